"""The one sequential pipeline: calibration windows flow through the model one layer at a time.

Every method (IntraSlice, the channel and SliceGPT baselines) and the streamed perplexity
run through :func:`run_layers`. The pipeline owns the iteration, the batching, the hooks'
data flow and every device move; a method only sees a :class:`LayerContext` (one layer on
the compute device, its calibration inputs, helpers to run it) and returns the compressed
layer. How one calibration window travels::

    tokens --capture_inputs--> layer-0 inputs (ActivationStore, policy.store)
      for each layer i:  access.onload(i) -> method.compress(ctx) -> new layer
                         outputs = new layer on the inputs (or the method's own)
                         access.emit(i, new layer)     (host RAM, or shards on disk)
      inputs = outputs
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ArchSpec, get_arch
from ..errors import NonFiniteError
from ..memory import trim
from . import distributed
from .devices import ActivationStore, DevicePolicy
from .hooks import StopForward, input_of


@dataclass
class LayerReport:
    index: int
    attention_ratio: float
    mlp_ratio: float
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    attention_rel_error: float | None = None
    mlp_rel_error: float | None = None
    seconds: float = 0.0


@dataclass
class LayerResult:
    """What a method returns for one layer."""

    layer: nn.Module
    report: LayerReport
    #: The next layer's inputs if the method computed them on the way (else the pipeline
    #: runs ``layer`` over the inputs).
    outputs: ActivationStore | None = None


@dataclass
class PipelineOutcome:
    layers: list[LayerReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def check_finite(t: torch.Tensor, what: str, layer: int) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"NaN/Inf in {what} of layer {layer}: the model or its dtype overflows on this data")


class LayerAccess(Protocol):
    """Where a run's layers come from and where the compressed ones go.

    :class:`ModelLayers` holds a whole model in host memory; the streaming access in
    ``pipeline.streaming`` reads each layer from safetensors shards and writes each
    compressed layer straight to the output shards.
    """

    model: nn.Module
    arch: ArchSpec

    def onload(self, index: int) -> nn.Module: ...
    def emit(self, index: int, layer: nn.Module) -> None: ...
    def release(self, index: int) -> None: ...
    def onload_module(self, path: str) -> nn.Module | None: ...
    def release_module(self, path: str) -> None: ...


class ModelLayers:
    """A model held in host memory (or, if ``resident``, wholly on the compute device)."""

    def __init__(self, model: nn.Module, policy: DevicePolicy, resident: bool = False) -> None:
        self.model = model
        self.arch = get_arch(model.config)
        self.policy = policy
        self.resident = resident
        # One home for every module: the whole model on the device (resident) or in host
        # memory, whatever device the caller handed it on; layers then visit the device.
        if resident:
            policy.to_compute(model)
        else:
            policy.to_host(model)

    def onload(self, index: int) -> nn.Module:
        return self.policy.to_compute(self.arch.decoder_layers(self.model)[index])

    def emit(self, index: int, layer: nn.Module) -> None:
        layers = self.arch.decoder_layers(self.model)
        layers[index] = layer if self.resident else self.policy.to_host(layer)

    def release(self, index: int) -> None:
        """Done with a layer that was only read (evaluation): back to host memory."""
        if not self.resident:
            self.policy.to_host(self.arch.decoder_layers(self.model)[index])

    def onload_module(self, path: str) -> nn.Module | None:
        try:
            mod = ArchSpec._get(self.model, path)
        except AttributeError:
            return None
        return self.policy.to_compute(mod)

    def release_module(self, path: str) -> None:
        if self.resident:
            return
        try:
            self.policy.to_host(ArchSpec._get(self.model, path))
        except AttributeError:
            pass


def _fit_batch(obj: Any, captured_bs: int, bs: int) -> Any:
    """Slice kwargs captured for a batch of ``captured_bs`` down to ``bs`` (the last batch)."""
    if captured_bs == bs or captured_bs == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj[:bs] if obj.dim() > 0 and obj.shape[0] == captured_bs else obj
    if isinstance(obj, tuple):
        return tuple(_fit_batch(o, captured_bs, bs) for o in obj)
    if isinstance(obj, dict):
        return {k: _fit_batch(v, captured_bs, bs) for k, v in obj.items()}
    return obj


@dataclass
class LayerInputs:
    """Calibration inputs of the current layer and the kwargs every layer call needs."""

    store: ActivationStore
    kwargs: dict[str, Any]
    captured_bs: int


@torch.no_grad()
def capture_inputs(access: LayerAccess, tokens: torch.Tensor, policy: DevicePolicy, batch_size: int) -> LayerInputs:
    """Run embedding (and rotary) only, up to decoder layer 0; keep its inputs and kwargs.

    The decoder layers are never run here (a pre-hook on layer 0 stops the forward), so
    they may still be on the meta device of a streamed model.
    """
    arch = access.arch
    model = access.model
    layers = arch.decoder_layers(model)
    for path in (arch.embed, arch.rotary):
        access.onload_module(path)
    captured: dict[str, Any] = {}
    store = policy.store_for("inputs")

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        store.append(hidden)
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            try:
                model(input_ids=policy.to_compute(tokens[start : start + batch_size]), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
        for path in (arch.embed, arch.rotary):
            access.release_module(path)
    captured.pop("cache", None)
    captured.pop("past_key_values", None)
    captured["use_cache"] = False
    return LayerInputs(store, policy.to_compute(captured), min(batch_size, tokens.shape[0]))


@dataclass
class LayerContext:
    """One layer on the compute device with its calibration inputs: what a method sees."""

    index: int
    layer: nn.Module
    arch: ArchSpec
    dims: dict[str, int]
    policy: DevicePolicy
    inputs: LayerInputs
    timings: dict[str, float]
    _timer_stack: list[_Timer] = field(default_factory=list, repr=False)
    #: The layer loop's progress bar (a method may show the shapes it chose there).
    bar: Any = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.layer.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return self.policy.compute

    def batches(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """(batch of layer inputs on the compute device, the layer kwargs fitted to it)."""
        captured_bs = self.inputs.captured_bs
        for batch in self.inputs.store:
            yield batch, _fit_batch(self.inputs.kwargs, captured_bs, batch.shape[0])

    def run(self, layer: nn.Module | None = None) -> None:
        """Run the whole layer over every batch (for the statistics its hooks collect)."""
        layer = layer or self.layer
        for batch, kw in self.batches():
            layer(batch, **kw)

    def outputs(self, layer: nn.Module | None = None) -> ActivationStore:
        """The layer's outputs on every batch, kept where the policy says."""
        layer = layer or self.layer
        out = self.policy.store_for("outputs")
        for batch, kw in self.batches():
            y = layer(batch, **kw)
            out.append(y[0] if isinstance(y, tuple) else y)
        return out

    def input_of(self, module: nn.Module, batch: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
        return input_of(self.layer, module, batch, kw)

    def release_inputs(self) -> None:
        """A method that computes the layer's outputs without its inputs frees them early."""
        self.inputs.store.clear()

    def store(self, name: str) -> ActivationStore:
        return self.policy.store_for(name)

    def math(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A statistic or weight for the float64 math, on the math device."""
        return self.policy.to_math(t)

    def check_finite(self, t: torch.Tensor, what: str) -> None:
        check_finite(t, what, self.index)

    def reduce(self, *stats: torch.Tensor) -> None:
        """Sum statistics over the ranks of a torchrun job, in place (no-op otherwise)."""
        for t in stats:
            distributed.all_reduce_(t)

    def reduce_count(self, n: int) -> int:
        return distributed.all_reduce_int(n, self.device)

    def timed(self, key: str) -> _Timer:
        """Time a block into ``timings[key]``; a nested block's time counts for itself only
        (the stages then add up to the layer's time)."""
        return _Timer(self.timings, key, self._timer_stack)


class _Timer:
    def __init__(self, timings: dict[str, float], key: str, stack: list[_Timer]) -> None:
        self.timings, self.key, self.stack = timings, key, stack
        self.inner = 0.0

    def __enter__(self) -> None:
        self.stack.append(self)
        self.t = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.t
        self.stack.pop()
        if self.stack:
            self.stack[-1].inner += elapsed
        self.timings[self.key] = self.timings.get(self.key, 0.0) + elapsed - self.inner


class LayerMethod(Protocol):
    """A compression method: one call per layer, in order, on the already-compressed outputs."""

    name: str

    def compress(self, ctx: LayerContext) -> LayerResult: ...


@torch.no_grad()
def walk_layers(
    access: LayerAccess,
    inputs: LayerInputs,
    policy: DevicePolicy,
    visit: Callable[[LayerContext], ActivationStore],
    after: Callable[[int, LayerInputs], None] | None = None,
    start: int = 0,
    progress: bool = False,
    desc: str = "layers",
    timings: dict[str, float] | None = None,
) -> LayerInputs:
    """The one layer loop: every decoder layer from ``start`` on, in order, on ``inputs``.

    ``visit(ctx)`` gets each onloaded layer with its calibration inputs and returns the
    layer's outputs (what pruning, the dense statistics and the streamed evaluation differ
    in); they become the next layer's inputs, and the old ones are freed. ``after(i,
    inputs)`` runs once layer ``i``'s outputs are the inputs in hand: where a pruning run
    writes the layer and checkpoints, and a read-only pass releases the layer. Returns
    the last layer's outputs.
    """
    arch = access.arch
    dims = arch.dims(access.model.config)
    n_layers = dims["n_layers"]
    bar = tqdm(range(start, n_layers), desc=desc, unit="layer", disable=not progress, initial=start, total=n_layers)
    for li in bar:
        layer = access.onload(li)
        ctx = LayerContext(li, layer, arch, dims, policy, inputs, timings if timings is not None else {}, bar=bar)
        outputs = visit(ctx)
        inputs.store.clear()
        inputs = LayerInputs(outputs, inputs.kwargs, inputs.captured_bs)
        if after is not None:
            after(li, inputs)
        trim()  # what this layer freed goes back to the system (see memory.py)
    return inputs


def run_layers(
    access: LayerAccess,
    tokens: torch.Tensor,
    method: LayerMethod,
    policy: DevicePolicy,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "pruning layers",
    start: int = 0,
    start_inputs: ActivationStore | None = None,
    after_layer: Callable[[int, ActivationStore, PipelineOutcome], None] | None = None,
) -> PipelineOutcome:
    """Compress every decoder layer of ``access`` with ``method``, in order (:func:`walk_layers`).

    A resumed run (``intraslice.resume``) passes ``start`` (the first layer not yet done)
    and ``start_inputs`` (that layer's inputs, saved by the interrupted run); the layer
    kwargs are captured again (embedding only). ``after_layer(i, next inputs, outcome)``
    runs once layer ``i`` is emitted: where a resumable run checkpoints. ``outcome.layers``
    holds the layers done by this call only.
    """
    outcome = PipelineOutcome()
    timings = outcome.timings
    t0 = time.perf_counter()
    inputs = capture_inputs(access, tokens, policy, batch_size)
    if start_inputs is not None:
        inputs.store.clear()
        inputs = LayerInputs(start_inputs, inputs.kwargs, inputs.captured_bs)
    timings["capture"] = time.perf_counter() - t0
    for batch in inputs.store:
        check_finite(batch, "the inputs", start)
    done: dict[int, tuple[nn.Module, LayerReport, float]] = {}

    def compress(ctx: LayerContext) -> ActivationStore:
        t_layer = time.perf_counter()
        result = method.compress(ctx)
        distributed.broadcast_module_(result.layer)  # every rank goes on with rank 0's solution
        t = time.perf_counter()
        outputs = result.outputs if result.outputs is not None else ctx.outputs(result.layer)
        for batch in outputs:
            check_finite(batch, "the outputs", ctx.index)
        timings["propagate"] = timings.get("propagate", 0.0) + time.perf_counter() - t
        r = result.report
        ctx.bar.set_postfix(heads=r.num_heads, r=r.head_dim, mlp=r.intermediate_size)
        done[ctx.index] = (result.layer, r, t_layer)
        return outputs

    def emit(li: int, inputs: LayerInputs) -> None:
        layer, report, t_layer = done.pop(li)
        access.emit(li, layer)
        report.seconds = time.perf_counter() - t_layer
        outcome.layers.append(report)
        if after_layer is not None:
            after_layer(li, inputs.store, outcome)

    inputs = walk_layers(access, inputs, policy, compress, emit, start, progress, desc, timings)
    inputs.store.clear()
    return outcome


@torch.no_grad()
def stream_forward(
    access: LayerAccess,
    tokens: torch.Tensor,
    policy: DevicePolicy,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "layers",
) -> LayerInputs:
    """The last decoder layer's outputs on ``tokens``, one layer on the device at a time.

    The model is only read (each layer is released after use): this is how a model larger
    than the device is evaluated. The final norm and LM head are applied by the caller.
    """
    inputs = capture_inputs(access, tokens, policy, batch_size)

    def forward(ctx: LayerContext) -> ActivationStore:
        return ctx.outputs(ctx.layer)

    return walk_layers(access, inputs, policy, forward, lambda li, _: access.release(li), 0, progress, desc)
