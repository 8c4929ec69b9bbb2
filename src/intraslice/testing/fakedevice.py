"""Emulated CUDA on a CPU-only machine: mixing devices fails here the way it fails on a GPU.

Device bugs (a statistic left on the GPU meeting a CPU weight, issue #10) only show on a
CUDA machine, and the test machines have none. Under :func:`emulated_cuda` the device
``"cuda"`` (``"cuda:0"``, ``torch.device("cuda")``, the integer ``0``) exists: a tensor moved
or created there keeps its data in CPU memory but is an :class:`EmulatedCudaTensor`, whose
``.device`` says ``cuda:0``, and every torch call that mixes such a tensor with a CPU
tensor raises the ``RuntimeError`` CUDA raises ("Expected all tensors to be on the same
device, but found at least two devices, cuda:0 and cpu!"). The numbers are the CPU's, so
a run under the harness can be compared bit for bit with a plain CPU run.

How it works, and why this way:

* One :class:`~torch.overrides.TorchFunctionMode` sees every torch call made from Python
  (functions, methods, property reads, factories, ``Module.to`` through ``Tensor.to``). It
  checks the devices of the tensor arguments, runs the real CPU kernel, and tags fresh
  results by switching their Python class in place (``out.__class__ =``), which costs no
  copy and keeps autograd identity: a leaf stays a leaf, ``grad_fn`` stays the op's.
* Calls made *inside* a torch function (a Python-level helper such as ``F.layer_norm``
  calling ``torch.layer_norm``) are not seen: the mode is off while a handler runs, so
  checks are made once per top-level call (cheap), and while the real kernel runs tagged
  tensors report ``cpu`` (the truth), so helpers that allocate with ``device=x.device``
  allocate where the data is.
* ``nn.Module.to("cuda")`` moves a parameter with ``param.data = moved``; the harness
  switches the class of the *same* Parameter object, so tied weights stay tied and
  references held elsewhere (optimizers, ``lm_head.weight is embed.weight``) stay valid.
  A tagged parameter is an :class:`EmulatedCudaTensor` with ``_is_param = True``, the
  mechanism torch itself uses for Parameters of tensor subclasses, so
  ``isinstance(p, nn.Parameter)`` holds and ``model.parameters()`` lists it.

The exceptions CUDA makes, mirrored here: CPU 0-dim tensors mix with CUDA tensors (not
in ``cat``/``stack``); a CUDA tensor may be indexed by CPU index tensors or masks, a CPU
tensor by a CUDA one only if that is a 0-dim integer; ``x[idx] = v`` with advanced
indices needs ``v`` on ``x``'s device unless ``v`` is 0-dim, while basic slicing assigns
any device (it is a ``copy_``); ``copy_``, ``.to``, ``.cuda()``, ``.cpu()``,
``type_as``, ``new_tensor``, ``torch.tensor(t, device=...)`` and setting ``.data`` move
between devices. ``.numpy()`` of a CUDA tensor raises ``TypeError``; a device index other
than 0 raises "invalid device ordinal"; a CPU generator for a CUDA factory raises.

While active, ``torch.cuda`` (and ``torch.accelerator``) claim one device: ``is_available``
is true, ``synchronize``/``empty_cache`` are no-ops, memory statistics count the bytes of
live tagged storages, streams and events are inert stand-ins; ``pin_memory`` is a no-op.
Everything is restored on exit, also after an exception. Not thread-safe (one mode, one
flag); tensors tagged inside keep saying ``cuda:0`` after exit but behave as CPU tensors.
"""

from __future__ import annotations

import copyreg
import time
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["EmulatedCudaTensor", "emulated_cuda", "is_emulated_cuda", "memory_stats"]

_CUDA0 = torch.device("cuda", 0)
_CPU = torch.device("cpu")
#: Nominal memory of the emulated card (an H100's), for ``mem_get_info``/``get_device_properties``.
_TOTAL_MEMORY = 80 * 2**30


