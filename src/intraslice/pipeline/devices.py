"""The one device policy: where layers compute, where activations wait, where float64 math runs.

Every device move of the pruning, the estimator and the evaluation goes through a
:class:`DevicePolicy` (or an :class:`ActivationStore` it makes): the math in ``algo/`` never
moves a tensor, it computes on whatever device its inputs are on. Keeping the moves in
one place is what makes a CUDA run correct by construction, and what the emulated-device
tests (``intraslice.testing.fakedevice``) check on a CPU-only machine.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import IntraSliceError

#: Where calibration activations wait between layers.
STORES = ("auto", "device", "cpu", "disk")
#: Where the float64 eigendecompositions and solves run.
MATH = ("auto", "cpu", "device")


@dataclass
class DevicePolicy:
    """Compute device, activation store and math device of one run.

    ``store``: ``device`` keeps calibration activations on the compute device (fastest,
    needs the memory), ``cpu`` in host memory (pinned on CUDA so copies overlap), ``disk``
    in safetensors files under ``offload_dir`` (bounded host memory for huge calibration
    sets). ``math``: ``device`` runs the float64 linear algebra on the compute device (an
    H100 does a 28672-wide float64 solve in a fraction of a second; a CPU takes minutes),
    ``cpu`` on the host. ``auto`` resolves both from the compute device; the memory plan
    (``intraslice.plan``) may choose otherwise.
    """

    device: str = "cpu"
    store: str = "auto"
    math: str = "auto"
    offload_dir: str | None = None

    def __post_init__(self) -> None:
        if self.store not in STORES:
            raise IntraSliceError(f"unknown activation store {self.store!r}: use one of {', '.join(STORES)}")
        if self.math not in MATH:
            raise IntraSliceError(f"unknown math device {self.math!r}: use one of {', '.join(MATH)}")
        if self.store == "auto":
            self.store = "cpu"
        if self.math == "auto":
            self.math = "device" if self.on_accelerator else "cpu"

    # -- devices -------------------------------------------------------------------
    @property
    def compute(self) -> torch.device:
        return torch.device(self.device)

    @property
    def host(self) -> torch.device:
        return torch.device("cpu")

    @property
    def math_device(self) -> torch.device:
        return self.compute if self.math == "device" else self.host

    @property
    def on_accelerator(self) -> bool:
        return self.compute.type != "cpu"

    # -- moves ---------------------------------------------------------------------
    def to_compute(self, obj: Any) -> Any:
        """Tensors (nested in tuples, lists, dicts) or a module onto the compute device."""
        return _move(obj, self.compute)

    def to_host(self, obj: Any) -> Any:
        return _move(obj, self.host)

    def to_math(self, t: torch.Tensor | None, float64: bool = True) -> torch.Tensor | None:
        """A statistic or weight for the float64 math: detached, on the math device."""
        if t is None:
            return None
        t = t.detach().to(self.math_device)
        return t.to(torch.float64) if float64 else t

    def store_for(self, name: str = "activations") -> ActivationStore:
        return ActivationStore(self, name)

    def synchronize(self) -> None:
        if self.compute.type == "cuda":
            torch.cuda.synchronize()

    def describe(self) -> dict[str, str]:
        return {"device": str(self.compute), "store": self.store, "math": str(self.math_device)}


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor | torch.nn.Module):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


class ActivationStore:
    """Per-batch activations of one layer, kept where the policy says; read back on the device.

    A list-like: ``append`` a batch computed on the compute device, iterate to get the
    batches back on the compute device. ``disk`` writes each batch as its own safetensors
    file (no pickle), so host memory holds one batch at a time.
    """

    def __init__(self, policy: DevicePolicy, name: str = "activations") -> None:
        self.policy = policy
        self.name = name
        self._items: list[torch.Tensor | Path | None] = []
        self._dir: Path | None = None

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        mode = self.policy.store
        if mode == "device":
            self._items.append(t.to(self.policy.compute))
        elif mode == "cpu":
            host = t.to(self.policy.host)
            if self.policy.compute.type == "cuda":
                host = host.pin_memory()
            self._items.append(host)
        else:
            from safetensors.torch import save_file

            if self._dir is None:
                base = self.policy.offload_dir
                if base is not None:
                    Path(base).mkdir(parents=True, exist_ok=True)
                self._dir = Path(tempfile.mkdtemp(prefix=f"intraslice-{self.name}-", dir=base))
            path = self._dir / f"{len(self._items):06d}.safetensors"
            save_file({"t": t.to(self.policy.host).contiguous()}, str(path))
            self._items.append(path)

    def extend(self, items: Any) -> None:
        for t in items:
            self.append(t)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        if item is None:
            raise IndexError(f"{self.name} batch {i} was released")
        if isinstance(item, Path):
            from safetensors.torch import load_file

            item = load_file(str(item))["t"]
        return item.to(self.policy.compute, non_blocking=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self._items)):
            yield self[i]

    def rows(self) -> int:
        """Number of samples over all batches."""
        return sum(int(self._shape(i)[0]) for i in range(len(self._items)))

    def _shape(self, i: int) -> tuple[int, ...]:
        item = self._items[i]
        if item is None:
            raise IndexError(f"{self.name} batch {i} was released")
        if isinstance(item, Path):
            from safetensors import safe_open

            with safe_open(str(item), framework="pt") as fh:
                return tuple(fh.get_slice("t").get_shape())
        return tuple(item.shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._items if isinstance(t, torch.Tensor))

    def release(self, i: int) -> None:
        """Free batch ``i`` (memory or its file) while the others stay readable.

        A pass that turns one store into another batch by batch releases each source batch
        once it is used, so the two stores together never hold more than one extra batch.
        """
        item = self._items[i]
        self._items[i] = None
        if isinstance(item, Path):
            item.unlink(missing_ok=True)

    def clear(self) -> None:
        self._items.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self) -> None:  # a store dropped by an exception must not leave files behind
        try:
            self.clear()
        except Exception:  # interpreter shutdown: modules may be gone
            pass
