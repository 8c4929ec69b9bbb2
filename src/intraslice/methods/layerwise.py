"""The layer flow shared by IntraSlice and the channel baseline: attention, then MLP.

A method here is two block steps, each in two parts: ``collect`` statistics from the
layer's calibration inputs (through hooks, on the compute device), then ``compress`` the
block from them (float64 math on the math device, then a module swap). Between the two
blocks the :class:`Budget` decides the MLP width that makes the layer hit its planned size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..algo.mlp import mlp_keep_count
from ..arch import ArchSpec
from ..config import PruneConfig
from ..modeling import IntraSliceConfig
from ..params import layer_kv_values, layer_linear_params
from ..pipeline.devices import ActivationStore
from ..pipeline.modules import numel_bias
from ..pipeline.sequential import LayerContext, LayerReport, LayerResult


@dataclass
class AttentionDone:
    spec: dict[str, Any]
    rel_error: float | None = None
    #: The residual stream after the pruned attention, per batch, when the step could form
    #: it without another attention pass (None: the MLP step runs the layer for it).
    mids: ActivationStore | None = None


@dataclass
class MLPDone:
    #: The residual stream after (pruned) attention, per batch: the MLP block is all that is
    #: left to run to get the layer's outputs.
    mids: ActivationStore
    rel_error: float | None = None


class AttentionStep(Protocol):
    def collect(self, ctx: LayerContext, att_ratio: float) -> Any: ...
    def compress(self, ctx: LayerContext, stats: Any, att_ratio: float, pruned: IntraSliceConfig) -> AttentionDone: ...


class MLPStep(Protocol):
    def collect(self, ctx: LayerContext, mids: ActivationStore | None = None) -> Any: ...
    def compress(self, ctx: LayerContext, stats: Any, keep: int) -> MLPDone: ...


class Budget:
    """Exact real budget: each layer's MLP absorbs its attention's rounding and the carry.

    Head widths round to even numbers and KV heads survive, so a layer's attention rarely
    lands on its planned size; the MLP width makes up the difference, and what is left
    (the MLP rounds to a multiple of 8) carries over to the next layer.

    The size is counted in serving cost: parameters plus ``cfg.kv_weight`` x the layer's
    K and V cache values per token (0 unless a ``--target-memory`` set it to context x batch),
    so under a memory target the MLP also absorbs what the attention's kept KV heads and
    widths store beyond (or below) the plan.
    """

    def __init__(self, cfg: PruneConfig, arch: ArchSpec) -> None:
        self.cfg, self.arch = cfg, arch
        self.carry = 0.0  # cost units the earlier layers kept beyond (+) or below (-) their plan

    def _kv(self, layer: Any) -> float:
        return self.cfg.kv_weight * layer_kv_values(self.arch, layer) if self.cfg.kv_weight else 0.0

    def plan(self, layer: Any, att_ratio: float, mlp_ratio: float) -> float:
        att_dense, mlp_dense = layer_linear_params(self.arch, layer)
        return (att_dense + self._kv(layer)) * (1.0 - att_ratio) + mlp_dense * (1.0 - mlp_ratio)

    def mlp_keep(self, layer: Any, m: int, mlp_ratio: float, planned: float) -> int:
        if not self.cfg.exact_budget:
            return mlp_keep_count(m, mlp_ratio, self.cfg.mlp_multiple)
        down = self.arch.gate_up_down(layer)[2]
        att_actual, mlp_dense = layer_linear_params(self.arch, layer)
        per_neuron = (mlp_dense - numel_bias(down)) / m
        # Uniform layers (the stock format): every layer the same MLP width, so no carry.
        carry = 0.0 if self.cfg.uniform_layers else self.carry
        want = (planned - att_actual - self._kv(layer) - carry - numel_bias(down)) / per_neuron
        return mlp_keep_count(m, 1.0 - min(max(want, 0.0), m) / m, self.cfg.mlp_multiple)

    def settle(self, layer: Any, planned: float) -> None:
        self.carry += sum(layer_linear_params(self.arch, layer)) + self._kv(layer) - planned


class LayerwiseMethod:
    """Attention step, budget, MLP step, and the layer outputs from the kept mid residuals."""

    def __init__(
        self, name: str, cfg: PruneConfig, pruned: IntraSliceConfig, attention: AttentionStep, mlp: MLPStep
    ) -> None:
        self.name, self.cfg, self.pruned = name, cfg, pruned
        self.attention, self.mlp = attention, mlp
        self.ratios: list[tuple[float, float]] | None = None
        self.budget: Budget | None = None

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What this method carries from layer to layer (JSON, tensors): the exact-budget carry."""
        return {"carry": None if self.budget is None else float(self.budget.carry)}, {}

    def restore_state(
        self, state: dict[str, Any], tensors: dict[str, Any], cfg: PruneConfig, arch: ArchSpec, n_layers: int
    ) -> None:
        """Continue after layer ``done - 1`` of an interrupted run (see ``intraslice.resume``)."""
        self.ratios = self.cfg.ratios_for(n_layers)
        self.budget = Budget(self.cfg, arch)
        self.budget.carry = float(state.get("carry") or 0.0)

    def compress(self, ctx: LayerContext) -> LayerResult:
        if self.ratios is None:
            self.ratios = self.cfg.ratios_for(ctx.dims["n_layers"])
            self.budget = Budget(self.cfg, ctx.arch)
        assert self.budget is not None
        att_ratio, mlp_ratio = self.ratios[ctx.index]
        layer = ctx.layer
        planned = self.budget.plan(layer, att_ratio, mlp_ratio)

        with ctx.timed("attention_stats"):
            att_stats = self.attention.collect(ctx, att_ratio)
        with ctx.timed("attention_math"):
            att = self.attention.compress(ctx, att_stats, att_ratio, self.pruned)
        del att_stats
        keep = self.budget.mlp_keep(layer, ctx.dims["m"], mlp_ratio, planned)
        with ctx.timed("mlp_stats"):
            mlp_stats = self.mlp.collect(ctx, att.mids)
        with ctx.timed("mlp_math"):
            mlp = self.mlp.compress(ctx, mlp_stats, keep)
        del mlp_stats
        att.spec["intermediate_size"] = keep
        self.budget.settle(layer, planned)

        # Finish the layer from the residual after attention: its outputs feed the next layer.
        # A parallel block's MLP reads the layer input, not that residual: run the whole layer.
        with ctx.timed("propagate"):
            if ctx.arch.parallel_block:
                outputs = ctx.outputs(layer)
            else:
                ctx.release_inputs()  # the mid residuals are all the MLP block needs
                outputs = ctx.store("outputs")
                for mid in mlp.mids:
                    outputs.append(ctx.arch.mlp_block(layer, mid))
        mlp.mids.clear()
        spec = att.spec
        report = LayerReport(
            ctx.index,
            att_ratio,
            mlp_ratio,
            spec["num_heads"],
            spec["num_kv_heads"],
            spec["head_dim"],
            keep,
            att.rel_error,
            mlp.rel_error,
        )
        return LayerResult(layer, report, outputs)
