"""Resumable pruning runs: a checkpoint after every finished layer, and resume after a kill.

A 70B prune runs for hours; a crash, an out-of-memory kill or a pre-empted machine must
not send it back to layer 0. ``intraslice prune --out DIR`` works in two hidden
directories next to ``DIR``::

    .DIR.partial/   the output being written: the pruned layers' shards (written by the
                    streaming writer as the layers finish), then config, code, tokenizer,
                    report; renamed to DIR in one step when complete
    .DIR.resume/    state.json  the run's settings (model files, calibration tokens,
                                options, versions) and what is done: the dense
                                perplexity, the allocation, the layers, the final write
                    acts-NNNNN/ the calibration activations layer NNNNN+1 reads, one
                                safetensors file per batch (never pickle)
                    pending-NNNNN.safetensors  pruned tensors not in a shard yet
                    method-NNNNN.safetensors   the method's carried tensors (SliceGPT)

``state.json`` is the commit point: it is replaced atomically after the files it names
are on disk, and files no committed state names are deleted after the commit. A run
killed at any point therefore leaves either nothing (or the previous ``DIR``, untouched)
or a resumable pair of directories. Rerunning the same command resumes automatically
from the last finished layer (a line says so); the finished model is bit-for-bit the one
an uninterrupted run writes, because everything a later layer depends on is restored
exactly: its inputs, the output writer's buffer and shard boundaries, and the method's
carried state (the exact-budget carry, the pruned config so far, SliceGPT's residual
basis). A different command finding the checkpoint is refused with a line naming what
differs; ``--overwrite`` discards it, ``--no-resume`` starts over.

The model files are fingerprinted by the content of ``config.json`` and the safetensors
index and the names, sizes and modification times of the weight files (hashing 140 GB
of weights would cost minutes); the calibration tokens by the SHA-256 of their values.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .errors import IntraSliceError

STATE_FILE = "state.json"
LOCK_FILE = "lock"
STATE_VERSION = 1

#: Test hook: called as ``TEST_HOOK(point, index)`` at every checkpoint point (see :func:`hook`).
TEST_HOOK: Callable[[str, int], None] | None = None
#: ``point`` or ``point:index``: the process kills itself with SIGKILL when it gets there.
KILL_ENV = "INTRASLICE_TEST_KILL"


def hook(point: str, index: int = -1) -> None:
    """A point where a test may kill the run.

    Points: ``dense_eval`` (dense perplexity saved), ``estimator`` (each module the
    estimator reads, index = count), ``allocation`` (allocation saved), ``emit`` (layer
    ``index`` written to the output, not yet checkpointed), ``acts`` (batch ``index`` of a
    checkpoint's activations written), ``layer`` (layer ``index`` checkpointed),
    ``globals`` (embedding/norm/head written), ``rename`` (a shard renamed by the final
    close), ``model`` (weights and config complete), ``finish`` (all written,
    before the final rename), ``renamed`` (after it, before the checkpoint is deleted).
    """
    if TEST_HOOK is not None:
        TEST_HOOK(point, index)
    spec = os.environ.get(KILL_ENV)
    if spec:
        name, _, n = spec.partition(":")
        if name == point and (not n or int(n) == index):
            os.kill(os.getpid(), signal.SIGKILL)


# -- fingerprints ------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def model_fingerprint(directory: Path, weight_files: list[str]) -> dict[str, str]:
    """config.json and the index by content, weight files by name, size and mtime."""
    out = {}
    for small in ("config.json", "model.safetensors.index.json"):
        if (directory / small).is_file():
            out[small] = _sha256_file(directory / small)
    for name in sorted(set(weight_files)):
        st = (directory / name).stat()
        out[name] = f"{st.st_size} bytes, mtime {st.st_mtime_ns}"
    return out


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and values."""
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two settings, in words (``--ratio 0.3 (now 0.2)``)."""
    a, b = _flatten(old), _flatten(new)
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        group, _, name = key.partition(".")
        if group == "options":
            line = f"--{name.replace('_', '-')} {a.get(key)} (now {b.get(key)})"
        elif group == "model":
            line = "the model files"
        elif group == "calibration":
            line = "the calibration tokens"
        else:
            line = f"{name or group} {a.get(key)} (now {b.get(key)})"
        if line not in out:
            out.append(line)
    return out


# -- the checkpoint --------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_dirs(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(``.DIR.partial``, ``.DIR.resume``) of an output directory ``DIR``."""
    path = Path(out).resolve()
    return path.parent / f".{path.name}.partial", path.parent / f".{path.name}.resume"


class RunCheckpoint:
    """The checkpoint of one ``intraslice prune`` run (see the module docstring).

    Use :meth:`open`. ``partial`` is where the output is written; ``directory`` holds the
    state. ``durable``: fsync each checkpoint's files before committing it (survives a
    power loss, not only a killed process).
    """

    def __init__(self, out: str | os.PathLike[str], durable: bool = True) -> None:
        self.out = Path(out)
        self.partial, self.directory = partial_dirs(out)
        self.durable = durable
        self.state: dict[str, Any] = {}
        self.resumed = False
        self.seconds = 0.0  # time spent writing layer checkpoints
        self._lock: Any = None
        self._committed_shards = 0

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        out: str | os.PathLike[str],
        settings: dict[str, Any],
        overwrite: bool = False,
        fresh: bool = False,
        log: Callable[[str], None] = print,
        durable: bool = True,
    ) -> RunCheckpoint:
        """Resume the interrupted run of these ``settings``, or start a new checkpoint.

        An interrupted run of other settings is refused (one line naming what differs)
        unless ``overwrite``; ``fresh`` discards any interrupted run.
        """
        ck = cls(out, durable)
        settings = json.loads(json.dumps(settings, default=str))  # as it will read back
        try:
            ck.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IntraSliceError(
                f"cannot write next to the output {ck.out}: {exc.strerror or exc} ({ck.directory})"
            ) from None
        ck._take_lock()
        state = ck._read_state()
        if state is not None and ck.partial.is_dir():
            diff = differences(state.get("settings", {}), settings)
            where = f"{ck.partial} ({ck.progress(state)})"
            if diff and not (overwrite or fresh):
                ck._release_lock()
                raise IntraSliceError(
                    f"{where} is an interrupted run with other settings: {'; '.join(diff)}; rerun its command "
                    "to resume it, or pass --overwrite to discard it"
                )
            if diff or fresh:
                log(f"discarding the interrupted run in {where}")
            else:
                ck.state = state
                ck.resumed = True
                ck._committed_shards = len(((state.get("layers") or {}).get("writer") or {}).get("shards", []))
                ck._sweep()  # files a killed checkpoint write left behind
                log(f"resuming the interrupted run in {where}; --no-resume starts over")
                return ck
        ck._clear()
        try:
            ck.partial.mkdir()
        except OSError as exc:
            ck.discard()
            raise IntraSliceError(f"cannot create {ck.partial}: {exc.strerror or exc}") from None
        ck.state = {"version": STATE_VERSION, "settings": settings, "stages": {}}
        ck.commit()
        return ck

    def _take_lock(self) -> None:
        import fcntl

        self._lock = open(self.directory / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise IntraSliceError(
                f"another intraslice prune is writing {self.out} ({self.directory} is locked)"
            ) from None

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _read_state(self) -> dict[str, Any] | None:
        path = self.directory / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            return None
        return state

    @staticmethod
    def progress(state: Mapping[str, Any]) -> str:
        """What an interrupted run had done, in words."""
        stages = state.get("stages", {})
        if stages.get("complete"):
            return "complete, not yet renamed"
        if "prune" in stages:
            return "model written"
        layers = state.get("layers")
        if layers:
            return f"{layers['done']} layers done"
        if "allocation" in stages:
            return "allocation done, no layer yet"
        return "no layer done yet"

    def _clear(self) -> None:
        """Delete the partial output and every checkpoint file (the lock stays)."""
        shutil.rmtree(self.partial, ignore_errors=True)
        for p in self.directory.iterdir():
            if p.name != LOCK_FILE:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def discard(self) -> None:
        """Delete both directories (after a user error: nothing of this run is worth keeping)."""
        shutil.rmtree(self.partial, ignore_errors=True)
        self._release_lock()
        shutil.rmtree(self.directory, ignore_errors=True)

    def release(self) -> None:
        """Keep the checkpoint for a later resume (after an interruption)."""
        self._release_lock()

    # -- committing ----------------------------------------------------------------------
    def commit(self) -> None:
        """Replace state.json atomically, then delete the files it no longer names."""
        path = self.directory / STATE_FILE
        tmp = path.with_name(STATE_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.state, fh)
            fh.flush()
            if self.durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if self.durable:
            _fsync(self.directory)
        self._sweep()

    def _sweep(self) -> None:
        """Delete the checkpoint files the committed state does not name."""
        keep = {STATE_FILE, LOCK_FILE, *self._referenced()}
        for p in self.directory.iterdir():
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _referenced(self) -> set[str]:
        layers = self.state.get("layers") or {}
        names = {name for name, _ in (layers.get("writer") or {}).get("pending", [])}
        for key in ("acts", "method_file"):
            if layers.get(key):
                names.add(layers[key])
        return names

    def stage(self, key: str) -> Any:
        """The saved result of a finished stage, or None."""
        return self.state["stages"].get(key)

    def save_stage(self, key: str, value: Any) -> None:
        self.state["stages"][key] = json.loads(json.dumps(value, default=str))
        self.commit()

    # -- layers ---------------------------------------------------------------------------
    @property
    def layers(self) -> dict[str, Any] | None:
        """The last layer checkpoint: ``done`` layers, writer, method, reports, timings."""
        return self.state.get("layers")

    def save_layer(
        self,
        index: int,
        inputs: Any,
        writer: Any,
        method: Any,
        pruned_config: Any,
        reports: list[Any],
        timings: dict[str, float],
        last: bool,
    ) -> float:
        """Checkpoint after layer ``index``: the next layer's inputs, the writer, the method.

        ``inputs``: the ActivationStore the next layer reads (not saved after the ``last``
        layer: nothing reads it). Returns the seconds the checkpoint took.
        """
        import time

        from safetensors.torch import save_file

        t0 = time.perf_counter()
        tag = f"{index:05d}"
        new_files: list[Path] = []
        acts = None
        if not last:
            acts = f"acts-{tag}"
            new_files += save_activations(inputs, self.directory / acts)
        wstate = None
        if writer is not None:
            wstate = writer.snapshot(self.directory, tag)
            shards = wstate["shards"]
            new_files += [self.partial / name for name, _ in shards[self._committed_shards :]]
            new_files += [self.directory / name for name, _ in wstate["pending"] if name.endswith(f"{tag}.safetensors")]
        mjson, mtensors = method_state(method, pruned_config, index + 1)
        method_file = None
        if mtensors:
            method_file = f"method-{tag}.safetensors"
            save_file(mtensors, str(self.directory / method_file))
            new_files.append(self.directory / method_file)
        if self.durable:
            for f in new_files:
                _fsync(f)
        self.state["layers"] = {
            "done": index + 1,
            "acts": acts,
            "writer": wstate,
            "method": mjson,
            "method_file": method_file,
            "reports": [asdict(r) for r in reports],
            "timings": dict(timings),
        }
        self.commit()
        if wstate is not None:
            self._committed_shards = len(wstate["shards"])
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        return seconds

    def load_inputs(self, policy: Any) -> Any:
        """The saved inputs of the next layer, into an ActivationStore of ``policy``."""
        from safetensors.torch import load_file

        layers = self.layers
        assert layers is not None and layers["acts"]
        store = policy.store_for("inputs")
        for f in sorted((self.directory / layers["acts"]).glob("b*.safetensors")):
            try:
                t = load_file(str(f))["t"]
            except Exception as exc:
                raise IntraSliceError(f"resume: cannot read the saved activations {f}: {exc}") from None
            store.append(t)
        return store

    def load_method_tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        layers = self.layers
        if not layers or not layers.get("method_file"):
            return {}
        path = self.directory / layers["method_file"]
        try:
            return load_file(str(path))
        except Exception as exc:
            raise IntraSliceError(f"resume: cannot read {path}: {exc}") from None

    # -- the end ---------------------------------------------------------------------------
    def finish(self) -> Path:
        """The partial output becomes ``out`` (an existing ``out`` is replaced), then the
        checkpoint is deleted."""
        self.save_stage("complete", True)
        hook("finish")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.partial, 0o777 & ~umask)
        for f in self.partial.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        out = self.out.resolve()
        backup = out.parent / f".{out.name}.old"
        if out.exists():
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(out, backup)
        os.replace(self.partial, out)
        hook("renamed")
        shutil.rmtree(backup, ignore_errors=True)
        self.discard()
        return self.out


