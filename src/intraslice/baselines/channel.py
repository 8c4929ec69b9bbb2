"""Channel/head pruning baseline (FLAP / Wanda-sp style): no PCA basis, no least squares.

What IntraSlice adds over this baseline is exactly what this file leaves out, so the two
run through the same layer runner, budget and pruned-model class:

* attention: whole query heads are removed by their score; a KV head goes when no query
  head reads it any more; kept heads keep their full width and every RoPE pair;
* MLP: intermediate channels are removed by their score;
* score of an input channel j of ``o_proj`` / ``down_proj``: ``||W[:, j]||^2 * s_j`` with
  ``s_j`` the channel's mean energy E[x_j^2] (Wanda-sp), or, with bias compensation, its
  fluctuation Var[x_j] (FLAP), because then the mean ``W[:, removed] @ E[x_removed]`` is
  folded into the output bias and only the fluctuation is lost.

Layers are pruned in order on the outputs of the already pruned layers (FLAP computes its
statistics on the dense model in one pass; the sequential version is the stronger one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PruneConfig
from ..methods.layerwise import AttentionDone, LayerwiseMethod, MLPDone
from ..modeling import IntraSliceConfig
from ..pipeline.devices import ActivationStore
from ..pipeline.hooks import hooks
from ..pipeline.modules import bias_of, install_attention, new_linear, row_linear
from ..pipeline.sequential import LayerContext

# -- pure math ----------------------------------------------------------------------------


@dataclass
class ChannelStats:
    """First and second moments of a linear layer's input channels (float64)."""

    total: torch.Tensor
    squares: torch.Tensor
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.total += x.sum(0)
        self.squares += x.pow(2).sum(0)
        self.count += x.shape[0]

    @classmethod
    def zeros(cls, n: int, device: torch.device | str = "cpu") -> ChannelStats:
        z = torch.zeros(n, dtype=torch.float64, device=device)
        return cls(z, z.clone())

    def map(self, fn: Any) -> ChannelStats:
        """The same moments with ``fn`` applied to each tensor (the pipeline's device move)."""
        return ChannelStats(fn(self.total), fn(self.squares), self.count)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def energy(self) -> torch.Tensor:
        return self.squares / max(self.count, 1)

    @property
    def fluctuation(self) -> torch.Tensor:
        return (self.energy - self.mean.pow(2)).clamp_min(0)


def channel_scores(weight: torch.Tensor, stats: ChannelStats, compensate: bool) -> torch.Tensor:
    """``||W[:, j]||^2`` times the channel's energy (or fluctuation when the mean is compensated)."""
    col = weight.to(torch.float64).pow(2).sum(0)
    return col * (stats.fluctuation if compensate else stats.energy)


def compensation_bias(
    weight: torch.Tensor, bias: torch.Tensor | None, stats: ChannelStats, removed: torch.Tensor
) -> torch.Tensor:
    """The output bias that restores the mean contribution of removed input channels."""
    w = weight.to(torch.float64)
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.to(torch.float64)
    return b + w[:, removed] @ stats.mean[removed]


def heads_to_remove(n_heads: int, n_kv: int, att_ratio: float) -> int:
    """Query heads to delete so that q/o (2 of the 2 + 2 n_kv/n_h parts) approach the ratio.

    The runner's exact budget lets the MLP absorb whatever this rounding leaves.
    """
    return min(n_heads - 1, max(0, round(att_ratio * (n_heads + n_kv))))


