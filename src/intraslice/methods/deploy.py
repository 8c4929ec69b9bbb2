"""Export-compatible pruning (issue #11): the per-layer attention constraints of a run.

What a stock engine can run restricts IntraSlice's steps C-D (see ``algo.attention``):
one RoPE pair set per layer or per model, one head width for the model, equal query groups,
every layer alike. Two of those choices need every layer's statistics before the first
layer is pruned (the global pair set, the common width), which the sequential pipeline
does not have. **Decision**: they come from one cheap pass over the *dense* model first
(:func:`dense_rope_statistics`): the calibration windows flow through the unpruned layers
once, one layer on the device at a time, collecting per layer the post-RoPE |q k| means
(step D's statistic) and the o_proj input covariance (step C's). Layer l is later pruned
on the outputs of the pruned layers 0..l-1, so these are the dense model's statistics, not
those the sequential method would see; for a choice made once for the whole model this is
the principled input (no layer's choice depends on how earlier layers were pruned), and it
costs one forward pass, about a quarter of the pruning itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..algo.attention import (
    AttentionConstraints,
    best_groups,
    captured_spectrum,
    channel_scores,
    choose_common_width,
    global_rope_pairs,
    group_shape_candidates,
    head_spectra,
)
from ..config import PruneConfig
from ..errors import IntraSliceError
from ..pipeline import distributed
from ..pipeline.devices import ActivationStore, DevicePolicy
from ..pipeline.hooks import gram, hooks
from ..pipeline.sequential import LayerAccess, LayerContext, capture_inputs, walk_layers
from .intraslice import pair_statistic


@dataclass
class DenseLayerStats:
    """Step C/D statistics of one dense layer (float64, on the CPU)."""

    #: (n_heads, h/2): sigma[i, p] = mu[i, p] + mu[i, p + h/2], mu the pair statistic (``--rope-score``)
    sigma: torch.Tensor
    #: (n_heads, h + 1): captured spectrum cum[i, r] of step C
    cum: torch.Tensor


@torch.no_grad()
def dense_rope_statistics(
    access: LayerAccess,
    tokens: torch.Tensor,
    policy: DevicePolicy,
    rope_score: str,
    batch_size: int = 4,
    progress: bool = False,
) -> list[DenseLayerStats]:
    """One pass of the calibration windows through the dense layers (see module docstring)."""
    arch = access.arch
    dims = arch.dims(access.model.config)
    n_h, n_kv, h = dims["n_heads"], dims["n_kv"], dims["head_dim"]
    d_o = n_h * h
    inputs = capture_inputs(access, tokens, policy, batch_size)
    slot: dict[str, torch.Tensor] = {}

    def on_q(_m: nn.Module, _i: tuple, y: torch.Tensor) -> None:
        slot["q"] = y

    def on_k(_m: nn.Module, _i: tuple, y: torch.Tensor) -> None:
        slot["k"] = y

    def on_o(_m: nn.Module, args: tuple) -> None:
        slot["o"] = args[0]

    out: list[DenseLayerStats] = []

    def statistics(ctx: LayerContext) -> ActivationStore:
        layer = ctx.layer
        q_proj, k_proj, _, o_proj = arch.qkvo(layer)
        h_acc = torch.zeros(d_o, d_o, dtype=torch.float64, device=ctx.device)
        mu = torch.zeros(n_h, h, dtype=torch.float64, device=ctx.device)
        n_tok = 0
        outputs = policy.store_for("outputs")
        with hooks((q_proj, on_q, False), (k_proj, on_k, False), (o_proj, on_o, True)):
            for batch, kw in ctx.batches():
                y = layer(batch, **kw)
                outputs.append(y[0] if isinstance(y, tuple) else y)
                h_acc += gram(slot["o"])
                stat, count = pair_statistic(rope_score, slot["q"], slot["k"], *kw["position_embeddings"], n_kv)
                mu += stat
                n_tok += count
                slot.clear()
        distributed.all_reduce_(h_acc)
        distributed.all_reduce_(mu)
        n_tok = distributed.all_reduce_int(n_tok, ctx.device)
        ctx.check_finite(h_acc, "the dense o_proj input covariance")
        mu = (mu / max(n_tok, 1)).cpu()
        h_cpu = h_acc.cpu()
        w_o = o_proj.weight.detach().to("cpu", torch.float64)
        cum = captured_spectrum(channel_scores(torch.diagonal(h_cpu), w_o), head_spectra(h_cpu, n_h, h))
        out.append(DenseLayerStats(sigma=mu[:, : h // 2] + mu[:, h // 2 :], cum=cum))
        return outputs

    inputs = walk_layers(
        access, inputs, policy, statistics, lambda li, _: access.release(li), 0, progress, "dense RoPE statistics"
    )
    inputs.store.clear()
    return out


def layer_keeps(cfg: PruneConfig, dims: dict[str, int]) -> list[int]:
    """Step A's channel budget K of every layer, from the planned attention ratios."""
    total = dims["n_heads"] * dims["head_dim"]
    return [max(total - round(total * a), 2) for a, _ in cfg.ratios_for(dims["n_layers"])]


def constrained(cfg: PruneConfig) -> bool:
    """Whether the run restricts the attention plan at all (False: the method as specified)."""
    return (
        cfg.rope_selection != "per-kv-group"
        or cfg.head_width is not None
        or cfg.common_width
        or cfg.equal_kv_groups
        or cfg.uniform_layers
    )


