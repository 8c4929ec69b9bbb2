"""Float64 linear-algebra helpers shared by the attention and MLP math."""

from __future__ import annotations

from collections.abc import Callable

import torch


def damping(mat: torch.Tensor, damp: float) -> float:
    """λ = damp · mean(diag(mat)), with a floor so an all-zero block stays solvable."""
    lam = float(damp) * float(torch.diagonal(mat).mean())
    return max(lam, 1e-12) if damp > 0 else 0.0


#: Components within this relative distance of an eigenvector's largest magnitude count as
#: tied for :func:`canonical_signs` (rounding differs between LAPACK builds, not this much).
SIGN_TIE_RTOL = 1e-8


def canonical_signs(vecs: torch.Tensor) -> torch.Tensor:
    """Eigenvectors (columns, batched over leading dims) with a sign fixed by their values.

    An eigenvector is defined up to its sign, and LAPACK builds (OpenBLAS, MKL, cuSOLVER)
    return either. Each column is flipped so that its largest-magnitude component is
    positive; among components tied to ``SIGN_TIE_RTOL`` (e.g. the (1, -1)/sqrt(2) of a
    symmetric pair) the first one decides, so a rounding difference between builds cannot
    move the choice. Bases, the allocations and saved weights computed from them are then
    the same whatever the build (up to rounding). Not fixed: the basis of a repeated
    eigenvalue, which no sign convention can make unique.
    """
    mag = vecs.abs()
    top = mag.amax(dim=-2, keepdim=True)
    first = (mag >= top * (1 - SIGN_TIE_RTOL)).to(torch.int8).argmax(dim=-2, keepdim=True)
    signs = torch.gather(vecs, -2, first).sign()
    return vecs * torch.where(signs == 0, torch.ones_like(signs), signs)


def eigh_desc(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a symmetric matrix (or a batch of them), by decreasing
    eigenvalue, with :func:`canonical_signs` (float64)."""
    vals, vecs = torch.linalg.eigh(mat.to(torch.float64))
    return vals.flip(-1), canonical_signs(vecs.flip(-1))


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a x = b for a symmetric positive (semi-)definite, float64, robustly.

    Cholesky first; if the damped matrix is still numerically singular fall back to lstsq
    so that a degenerate calibration set degrades the correction instead of crashing.
    """
    a = a.to(torch.float64)
    return solve_spd_consuming(a.clone(), b.to(torch.float64), lambda: a)


def solve_spd_consuming(a: torch.Tensor, b: torch.Tensor, rebuild: Callable[[], torch.Tensor]) -> torch.Tensor:
    """:func:`solve_spd` that factors ``a`` in place (``a`` is overwritten by its Cholesky factor).

    Why: for the MLP correction ``a`` is (keep x keep) float64, up to m^2 x 8 bytes (6 GiB for
    a 28672-wide MLP); factoring into a second matrix doubled that. The lstsq fallback needs
    the matrix itself, so ``rebuild()`` makes it again (only on that rare path).
    """
    info = torch.empty((), dtype=torch.int32, device=a.device)
    chol, info = torch.linalg.cholesky_ex(a, out=(a, info))
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.lstsq(rebuild(), b).solution
