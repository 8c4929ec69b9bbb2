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


def decoder_linear_params(model: nn.Module, arch_config: Any | None = None) -> int:
    """Weights and biases of q, k, v, o, gate, up, down over all decoder layers.

    Works on a source model (through its architecture mapping) and on a pruned
    ``IntraSliceForCausalLM`` (Llama-style names).
    """
    arch = get_arch(arch_config if arch_config is not None else model.config.model_type)
    total = 0
    for layer in arch.decoder_layers(model):
        total += sum(layer_linear_params(arch, layer))
    return total


def param_report(model: nn.Module, arch_config: Any | None = None) -> dict[str, int]:
    return {"decoder_linear": decoder_linear_params(model, arch_config), "whole_model": whole_model_params(model)}
