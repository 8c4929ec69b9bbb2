"""The teacher's targets, computed once in a streamed pass and cached on disk.

Why a cache: the teacher and the student never need to be in memory together. The
teacher runs one decoder layer at a time over a shard of training windows
(:func:`intraslice.pipeline.sequential.stream_forward`, as the pruning and the evaluation
do, so a 70B teacher needs one layer's memory), its final norm and LM head are applied in
chunks of positions, and what training needs is kept: per position the top-k
log-probabilities (float32), their token ids (int32) and the log-probability of all the
other tokens (the tail bucket of :mod:`intraslice.heal.loss`). ``topk = 0`` keeps the
whole distribution (vocabulary-size rows: for tiny runs only).

Layout (under the heal run's resume area)::

    teacher/manifest.json          what the shards hold (teacher, windows, k) and which are done
    teacher/shard-NNNNN.safetensors  logp (m, T, k), idx (m, T, k), tail (m, T) of m windows

Bounded and resumable: each shard is one pass of the teacher over ``shard_windows``
windows (host memory holds that shard's hidden states), written to a temporary name and
renamed, then committed to the manifest; a killed pass recomputes only the shards the
manifest does not list. Size on disk: windows x T x k x 8 bytes (k = 64, 1M tokens: 512 MB).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import IntraSliceError

MANIFEST = "manifest.json"
#: Positions whose teacher logits exist at once.
HEAD_CHUNK = 256


def cache_bytes(n_windows: int, seqlen: int, topk: int, vocab: int) -> int:
    k = topk if 0 < topk < vocab else vocab
    return n_windows * seqlen * (k * (4 + (4 if 0 < topk < vocab else 0)) + 4)


@torch.no_grad()
def teacher_targets(logits: torch.Tensor, topk: int) -> dict[str, torch.Tensor]:
    """The cached targets of (…, V) teacher logits: top-k log-probs, ids and the tail."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if topk <= 0 or topk >= logp.shape[-1]:
        return {"logp": logp}
    values, idx = logp.topk(topk, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1)
    return {"logp": values, "idx": idx.to(torch.int32), "tail": tail}


class TeacherCache:
    """Read access to a finished cache: :meth:`get` one window's targets."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.shard_windows = int(manifest["shard_windows"])

    @property
    def full(self) -> bool:
        return int(self.manifest["topk"]) <= 0

    def get(self, window: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        s, i = divmod(window, self.shard_windows)
        path = self.directory / self.manifest["shards"][s]
        with safe_open(str(path), framework="pt") as f:
            logp = f.get_slice("logp")[i]
            if "idx" not in f.keys():
                return logp, None, None
            return logp, f.get_slice("idx")[i], f.get_slice("tail")[i]

    def nbytes(self) -> int:
        return sum((self.directory / s).stat().st_size for s in self.manifest["shards"])


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)


def build_cache(
    directory: Path,
    ckpt: Any,
    windows: torch.Tensor,
    topk: int,
    policy: Any,
    key: str,
    shard_windows: int = 64,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_shard: Callable[[int], None] | None = None,
) -> TeacherCache:
    """The teacher's targets for every window, reusing the shards an interrupted pass finished."""
    from ..pipeline.sequential import stream_forward
    from ..pipeline.streaming import StreamedLayers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n, seqlen = windows.shape
    n_shards = -(-n // shard_windows)
    manifest: dict[str, Any] = {
        "key": key,
        "n_windows": n,
        "seqlen": seqlen,
        "topk": topk,
        "shard_windows": shard_windows,
        "shards": [],
    }
    try:
        old = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if old and {k: v for k, v in old.items() if k != "shards"} == {k: v for k, v in manifest.items() if k != "shards"}:
        # the contiguous prefix of finished shards: shard s holds windows s*m..; a gap (a lost middle
        # shard) means everything from it on is recomputed, so index and file always agree
        for i, name in enumerate(old["shards"]):
            if name != f"shard-{i:05d}.safetensors" or not (directory / name).is_file():
                break
            manifest["shards"].append(name)
        if manifest["shards"]:
            log(f"teacher cache: {len(manifest['shards'])} of {n_shards} shards reused from an interrupted run")
    else:
        for stale in directory.glob("shard-*"):
            stale.unlink()
    _write_manifest(directory, manifest)
    done = len(manifest["shards"])
    if done < n_shards:
        access = StreamedLayers(ckpt, policy)
        arch = access.arch
        bar = tqdm(
            total=n * seqlen, initial=done * shard_windows * seqlen, desc="teacher", unit="tok", disable=not progress
        )
        for s in range(done, n_shards):
            chunk = windows[s * shard_windows : (s + 1) * shard_windows]
            hidden = stream_forward(access, chunk, policy, batch_size=1)
            norm = access.onload_module(arch.final_norm)
            head = access.onload_module(arch.lm_head)
            parts: dict[str, list[torch.Tensor]] = {}
            try:
                for h in hidden.store:
                    rows: dict[str, list[torch.Tensor]] = {}
                    for a in range(0, seqlen, HEAD_CHUNK):
                        logits = head(norm(h[:, a : a + HEAD_CHUNK]))
                        for name, t in teacher_targets(logits, topk).items():
                            rows.setdefault(name, []).append(t.cpu())
                    for name, ts in rows.items():
                        parts.setdefault(name, []).append(torch.cat(ts, dim=1))
            finally:
                hidden.store.clear()
                access.release_module(arch.final_norm)
                access.release_module(arch.lm_head)
            tensors = {name: torch.cat(ts).contiguous() for name, ts in parts.items()}
            if not all(torch.isfinite(t).all() for name, t in tensors.items() if name != "idx"):
                # a tail of 0 mass is -inf and allowed; NaN or +inf never is
                bad = [name for name, t in tensors.items() if name != "idx" and (torch.isnan(t).any() or (t > 0).any())]
                if bad:
                    raise IntraSliceError("the teacher produces NaN/Inf: check its weights and --dtype")
            name = f"shard-{s:05d}.safetensors"
            tmp = directory / (name + ".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, directory / name)
            manifest["shards"].append(name)
            _write_manifest(directory, manifest)
            bar.update(chunk.numel())
            if on_shard is not None:
                on_shard(s)
        bar.close()
    return TeacherCache(directory, manifest)
