"""Forward hooks for statistics: register for a block, stop a forward early, mask rows.

The pruning methods read activations (the input of o_proj, of down_proj, the residual
after attention) through these, from the *unmodified* Hugging Face layer code: no copied
forward functions, so every architecture's own attention and MLP code is what is measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted activation is captured."""


@contextmanager
def hooks(*pairs: tuple[nn.Module, Callable, bool]) -> Iterator[None]:
    """Register (module, fn, is_pre) hooks for the duration of a block."""
    handles = [m.register_forward_pre_hook(fn) if pre else m.register_forward_hook(fn) for m, fn, pre in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def input_of(layer: nn.Module, module: nn.Module, batch: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    """Run ``layer`` only as far as ``module`` and return that module's input.

    Statistics of the attention never need the rest of the layer (the MLP), so the forward
    stops there: roughly half the cost of a full layer pass.
    """
    slot: dict[str, torch.Tensor] = {}

    def grab(_m: nn.Module, args: tuple) -> None:
        slot["x"] = args[0]
        raise StopForward

    handle = module.register_forward_pre_hook(grab)
    try:
        layer(batch, **kw)
    except StopForward:
        pass
    finally:
        handle.remove()
    return slot["x"]


@contextmanager
def masked_rows(linear: nn.Linear, mask: torch.Tensor) -> Iterator[None]:
    """Temporarily zero the rows of a linear (and its bias) outside ``mask`` (a CPU bool mask)."""
    w0 = linear.weight.data.clone()
    b0 = linear.bias.data.clone() if linear.bias is not None else None
    drop = ~mask  # CPU indices into a tensor on any device, as CUDA allows
    linear.weight.data[drop] = 0
    if linear.bias is not None:
        linear.bias.data[drop] = 0
    try:
        yield
    finally:
        linear.weight.data.copy_(w0)
        if b0 is not None:
            linear.bias.data.copy_(b0)


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X in float64 on X's device (the statistics every method accumulates)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return x.T @ x