def save_activations(store: Any, directory: Path) -> list[Path]:
    """Each batch of an ActivationStore as its own safetensors file (one batch in memory).

    Batches already on disk (the ``disk`` store) are hard-linked when the file system
    allows it, else copied.
    """
    from safetensors.torch import save_file

    shutil.rmtree(directory, ignore_errors=True)  # left by a run killed while writing it
    directory.mkdir()
    files = []
    for i, item in enumerate(store._items):
        path = directory / f"b{i:06d}.safetensors"
        if isinstance(item, Path):
            try:
                os.link(item, path)
            except OSError:
                shutil.copyfile(item, path)
        else:
            save_file({"t": item.detach().to("cpu").contiguous()}, str(path))
        files.append(path)
        hook("acts", i)
    return files


# -- the method's carried state ---------------------------------------------------------------
def method_state(method: Any, pruned_config: Any, done: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What a method carries from layer to layer, as JSON and tensors.

    Every method: the pruned config's per-layer entries so far; then the method's own
    ``checkpoint_state()`` (IntraSlice and channel: the exact-budget carry; SliceGPT: the
    residual basis the next layer reads). JSON floats round-trip exactly (shortest repr).
    """
    own = getattr(method, "checkpoint_state", None)
    if own is None:
        raise IntraSliceError(f"method {type(method).__name__} cannot be checkpointed (no checkpoint_state)")
    state: dict[str, Any] = {"config_layers": list(getattr(pruned_config, "layers", None) or [])[:done]}
    carried, tensors = own()
    state.update(carried)
    return json.loads(json.dumps(state)), dict(tensors)


def restore_method(
    method: Any, pruned_config: Any, state: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], cfg: Any, arch: Any
) -> None:
    """Put :func:`method_state` back into a freshly made method (same settings)."""
    saved_layers = state.get("config_layers") or []
    if saved_layers and getattr(pruned_config, "layers", None) is not None:
        for i, spec in enumerate(saved_layers):
            pruned_config.layers[i] = spec
    method.restore_state(dict(state), dict(tensors), cfg, arch, int(pruned_config.num_hidden_layers))


def kept_line(checkpoint: RunCheckpoint, fix: str = "") -> str:
    """Where an interrupted run is kept and how to resume it."""
    layers = checkpoint.layers
    done = f" ({layers['done']} layers done)" if layers else ""
    return f"the run is kept in {checkpoint.partial}{done}; {fix}rerun the same command to resume"


def os_error_line(exc: OSError, checkpoint: RunCheckpoint | None) -> str:
    """One line for a failed write (disk full, read-only, permissions), saying what is kept."""
    what = exc.strerror or str(exc)
    where = f" writing {exc.filename}" if exc.filename else ""
    line = f"{what}{where}"
    if checkpoint is not None and checkpoint.partial.is_dir() and checkpoint.directory.is_dir():
        fix = "free some space and " if exc.errno == errno.ENOSPC else "fix it and "
        line += ": " + kept_line(checkpoint, fix)
    return line


def sweep_finished(out: str | os.PathLike[str]) -> None:
    """Delete the checkpoint of a run that completed but was killed before deleting it.

    Its state says complete and its partial output is gone (renamed to ``out``); a live
    run holds the lock and is left alone.
    """
    import fcntl

    partial, directory = partial_dirs(out)
    state = directory / STATE_FILE
    if partial.exists() or not state.is_file() or not Path(out).is_dir():
        return
    try:
        complete = json.loads(state.read_text(encoding="utf-8"))["stages"].get("complete")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    if not complete:
        return
    try:
        with open(directory / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(directory, ignore_errors=True)
    except OSError:
        return
