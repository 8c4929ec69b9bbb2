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
    return input_of_call(module, lambda: layer(batch, **kw))


def input_of_call(module: nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """Call ``run`` only until it reaches ``module``; return that module's first input."""
    slot: dict[str, torch.Tensor] = {}

    def grab(_m: nn.Module, args: tuple) -> None:
        slot["x"] = args[0]
        raise StopForward

    handle = module.register_forward_pre_hook(grab)
    try:
        run()
    except StopForward:
        pass
    finally:
        handle.remove()
    if "x" not in slot:
        raise RuntimeError(f"the forward never reached {type(module).__name__}")
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


#: Rows per float32 product block of :func:`cross_gram` (see its Decision).
GRAM_CHUNK = 2048


def cross_gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A^T B (rows = tokens) as a float64 matrix on A's device.

    **Decision (speed of the statistics):** float64 models get a float64 product. Every
    other dtype is multiplied in float32 over blocks of at most ``GRAM_CHUNK`` token rows and
    the blocks are summed in float64. The activations are float32 (or bf16/fp16, exact in
    float32) already, so the only added error is the float32 rounding of a <=2048-term dot
    product, about 1e-6 relative, two orders below the damping every solve adds (1e-2 of the
    mean diagonal); the token sum over a whole calibration set (65k-500k rows), where
    float32 would lose digits, stays in float64. On a CPU this halves the time of the
    statistics passes (float64 GEMM runs at half the float32 rate; measured on SmolLM2 at
    32 x 2048: see BENCHMARKS.md), and on a GPU float64 is 2-60x slower still.
    """
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    if a.dtype == torch.float64 or b.dtype == torch.float64:
        return a.to(torch.float64).T @ b.to(torch.float64)
    a, b = a.to(torch.float32), b.to(torch.float32)
    out = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], GRAM_CHUNK):
        out += (a[i : i + GRAM_CHUNK].T @ b[i : i + GRAM_CHUNK]).to(torch.float64)
    return out


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X as a float64 matrix on X's device (the statistics every method accumulates).

    Float32 products summed in float64 unless X is float64: see :func:`cross_gram`.
    """
    return cross_gram(x, x)
