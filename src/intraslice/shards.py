"""Writing a model's weights as safetensors shards, one tensor at a time.

A pruned 70B model must never be whole in RAM: the layer-by-layer pipeline hands each
compressed layer's tensors to a :class:`ShardedWriter`, which keeps at most one shard in
memory and writes it out as soon as it is full. ``close()`` gives the files the names
``from_pretrained`` expects (``model.safetensors``, or ``model-0000i-of-0000N.safetensors``
plus ``model.safetensors.index.json``), so the directory loads like any Hugging Face
checkpoint once a ``config.json`` sits next to it.

Shards are written under temporary names and renamed only in ``close()``: the final count N
is part of every name, and an aborted run leaves no file that looks like a checkpoint.
Write into a temporary directory (``saving.atomic_directory``) for an atomic result.

A resumable run (``intraslice.resume``) calls :meth:`ShardedWriter.snapshot` after every
layer: the shards written so far are named in the returned state, and the tensors still
buffered (not yet in a shard) go to a small *pending* file, so that
:meth:`ShardedWriter.resume` rebuilds exactly this writer (same buffer, same shard
boundaries, hence byte-identical shards) in a later process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from .errors import IntraSliceError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
#: Hugging Face's own default shard size is 5 GB; 2 GiB keeps the RAM high-water mark low.
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30
_TMP_PREFIX = "_intraslice-shard-"


def shard_name(index: int, count: int) -> str:
    """The standard name of shard ``index`` (1-based) of ``count``."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def tied_weights_to_skip(config_or_model: Any) -> frozenset[str]:
    """Names not to write because ``from_pretrained`` re-ties them to another tensor.

    A model's ``all_tied_weights_keys`` (transformers 5) names them exactly; for a bare
    config, ``lm_head.weight`` when ``tie_word_embeddings`` is set (the input embedding is
    then the one stored). Writing it anyway would store the largest matrix twice.
    """
    tied = getattr(config_or_model, "all_tied_weights_keys", None)
    if isinstance(tied, Mapping):
        return frozenset(tied)
    config = getattr(config_or_model, "config", config_or_model)
    return frozenset({"lm_head.weight"}) if getattr(config, "tie_word_embeddings", False) else frozenset()