class _State:
    """Module-wide state of the harness (one harness at a time: torch function modes are per thread)."""

    def __init__(self) -> None:
        self.depth = 0  # nesting of emulated_cuda() blocks; only the outermost installs anything
        self.real_call = 0  # > 0 while a real CPU kernel runs: tagged tensors then report cpu
        #: tagged storages alive: StorageImpl address -> (bytes, weak reference that releases them)
        self.live: dict[int, tuple[int, weakref.ref]] = {}
        self.allocated = 0
        self.peak = 0


_STATE = _State()


class EmulatedCudaTensor(torch.Tensor):
    """A tensor on the emulated ``cuda:0``: CPU memory, CUDA identity.

    Its ``__torch_function__`` is disabled on purpose: the harness' mode does all the work,
    so each call is handled once, and outside the harness such a tensor computes as a CPU
    tensor (while still saying ``cuda:0``, as a real CUDA tensor would).
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return _CPU if _STATE.real_call else _CUDA0

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return not _STATE.real_call

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return bool(_STATE.real_call)

    def get_device(self) -> int:  # type: ignore[override]
        return -1 if _STATE.real_call else 0

    def __deepcopy__(self, memo: dict[int, Any]) -> EmulatedCudaTensor:
        """A tagged deep copy; storage sharing between copied views is kept (torch's memo)."""
        if id(self) in memo:
            return memo[id(self)]
        with _raw():
            if not self.is_leaf:
                raise RuntimeError(
                    "Only Tensors created explicitly by the user (graph leaves) support the deepcopy protocol"
                )
            alias = torch.Tensor._make_subclass(torch.Tensor, self, self.requires_grad)
            memo.setdefault(id(memo), []).append(alias)  # keep its id (a memo key) from being reused
            new = torch.Tensor.__deepcopy__(alias, memo)
            grad = self.grad
        _tag(new)
        memo[id(self)] = new
        if grad is not None:
            with _raw():
                new.grad = _tag(grad.detach().clone())
        for slot in copyreg._slotnames(type(self)):  # type: ignore[attr-defined]
            if hasattr(self, slot):
                setattr(new, slot, deepcopy(getattr(self, slot), memo))
        new.__dict__.update(deepcopy(self.__dict__, memo))
        return new

    def __reduce_ex__(self, proto: Any) -> Any:  # type: ignore[override]
        """Pickle (``torch.save``) as a plain CPU tensor: what ``map_location="cpu"`` would load.

        A class of this module in the file would make ``torch.load(weights_only=True)`` refuse it.
        """
        with _raw():
            alias = torch.Tensor._make_subclass(torch.Tensor, self, self.requires_grad)
        return alias.__reduce_ex__(proto)


def is_emulated_cuda(t: Any) -> bool:
    """Whether ``t`` is a tensor on the emulated ``cuda:0``."""
    return isinstance(t, EmulatedCudaTensor)


def memory_stats() -> dict[str, int]:
    """Bytes of tagged storages alive now and at the peak (what ``torch.cuda`` reports)."""
    return {"allocated_bytes.all.current": _STATE.allocated, "allocated_bytes.all.peak": _STATE.peak}


# -- tagging -----------------------------------------------------------------------------


@contextmanager
def _raw() -> Iterator[None]:
    """Run torch calls unchecked (no torch function at all) with tagged tensors reporting cpu."""
    _STATE.real_call += 1
    try:
        with torch._C.DisableTorchFunction():
            yield
    finally:
        _STATE.real_call -= 1


def _release(key: int) -> None:
    entry = _STATE.live.pop(key, None)
    if entry is not None:
        _STATE.allocated -= entry[0]


def _account(t: torch.Tensor) -> None:
    """Count ``t``'s storage once while it lives.

    A storage keeps its Python object for its whole life, so a weak reference to that
    object fires exactly when the memory is freed (cheaper than ``weakref.finalize``).
    """
    st = torch.Tensor.untyped_storage(t)
    key = st._cdata
    if key in _STATE.live:
        return
    nbytes = st.nbytes()
    _STATE.live[key] = (nbytes, weakref.ref(st, lambda _ref, key=key: _release(key)))
    _STATE.allocated += nbytes
    if _STATE.allocated > _STATE.peak:
        _STATE.peak = _STATE.allocated


def _tag(t: torch.Tensor) -> torch.Tensor:
    """Move ``t`` (a fresh result that nobody else holds) to the emulated device, in place."""
    cls = t.__class__
    if cls is EmulatedCudaTensor:
        return t
    if cls is torch.Tensor:
        t.__class__ = EmulatedCudaTensor
    elif cls is nn.Parameter:
        t.__class__ = EmulatedCudaTensor
        t._is_param = True
    else:  # another subclass: its own semantics win; it stays on the CPU
        return t
    if not t.is_meta:
        _account(t)
    return t


def _untag(t: torch.Tensor) -> None:
    """Back to a CPU tensor (``t.data = cpu_tensor`` moved it)."""
    if t.__dict__.pop("_is_param", False):
        t.__class__ = nn.Parameter
    else:
        t.__class__ = torch.Tensor


# -- device arithmetic -------------------------------------------------------------------


def _mixed(a: str, b: str, what: str) -> RuntimeError:
    return RuntimeError(
        f"Expected all tensors to be on the same device, but found at least two devices, {a} and {b}! "
        f"(emulated CUDA, in {what})"
    )


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


_TARGETS: dict[Any, Any] = {}


def _target(spec: Any) -> Any:
    """``"cuda"`` for the emulated device, else the ``torch.device`` asked for (cpu, meta)."""
    try:
        return _TARGETS[spec]
    except (KeyError, TypeError):
        pass
    dev = torch.device("cuda", spec) if isinstance(spec, int) else torch.device(spec)
    if dev.type == "cuda":
        if dev.index not in (None, 0):
            raise RuntimeError(f"CUDA error: invalid device ordinal (emulated CUDA has only cuda:0, got {dev})")
        out: Any = "cuda"
    else:
        out = dev
    try:
        _TARGETS[spec] = out
    except TypeError:
        pass
    return out


def _flat(obj: Any, out: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            if isinstance(o, torch.Tensor):
                out.append(o)
            elif isinstance(o, (list, tuple)):
                _flat(o, out)


def _tensors(args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for a in args:
        _flat(a, out)
    for v in kwargs.values():
        _flat(v, out)
    return out


def _check_same_device(tensors: list[torch.Tensor], what: Any, scalars_ok: bool = True) -> bool:
    """Raise as CUDA does if tagged and untagged tensors meet; return whether any is tagged."""
    for t in tensors:
        if t.__class__ is EmulatedCudaTensor:
            break
    else:
        return False  # all on the CPU: torch checks the rest itself
    tagged = False
    other: str | None = None
    first: str | None = None
    for t in tensors:
        if t.__class__ is EmulatedCudaTensor:
            tagged = True
            first = first or "cuda:0"
        elif scalars_ok and t.dim() == 0 and t.device.type == "cpu":
            continue  # CUDA accepts CPU scalars
        else:
            other = other or str(t.device)
            first = first or other
    if tagged and other is not None:
        second = other if first == "cuda:0" else "cuda:0"
        raise _mixed(first or "cuda:0", second, what if isinstance(what, str) else _name(what))
    return tagged


def _real(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    _STATE.real_call += 1
    try:
        return func(*args, **kwargs)
    finally:
        _STATE.real_call -= 1


def _tag_results(out: Any, inputs: list[torch.Tensor]) -> Any:
    """Tag the fresh tensors of ``out`` (not the inputs an in-place op or a no-op returns)."""
    if isinstance(out, torch.Tensor):
        if out.__class__ is not EmulatedCudaTensor and not any(out is t for t in inputs):
            _tag(out)
    elif isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor) and o.__class__ is not EmulatedCudaTensor:
                if not any(o is t for t in inputs):
                    _tag(o)
    return out


def _check_generator(kwargs: dict[str, Any], what: str) -> None:
    gen = kwargs.get("generator")
    if gen is not None and gen.device.type != "cuda":
        raise RuntimeError(f"Expected a 'cuda' device type for generator but found '{gen.device.type}' (in {what})")


# -- handlers ----------------------------------------------------------------------------


def _generic(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    tensors = _tensors(args, kwargs)
    if not tensors:
        return func(*args, **kwargs)
    if not _check_same_device(tensors, func, func not in _NO_SCALARS):
        return func(*args, **kwargs)
    if "generator" in kwargs:
        _check_generator(kwargs, _name(func))
    return _tag_results(_real(func, args, kwargs), tensors)


def _factory(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """A call with ``device=`` (or ``pin_memory=``): the result lives where ``device`` says."""
    kw = dict(kwargs)
    if kw.get("pin_memory"):
        kw["pin_memory"] = False
    dev = kw.get("device")
    target = _target(dev) if dev is not None else None
    if target is None:
        return _generic(func, args, kw)
    if target != "cuda" and target.type != "cpu":
        return func(*args, **kw)  # meta and the like: nothing to emulate
    kw["device"] = _CPU
    if target == "cuda":
        _check_generator(kw, _name(func))
    inputs = _tensors(args, {})
    out = _real(func, args, kw)
    if isinstance(out, torch.Tensor) and any(out is t for t in inputs):
        if (out.__class__ is EmulatedCudaTensor) == (target == "cuda"):
            return out  # as_tensor(t, device=t.device): no copy
        with _raw():
            out = torch.Tensor.clone(out)  # a device change always copies
    if target == "cuda":
        return _tag_results(out, inputs)
    return out


def _move(self: torch.Tensor, to_cuda: bool, kw: dict[str, Any]) -> torch.Tensor:
    """``self.to(...)`` where the target is ``cuda`` (``to_cuda``) or ``cpu``, with ``kw`` (dtype, copy, ...)."""
    if to_cuda == (self.__class__ is EmulatedCudaTensor):
        out = _real(torch.Tensor.to, (self,), kw)
        if to_cuda and out is not self:
            _tag(out)
        return out
    if self.is_meta:
        raise NotImplementedError(
            "Cannot copy out of meta tensor; no data! Please use torch.nn.Module.to_empty() instead of "
            "torch.nn.Module.to() when moving module from meta to a different device."
        )
    out = _real(torch.Tensor.to, (self,), {**kw, "copy": True})
    return _tag(out) if to_cuda else out


def _to(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    self, rest = args[0], args[1:]
    kw = dict(kwargs)
    dev = kw.pop("device", None)
    if rest:
        first = rest[0]
        if isinstance(first, torch.Tensor):
            dev = "cuda" if first.__class__ is EmulatedCudaTensor else first.device
            kw["dtype"] = first.dtype
            names: tuple[str, ...] = ("non_blocking", "copy")
        elif isinstance(first, torch.dtype):
            kw["dtype"] = first
            names = ("non_blocking", "copy")
        else:
            dev = first
            names = ("dtype", "non_blocking", "copy")
        kw.update(zip(names, rest[1:], strict=False))
    target = _target(dev) if dev is not None else None
    if target is None:
        return _move(self, self.__class__ is EmulatedCudaTensor, kw)
    if target == "cuda" or target.type == "cpu":
        return _move(self, target == "cuda", kw)
    return _real(func, (self,), {**kw, "device": target})  # meta and the like


def _cuda(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    kw = dict(kwargs)
    dev = kw.pop("device", args[1] if len(args) > 1 else None)
    if len(args) > 2:
        kw["non_blocking"] = args[2]
    _target(0 if dev is None else dev)  # invalid ordinals raise
    return _move(args[0], True, kw)


def _cpu(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    return _move(args[0], False, dict(kwargs))


def _type_as(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    self, other = args[0], (args[1] if len(args) > 1 else kwargs["other"])
    return _move(self, other.__class__ is EmulatedCudaTensor, {"dtype": other.dtype})


def _passthrough(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    return func(*args, **kwargs)


def _unchecked(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """Cross-device by definition (``copy_``): no check, the result is the destination."""
    return _real(func, args, kwargs)


def _same_as_self(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """``self.new_*(...)``: data arguments are copied, the result lives with ``self``."""
    if kwargs.get("device") is not None or kwargs.get("pin_memory"):
        return _factory(func, args, kwargs)
    out = _real(func, args, kwargs)
    if args[0].__class__ is EmulatedCudaTensor:
        _tag_results(out, _tensors(args, kwargs))
    return out


def _set_data(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """``t.data = moved`` (how ``Module.to`` moves parameters): the same object changes device."""
    self, value = args
    _real(func, args, kwargs)
    to_cuda = value.__class__ is EmulatedCudaTensor
    if to_cuda and self.__class__ is not EmulatedCudaTensor:
        _tag(self)
    elif not to_cuda and self.__class__ is EmulatedCudaTensor:
        _untag(self)
    return None


def _set_grad(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    self, value = args
    if value is not None and (self.__class__ is EmulatedCudaTensor) != (value.__class__ is EmulatedCudaTensor):
        raise RuntimeError("assigned grad has data located on a different device (emulated CUDA)")
    return _real(func, args, kwargs)


def _index_tensors(index: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _flat(index, out)
    return out


def _advanced(index: Any, tensors: list[torch.Tensor]) -> bool:
    """Whether ``x[index]`` is advanced indexing (a gather/scatter, not a view + copy_)."""
    if any(t.dim() > 0 or t.dtype == torch.bool for t in tensors):
        return True
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, list) for i in items)


def _check_indices(self: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    if self.__class__ is EmulatedCudaTensor:
        return  # CUDA copies CPU indices over
    for t in tensors:
        if t.__class__ is EmulatedCudaTensor and (t.dim() > 0 or t.dtype == torch.bool):
            raise RuntimeError(
                f"indices should be either on cpu or on the same device as the indexed tensor ({self.device})"
            )


def _getitem(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    self, index = args
    idx = _index_tensors(index)
    _check_indices(self, idx)
    if self.__class__ is not EmulatedCudaTensor:
        return _real(func, args, kwargs) if idx else func(*args, **kwargs)
    return _tag_results(_real(func, args, kwargs), [self])


def _setitem(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    self, index, value = args
    idx = _index_tensors(index)
    _check_indices(self, idx)
    if (
        isinstance(value, torch.Tensor)
        and value.dim() > 0
        and (value.__class__ is EmulatedCudaTensor) != (self.__class__ is EmulatedCudaTensor)
        and _advanced(index, idx)
    ):
        here, there = ("cuda:0", "cpu") if self.__class__ is EmulatedCudaTensor else ("cpu", "cuda:0")
        raise _mixed(here, there, "Tensor.__setitem__ (index_put_)")
    return _real(func, args, kwargs)


def _index_put(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    self = args[0]
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    values = args[2] if len(args) > 2 else kwargs.get("values")
    if isinstance(values, torch.Tensor) and values.dim() > 0:
        _check_same_device([self, values], func)
    out = _real(func, args, kwargs)
    if self.__class__ is EmulatedCudaTensor:
        _tag_results(out, [self, *_index_tensors(indices)])
    return out


def _no_numpy(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    if args[0].__class__ is EmulatedCudaTensor:
        raise TypeError(
            "can't convert cuda:0 device type tensor to numpy. "
            "Use Tensor.cpu() to copy the tensor to host memory first."
        )
    return func(*args, **kwargs)


def _pin_memory(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    return args[0]  # pinning needs a real accelerator; the copies it speeds up are CPU copies here


def _noop(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    return None


def _as_plain(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """Formatting: torch formats subclasses differently (class name, no ``f"{t:.3f}"``), so
    format a plain alias and print ``tensor([...], device='cuda:0')`` as a CUDA tensor does."""
    self = args[0]
    if self.__class__ is not EmulatedCudaTensor:
        return func(*args, **kwargs)
    with _raw():
        alias = torch.Tensor._make_subclass(torch.Tensor, self, self.requires_grad)
    text = _real(func, (alias, *args[1:]), kwargs)
    if func is torch.Tensor.__repr__ and text.endswith(")"):
        text = text[:-1] + ", device='cuda:0')"
    return text


def _autograd_grad(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """Gradients live where their inputs live (outputs and inputs may legitimately differ)."""
    inputs = kwargs["inputs"] if "inputs" in kwargs else args[1]
    seq = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    out = _real(func, args, kwargs)
    for g, x in zip(out, seq, strict=False):
        if g is not None and x.__class__ is EmulatedCudaTensor:
            _tag(g)
    return out


def _parse_to(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        _target(args[0])
        args = (torch.device("cuda", args[0]), *args[1:])
    return func(*args, **kwargs)


def _getset(name: str, op: str) -> Any:
    return getattr(getattr(torch._C.TensorBase, name), op)


_Tensor = torch.Tensor
_NO_SCALARS = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack, torch.dstack}
_NO_SCALARS |= {torch.column_stack, torch.row_stack}

_HANDLERS: dict[Any, Callable[[Callable[..., Any], tuple, dict[str, Any]], Any]] = {
    _Tensor.to: _to,
    _Tensor.cuda: _cuda,
    _Tensor.cpu: _cpu,
    _Tensor.type_as: _type_as,
    _Tensor.copy_: _unchecked,
    _Tensor.__getitem__: _getitem,
    _Tensor.__setitem__: _setitem,
    _Tensor.index_put_: _index_put,
    _Tensor.index_put: _index_put,
    torch.index_put: _index_put,
    _Tensor.numpy: _no_numpy,
    _Tensor.__array__: _no_numpy,
    _Tensor.pin_memory: _pin_memory,
    _Tensor.record_stream: _noop,
    _Tensor.__repr__: _as_plain,
    _Tensor.__format__: _as_plain,
    torch.autograd.grad: _autograd_grad,
    torch._has_compatible_shallow_copy_type: _passthrough,  # Module._apply asks before .data =
    torch.is_same_size: _passthrough,
    _Tensor.is_same_size: _passthrough,
    torch._C._nn._parse_to: _parse_to,
    _getset("data", "__set__"): _set_data,
    _getset("grad", "__set__"): _set_grad,
}
for _new in ("new_tensor", "new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided"):
    _HANDLERS[getattr(_Tensor, _new)] = _same_as_self
# Metadata reads: no tensor results, no checks; the hot path of model code.
for _attr in ("shape", "dtype", "ndim", "requires_grad", "is_leaf", "grad_fn", "layout", "is_meta", "device"):
    _HANDLERS[_getset(_attr, "__get__")] = _passthrough
for _meth in ("size", "dim", "numel", "stride", "is_contiguous", "is_floating_point", "is_complex", "element_size"):
    _HANDLERS[getattr(_Tensor, _meth)] = _passthrough
for _meth in ("data_ptr", "storage_offset", "__len__", "item", "tolist", "is_pinned", "untyped_storage"):
    _HANDLERS[getattr(_Tensor, _meth)] = _passthrough


class _EmulatedCudaMode(TorchFunctionMode):
    """Checks devices and tags results of every torch call made from Python (see the module doc)."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        if kwargs.get("device") is not None or kwargs.get("pin_memory"):
            return _factory(func, args, kwargs)
        return _generic(func, args, kwargs)


# -- torch.cuda stand-ins ----------------------------------------------------------------


class _Event:
    """``torch.cuda.Event``: wall-clock timing (the CPU ran every kernel synchronously)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.t: float | None = None

    def record(self, stream: Any = None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _Event) -> float:
        if self.t is None or end.t is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        return (end.t - self.t) * 1000.0


class _Stream:
    """``torch.cuda.Stream``: everything already ran, in order."""

    device = _CUDA0

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: _Event | None = None) -> _Event:
        event = event or _Event()
        event.record()
        return event

    def query(self) -> bool:
        return True

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_DEFAULT_STREAM = _Stream()


class _DeviceContext:
    """``torch.cuda.device(i)``: only device 0 exists."""

    def __init__(self, device: Any) -> None:
        if device is not None and not (isinstance(device, int) and device < 0):
            _target(device)

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        pass


def _check_dev(device: Any = None) -> None:
    if device is not None:
        _target(device)


def _properties(device: Any = None) -> types.SimpleNamespace:
    _check_dev(device)
    return types.SimpleNamespace(
        name="Emulated CUDA (CPU)", total_memory=_TOTAL_MEMORY, major=9, minor=0, multi_processor_count=132
    )


def _reset_peak(device: Any = None) -> None:
    _STATE.peak = _STATE.allocated


def _cuda_api() -> dict[str, Any]:
    """Replacements for ``torch.cuda`` attributes while the harness is active."""
    allocated: Callable[..., int] = lambda device=None: _STATE.allocated  # noqa: E731
    peak: Callable[..., int] = lambda device=None: _STATE.peak  # noqa: E731
    return {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": _check_dev,
        "synchronize": _check_dev,
        "empty_cache": lambda: None,
        "init": lambda: None,
        "is_initialized": lambda: True,
        "reset_peak_memory_stats": _reset_peak,
        "reset_max_memory_allocated": _reset_peak,
        "memory_allocated": allocated,
        "max_memory_allocated": peak,
        "memory_reserved": allocated,
        "max_memory_reserved": peak,
        "memory_stats": lambda device=None: memory_stats(),
        "mem_get_info": lambda device=None: (_TOTAL_MEMORY - _STATE.allocated, _TOTAL_MEMORY),
        "get_device_name": lambda device=None: _properties(device).name,
        "get_device_properties": _properties,
        "get_device_capability": lambda device=None: (9, 0),
        "is_bf16_supported": lambda including_emulation=True: True,
        "device": _DeviceContext,
        "Stream": _Stream,
        "Event": _Event,
        "stream": lambda stream=None: stream if stream is not None else _DEFAULT_STREAM,
        "current_stream": lambda device=None: _DEFAULT_STREAM,
        "default_stream": lambda device=None: _DEFAULT_STREAM,
    }


def _accelerator_api() -> dict[str, Any]:
    """Replacements for ``torch.accelerator`` (the device-generic API) while the harness is active."""
    cuda = _cuda_api()
    return {
        "is_available": cuda["is_available"],
        "current_accelerator": lambda check_available=False: torch.device("cuda"),
        "device_count": cuda["device_count"],
        "current_device_index": cuda["current_device"],
        "current_device_idx": cuda["current_device"],
        "set_device_index": _check_dev,
        "set_device_idx": _check_dev,
        "synchronize": _check_dev,
        "empty_cache": cuda["empty_cache"],
        "memory_allocated": cuda["memory_allocated"],
        "max_memory_allocated": cuda["max_memory_allocated"],
        "reset_peak_memory_stats": _reset_peak,
        "current_stream": cuda["current_stream"],
    }


def _patch(module: Any, replacements: dict[str, Any], saved: list[tuple[Any, str, Any]]) -> None:
    for name, value in replacements.items():
        saved.append((module, name, getattr(module, name, _MISSING)))
        setattr(module, name, value)


_MISSING = object()


@contextmanager
def emulated_cuda() -> Iterator[None]:
    """Make ``"cuda"`` an emulated device for the block (see the module docstring).

    Nested blocks are no-ops. On exit ``torch.cuda``, ``torch.accelerator`` and the torch
    function mode stack are restored, whatever the block raised.
    """
    if _STATE.depth:
        _STATE.depth += 1
        try:
            yield
        finally:
            _STATE.depth -= 1
        return
    saved: list[tuple[Any, str, Any]] = []
    mode = _EmulatedCudaMode()
    _STATE.depth = 1
    _reset_peak()
    try:
        _patch(torch.cuda, _cuda_api(), saved)
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is not None:
            _patch(accelerator, _accelerator_api(), saved)
        with mode:
            yield
    finally:
        _STATE.depth = 0
        for module, name, value in reversed(saved):
            if value is _MISSING:
                delattr(module, name)
            else:
                setattr(module, name, value)
