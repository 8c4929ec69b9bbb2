"""Weights streamed both ways: layers read from the source shards, written to the output shards.

:class:`StreamedLayers` is the :class:`~intraslice.pipeline.sequential.LayerAccess` of a
model that is never whole in memory: the model is a meta-device skeleton, a decoder layer
is read from the safetensors shards onto the compute device when the pipeline asks for it
and put back on meta after use; with a :class:`PrunedWriter`, each compressed layer is
written to the output shards before it is dropped. Peak memory: one layer (plus one
output shard being filled), whatever the depth.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import get_arch
from ..checkpoint import SourceCheckpoint
from ..errors import NonFiniteError
from ..shards import ShardedWriter
from .devices import DevicePolicy

#: Shards are closed at the first layer boundary past this size.
MIN_SHARD_BYTES = 64 * 2**20


class PrunedWriter:
    """Writes a compressed model layer by layer as sharded safetensors with the standard index.

    Tensor names are those ``build_pruned_model`` would give (the source names after the
    architecture's ``state_renames``), so the directory loads with ``from_pretrained`` into
    the pruned model class, exactly like an in-memory save.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        renames: tuple[tuple[str, str], ...] = (),
        min_shard_bytes: int = MIN_SHARD_BYTES,
        **kw: Any,
    ):
        self.directory = Path(directory)
        self.renames = renames
        self.min_shard_bytes = min_shard_bytes
        self.writer = ShardedWriter(self.directory, **kw)

    @classmethod
    def resume(
        cls,
        directory: str | os.PathLike[str],
        state: Mapping[str, Any],
        pending_dir: Path,
        renames: tuple[tuple[str, str], ...] = (),
        min_shard_bytes: int = MIN_SHARD_BYTES,
        **kw: Any,
    ) -> PrunedWriter:
        """The writer of a :meth:`snapshot` (see ``ShardedWriter.resume``)."""
        self = cls.__new__(cls)
        self.directory = Path(directory)
        self.renames = renames
        self.min_shard_bytes = min_shard_bytes
        self.writer = ShardedWriter.resume(self.directory, state, pending_dir, **kw)
        return self

    def snapshot(self, pending_dir: Path, tag: str) -> dict[str, Any]:
        """State to resume from after the layers written so far (see ``ShardedWriter.snapshot``)."""
        return self.writer.snapshot(pending_dir, tag)

    def end_layer(self) -> None:
        """A layer is complete: write the shard once it holds ``min_shard_bytes``.

        Shards then end on layer boundaries, and host memory holds at most this much plus
        one layer, whatever the model's size (one 1.2 GB shard per layer for a 70B model,
        a few layers per shard for a small one).
        """
        if self.writer._buffer_bytes >= self.min_shard_bytes:
            self.writer.flush()

    def _name(self, name: str) -> str:
        for old, new in self.renames:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    def add_module(self, prefix: str, module: nn.Module, skip: frozenset[str] = frozenset()) -> None:
        for name, t in module.state_dict().items():
            full = f"{prefix}.{name}" if prefix else name
            if full not in skip:
                self.writer.add(self._name(full), t)

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


def check_finite_weights(module: nn.Module, prefix: str) -> None:
    """Refuse a source module with a NaN/Inf weight, naming the tensor (the layer and module).

    Without it the first symptom is a NaN statistic or loss layers later, far from the cause.
    """
    for name, t in module.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"NaN/Inf in the source weight {prefix}.{name}: the checkpoint is damaged")


class StreamedLayers:
    """A model read one module at a time from its checkpoint (see module docstring)."""

    def __init__(
        self,
        ckpt: SourceCheckpoint,
        policy: DevicePolicy,
        writer: PrunedWriter | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.ckpt = ckpt
        self.policy = policy
        self.writer = writer
        self.model = model if model is not None else ckpt.skeleton()
        self.arch = get_arch(self.model.config)

    def _prefix(self, index: int) -> str:
        return f"{self.arch.layers}.{index}"

    def onload(self, index: int) -> nn.Module:
        layer = self.ckpt.load_module(self.model, self._prefix(index), device=self.policy.compute)
        check_finite_weights(layer, self._prefix(index))
        return layer

    def emit(self, index: int, layer: nn.Module) -> None:
        if self.writer is not None:
            self.writer.add_module(self._prefix(index), layer)
            self.writer.end_layer()
        self.arch.decoder_layers(self.model)[index] = layer  # the compressed module, then dropped
        self.ckpt.release_module(self.model, self._prefix(index))

    def release(self, index: int) -> None:
        self.ckpt.release_module(self.model, self._prefix(index))

    def onload_module(self, path: str) -> nn.Module | None:
        try:
            self.model.get_submodule(path)
        except AttributeError:
            return None
        return self.ckpt.load_module(self.model, path, device=self.policy.compute)

    def release_module(self, path: str) -> None:
        try:
            self.model.get_submodule(path)
        except AttributeError:
            return
        self.ckpt.release_module(self.model, path)

    def write_globals(self, tied: bool) -> None:
        """Embedding, final norm and LM head (not tied) to the output, one at a time."""
        assert self.writer is not None
        arch = self.arch
        for path in (arch.embed, arch.final_norm, *(() if tied else (arch.lm_head,))):
            module = self.ckpt.load_module(self.model, path, device="cpu")
            self.writer.add_module(path, module)
            self.ckpt.release_module(self.model, path)
