"""Module swapping: physically smaller linears and attention modules built from new weights.

The weights come from the float64 math (on the math device); the new modules are made in
the model dtype on the compute device, so a pruned layer can run on the next calibration
batch at once. These are the only places a method's result becomes an ``nn.Module``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..arch import ArchSpec
from ..modeling import IntraSliceAttention, IntraSliceConfig


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (out, in) and ``bias``, cast and moved once."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=device, dtype=dtype)
    lin.weight.data.copy_(weight.to(device=device, dtype=dtype))
    if bias is not None:
        lin.bias.data.copy_(bias.to(device=device, dtype=dtype))
    return lin


def bias_of(lin: nn.Linear) -> torch.Tensor | None:
    return lin.bias.data if lin.bias is not None else None


def numel_bias(lin: nn.Linear) -> int:
    return lin.bias.numel() if lin.bias is not None else 0


def row_linear(lin: nn.Linear | None, idx: torch.Tensor, dtype: torch.dtype, device: torch.device) -> nn.Linear | None:
    """A new linear with the rows ``idx`` of ``lin`` (and of its bias); None stays None."""
    if lin is None:
        return None
    idx = idx.to(lin.weight.device)
    bias = lin.bias.data[idx] if lin.bias is not None else None
    return new_linear(lin.weight.data[idx], bias, dtype, device)


def install_attention(
    arch: ArchSpec,
    layer: nn.Module,
    pruned_config: IntraSliceConfig,
    li: int,
    spec: dict[str, Any],
    weights: tuple[tuple[torch.Tensor, torch.Tensor | None], ...],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Swap into ``layer`` a physically smaller attention with (weight, bias) for q, k, v, o."""
    attn = IntraSliceAttention(pruned_config, li, spec).to(device=device, dtype=dtype)
    attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = (new_linear(w, b, dtype, device) for w, b in weights)
    arch.set_attention(layer, attn)
