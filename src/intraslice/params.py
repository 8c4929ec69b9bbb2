"""Real parameter counts: what disappears from ``model.parameters()``."""

from __future__ import annotations

from typing import Any

from torch import nn

from .arch import ArchSpec, get_arch


def whole_model_params(model: nn.Module) -> int:
    """All parameters, tied weights counted once (``parameters()`` de-duplicates)."""
    return sum(p.numel() for p in model.parameters())


def module_params(module: nn.Module) -> int:
    """Parameters owned directly by a module (a linear's weight and bias)."""
    return sum(p.numel() for p in module.parameters(recurse=False))


def layer_linear_params(arch: ArchSpec, layer: nn.Module) -> tuple[int, int]:
    """(attention, MLP) linear parameters of one decoder layer: q/k/v/o and gate/up/down.

    SliceGPT's shortcut matrices, where present, count with the block they bypass.
    """
    att_short, mlp_short = arch.shortcuts(layer)
    attention = sum(module_params(m) for m in (*arch.qkvo(layer), att_short) if m is not None)
    mlp = sum(module_params(m) for m in (*arch.gate_up_down(layer), mlp_short) if m is not None)
    return attention, mlp


def layer_kv_values(arch: ArchSpec, layer: nn.Module) -> int:
    """K and V cache values one token stores in this layer: the output rows of k_proj and v_proj."""
    _, k, v, _ = arch.qkvo(layer)
    return int(k.weight.shape[0]) + int(v.weight.shape[0])


def decoder_linear_params(model: nn.Module, arch_config: Any | None = None) -> int:
    """Weights and biases of q, k, v, o, gate, up, down over all decoder layers.

    Works on a source model (through its architecture mapping) and on a pruned
    ``IntraSliceForCausalLM`` (Llama-style names).
    """
    arch = get_arch(arch_config if arch_config is not None else model.config.model_type)
    arch.prepare_model(model)  # fused layouts (Phi-3) are split first, exactly and in place
    total = 0
    for layer in arch.decoder_layers(model):
        total += sum(layer_linear_params(arch, layer))
    return total


def param_report(model: nn.Module, arch_config: Any | None = None) -> dict[str, int]:
    return {"decoder_linear": decoder_linear_params(model, arch_config), "whole_model": whole_model_params(model)}


def parse_target_params(text: str) -> tuple[str, float]:
    """``--target-params``: a fraction to remove ("0.3", "30%") or a count to keep ("90M", "1.2B", "9e7").

    Returns ("fraction", f) or ("count", n).
    """
    from .errors import IntraSliceError

    s = str(text).strip().replace("_", "").replace(",", "")
    try:
        if s.endswith("%"):
            return "fraction", float(s[:-1]) / 100.0
        scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(s[-1:].upper())
        value = float(s[:-1]) * scale if scale else float(s)
    except ValueError:
        raise IntraSliceError(
            f"--target-params must be a fraction to remove (0.3, 30%) or a count to keep (90M, 1.2B), got {text!r}"
        ) from None
    if scale is None and value < 1:
        return "fraction", value
    return "count", value


def ratio_for_target(target: tuple[str, float], scope: str, before: dict[str, int]) -> float:
    """The fraction of decoder-linear parameters to remove so that ``scope`` meets ``target``.

    Every method prunes only decoder linears (SliceGPT's shortcuts count among them), so a
    whole-model target is met by removing the same *number* of decoder parameters.
    """
    from .errors import IntraSliceError

    if scope not in ("decoder", "model"):
        raise IntraSliceError(f"--target-of must be decoder or model, got {scope!r}")
    dec, whole = before["decoder_linear"], before["whole_model"]
    total = dec if scope == "decoder" else whole
    kind, value = target
    removed = value * total if kind == "fraction" else total - value
    if removed < 0 or removed > dec:
        what = "decoder linear" if scope == "decoder" else "whole model"
        raise IntraSliceError(
            f"--target-params {value:g} is out of reach: the {what} has {total:,} parameters, "
            f"of which the decoder linears ({dec:,}) are all that can be removed"
        )
    return removed / dec
