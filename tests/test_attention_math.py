"""The attention math of method.md section 2, checked on synthetic data."""

from __future__ import annotations

import math

import torch

from intraslice.algo.attention import (
    AttentionPlan,
    compress_attention,
    pair_dims,
    plan_attention,
    qk_row_masks,
    select_heads,
    select_rope_pairs,
)
from intraslice.modeling.modeling_intraslice import rotate_half

f64 = torch.float64


def rope_tables(t: int, h: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (base ** (torch.arange(0, h, 2, dtype=f64) / h))
    freqs = torch.arange(t, dtype=f64)[:, None] * inv
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def test_selecting_whole_rope_pairs_commutes_with_rope() -> None:
    torch.manual_seed(0)
    t, h = 12, 16
    cos, sin = rope_tables(t, h)
    q, k = torch.randn(t, h, dtype=f64), torch.randn(t, h, dtype=f64)
    pairs = [1, 4, 5, 7]
    dims = pair_dims(pairs, h)
    # Select then rotate with the kept frequencies ...
    cos_k = torch.cat((cos[:, pairs], cos[:, pairs]), -1)
    sin_k = torch.cat((sin[:, pairs], sin[:, pairs]), -1)
    sel_then_rope = apply_rope(q[:, dims], cos_k, sin_k)
    # ... equals rotate then select.
    rope_then_sel = apply_rope(q, cos, sin)[:, dims]
    torch.testing.assert_close(sel_then_rope, rope_then_sel, atol=1e-14, rtol=0)
    # and the pruned scores equal the scores restricted to the kept pairs.
    scores_pruned = apply_rope(q[:, dims], cos_k, sin_k) @ apply_rope(k[:, dims], cos_k, sin_k).T
    mask = torch.zeros(h, dtype=torch.bool)
    mask[dims] = True
    scores_masked = apply_rope(q * mask, cos, sin) @ apply_rope(k * mask, cos, sin).T
    torch.testing.assert_close(scores_pruned, scores_masked, atol=1e-12, rtol=0)


def test_scale_folding_keeps_scores_identical() -> None:
    """sqrt(r/h) folded into W_q makes 1/sqrt(r) act as the source's 1/sqrt(h)."""
    torch.manual_seed(1)
    d, h, r = 32, 16, 10
    w_q, w_k = torch.randn(h, d, dtype=f64), torch.randn(h, d, dtype=f64)
    x = torch.randn(7, d, dtype=f64)
    plan = AttentionPlan(n_heads=1, n_kv=1, head_dim=h, kept_heads=[0], width=r, pairs={0: [0, 2, 3, 5, 6]})
    comp = compress_attention(
        plan,
        torch.eye(h, dtype=f64),
        torch.eye(h, dtype=f64),
        w_q,
        w_k,
        torch.randn(h, d, dtype=f64),
        torch.randn(d, h, dtype=f64),
    )
    dims = pair_dims(plan.pairs[0], h)
    source = (x @ w_q[dims].T) @ (x @ w_k[dims].T).T / math.sqrt(h)
    pruned = (x @ comp.w_q.T) @ (x @ comp.w_k.T).T / math.sqrt(r)
    torch.testing.assert_close(pruned, source, atol=1e-12, rtol=0)


def _low_rank_heads(n_tok: int, n_heads: int, n_kv: int, h: int, r: int, seed: int = 0) -> torch.Tensor:
    """o_proj inputs whose heads in one KV group share an r-dim subspace (true for V under GQA)."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    bases = [torch.linalg.qr(torch.randn(h, r, generator=g, dtype=f64))[0] for _ in range(n_kv)]
    for i in range(n_heads):
        coeff = torch.randn(n_tok, r, generator=g, dtype=f64)
        blocks.append(coeff @ bases[i // (n_heads // n_kv)].T)
    return torch.cat(blocks, 1)


def test_vo_pca_and_correction_recover_low_rank_output() -> None:
    n_heads, n_kv, h, r, d = 4, 2, 16, 8, 24
    x = _low_rank_heads(400, n_heads, n_kv, h, r)
    g = torch.Generator().manual_seed(3)
    w_o = torch.randn(d, n_heads * h, generator=g, dtype=f64)
    w_v = torch.randn(n_kv * h, d, generator=g, dtype=f64)
    w_qk = torch.randn(n_heads * h, d, generator=g, dtype=f64)
    plan = AttentionPlan(
        n_heads, n_kv, h, kept_heads=[0, 1, 2, 3], width=r, pairs={0: list(range(r // 2)), 1: list(range(r // 2))}
    )
    hx = x.T @ x
    comp = compress_attention(plan, hx, hx, w_qk, w_qk[: n_kv * h], w_v, w_o, damp=0.0, h_dense=hx)
    # The pruned V of KV group g is U_g^T v, so each kept head's o_proj input is X_i U_g.
    for a in range(n_kv):
        torch.testing.assert_close(comp.w_v[a * r : (a + 1) * r], comp.bases[a].T @ w_v[a * h : (a + 1) * h])
    y = torch.cat([x[:, i * h : (i + 1) * h] @ comp.bases[i // 2] for i in range(n_heads)], 1)
    torch.testing.assert_close(y @ comp.w_o.T, x @ w_o.T, atol=1e-8, rtol=0)
    assert comp.rel_error is not None and comp.rel_error < 1e-12


def test_correction_beats_plain_projection_when_heads_are_deleted() -> None:
    """With a head deleted, least squares moves its contribution onto correlated kept heads."""
    torch.manual_seed(4)
    n_heads, h, d = 3, 8, 12
    base = torch.randn(500, h, dtype=f64)
    x = torch.cat([base, base @ torch.randn(h, h, dtype=f64) * 0.5, torch.randn(500, h, dtype=f64)], 1)
    w_o = torch.randn(d, n_heads * h, dtype=f64)
    plan = AttentionPlan(n_heads, n_heads, h, kept_heads=[0, 2], width=h, pairs={0: list(range(4)), 2: list(range(4))})
    xt = x.clone()
    xt[:, h : 2 * h] = 0
    comp = compress_attention(
        plan,
        xt.T @ xt,
        xt.T @ x,
        torch.randn(24, d, dtype=f64),
        torch.randn(24, d, dtype=f64),
        torch.randn(24, d, dtype=f64),
        w_o,
        damp=1e-9,
        h_dense=x.T @ x,
    )
    assert comp.rel_error is not None and comp.rel_error < 1e-8  # head 1 is a linear function of head 0


def test_head_selection_keeps_everything_at_full_budget() -> None:
    torch.manual_seed(5)
    h_mat = torch.randn(64, 64, dtype=f64)
    h_mat = h_mat @ h_mat.T
    plan = plan_attention(h_mat, torch.rand(4, 16, dtype=f64), torch.randn(8, 64, dtype=f64), 4, 2, 16, keep=64)
    assert plan.kept_heads == [0, 1, 2, 3] and plan.width == 16
    assert all(p == list(range(8)) for p in plan.pairs.values())


def test_head_selection_deletes_weak_heads_and_respects_min_width() -> None:
    n_heads, h = 8, 16
    scores = torch.ones(n_heads * h, dtype=f64)
    scores[:h] = 1e-6  # head 0 is useless
    spectra = torch.full((n_heads, h), 1.0 / h, dtype=f64)
    kept, r = select_heads(scores, spectra, keep=64, min_width_frac=0.75)
    assert 0 not in kept
    assert r % 2 == 0 and r >= 12 and r <= h
    assert len(kept) * r <= 64 + len(kept)  # budget within the even-width rounding


def test_pairs_shared_per_kv_group_and_masks() -> None:
    mu = torch.rand(4, 8, dtype=f64)
    pairs = select_rope_pairs(mu, kept_heads=[0, 1, 3], n_kv=2, width=4)
    assert set(pairs) == {0, 1} and all(len(p) == 2 for p in pairs.values())
    sigma0 = mu[0, :4] + mu[0, 4:] + mu[1, :4] + mu[1, 4:]
    assert pairs[0] == sorted(torch.topk(sigma0, 2).indices.tolist())
    plan = AttentionPlan(4, 2, 8, kept_heads=[0, 1, 3], width=4, pairs=pairs)
    q_mask, k_mask = qk_row_masks(plan)
    assert int(q_mask.sum()) == 3 * 4 and int(k_mask.sum()) == 2 * 4
    assert not q_mask[16:24].any()  # deleted head 2
    assert plan.kv_index() == [0, 0, 1]
