"""IntraSlice MLP math (method.md section 3), as pure functions of statistics and weights.

Z = act(X W_gate^T) * (X W_up^T) is the down_proj input (computed with this layer's
attention already pruned). A SiLU/GELU between the producer and the consumer forbids a
rotation, so the compression matrix is a 0/1 selection S of kept channels K, and the
dropped channels are regressed onto the kept ones (Nystrom-like):

    R = (S^T H S + λI)^{-1} (S^T H + λ S^T),   W_down <- W_down R^T,

with H = Z^T Z (float64). Adding λ to both sides keeps R[:, K] = I exactly, so the ridge
only shrinks the *reconstruction of the dropped channels* and ratio 0 is lossless; the
code solves for the dropped columns R_D = (H_KK + λI)^{-1} H_KD alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .linalg import damping, solve_spd_consuming


def mlp_keep_count(width: int, ratio: float, multiple: int = 8) -> int:
    """k = m - n_drop with n_drop = round(m * ratio) rounded to a multiple of ``multiple``."""
    n_drop = round(width * ratio / multiple) * multiple
    n_drop = min(max(n_drop, 0), width - multiple if width > multiple else width - 1)
    return width - n_drop


@dataclass
class CompressedMLP:
    """Kept channels (ascending), the new down_proj weight (float64), and a diagnostic."""

    kept: torch.Tensor
    w_down: torch.Tensor
    rel_error: float | None = None


def compress_mlp(h: torch.Tensor, w_down: torch.Tensor, keep: int, damp: float = 0.01) -> CompressedMLP:
    """Select ``keep`` channels by s_j = ||W_down[:, j]||^2 H_jj and fold the correction."""
    f64 = torch.float64
    h = h.to(f64)
    w = w_down.to(f64)
    m = h.shape[0]
    if not 0 < keep <= m:
        raise ValueError(f"MLP keep count {keep} outside (0, {m}]")
    scores = w.pow(2).sum(0) * torch.diagonal(h)
    kept = torch.topk(scores, keep).indices.sort().values
    lam = damping(h, damp)
    # R's kept columns are exactly I (λ on both sides), so only its dropped columns
    # R_D = (H_KK + λI)^{-1} H_KD are solved for and W_down R^T = W_K + W_D R_D^T. Solving for
    # the (keep x m-keep) block instead of the whole (keep x m) R, adding λ to H_KK's diagonal
    # in place and factoring H_KK in place keeps the float64 working set at most m^2 (the
    # largest term of the prune stage's host peak on CPU).
    dropped = torch.ones(m, dtype=torch.bool, device=h.device)
    dropped[kept] = False
    dropped = dropped.nonzero().squeeze(1)
    new_down = w[:, kept]
    if dropped.numel():
        rows = kept.unsqueeze(1)  # gathered blocks, without a (keep x m) intermediate

        def damped_kk() -> torch.Tensor:
            a = h[rows, kept]
            a.diagonal().add_(lam)
            return a

        r_d = solve_spd_consuming(damped_kk(), h[rows, dropped], damped_kk)  # (keep, m - keep)
        new_down += w[:, dropped] @ r_d.T
        del r_d
    # ||Z W^T - Z S R W^T||^2 = tr(D H D^T), D = W - W R^T S^T.
    ref = float(torch.einsum("ij,ij->", w @ h, w))
    d = w.clone()
    d[:, kept] -= new_down
    err = float(torch.einsum("ij,ij->", d @ h, d))
    rel = max(err, 0.0) / ref if ref > 0 else 0.0
    return CompressedMLP(kept=kept, w_down=new_down, rel_error=rel)