def _is_final_name(name: str) -> bool:
    """A file name ``from_pretrained`` reads as weights (an earlier checkpoint's, or ours once closed)."""
    return name == SAFETENSORS_INDEX or (name.startswith("model") and name.endswith(".safetensors"))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardedWriter:
    """Append tensors; a shard file is written whenever ``max_shard_bytes`` is reached.

    At most one shard (``max_shard_bytes``, or one larger tensor alone) is held in RAM. A
    tensor already on the CPU and contiguous is held by reference until its shard is
    written, not copied: do not modify it in place before ``close()``/the next flush.
    ``skip`` names are silently dropped (see :func:`tied_weights_to_skip`).

    Use as a context manager: a clean exit calls ``close()``, an exception removes the
    shards written so far.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        skip: Iterable[str] = (),
        _check_stale: bool = True,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        stale = sorted(p.name for p in self.directory.iterdir() if _is_final_name(p.name))
        if stale and _check_stale:
            # Mixing our shards with an earlier checkpoint's would give a directory that loads wrong weights.
            raise IntraSliceError(f"{self.directory} already holds safetensors weights ({', '.join(stale)})")
        self.max_shard_bytes = int(max_shard_bytes)
        self.skip = frozenset(skip)
        self.total_size = 0
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._storages: set[int] = set()
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._closed = False
        self.files: list[Path] = []
        #: Pending files (see :meth:`snapshot`) holding the buffer, in order, and their names.
        self._pending: list[tuple[str, list[str]]] = []
        #: Called after each shard is renamed in ``close()`` (a test hook of the resume tests).
        self.on_rename: Callable[[Path], None] | None = None

    # -- writing -----------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> bool:
        """Queue one tensor (moved to the CPU, contiguous); False if ``name`` is skipped."""
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        if name in self.skip:
            return False
        if name in self._names:
            raise ValueError(f"tensor {name!r} added twice")
        t = tensor.detach()
        if t.is_meta:
            raise ValueError(f"tensor {name!r} is on the meta device: materialise it before writing")
        t = t.to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in self._storages:
            t = t.clone()  # safetensors refuses tensors sharing memory within one file
            storage = t.untyped_storage().data_ptr()
        nbytes = _nbytes(t)
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._buffer[name] = t
        self._storages.add(storage)
        self._buffer_bytes += nbytes
        self._names.add(name)
        self.total_size += nbytes
        if self._buffer_bytes >= self.max_shard_bytes:
            self.flush()
        return True

    def add_state_dict(self, state: Mapping[str, torch.Tensor], prefix: str = "") -> int:
        """``add`` every entry (names prefixed with ``prefix``); returns how many were written."""
        return sum(self.add(prefix + name, t) for name, t in state.items())

    def flush(self) -> None:
        """Write the buffered tensors as one shard (under a temporary name) and drop them."""
        if not self._buffer:
            return
        from safetensors.torch import save_file

        path = self.directory / f"{_TMP_PREFIX}{len(self._shards) + 1:05d}.safetensors"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer = {}
        self._storages = set()
        self._buffer_bytes = 0
        self._pending = []  # their tensors are in the shard now (the files go at the next commit)

    def close(self) -> list[Path]:
        """Write the last shard, give every shard its final name, write the index if several.

        Returns the final file paths (the index last). An empty writer writes an empty
        ``model.safetensors``.
        """
        if self._closed:
            return self.files
        self.flush()
        if not self._shards:
            from safetensors.torch import save_file

            save_file({}, str(self.directory / SAFETENSORS_SINGLE), metadata={"format": "pt"})
            self.files = [self.directory / SAFETENSORS_SINGLE]
        elif len(self._shards) == 1:
            final = self.directory / SAFETENSORS_SINGLE
            os.replace(self._shards[0][0], final)
            self._renamed(final)
            self.files = [final]
        else:
            count = len(self._shards)
            weight_map: dict[str, str] = {}
            files = []
            for i, (tmp, names) in enumerate(self._shards, start=1):
                final = self.directory / shard_name(i, count)
                os.replace(tmp, final)
                self._renamed(final)
                files.append(final)
                weight_map.update(dict.fromkeys(names, final.name))
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            index_path = self.directory / SAFETENSORS_INDEX
            tmp_index = index_path.with_name(index_path.name + ".tmp")
            tmp_index.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp_index, index_path)
            self.files = [*files, index_path]
        self._closed = True
        return self.files

    def _renamed(self, path: Path) -> None:
        if self.on_rename is not None:
            self.on_rename(path)

    # -- resuming ----------------------------------------------------------------------
    def snapshot(self, pending_dir: Path, tag: str) -> dict[str, Any]:
        """The writer's state, with the buffered tensors not yet saved put in a pending file.

        ``pending_dir/pending-{tag}.safetensors`` gets the tensors added since the last
        snapshot or flush (nothing if none: a layer that filled a shard costs no extra
        write). The returned JSON-able state names the shards and pending files in order;
        the caller commits it, and may delete pending files no committed state names.
        """
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        saved = {n for _, names in self._pending for n in names}
        new = [n for n in self._buffer if n not in saved]
        if new:
            from safetensors.torch import save_file

            name = f"pending-{tag}.safetensors"
            save_file({n: self._buffer[n] for n in new}, str(Path(pending_dir) / name), metadata={"format": "pt"})
            self._pending.append((name, new))
        return {
            "shards": [[path.name, names] for path, names in self._shards],
            "pending": [[name, names] for name, names in self._pending],
            "total_size": self.total_size,
        }

    @classmethod
    def resume(
        cls, directory: str | os.PathLike[str], state: Mapping[str, Any], pending_dir: Path, **kw: Any
    ) -> ShardedWriter:
        """The writer of :meth:`snapshot`'s ``state``, in a new process.

        Shards of that state renamed by an interrupted ``close()`` get their temporary names
        back; shards and index files written after the state are deleted (they are written
        again). Pending files are read back into the buffer, in order.
        """
        from safetensors import safe_open

        writer = cls(directory, _check_stale=False, **kw)
        d = writer.directory
        for i, (name, names) in enumerate(state["shards"], start=1):
            path = d / name
            if not path.is_file():
                renamed = sorted(d.glob(f"model-{i:05d}-of-*.safetensors"))
                if i == 1 and (d / SAFETENSORS_SINGLE).is_file():
                    renamed.append(d / SAFETENSORS_SINGLE)
                if not renamed:
                    raise IntraSliceError(f"resume: shard {path} of the checkpoint is missing")
                os.replace(renamed[0], path)
            writer._shards.append((path, list(names)))
            writer._names.update(names)
        kept = {p.name for p, _ in writer._shards}
        for p in d.iterdir():
            if (
                _is_final_name(p.name)
                or p.name == SAFETENSORS_INDEX + ".tmp"
                or (p.name.startswith(_TMP_PREFIX) and p.name not in kept)
            ):
                p.unlink()
        for name, names in state["pending"]:
            path = Path(pending_dir) / name
            try:
                with safe_open(str(path), framework="pt") as fh:
                    tensors = {n: fh.get_tensor(n) for n in names}
            except Exception as exc:
                raise IntraSliceError(f"resume: cannot read {path}: {exc}") from exc
            for n, t in tensors.items():
                writer._buffer[n] = t
                writer._storages.add(t.untyped_storage().data_ptr())
                writer._buffer_bytes += _nbytes(t)
                writer._names.add(n)
            writer._pending.append((name, list(names)))
        writer.total_size = int(state["total_size"])
        return writer

    def abort(self) -> None:
        """Drop the buffer and delete the shards written so far (after a failed run)."""
        for path, _ in self._shards:
            path.unlink(missing_ok=True)
        self._shards = []
        self._buffer = {}
        self._storages = set()
        self._buffer_bytes = 0
        self._pending = []
        self._closed = True

    @property
    def num_shards(self) -> int:
        """Shards written so far (the buffered one not counted)."""
        return len(self._shards)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
