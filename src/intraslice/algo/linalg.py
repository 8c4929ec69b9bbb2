"""Float64 linear-algebra helpers shared by the attention and MLP math."""

from __future__ import annotations

import torch


def damping(mat: torch.Tensor, damp: float) -> float:
    """λ = damp · mean(diag(mat)), with a floor so an all-zero block stays solvable."""
    lam = float(damp) * float(torch.diagonal(mat).mean())
    return max(lam, 1e-12) if damp > 0 else 0.0


def eigh_desc(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a symmetric matrix, by decreasing eigenvalue (float64)."""
    vals, vecs = torch.linalg.eigh(mat.to(torch.float64))
    return vals.flip(0), vecs.flip(1)


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a x = b for a symmetric positive (semi-)definite, float64, robustly.

    Cholesky first; if the damped matrix is still numerically singular fall back to lstsq
    so that a degenerate calibration set degrades the correction instead of crashing.
    """
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.lstsq(a, b).solution
