"""IntraSlice attention math (method.md section 2), as pure functions of statistics and weights.

Layout conventions (Hugging Face): ``W_q`` is (n_heads*h, d), head-major rows; ``W_k`` and
``W_v`` are (n_kv*h, d); ``W_o`` is (d, n_heads*h). Query head i reads KV head i // g,
g = n_heads / n_kv. RoPE is "rotate_half": dim j pairs with dim j + h/2.

Pipeline for one layer:

1. :func:`plan_attention` (steps A-D): from the o_proj input covariance H, W_o and the
   post-RoPE |q_j k_j| means, decide which query heads survive, the common width r, and
   which RoPE pairs each surviving KV group keeps.
2. The runner recomputes the attention output with the pruned Q/K (:func:`qk_row_masks`)
   and collects H~ = X~^T X~ and X~^T X (X = unpruned o_proj input).
3. :func:`compress_attention` (steps E-G): per-KV-group PCA of V/O, least-squares
   correction folded into o_proj, and the new physically smaller weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .linalg import damping, eigh_desc, solve_spd


@dataclass
class AttentionPlan:
    """Which heads, which width, which RoPE pairs (the result of steps A-D)."""

    n_heads: int
    n_kv: int
    head_dim: int
    kept_heads: list[int]
    width: int
    #: kept RoPE pair indices (ascending, each < head_dim/2) per surviving KV head
    pairs: dict[int, list[int]] = field(default_factory=dict)

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def kept_kv(self) -> list[int]:
        return sorted({i // self.group for i in self.kept_heads})

    def kv_index(self) -> list[int]:
        """For each kept query head, the position of its KV head among the kept KV heads."""
        pos = {kv: a for a, kv in enumerate(self.kept_kv)}
        return [pos[i // self.group] for i in self.kept_heads]


def channel_scores(h_diag: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """Step A: s_j = ||W_o[:, j]||^2 * H_jj (float64)."""
    return w_o.to(torch.float64).pow(2).sum(0) * h_diag.to(torch.float64)


def head_spectra(h: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Step B: per-head eigenvalues of the diagonal blocks of H, decreasing, normalised to sum 1."""
    out = torch.zeros(n_heads, head_dim, dtype=torch.float64, device=h.device)
    for i in range(n_heads):
        blk = h[i * head_dim : (i + 1) * head_dim, i * head_dim : (i + 1) * head_dim]
        vals = eigh_desc(blk)[0].clamp_min(0)
        total = vals.sum()
        out[i] = vals / total if total > 0 else torch.full_like(vals, 1.0 / head_dim)
    return out