def resolve_constraints(
    cfg: PruneConfig, dims: dict[str, int], stats: list[DenseLayerStats] | None = None, model_type: str = ""
) -> list[AttentionConstraints] | None:
    """Per-layer constraints of this run (None: the method as specified, nothing to restrict).

    Uniform layers of a Llama source keep a head count that divides the hidden size: the stock
    ``LlamaConfig`` of transformers 5.24 refuses any other, even with an explicit ``head_dim``.
    """
    if not constrained(cfg):
        return None
    h, n_kv, n_layers = dims["head_dim"], dims["n_kv"], dims["n_layers"]
    width = cfg.head_width
    if width is not None and width > h:
        raise IntraSliceError(f"--head-width {width} exceeds the model's head dimension {h}")
    keeps = layer_keeps(cfg, dims)
    shape: tuple[int, int] | None = None
    divides = dims["d"] if cfg.uniform_layers and model_type == "llama" else None
    if cfg.common_width and (width is None or cfg.uniform_layers):
        if stats is None:
            raise IntraSliceError("a common head width needs the dense statistics pass (internal error)")
        cums = [s.cum for s in stats]
        if width is None:
            # **Decision (measured)**: with one RoPE pair set for the whole model, the default
            # width keeps every pair (r = h); heads are deleted instead. On SmolLM2 at ratio 0.2
            # (uniform, 8 x 512 calibration, P1 on 4 windows) a global set of 24 of 32 pairs
            # gave 243 against 49.1 unconstrained, all 32 pairs 51.6: the pairs a group needs
            # (high frequencies for positional heads) are not the pairs the model-wide sum keeps.
            only_h = [dims["head_dim"]] if cfg.rope_selection == "global" else None
            width, shape = choose_common_width(
                cums,
                keeps,
                n_kv,
                cfg.min_head_width,
                cfg.equal_kv_groups,
                uniform=cfg.uniform_layers,
                divides=divides,
                widths=only_h,
            )  # the unpriced width: a narrower one cuts RoPE pairs (see algo.attention.plan_attention)
        else:  # uniform layers at a given width: the shared group shape from the same criterion
            g = dims["n_heads"] // n_kv
            shapes = group_shape_candidates(n_kv, g, keeps[0] / width, divides)
            shape = max(shapes, key=lambda ab: (sum(best_groups(c[:, width], n_kv, *ab)[1] for c in cums), -ab[0]))
    if cfg.uniform_layers and shape is None:
        raise IntraSliceError("--uniform-layers needs a common head width (internal error)")
    pairs = None
    if cfg.rope_selection == "global":
        assert stats is not None and width is not None
        pairs = global_rope_pairs([s.sigma for s in stats], width)
    return [
        AttentionConstraints(
            rope_selection=cfg.rope_selection,
            width=width,
            equal_groups=cfg.equal_kv_groups or cfg.uniform_layers,
            pairs=pairs,
            group_shape=shape,
        )
        for _ in range(n_layers)
    ]


def whole_attention_meets(cfg: PruneConfig, dims: dict[str, int]) -> dict[str, Any] | None:
    """What was decided when every layer keeps its whole attention; None when one does not.

    Why: under the default attention share 0 (issue #14) no layer loses attention, and the
    unpruned attention meets every export constraint by itself: one head width (h) and one
    pair set (all of them) for the model, every KV group with all its query heads, every
    layer alike. The dense statistics pass and the per-layer attention passes would only
    reproduce the weights, so the run skips them as an unconstrained one does. A fixed
    ``--head-width`` below h still shrinks every layer, so it keeps the constrained path.
    """
    h = dims["head_dim"]
    if not constrained(cfg) or cfg.head_width not in (None, h):
        return None
    if any(a != 0 for a, _ in cfg.ratios_for(dims["n_layers"])):
        return None
    shape = (dims["n_kv"], dims["n_heads"] // dims["n_kv"]) if cfg.uniform_layers else None
    pairs = list(range(h // 2)) if cfg.rope_selection == "global" else None
    whole = AttentionConstraints(cfg.rope_selection, h, cfg.equal_kv_groups or cfg.uniform_layers, pairs, shape)
    return {**decided(whole, cfg), "attention_kept_whole": True}


def decided(c: AttentionConstraints, cfg: PruneConfig) -> dict[str, Any]:
    """The run's constraints as its report records them (every layer's are alike)."""
    return {
        "rope_selection": c.rope_selection,
        "head_width": c.width,
        "equal_kv_groups": c.equal_groups,
        "global_rope_pairs": c.pairs,
        "group_shape": list(c.group_shape) if c.group_shape else None,
        "uniform_layers": cfg.uniform_layers,
        "deploy": cfg.deploy,
    }


def prepare_constraints(
    method: Any,
    access: LayerAccess,
    tokens: torch.Tensor,
    cfg: PruneConfig,
    policy: DevicePolicy,
    progress: bool = False,
) -> dict[str, Any]:
    """Give an IntraSlice method its per-layer constraints (runs the dense pass if needed).

    Returns what was decided (for the run's report); ``{}`` when nothing is constrained.
    """
    step = getattr(method, "attention", None)
    if cfg.method != "intraslice" or step is None or not hasattr(step, "constraints"):
        return {}
    dims = access.arch.dims(access.model.config)
    whole = whole_attention_meets(cfg, dims)
    if whole is not None:
        step.constraints = None  # every layer's attention step is skipped (its weights kept)
        return whole
    stats = None
    if cfg.needs_dense_pass:
        stats = dense_rope_statistics(access, tokens, policy, cfg.rope_score, cfg.batch_size, progress)
    constraints = resolve_constraints(cfg, dims, stats, str(getattr(access.model.config, "model_type", "")))
    step.constraints = constraints
    if constraints is None:
        return {}
    return decided(constraints[0], cfg)
