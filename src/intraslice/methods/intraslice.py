"""IntraSlice's two block steps (method.md sections 2 and 3) on the sequential pipeline.

Attention: pass A collects H = X^T X of the o_proj input and the post-RoPE |q k| means;
the plan (heads, width, RoPE pairs) comes from those; pass B reruns the attention with the
pruned Q/K to get H~ = X~^T X~ and X~^T X (and keeps X~); the math then builds the V/O
bases and the corrected o_proj, and the pruned attention's output follows from the kept X~
by one product (``algo.attention.output_map``). MLP: pass C collects Z^T Z of the down_proj
input from the residual after the pruned attention; the math keeps channels and corrects
down_proj. Statistics accumulate in float64 on the compute device; the math
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
    CachePrice,
    attention_pair_variance,
    compress_attention,
    head_channel_mask,
    low_frequency_scores,
    output_map,
    plan_attention,
    qk_row_masks,
)
from ..algo.mlp import compress_mlp
from ..config import PruneConfig
from ..modeling import IntraSliceConfig
from ..modeling.configuration_intraslice import unpruned_layer
from ..modeling.modeling_intraslice import rotate_half
from ..pipeline.devices import ActivationStore
from ..pipeline.hooks import cross_gram, gram, hooks, input_of_call, masked_rows
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
    #: X~ per batch (pass B's o_proj input, deleted heads zeroed), for the attention output.
    pruned_x: ActivationStore


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
) -> tuple[torch.Tensor, torch.Tensor, ActivationStore]:
    """Pass B: H~ = X~^T X~ and X~^T X on the same tokens (X~: pruned Q/K, deleted heads zeroed), and X~.

    X~ replaces X batch by batch in the activation store (each X batch is released once
    used), so the pass holds no more activations than pass A did.
    """
    q_proj, k_proj, _, o_proj = ctx.arch.qkvo(ctx.layer)
    q_mask, k_mask = qk_row_masks(plan)
    head_mask = ctx.policy.to_compute(head_channel_mask(plan))
    d_o = plan.n_heads * plan.head_dim
    h_t = torch.zeros(d_o, d_o, dtype=torch.float64, device=ctx.device)
    cross = torch.zeros_like(h_t)
    xts = ctx.store("o_proj_pruned_inputs")
    keep_xt = not ctx.arch.parallel_block  # a parallel block's MLP reads x, not the attention output
    seen = 0
    with masked_rows(q_proj, q_mask), masked_rows(k_proj, k_mask):
        for i, (batch, kw) in enumerate(ctx.batches()):
            xt = ctx.input_of(o_proj, batch, kw)
            xt = xt * head_mask.to(xt.dtype)  # 0/1: exact in any dtype
            h_t += gram(xt)
            cross += cross_gram(xt, dense_x[i])
            dense_x.release(i)
            if keep_xt:
                xts.append(xt)
            seen += 1
    if seen != len(dense_x):
        raise RuntimeError("pass B saw a different number of batches than pass A")
    ctx.reduce(h_t, cross)
    ctx.check_finite(h_t, "the pruned attention output covariance")
    return h_t, cross, xts


class IntraSliceAttentionStep:
    """Head deletion, common width, RoPE pairs per KV group, V/O PCA with o_proj correction."""

    def __init__(self, cfg: PruneConfig) -> None:
        self.cfg = cfg
        #: Per-layer export constraints (``methods.deploy.prepare_constraints``); None: none.
        self.constraints: list[AttentionConstraints] | None = None

    def collect(self, ctx: LayerContext, att_ratio: float) -> AttentionStats | None:
        """Passes A-B and the plan; None when the layer keeps its whole attention.

        Why None: at ratio 0 every head stays at full width with every pair, and the V/O basis
        and its damped correction are exactly lossless (method.md 2.E), so the statistics
        would only reproduce the weights. Under the default attention share 0 that is every
        layer, and the passes cost more than the MLP step (BENCHMARKS.md, "Quick start").
        Export constraints (a common width or pair set) may shrink even a ratio-0 layer.
        """
        if att_ratio == 0 and self.constraints is None:
            return None
        n_h, n_kv, h = ctx.dims["n_heads"], ctx.dims["n_kv"], ctx.dims["head_dim"]
        h_dense, mu, dense_x = dense_attention_stats(ctx, self.cfg.rope_score)
        keep = n_h * h - round(n_h * h * att_ratio)
        price = CachePrice(float(self.cfg.kv_weight), int(ctx.dims["d"])) if self.cfg.kv_weight else None
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
            price=price,
            budget=None if price is None else (1.0 - att_ratio) * price.cost(n_h, n_kv, h),
        )
        h_t, cross, xts = pruned_attention_stats(ctx, plan, dense_x)
        dense_x.clear()
        return AttentionStats(plan, h_dense, h_t, cross, xts)

    def compress(
        self, ctx: LayerContext, stats: AttentionStats | None, att_ratio: float, pruned: IntraSliceConfig
    ) -> AttentionDone:
        q_proj, k_proj, v_proj, o_proj = ctx.arch.qkvo(ctx.layer)
        if stats is None:  # the whole attention kept: its own weights in the pruned model's module
            d = ctx.dims
            spec = unpruned_layer(d["n_heads"], d["n_kv"], d["head_dim"], d["m"])
            pruned.layers[ctx.index] = spec
            weights = tuple((m.weight, bias_of(m)) for m in (q_proj, k_proj, v_proj, o_proj))
            install_attention(ctx.arch, ctx.layer, pruned, ctx.index, spec, weights, ctx.dtype, ctx.device)
            return AttentionDone(spec, 0.0, None)  # no mids: the MLP step runs the layer for them
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
        mids = None
        if not ctx.arch.parallel_block:
            with ctx.timed("attention_output"):
                mids = attention_residuals(ctx, output_map(plan, comp), bias_of(o_proj), stats.pruned_x)
        stats.pruned_x.clear()
        return AttentionDone(spec, comp.rel_error, mids)


@torch.no_grad()
def attention_residuals(
    ctx: LayerContext, w_eff: torch.Tensor, b_o: torch.Tensor | None, pruned_x: ActivationStore
) -> ActivationStore:
    """The residual after the pruned attention, per batch, from pass B's X~ (no attention pass).

    **Decision (pass C reuses pass B):** the pruned attention's output is X~ (W_o' C^T)^T + b_o
    (``algo.attention.output_map``), the same function the installed modules compute, so
    the MLP statistics and the layer's outputs are taken on it instead of rerunning q/k/v,
    the attention and o_proj: about a fifth of the pruning time on SmolLM2. It differs from
    running the installed modules only by rounding (one product instead of v_proj's basis
    then o_proj, in the model's dtype); the float64 tests bound it against the pruned
    module's own forward.
    """
    w = ctx.policy.to_compute(w_eff.to(ctx.dtype))  # cast first: no float64 copy on the device
    b = ctx.policy.to_compute(b_o.to(ctx.dtype)) if b_o is not None else None
    mids = ctx.store("mids")
    for i, (batch, _kw) in enumerate(ctx.batches()):
        xt = pruned_x[i]
        mids.append(ctx.arch.attention_residual(ctx.layer, batch, torch.nn.functional.linear(xt, w, b)))
        pruned_x.release(i)
    return mids


def head_positions(z: torch.Tensor, skip: int) -> torch.Tensor:
    """``z`` (batch, positions, channels) without its last ``skip`` positions."""
    return z[..., : z.shape[-2] - skip, :] if skip else z


@torch.no_grad()
def mlp_input_stats(
    ctx: LayerContext, mids: ActivationStore | None = None, skip: int = 0
) -> tuple[torch.Tensor, ActivationStore]:
    """Pass C: H = Z^T Z of the down_proj input, with this layer's attention already pruned.

    ``mids`` (the residual after the pruned attention, from the attention step) makes this
    an MLP-only pass that stops at down_proj. Without them (a parallel block) the whole
    layer runs, and the residual after attention is kept here, so that the layer's outputs
    only need the pruned MLP block instead of the whole layer again.

    ``skip``: H leaves out each window's last ``skip`` positions (``--calib-repeat-in
    attention``, issue #14): the attention step fits on the repeated span, the MLP's channel
    choice and correction on the text alone, while the layer's outputs (the next layer's
    inputs) still cover every position. An option, off: measured on Qwen2.5-Coder-0.5B at
    0.3 it was worse on perplexity and copying than keeping the span in H (39.35 / 0.48
    against 38.58 / 0.39; :func:`intraslice.data.with_repeated_spans`).
    """
    _, _, down = ctx.arch.gate_up_down(ctx.layer)
    if mids is not None:
        h_z = None
        for mid in mids:
            z = input_of_call(down, lambda mid=mid: ctx.arch.mlp_block(ctx.layer, mid))
            z = head_positions(z, skip)
            h_z = gram(z) if h_z is None else h_z + gram(z)
        assert h_z is not None
        ctx.reduce(h_z)
        ctx.check_finite(h_z, "the down_proj input covariance")
        return h_z, mids
    acc: dict[str, torch.Tensor] = {}
    mids = ctx.store("mids")

    def on_down(_m: nn.Module, args: tuple) -> None:
        g = gram(head_positions(args[0], skip))
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

    def collect(self, ctx: LayerContext, mids: ActivationStore | None = None) -> tuple[torch.Tensor, ActivationStore]:
        return mlp_input_stats(ctx, mids, self.cfg.mlp_skip_positions)

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
