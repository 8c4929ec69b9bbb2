"""IntraSlice's two block steps (method.md sections 2 and 3) on the sequential pipeline.

Attention: pass A collects H = X^T X of the o_proj input and the post-RoPE |q k| means;
the plan (heads, width, RoPE pairs) comes from those; pass B reruns the attention with the
pruned Q/K to get H~ = X~^T X~ and X~^T X; the math then builds the V/O bases and the
corrected o_proj. MLP: pass C collects Z^T Z of the down_proj input with this layer's
attention already pruned (and keeps the residual after attention); the math keeps channels
and corrects down_proj. Statistics accumulate in float64 on the compute device; the math
receives them through ``ctx.math`` (the policy's math device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..algo.attention import (
    AttentionConstraints,
    AttentionPlan,
    attention_pair_variance,
    compress_attention,
    head_channel_mask,
    low_frequency_scores,
    plan_attention,
    qk_row_masks,
)
from ..algo.mlp import compress_mlp
from ..config import PruneConfig
from ..modeling import IntraSliceConfig
from ..modeling.modeling_intraslice import rotate_half
from ..pipeline.devices import ActivationStore
from ..pipeline.hooks import cross_gram, gram, hooks, masked_rows
from ..pipeline.modules import bias_of, install_attention, new_linear, row_linear
from ..pipeline.sequential import LayerContext
from .layerwise import AttentionDone, LayerwiseMethod, MLPDone


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_half RoPE on (B, T, heads, h) with (B|1, T, h) tables."""
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def qk_abs_sum(
    q_out: torch.Tensor, k_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_kv: int
) -> torch.Tensor:
    """sum over tokens of |q_ij k_g(i)j| after RoPE, (n_heads, h) float64, from q/k_proj outputs (B, T, .).

    Per token in the activation dtype (at least float32), summed in float64: the same
    rounding argument as pipeline.hooks.cross_gram's Decision.
    """
    q, k = _rotated_qk(q_out, k_out, cos, sin, n_kv)
    return (q * k.repeat_interleave(q.shape[2] // n_kv, dim=2)).abs().sum((0, 1), dtype=torch.float64)


def _rotated_qk(
    q_out: torch.Tensor, k_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_kv: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, n_heads, h) and k (B, T, n_kv, h) after RoPE, in the activation dtype (at least float32)."""
    b, t, _ = q_out.shape
    h = k_out.shape[-1] // n_kv
    work = torch.float64 if q_out.dtype == torch.float64 else torch.float32
    q = _rope(q_out.view(b, t, -1, h).to(work), cos, sin)
    k = _rope(k_out.view(b, t, n_kv, h).to(work), cos, sin)
    return q, k


#: Query positions per calibration window scored by the "attention" pair score.
#: **Decision**: 128, evenly spaced (position 0, which attends to itself only, left out):
#: the score is a mean over queries, and 128 rows cost about a sixteenth of full attention
#: at 2048 tokens while covering short and long ranges alike.
SCORED_QUERIES = 128


def scored_queries(t_len: int, device: torch.device | str) -> torch.Tensor:
    """The query positions of one window the attention pair score averages over."""
    n = min(SCORED_QUERIES, t_len - 1)
    return torch.linspace(0, t_len - 1, n + 1, device=device)[1:].round().long().unique()


def pair_statistic(
    rope_score: str, q_out: torch.Tensor, k_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_kv: int
) -> tuple[torch.Tensor, int]:
    """(sum of the per-dim pair statistic (n_heads, h) float64, how many terms it sums).

    Step D folds dims j and j + h/2 into one pair score, so scores given per pair
    ("attention", "low-frequency") are split evenly over the pair's two dims.
    """
    if rope_score == "qk":
        return qk_abs_sum(q_out, k_out, cos, sin, n_kv), q_out.shape[0] * q_out.shape[1]
    b, t, _ = q_out.shape
    h = k_out.shape[-1] // n_kv
    if rope_score == "low-frequency":
        pair = low_frequency_scores(q_out.shape[-1] // h, h).to(q_out.device) * (b * t)
        return torch.cat([pair, pair], dim=1) / 2, b * t
    q, k = _rotated_qk(q_out, k_out, cos, sin, n_kv)
    queries = scored_queries(t, q.device)
    pair = sum(attention_pair_variance(q[i], k[i], queries) for i in range(b))
    return torch.cat([pair, pair], dim=1) / 2, b * len(queries)


@dataclass
class AttentionStats:
    plan: AttentionPlan
    h_dense: torch.Tensor  # (d_o, d_o) float64, compute device
    h_tilde: torch.Tensor
    cross: torch.Tensor


@torch.no_grad()
def dense_attention_stats(ctx: LayerContext, rope_score: str) -> tuple[torch.Tensor, torch.Tensor, ActivationStore]:
    """Pass A: H = X^T X of the o_proj input, the pair statistic mu (:func:`pair_statistic`), and X.

    With the spec's score, mu[i, j] = mean |q_ij k_g(i)j| after RoPE.

    X (the unpruned o_proj input) is kept per batch where the policy keeps activations:
    pass B needs it token-aligned with the pruned attention output, and recomputing it
    would cost a pass.
    """
    q_proj, k_proj, _, o_proj = ctx.arch.qkvo(ctx.layer)
    n_h, n_kv, h = ctx.dims["n_heads"], ctx.dims["n_kv"], ctx.dims["head_dim"]
    d_o = n_h * h
    h_acc = torch.zeros(d_o, d_o, dtype=torch.float64, device=ctx.device)
    mu = torch.zeros(n_h, h, dtype=torch.float64, device=ctx.device)
    n_tok = 0
    xs = ctx.store("o_proj_inputs")
    slot: dict[str, torch.Tensor] = {}

    def on_q(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        slot["q"] = out

    def on_k(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        slot["k"] = out

    with hooks((q_proj, on_q, False), (k_proj, on_k, False)):
        for batch, kw in ctx.batches():
            x = ctx.input_of(o_proj, batch, kw)
            h_acc += gram(x)
            xs.append(x)
            stat, count = pair_statistic(rope_score, slot["q"], slot["k"], *kw["position_embeddings"], n_kv)
            mu += stat
            n_tok += count
    ctx.reduce(h_acc, mu)
    n_tok = ctx.reduce_count(n_tok)
    ctx.check_finite(h_acc, "the o_proj input covariance")
    ctx.check_finite(mu, "the q/k statistics")
    return h_acc, mu / max(n_tok, 1), xs


@torch.no_grad()
def pruned_attention_stats(
    ctx: LayerContext, plan: AttentionPlan, dense_x: ActivationStore
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass B: H~ = X~^T X~ and X~^T X on the same tokens (X~: pruned Q/K, deleted heads zeroed)."""
    q_proj, k_proj, _, o_proj = ctx.arch.qkvo(ctx.layer)
    q_mask, k_mask = qk_row_masks(plan)
    head_mask = ctx.policy.to_compute(head_channel_mask(plan))
    d_o = plan.n_heads * plan.head_dim
    h_t = torch.zeros(d_o, d_o, dtype=torch.float64, device=ctx.device)
    cross = torch.zeros_like(h_t)
    with masked_rows(q_proj, q_mask), masked_rows(k_proj, k_mask):
        for (batch, kw), x in zip(ctx.batches(), dense_x, strict=True):
            xt = ctx.input_of(o_proj, batch, kw).reshape(-1, d_o)
            xt = xt * head_mask.to(xt.dtype)  # 0/1: exact in any dtype
            h_t += gram(xt)
            cross += cross_gram(xt, x)
    ctx.reduce(h_t, cross)
    ctx.check_finite(h_t, "the pruned attention output covariance")
    return h_t, cross


class IntraSliceAttentionStep:
    """Head deletion, common width, RoPE pairs per KV group, V/O PCA with o_proj correction."""

    def __init__(self, cfg: PruneConfig) -> None:
        self.cfg = cfg
        #: Per-layer export constraints (``methods.deploy.prepare_constraints``); None: none.
        self.constraints: list[AttentionConstraints] | None = None

    def collect(self, ctx: LayerContext, att_ratio: float) -> AttentionStats:
        n_h, n_kv, h = ctx.dims["n_heads"], ctx.dims["n_kv"], ctx.dims["head_dim"]
        h_dense, mu, dense_x = dense_attention_stats(ctx, self.cfg.rope_score)
        keep = n_h * h - round(n_h * h * att_ratio)
        w_o = ctx.arch.qkvo(ctx.layer)[3].weight
        plan = plan_attention(
            ctx.math(h_dense),
            ctx.math(mu),
            ctx.math(w_o),
            n_h,
            n_kv,
            h,
            max(keep, 2),
            self.cfg.min_head_width,
            constraints=self.constraints[ctx.index] if self.constraints else None,
        )
        h_t, cross = pruned_attention_stats(ctx, plan, dense_x)
        dense_x.clear()
        return AttentionStats(plan, h_dense, h_t, cross)

    def compress(
        self, ctx: LayerContext, stats: AttentionStats, att_ratio: float, pruned: IntraSliceConfig
    ) -> AttentionDone:
        q_proj, k_proj, v_proj, o_proj = ctx.arch.qkvo(ctx.layer)
        plan = stats.plan
        comp = compress_attention(
            plan,
            ctx.math(stats.h_tilde),
            ctx.math(stats.cross),
            ctx.math(q_proj.weight),
            ctx.math(k_proj.weight),
            ctx.math(v_proj.weight),
            ctx.math(o_proj.weight),
            b_q=ctx.math(bias_of(q_proj)),
            b_k=ctx.math(bias_of(k_proj)),
            b_v=ctx.math(bias_of(v_proj)),
            damp=self.cfg.damp,
            h_dense=ctx.math(stats.h_dense) if self.cfg.diagnostics else None,
        )
        spec = {
            "num_heads": len(plan.kept_heads),
            "num_kv_heads": len(plan.kept_kv),
            "head_dim": plan.width,
            "kv_index": plan.kv_index(),
            "rope_pairs": [plan.pairs[kv] for kv in plan.kept_kv],
            "intermediate_size": ctx.dims["m"],
        }
        pruned.layers[ctx.index] = spec
        weights = ((comp.w_q, comp.b_q), (comp.w_k, comp.b_k), (comp.w_v, comp.b_v), (comp.w_o, bias_of(o_proj)))
        install_attention(ctx.arch, ctx.layer, pruned, ctx.index, spec, weights, ctx.dtype, ctx.device)
        return AttentionDone(spec, comp.rel_error)


@torch.no_grad()
def mlp_input_stats(ctx: LayerContext) -> tuple[torch.Tensor, ActivationStore]:
    """Pass C: H = Z^T Z of the down_proj input, with this layer's attention already pruned.

    Also keeps the residual stream after the (pruned) attention, so that the layer's
    outputs only need the pruned MLP block instead of the whole layer again.
    """
    _, _, down = ctx.arch.gate_up_down(ctx.layer)
    acc: dict[str, torch.Tensor] = {}
    mids = ctx.store("mids")

    def on_down(_m: nn.Module, args: tuple) -> None:
        g = gram(args[0])
        acc["h"] = acc["h"] + g if "h" in acc else g

    def on_mid(_m: nn.Module, args: tuple) -> None:
        mids.append(args[0])

    with hooks((down, on_down, True), (ctx.arch.mlp_input_module(ctx.layer), on_mid, True)):
        ctx.run()
    ctx.reduce(acc["h"])
    ctx.check_finite(acc["h"], "the down_proj input covariance")
    return acc["h"], mids


class IntraSliceMLPStep:
    """Keep MLP channels, least-squares correction folded into down_proj."""

    def __init__(self, cfg: PruneConfig) -> None:
        self.cfg = cfg

    def collect(self, ctx: LayerContext) -> tuple[torch.Tensor, ActivationStore]:
        return mlp_input_stats(ctx)

    def compress(self, ctx: LayerContext, stats: tuple[torch.Tensor, ActivationStore], keep: int) -> MLPDone:
        h_z, mids = stats
        gate, up, down = ctx.arch.gate_up_down(ctx.layer)
        mc = compress_mlp(ctx.math(h_z), ctx.math(down.weight), keep, self.cfg.damp)
        kept = ctx.policy.to_host(mc.kept)
        dtype, device = ctx.dtype, ctx.device
        ctx.arch.set_mlp_linears(
            ctx.layer,
            row_linear(gate, kept, dtype, device),
            row_linear(up, kept, dtype, device),
            new_linear(mc.w_down, bias_of(down), dtype, device),
        )
        return MLPDone(mids, mc.rel_error)


def intraslice_method(cfg: PruneConfig, pruned: IntraSliceConfig) -> LayerwiseMethod:
    return LayerwiseMethod("intraslice", cfg, pruned, IntraSliceAttentionStep(cfg), IntraSliceMLPStep(cfg))


__all__: list[Any] = ["IntraSliceAttentionStep", "IntraSliceMLPStep", "intraslice_method"]