def select_heads(
    scores: torch.Tensor,
    spectra: torch.Tensor,
    keep: int,
    min_width_frac: float = 0.75,
) -> tuple[list[int], int]:
    """Step C: delete whole heads, return (kept heads ascending, common even width r).

    ``keep`` is the channel budget K of the o_proj input. Heads that win few of the top-K
    channels are deleted first; then heads are deleted greedily while the captured
    spectrum J(D, r) = sum_{i not in D} sum_{k <= r} S[i, k] (r = K / #remaining) grows;
    finally heads are deleted until r >= min_width_frac * h.
    """
    n_heads, head_dim = spectra.shape
    total = n_heads * head_dim
    if not 0 < keep <= total:
        raise ValueError(f"channel budget {keep} outside (0, {total}]")
    if keep == total:
        return list(range(n_heads)), head_dim
    per_head_channels = torch.zeros(n_heads, dtype=torch.long, device=scores.device)
    top = torch.topk(scores, keep).indices
    per_head_channels.index_add_(0, top // head_dim, torch.ones_like(top))
    head_mass = scores.view(n_heads, head_dim).sum(1)
    s_mat = spectra * head_mass[:, None]  # S[i, k]
    cum = torch.cat([torch.zeros(n_heads, 1, dtype=torch.float64, device=s_mat.device), s_mat.cumsum(1)], dim=1)

    def width(n_rem: int) -> int:
        return min(head_dim, keep // n_rem)

    def objective(rem: list[int]) -> float:
        return float(cum[rem, width(len(rem))].sum())

    min_needed = math.ceil(keep / head_dim)  # r <= h
    threshold = keep // n_heads // 4
    remaining = [i for i in range(n_heads) if per_head_channels[i] >= threshold]
    if len(remaining) < min_needed:  # never delete so many that r would exceed h
        order = torch.argsort(head_mass, descending=True).tolist()
        remaining = sorted(order[:min_needed])

    def least_important(rem: list[int]) -> int:
        r = width(len(rem))
        return min(rem, key=lambda i: (float(cum[i, r]), i))

    while len(remaining) - 1 >= max(min_needed, 1):
        victim = least_important(remaining)
        candidate = [i for i in remaining if i != victim]
        if objective(candidate) > objective(remaining):
            remaining = candidate
        else:
            break
    while len(remaining) > 1 and keep / len(remaining) < min_width_frac * head_dim:
        remaining.remove(least_important(remaining))

    r = keep / len(remaining)
    r_even = round(r / 2.0) * 2
    r_even = max(2, min(head_dim, r_even))
    return sorted(remaining), r_even


def select_rope_pairs(
    qk_mean: torch.Tensor,
    kept_heads: list[int],
    n_kv: int,
    width: int,
) -> dict[int, list[int]]:
    """Step D: per surviving KV group, keep the r/2 RoPE pairs with the largest sigma.

    ``qk_mean`` is (n_heads, h): mu[i, j] = mean_t |q_ij(t) k_g(i)j(t)| after RoPE. Pairs
    (j, j + h/2) are scored together and summed over the group's surviving query heads, so
    one pair set serves the whole group and the selection commutes with RoPE.
    """
    n_heads, head_dim = qk_mean.shape
    half = head_dim // 2
    g = n_heads // n_kv
    sigma_head = qk_mean[:, :half] + qk_mean[:, half:]
    pairs: dict[int, list[int]] = {}
    for kv in sorted({i // g for i in kept_heads}):
        members = [i for i in kept_heads if i // g == kv]
        sigma = sigma_head[members].sum(0)
        top = torch.topk(sigma.to(torch.float64), width // 2).indices
        pairs[kv] = sorted(int(p) for p in top)
    return pairs


def plan_attention(
    h: torch.Tensor,
    qk_mean: torch.Tensor,
    w_o: torch.Tensor,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    keep: int,
    min_width_frac: float = 0.75,
) -> AttentionPlan:
    """Steps A-D for one layer."""
    scores = channel_scores(torch.diagonal(h), w_o)
    spectra = head_spectra(h, n_heads, head_dim)
    kept, r = select_heads(scores, spectra, keep, min_width_frac)
    pairs = select_rope_pairs(qk_mean, kept, n_kv, r)
    return AttentionPlan(n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, kept_heads=kept, width=r, pairs=pairs)


def pair_dims(pairs: list[int], head_dim: int) -> list[int]:
    """Head-local dims kept for a pair set, in the pruned rotate_half order."""
    half = head_dim // 2
    return list(pairs) + [p + half for p in pairs]


def qk_row_masks(plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean row masks of W_q and W_k that keep exactly the planned dims (deleted heads: none).

    Zeroing the other rows reproduces the pruned Q/K scores at the source scale
    1/sqrt(h): the runner uses this to compute X~ on the unmodified module.
    """
    h, g = plan.head_dim, plan.group
    q_mask = torch.zeros(plan.n_heads * h, dtype=torch.bool)
    k_mask = torch.zeros(plan.n_kv * h, dtype=torch.bool)
    for kv, pairs in plan.pairs.items():
        dims = torch.tensor(pair_dims(pairs, h))
        k_mask[kv * h + dims] = True
    for i in plan.kept_heads:
        dims = torch.tensor(pair_dims(plan.pairs[i // g], h))
        q_mask[i * h + dims] = True
    return q_mask, k_mask


def head_channel_mask(plan: AttentionPlan) -> torch.Tensor:
    """Boolean mask of the o_proj input channels belonging to kept heads."""
    mask = torch.zeros(plan.n_heads * plan.head_dim, dtype=torch.bool)
    for i in plan.kept_heads:
        mask[i * plan.head_dim : (i + 1) * plan.head_dim] = True
    return mask


@dataclass
class CompressedAttention:
    """New weights (float64) of a pruned attention, plus diagnostics."""

    w_q: torch.Tensor
    b_q: torch.Tensor | None
    w_k: torch.Tensor
    b_k: torch.Tensor | None
    w_v: torch.Tensor
    b_v: torch.Tensor | None
    w_o: torch.Tensor
    rel_error: float | None = None
    #: per kept KV head, the (h, r) PCA basis U_g fused into v_proj
    bases: dict[int, torch.Tensor] = field(default_factory=dict)


def compress_attention(
    plan: AttentionPlan,
    h_tilde: torch.Tensor,
    cross: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_o: torch.Tensor,
    b_q: torch.Tensor | None = None,
    b_k: torch.Tensor | None = None,
    b_v: torch.Tensor | None = None,
    damp: float = 0.01,
    h_dense: torch.Tensor | None = None,
) -> CompressedAttention:
    """Steps E-G: V/O PCA per KV group, least-squares correction, scale folding.

    ``h_tilde`` = X~^T X~ and ``cross`` = X~^T X (float64, n_heads*h square), where X~ is
    the o_proj input with the planned Q/K and the deleted heads zeroed and X the unpruned
    o_proj input on the same tokens.

    The correction is solved in the compressed space Y = X~ C:
    B = argmin ||X - Y B||^2 + λ||B - C^T||^2 = (Y^T Y + λI)^{-1}(Y^T X + λ C^T).
    **Decision**: the ridge pulls towards the uncorrected projection C^T rather than
    towards 0, so at ratio 0 (C square orthogonal, X~ = X) B = C^T exactly and pruning is
    lossless; the spec's X^ = X~ C C^T formulation gives the same W_o up to this ridge.
    ``W_o <- W_o B^T``. If ``h_dense`` (X^T X) is given, the relative output error
    ||X W_o^T - Y B W_o^T||^2 / ||X W_o^T||^2 is returned as a diagnostic.
    """
    f64 = torch.float64
    h, g, r = plan.head_dim, plan.group, plan.width
    kept, kept_kv = plan.kept_heads, plan.kept_kv
    n_keep = len(kept)

    # E. per-KV-group PCA basis of the pruned attention output.
    bases: dict[int, torch.Tensor] = {}
    for kv in kept_kv:
        blk = torch.zeros(h, h, dtype=f64, device=h_tilde.device)
        for i in kept:
            if i // g == kv:
                blk += h_tilde[i * h : (i + 1) * h, i * h : (i + 1) * h]
        bases[kv] = eigh_desc(blk)[1][:, :r]
    c = torch.zeros(plan.n_heads * h, n_keep * r, dtype=f64, device=h_tilde.device)
    for a, i in enumerate(kept):
        c[i * h : (i + 1) * h, a * r : (a + 1) * r] = bases[i // g]

    # F. least-squares correction folded into o_proj.
    yty = c.T @ h_tilde.to(f64) @ c
    ytx = c.T @ cross.to(f64)
    lam = damping(yty, damp)
    eye = torch.eye(n_keep * r, dtype=f64, device=h_tilde.device)
    b = solve_spd(yty + lam * eye, ytx + lam * c.T)
    w_o64 = w_o.to(f64)
    new_o = w_o64 @ b.T

    rel_error = None
    if h_dense is not None:
        hd = h_dense.to(f64)
        wtw = w_o64.T @ w_o64
        ref = float((wtw * hd).sum())
        # ||X W^T - Y B W^T||^2 = tr(W H W^T) - 2 tr(W B^T Y^T X W^T) + tr(W B^T Y^T Y B W^T)
        term_cross = float(((b.T @ ytx) * wtw).sum())
        term_quad = float(((b.T @ yty @ b) * wtw).sum())
        err = ref - 2.0 * term_cross + term_quad
        rel_error = max(err, 0.0) / ref if ref > 0 else 0.0

    # V: U_g^T W_v,g per kept KV head.
    new_v = torch.cat([bases[kv].T @ w_v.to(f64)[kv * h : (kv + 1) * h] for kv in kept_kv])
    new_bv = None
    if b_v is not None:
        new_bv = torch.cat([bases[kv].T @ b_v.to(f64)[kv * h : (kv + 1) * h] for kv in kept_kv])

    # D/G. Q/K keep whole RoPE pairs; q rows absorb sqrt(r/h) so 1/sqrt(r) acts as 1/sqrt(h).
    scale = math.sqrt(r / h)
    q_rows = torch.cat([torch.tensor(pair_dims(plan.pairs[i // g], h)) + i * h for i in kept])
    k_rows = torch.cat([torch.tensor(pair_dims(plan.pairs[kv], h)) + kv * h for kv in kept_kv])
    new_q = w_q.to(f64)[q_rows] * scale
    new_bq = b_q.to(f64)[q_rows] * scale if b_q is not None else None
    new_k = w_k.to(f64)[k_rows]
    new_bk = b_k.to(f64)[k_rows] if b_k is not None else None
    return CompressedAttention(new_q, new_bq, new_k, new_bk, new_v, new_bv, new_o, rel_error, bases)
