"""Pruning methods registered by name behind one protocol.

A method is what runs on one decoder layer at a time inside the shared pipeline
(``pipeline.run_layers``): it takes the layer's calibration inputs and returns a smaller
layer. Everything around it (loading, allocation, checkpoints, evaluation, saving) is
the engine's and is the same for every method, so adding one is a single
:func:`register_method` call, from any module (a test file registers a toy method this way):

    register_method(MethodSpec(name="toy", build=build_toy))

``intraslice prune --method toy`` and :func:`intraslice.run` then accept it, and an
interrupted run resumes through the method's own :meth:`LayerMethod.checkpoint_state` /
``restore_state`` (see ``intraslice.resume``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import IntraSliceError

#: ``build(skeleton, cfg)`` -> (layer method, the pruned model's config, its model class, facts).
Builder = Callable[[Any, Any], tuple[Any, Any, type, dict[str, Any]]]


@dataclass(frozen=True)
class MethodSpec:
    """What the engine needs to know about a method, besides its layer step.

    Why these fields: each is a question the engine used to answer with ``method ==``.
    """

    name: str
    #: Makes the layer method for a model skeleton and a :class:`intraslice.config.PruneConfig`.
    build: Builder
    #: One line for ``--help``.
    summary: str = ""
    #: The allocation it runs unless told otherwise (the baselines: uniform, as published).
    default_allocation: str = "uniform"
    #: Whether per-layer (attention, MLP) ratios mean anything: SliceGPT slices the residual
    #: stream, one width for every layer, so global allocations and splits are refused.
    per_layer_ratios: bool = True
    #: The share of each calibration window its layer steps see repeated (0: plain windows).
    calib_repeat: float = 0.0
    #: Accepts IntraSlice's RoPE / export options (--rope-score, --deploy, ...).
    export_constraints: bool = False
    #: Supports ``--target-speedup`` (its candidate shapes are IntraSlice's).
    speed_target: bool = False
    #: Supports ``--target-memory`` (its layers run the serving-cost :class:`Budget`, whose
    #: MLP absorbs what the attention keeps in weights and KV cache beyond the plan).
    memory_target: bool = False
    #: The progress bar's words for the layer loop.
    progress_label: str = "pruning layers"


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, replace: bool = False) -> MethodSpec:
    """Make ``spec.name`` a method of the CLI and the API (``replace`` to redefine one)."""
    if spec.name in _METHODS and not replace:
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Forget a method (tests that register a toy one clean up after themselves)."""
    _METHODS.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str) -> MethodSpec:
    try:
        return _METHODS[name]
    except KeyError:
        raise IntraSliceError(f"unknown method {name!r}: choose one of {', '.join(_METHODS)}") from None


# -- the built-in methods ---------------------------------------------------------------------
def _pruned_config(model: Any) -> Any:
    from ..arch import get_arch
    from ..modeling import IntraSliceConfig

    cfg = IntraSliceConfig(**get_arch(model.config).pruned_config_kwargs(model.config))
    cfg._attn_implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    return cfg


def _build_intraslice(model: Any, cfg: Any) -> tuple[Any, Any, type, dict[str, Any]]:
    from ..methods.intraslice import intraslice_method
    from ..modeling import IntraSliceForCausalLM

    pruned = _pruned_config(model)
    return intraslice_method(cfg, pruned), pruned, IntraSliceForCausalLM, {}


def _build_channel(model: Any, cfg: Any) -> tuple[Any, Any, type, dict[str, Any]]:
    from ..baselines.channel import channel_method
    from ..modeling import IntraSliceForCausalLM

    pruned = _pruned_config(model)
    pruned.o_proj_bias = pruned.o_proj_bias or cfg.bias_compensation
    pruned.down_proj_bias = cfg.bias_compensation
    return channel_method(cfg, pruned), pruned, IntraSliceForCausalLM, {}


def _build_slicegpt(model: Any, cfg: Any) -> tuple[Any, Any, type, dict[str, Any]]:
    from ..baselines.slicegpt import SliceGPTMethod, slicegpt_config
    from ..modeling import SliceGPTForCausalLM

    sliced, info = slicegpt_config(model, cfg.ratio, cfg.slice_dim)
    sliced._attn_implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    return SliceGPTMethod(sliced), sliced, SliceGPTForCausalLM, info


#: IntraSlice's repeated-span share: the heads that copy work on the calibration text
#: (docs/method.md section 8). Kept equal to ``config.DEFAULT_CALIB_REPEAT``.
_INTRASLICE_REPEAT = 0.5

register_method(
    MethodSpec(
        name="intraslice",
        build=_build_intraslice,
        summary="block-intra PCA (the method)",
        default_allocation="global_pca",
        calib_repeat=_INTRASLICE_REPEAT,
        export_constraints=True,
        speed_target=True,
        memory_target=True,
    )
)
register_method(
    MethodSpec(
        name="slicegpt",
        build=_build_slicegpt,
        summary="rotate and slice the residual stream (baseline)",
        per_layer_ratios=False,
        progress_label="slicing layers (SliceGPT)",
    )
)
register_method(
    MethodSpec(
        name="channel",
        build=_build_channel,
        summary="FLAP/Wanda-sp heads and channels (baseline)",
        memory_target=True,
    )
)
