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

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..arch import ArchSpec
from ..config import PruneConfig
from ..modeling import IntraSliceConfig
from ..runner import LayerRunner, _hooks, _linear, _rows, check_finite, install_attention

# -- pure math ----------------------------------------------------------------------------


@dataclass
class ChannelStats:
    """First and second moments of a linear layer's input channels (float64)."""

    total: torch.Tensor
    squares: torch.Tensor
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.total += x.sum(0).to(self.total.device)
        self.squares += x.pow(2).sum(0).to(self.squares.device)
        self.count += x.shape[0]

    @classmethod
    def zeros(cls, n: int) -> ChannelStats:
        return cls(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))

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
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.to(torch.float64)
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


# -- plumbing (same signatures as the IntraSlice steps in ``runner``) ---------------------


def _input_stats(
    runner: LayerRunner, inps: torch.Tensor, module: nn.Module, mid_module: nn.Module | None = None
) -> tuple[ChannelStats, list[torch.Tensor]]:
    """Moments of ``module``'s input. With ``mid_module`` the whole layer runs and that
    module's inputs (the residual after attention) are kept; otherwise the layer stops at
    ``module``."""
    stats = ChannelStats.zeros(module.in_features)
    mids: list[torch.Tensor] = []
    if mid_module is None:
        for batch, kw in runner.each_batch(inps):
            stats.add(runner.input_of(module, batch, kw))
        return stats, mids

    def on_in(_m: nn.Module, args: tuple) -> None:
        stats.add(args[0])

    def on_mid(_m: nn.Module, args: tuple) -> None:
        mids.append(args[0].to(runner.cfg.offload_device))

    with _hooks((module, on_in, True), (mid_module, on_mid, True)):
        runner.run(inps)
    return stats, mids


def prune_attention_channels(
    runner: LayerRunner,
    arch: ArchSpec,
    dims: dict[str, int],
    inps: torch.Tensor,
    att_ratio: float,
    cfg: PruneConfig,
    pruned_config: IntraSliceConfig,
    li: int,
    timings: dict[str, float],
) -> tuple[dict[str, Any], float | None]:
    """Delete the lowest-scoring whole heads of one layer (optionally bias-compensated)."""
    layer, dtype = runner.layer, next(runner.layer.parameters()).dtype
    n_h, n_kv, h = dims["n_heads"], dims["n_kv"], dims["head_dim"]
    q_proj, k_proj, v_proj, o_proj = arch.qkvo(layer)
    t = time.perf_counter()
    stats, _ = _input_stats(runner, inps, o_proj)
    check_finite(stats.squares, "the o_proj input statistics", li)
    timings["attention_stats"] += time.perf_counter() - t

    t = time.perf_counter()
    compensate = cfg.bias_compensation
    w_o = o_proj.weight.data.cpu()
    head_score = channel_scores(w_o, stats, compensate).view(n_h, h).sum(1)
    n_drop = heads_to_remove(n_h, n_kv, att_ratio)
    kept = sorted(torch.argsort(head_score, descending=True)[: n_h - n_drop].tolist())
    layout = kept_head_layout(kept, n_h, n_kv, h)
    kept_kv = layout.pop("kept_kv")
    spec = {**layout, "intermediate_size": dims["m"]}
    pruned_config.layers[li] = spec

    rows = lambda heads: torch.cat([torch.arange(i * h, (i + 1) * h) for i in heads])  # noqa: E731
    q_rows, kv_rows = rows(kept), rows(kept_kv)
    removed = torch.ones(n_h * h, dtype=torch.bool)
    removed[q_rows] = False
    o_bias = o_proj.bias.data.cpu() if o_proj.bias is not None else None
    if compensate:
        o_bias = compensation_bias(w_o, o_bias, stats, removed)

    def bias_rows(lin: nn.Linear, idx: torch.Tensor) -> torch.Tensor | None:
        return lin.bias.data.cpu()[idx] if lin.bias is not None else None

    weights = (
        (q_proj.weight.data.cpu()[q_rows], bias_rows(q_proj, q_rows)),
        (k_proj.weight.data.cpu()[kv_rows], bias_rows(k_proj, kv_rows)),
        (v_proj.weight.data.cpu()[kv_rows], bias_rows(v_proj, kv_rows)),
        (w_o[:, q_rows], o_bias),
    )
    install_attention(arch, layer, pruned_config, li, spec, weights, dtype, cfg.device)
    timings["attention_math"] += time.perf_counter() - t
    return spec, None


def prune_mlp_channels(
    runner: LayerRunner,
    arch: ArchSpec,
    inps: torch.Tensor,
    keep: int,
    cfg: PruneConfig,
    li: int,
    timings: dict[str, float],
) -> tuple[list[torch.Tensor], float | None]:
    """Keep the ``keep`` highest-scoring MLP channels; returns the residuals after attention."""
    layer, dtype = runner.layer, next(runner.layer.parameters()).dtype
    gate, up, down = arch.gate_up_down(layer)
    t = time.perf_counter()
    stats, mids = _input_stats(runner, inps, down, arch.mlp_input_module(layer))
    check_finite(stats.squares, "the down_proj input statistics", li)
    timings["mlp_stats"] += time.perf_counter() - t

    t = time.perf_counter()
    w_d = down.weight.data.cpu()
    score = channel_scores(w_d, stats, cfg.bias_compensation)
    kept = torch.sort(torch.argsort(score, descending=True)[:keep]).values
    removed = torch.ones(w_d.shape[1], dtype=torch.bool)
    removed[kept] = False
    d_bias = down.bias.data.cpu() if down.bias is not None else None
    if cfg.bias_compensation:
        d_bias = compensation_bias(w_d, d_bias, stats, removed)

    arch.set_mlp_linears(
        layer,
        _rows(gate, kept, dtype, cfg.device),
        _rows(up, kept, dtype, cfg.device),
        _linear(w_d[:, kept], d_bias, dtype, cfg.device),
    )
    timings["mlp_math"] += time.perf_counter() - t
    return mids, None