def kept_head_layout(kept: list[int], n_heads: int, n_kv: int, head_dim: int) -> dict[str, Any]:
    """Spec of an attention that keeps query heads ``kept`` at full width (all RoPE pairs)."""
    g = n_heads // n_kv
    kept_kv = sorted({i // g for i in kept})
    return {
        "num_heads": len(kept),
        "num_kv_heads": len(kept_kv),
        "head_dim": head_dim,
        "kv_index": [kept_kv.index(i // g) for i in kept],
        "rope_pairs": [list(range(head_dim // 2)) for _ in kept_kv],
        "kept_kv": kept_kv,
    }


# -- the two block steps on the sequential pipeline ----------------------------------------


def _input_stats(
    ctx: LayerContext, module: nn.Module, mid_module: nn.Module | None = None
) -> tuple[ChannelStats, ActivationStore | None]:
    """Moments of ``module``'s input. With ``mid_module`` the whole layer runs and that
    module's inputs (the residual after attention) are kept; otherwise the layer stops at
    ``module``."""
    stats = ChannelStats.zeros(module.in_features, ctx.device)
    if mid_module is None:
        for batch, kw in ctx.batches():
            stats.add(ctx.input_of(module, batch, kw))
        return _reduced(ctx, stats), None
    mids = ctx.store("mids")

    def on_in(_m: nn.Module, args: tuple) -> None:
        stats.add(args[0])

    def on_mid(_m: nn.Module, args: tuple) -> None:
        mids.append(args[0])

    with hooks((module, on_in, True), (mid_module, on_mid, True)):
        ctx.run()
    return _reduced(ctx, stats), mids


def _reduced(ctx: LayerContext, stats: ChannelStats) -> ChannelStats:
    """The moments summed over the ranks of a torchrun job."""
    ctx.reduce(stats.total, stats.squares)
    stats.count = ctx.reduce_count(stats.count)
    return stats


def _rows_of(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[idx]


class ChannelAttentionStep:
    """Delete the lowest-scoring whole heads of one layer (optionally bias-compensated)."""

    def __init__(self, cfg: PruneConfig) -> None:
        self.cfg = cfg

    def collect(self, ctx: LayerContext, att_ratio: float) -> ChannelStats:
        stats, _ = _input_stats(ctx, ctx.arch.qkvo(ctx.layer)[3])
        ctx.check_finite(stats.squares, "the o_proj input statistics")
        return stats

    def compress(
        self, ctx: LayerContext, stats: ChannelStats, att_ratio: float, pruned: IntraSliceConfig
    ) -> AttentionDone:
        n_h, n_kv, h = ctx.dims["n_heads"], ctx.dims["n_kv"], ctx.dims["head_dim"]
        q_proj, k_proj, v_proj, o_proj = ctx.arch.qkvo(ctx.layer)
        stats = stats.map(ctx.math)
        compensate = self.cfg.bias_compensation
        w_o = ctx.math(o_proj.weight)
        head_score = channel_scores(w_o, stats, compensate).view(n_h, h).sum(1)
        n_drop = heads_to_remove(n_h, n_kv, att_ratio)
        kept = sorted(torch.argsort(head_score, descending=True)[: n_h - n_drop].tolist())
        layout = kept_head_layout(kept, n_h, n_kv, h)
        kept_kv = layout.pop("kept_kv")
        spec = {**layout, "intermediate_size": ctx.dims["m"]}
        pruned.layers[ctx.index] = spec

        rows = lambda heads: torch.cat([torch.arange(i * h, (i + 1) * h) for i in heads])  # noqa: E731
        q_rows, kv_rows = rows(kept), rows(kept_kv)
        removed = torch.ones(n_h * h, dtype=torch.bool)
        removed[q_rows] = False
        o_bias = ctx.math(bias_of(o_proj))
        if compensate:
            o_bias = compensation_bias(w_o, o_bias, stats, removed)
        qkv = ((q_proj, q_rows), (k_proj, kv_rows), (v_proj, kv_rows))
        weights = (
            *((ctx.math(lin.weight)[idx], _rows_of(ctx.math(bias_of(lin)), idx)) for lin, idx in qkv),
            (w_o[:, q_rows], o_bias),
        )
        install_attention(ctx.arch, ctx.layer, pruned, ctx.index, spec, weights, ctx.dtype, ctx.device)
        return AttentionDone(spec, None)


class ChannelMLPStep:
    """Keep the ``keep`` highest-scoring MLP channels (optionally bias-compensated)."""

    def __init__(self, cfg: PruneConfig) -> None:
        self.cfg = cfg

    def collect(self, ctx: LayerContext, mids: ActivationStore | None = None) -> tuple[ChannelStats, ActivationStore]:
        # The channel attention step keeps no attention output, so ``mids`` is always None here.
        down = ctx.arch.gate_up_down(ctx.layer)[2]
        stats, mids = _input_stats(ctx, down, ctx.arch.mlp_input_module(ctx.layer))
        ctx.check_finite(stats.squares, "the down_proj input statistics")
        assert mids is not None
        return stats, mids

    def compress(self, ctx: LayerContext, collected: tuple[ChannelStats, ActivationStore], keep: int) -> MLPDone:
        stats, mids = collected
        stats = stats.map(ctx.math)
        gate, up, down = ctx.arch.gate_up_down(ctx.layer)
        w_d = ctx.math(down.weight)
        score = channel_scores(w_d, stats, self.cfg.bias_compensation)
        kept = torch.sort(torch.argsort(score, descending=True)[:keep]).values
        removed = torch.ones(w_d.shape[1], dtype=torch.bool, device=w_d.device)
        removed[kept] = False
        d_bias = ctx.math(bias_of(down))
        if self.cfg.bias_compensation:
            d_bias = compensation_bias(w_d, d_bias, stats, removed)
        kept_host = ctx.policy.to_host(kept)
        dtype, device = ctx.dtype, ctx.device
        ctx.arch.set_mlp_linears(
            ctx.layer,
            row_linear(gate, kept_host, dtype, device),
            row_linear(up, kept_host, dtype, device),
            new_linear(w_d[:, kept], d_bias, dtype, device),
        )
        return MLPDone(mids, None)


def channel_method(cfg: PruneConfig, pruned: IntraSliceConfig) -> LayerwiseMethod:
    return LayerwiseMethod("channel", cfg, pruned, ChannelAttentionStep(cfg), ChannelMLPStep(cfg))
