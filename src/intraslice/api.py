"""One-call entry point: ``prune(model, calibration_tokens, PruneConfig(ratio=0.3))``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .arch import get_arch
from .config import PruneConfig
from .errors import IntraSliceError
from .methods.deploy import prepare_constraints
from .methods.registry import get_method
from .modeling import IntraSliceConfig, IntraSliceForCausalLM
from .params import param_report
from .pipeline import ModelLayers, distributed, run_layers
from .pipeline.sequential import LayerMethod


@dataclass
class PruneSummary:
    """What a pruning run removed, layer by layer, and what it cost (in memory or streamed)."""

    params_before: dict[str, int]
    params_after: dict[str, int]
    layers: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    #: The method's name and its own facts (SliceGPT: the residual width found for the ratio).
    method: dict[str, Any] = field(default_factory=dict)

    def reduction(self) -> dict[str, float]:
        return {k: 1.0 - self.params_after[k] / self.params_before[k] for k in self.params_before}

    def report(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "reduction": self.reduction(),
            "method": self.method,
            "layers": self.layers,
            "timings_s": self.timings,
        }


@dataclass
class PruneResult(PruneSummary):
    """The physically smaller model (in memory) and what it cost."""

    model: IntraSliceForCausalLM | None = None


def prune(
    model: nn.Module,
    calibration: torch.Tensor,
    config: PruneConfig | None = None,
    progress: bool = True,
    estimator_calibration: torch.Tensor | None = None,
) -> PruneResult:
    """Prune a Hugging Face causal LM (IntraSlice, or a baseline named by ``config.method``).

    ``calibration`` is an int64 tensor of token windows (nsamples, seqlen). The source
    ``model`` is consumed: its decoder layers are replaced in place by smaller modules
    whose weights the returned model shares.

    ``estimator_calibration``: the windows of the mask-gradient estimator, when they differ
    from the layer steps' (default: ``calibration``). The CLI's IntraSlice default gives the
    layer steps each window followed by a repeat of an earlier span of it and the estimator
    the plain windows (docs/method.md section 8); from Python::

        plain = calibration_windows(tokenizer, DEFAULT_CALIB, nsamples=128, seqlen=2048)
        spans = with_repeated_spans(plain, DEFAULT_CALIB_REPEAT, DEFAULT_CALIB_REPEAT_MODE)
        prune(model, spans.tokens, config, estimator_calibration=plain.tokens)

    The per-layer ratios are ``config.layer_ratios`` when given; otherwise
    ``config.allocation`` decides, and its default is the CLI's: ``global_pca`` for
    IntraSlice (the mask-gradient estimator runs on ``calibration`` first, see
    :func:`intraslice.importance.estimate_allocation`; its record is in
    ``result.method["allocation"]``), ``uniform`` for the baselines. Pass
    ``PruneConfig(allocation="uniform")`` to give every layer ``ratio`` without the estimator.
    """
    config = config or PruneConfig()
    if getattr(model.config, "model_type", None) == "intraslice":
        raise IntraSliceError("this model is already pruned by intraslice; prune the source model instead")
    arch = get_arch(model.config)
    config.validate(arch.dims(model.config)["n_layers"])
    arch.prepare_model(model)
    grad_windows = calibration if estimator_calibration is None else estimator_calibration
    for name, windows in (("calibration", calibration), ("estimator_calibration", grad_windows)):
        if windows.dim() != 2 or windows.shape[0] < 1:
            shape = tuple(windows.shape)
            raise IntraSliceError(f"{name} must be (nsamples, seqlen) token ids, got shape {shape}")
    t0 = time.perf_counter()
    before = param_report(model)
    model.eval()
    extra: dict[str, Any] = {"method": config.method}
    config, extra["allocation"] = allocate_layers(model, grad_windows, config, progress)
    method, pruned_config, model_cls, info = make_method(model, config)
    extra.update(info)
    policy = config.policy()
    extra["devices"] = policy.describe()
    desc = get_method(config.method).progress_label
    tokens = distributed.shard(calibration)  # under torchrun: this rank's windows
    access = ModelLayers(model, policy)
    constraints = prepare_constraints(method, access, tokens, config, policy, progress)  # export constraints
    if constraints:
        extra["constraints"] = constraints
    outcome = run_layers(access, tokens, method, policy, config.batch_size, progress, desc)
    pruned = build_pruned_model(model, pruned_config, model_cls)
    timings = dict(outcome.timings)
    if extra["allocation"].get("estimator_seconds") is not None:
        timings["allocation"] = float(extra["allocation"]["estimator_seconds"])
    timings["total"] = time.perf_counter() - t0
    return PruneResult(
        model=pruned,
        params_before=before,
        params_after=param_report(pruned),
        layers=[asdict(r) for r in outcome.layers],
        timings=timings,
        method=extra,
    )


def allocate_layers(
    model: nn.Module, calibration: torch.Tensor, config: PruneConfig, progress: bool = True
) -> tuple[PruneConfig, dict[str, Any]]:
    """``config`` with its per-layer ratios filled in by its allocation, and how they were found.

    Explicit ``layer_ratios`` are kept; nothing to remove, or the spec's uniform allocation,
    leaves them unset (every layer gets ``ratio`` in both modules); a uniform allocation with
    a split (a share or β, or every layer alike for a stock format) gets the same pair in
    every layer. The caller's config is not modified.
    """
    from .importance import estimate_allocation

    mode = config.allocation_mode()
    if config.layer_ratios is not None:
        return config, {"mode": "given"}
    if config.ratio == 0:
        return config, {"mode": mode}
    if mode == "uniform":  # no gradients: the spec's uniform, or a split asked for (every layer alike)
        split = config.uniform_layers or config.attention_share is not None or config.mlp_bias is not None
        if not split or not get_method(config.method).per_layer_ratios:  # SliceGPT: nothing to split
            return config, {"mode": mode}
        alloc, record = estimate_allocation(
            model,
            config.ratio,
            mode,
            attention_share=config.attention_share,
            mlp_bias=config.mlp_bias,
            split_uniform=config.uniform_layers,
        )
        return replace(config, layer_ratios=[tuple(r) for r in alloc.layer_ratios]), record
    compute = config.policy().compute
    # A model already on the compute device stays there; otherwise each module visits it in turn.
    where = next(model.parameters()).device
    resident = where.type == compute.type and (compute.index is None or where.index == compute.index)
    alloc, record = estimate_allocation(
        model,
        config.ratio,
        mode,
        tokens=calibration,
        device=compute,
        progress=progress,
        resident=resident,
        attention_share=config.attention_share,
        mlp_bias=config.mlp_bias,
    )
    return replace(config, layer_ratios=[tuple(r) for r in alloc.layer_ratios]), record


def make_method(
    model: nn.Module, config: PruneConfig
) -> tuple[LayerMethod, IntraSliceConfig, type[IntraSliceForCausalLM], dict[str, Any]]:
    """The layer method for ``config.method``, the pruned model's config (filled in as the
    layers are compressed) and its model class (see ``methods.registry``)."""
    return get_method(config.method).build(model, config)


def build_pruned_model(
    source: nn.Module, pruned_config: IntraSliceConfig, model_cls: type[IntraSliceForCausalLM] = IntraSliceForCausalLM
) -> IntraSliceForCausalLM:
    """Move the (pruned-in-place) source weights into the compressed model class."""
    with torch.device("meta"):
        model = model_cls(pruned_config)
    state = source.state_dict()
    for old, new in get_arch(source.config).state_renames:
        state = {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (pruned_config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch building the pruned model: missing {missing}, unexpected {unexpected}")
    if pruned_config.tie_word_embeddings:
        model.tie_weights()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"pruned model has uninitialised tensors: {leftover[:5]}")
    model.eval()
    return model
