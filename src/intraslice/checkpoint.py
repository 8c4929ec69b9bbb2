"""Source checkpoints opened without materialising them: weights are read module by module.

A 7B-70B source model must never be whole in RAM or on the device. :class:`SourceCheckpoint`
reads the config and the safetensors index only; :meth:`SourceCheckpoint.skeleton` builds
the Hugging Face model on the meta device (no weight allocated), and
:meth:`SourceCheckpoint.load_module` / :meth:`SourceCheckpoint.release_module` materialise
one module (a decoder layer, the embedding, the final norm, the LM head) from the shards
and put it back on meta when the pipeline is done with it::

    ckpt = SourceCheckpoint.open("meta-llama/Llama-2-70b-hf", dtype="bfloat16")
    model = ckpt.skeleton()
    for i in range(ckpt.config.num_hidden_layers):
        layer = ckpt.load_module(model, f"model.layers.{i}", device="cuda")
        ...                                   # prune it, write it (shards.ShardedWriter)
        ckpt.release_module(model, f"model.layers.{i}")

Architectures whose Hugging Face layout differs from the one the pruning code reads (Phi-3's
fused projections, Phi-2's partial rotary) are converted as they are read: ``skeleton()``
applies the model-level part of ``ArchSpec.prepare_model`` and ``load_module`` converts each
decoder layer once it is complete, so the streamed model equals
``arch.prepare_model(from_pretrained(...))`` module for module.

Sources: a local directory (``config.json`` and ``model.safetensors`` or a sharded
``model.safetensors.index.json``), a hub id (only the json, safetensors and tokenizer files
are downloaded), or a GGUF file, converted once to a cached safetensors directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import socket
import tempfile
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import ARCHITECTURES, ArchSpec
from .errors import IntraSliceError
from .models import config_dtype
from .shards import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, ShardedWriter, tied_weights_to_skip

#: What a hub download fetches: config/index/tokenizer json, the weights, tokenizer models.
HUB_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "spiece.model", "*.tiktoken", "merges.txt", "vocab.*")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unreadable(path: Path, exc: BaseException, tensor: str | None = None) -> IntraSliceError:
    what = f"tensor {tensor!r} from " if tensor else ""
    return IntraSliceError(f"cannot read {what}{path} (truncated or corrupt safetensors file?): {_first_line(exc)}")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from .models import parse_dtype

    return parse_dtype(dtype)


# -- GGUF conversion cache -----------------------------------------------------------------
def gguf_cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where converted GGUF checkpoints live: ``cache_dir``, else ``$INTRASLICE_CACHE/gguf``,
    else ``~/.cache/intraslice/gguf``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("INTRASLICE_CACHE")
    return Path(env) / "gguf" if env else Path.home() / ".cache" / "intraslice" / "gguf"


#: What a conversion writes; a new version gets new cache entries. Since 3: ``config.json`` names
#: the model class (``architectures``) and carries no ``quantization_config`` (transformers
#: records the GGUF as one, but the weights written are plain floats): llama.cpp's converter
#: and vLLM read both.
CONVERSION_VERSION = 3


def gguf_cache_key(gguf_path: str | os.PathLike[str]) -> str:
    """Directory name of a GGUF file's conversion: its stem and a hash of (path, size, mtime).

    A file replaced in place (new size or mtime) gets a new conversion, never a stale one.
    """
    path = Path(gguf_path).resolve()
    st = path.stat()
    ident = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0v{CONVERSION_VERSION}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}"


#: Largest safetensors file a GGUF conversion writes (one tensor larger than this gets its own).
#: No shard is ever held in memory: each tensor is written to its file as it is dequantized.
GGUF_SHARD_BYTES = 512 * 2**20


def convert_gguf(gguf_path: Path, out: Path, max_shard_bytes: int = GGUF_SHARD_BYTES) -> None:
    """Dequantize a GGUF file into a safetensors checkpoint directory ``out``, one tensor at a time.

    The tokenizer, config and generation config come from the GGUF's metadata (transformers
    builds them without reading a weight). The weights are read from the file one tensor at
    a time, dequantized (``gguf.dequantize``), given the names and layout transformers' own
    GGUF loader gives them (its name map and its per-tensor processor: for ``llama`` files,
    Mistral's included, the Q/K row permutation of llama.cpp's converter undone) and written
    straight into the shard file that holds them, in float32, as
    ``from_pretrained(..., gguf_file=...)`` loads them: tensor for tensor equal. Shards are
    at most ``max_shard_bytes`` (``model.safetensors``, or numbered shards and an index);
    the tied LM head is left out.

    Peak memory (:func:`intraslice.plan.gguf_conversion_bytes`): the process (torch,
    transformers) and the GGUF metadata being parsed (the vocabulary, about 4 KiB a token),
    or, later, about 3x the float32 size of one unit of work (its raw bytes, the dequantized
    array, a permuted copy): a slice of :data:`GGUF_CHUNK_BYTES` of a large tensor, or a whole
    ``llama`` Q/K projection (their rows are permuted across heads). Nothing grows with the
    number of layers or the embedding's size; no shard is ever held in memory.

    GGUF architectures whose transformers loader merges several tensors into one (MoE
    experts) or that transformers loads by its newer packed path are converted whole
    (:func:`_convert_gguf_whole`): intraslice prunes none of them.
    """
    import gc

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .memory import trim

    directory, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    with torch.device("meta"):  # the names, the tied weights and the generation config; no weight
        model = AutoModelForCausalLM.from_config(config)
    plan = _gguf_tensor_plan(gguf_path, model)
    if plan is None:
        del model
        _convert_gguf_whole(gguf_path, out)
        return
    model.config.dtype = torch.float32  # what the weights are stored in, read back by SourceCheckpoint.dtype
    model.config.architectures = [type(model).__name__]  # other tools (llama.cpp, vLLM) dispatch on it
    if hasattr(model.config, "quantization_config"):  # {"quant_method": "gguf"}: the weights here are plain
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(out)
    del model, config
    gc.collect()
    trim()  # the parsed metadata (the vocabulary, many small objects) goes before the weights come
    _write_gguf_shards(gguf_path, plan, out, max_shard_bytes)


class _GGUFTensor:
    """One tensor of the conversion: where it lies in the GGUF file and what it becomes."""

    __slots__ = ("gguf_name", "name", "nbytes", "nbytes_raw", "offset", "qtype", "raw_dtype", "raw_shape", "shape")

    def __init__(self, source: Any, name: str) -> None:
        self.gguf_name, self.qtype = str(source.name), source.tensor_type
        self.offset, self.nbytes_raw = int(source.data_offset), int(source.n_bytes)
        self.raw_dtype, self.raw_shape = source.data.dtype, tuple(source.data.shape)  # no byte of it read
        self.name = name
        self.shape = tuple(int(n) for n in reversed(source.shape.tolist()))  # GGUF lists dims fastest first
        self.nbytes = 4 * int(torch.Size(self.shape).numel())  # float32


def _gguf_tensor_plan(gguf_path: Path, model: nn.Module) -> tuple[Any, list[_GGUFTensor]] | None:
    """The GGUF tensors to convert, named and shaped as transformers loads them, and the
    tensor processor transformers applies to them; None if the file cannot be streamed."""
    try:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            LlamaTensorProcessor,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )
    except ImportError:  # a transformers without its per-tensor GGUF loader
        return None
    reader = GGUFReader(gguf_path)
    arch = read_field(reader, "general.architecture")[0]
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:
        packed = False
    else:
        packed = is_gguf_arch_supported(arch)  # loaded by transformers' newer path, with its own transforms
    processor_class = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    # Only processors that turn one GGUF tensor into one tensor of the same shape stream.
    if packed or processor_class not in (TensorProcessor, LlamaTensorProcessor):
        return None
    # The head counts as transformers' load_gguf_checkpoint parses them (absent: not permuted).
    heads: dict[str, Any] = {}
    for key, hf_key in (("head_count", "num_attention_heads"), ("head_count_kv", "num_key_value_heads")):
        value = read_field(reader, f"{arch}.attention.{key}")
        if value:
            heads[hf_key] = value[0] if len(value) == 1 else value
    processor = processor_class(config=heads)
    key_map = get_gguf_hf_weights_map(model, processor)
    skip = tied_weights_to_skip(model)
    planned: dict[str, _GGUFTensor] = {}
    for t in reader.tensors:
        hf_name = key_map.get(t.name)
        if hf_name is None or hf_name in skip:  # e.g. llama3's rope_freqs: transformers drops it too
            continue
        if hf_name in planned:
            raise ValueError(f"GGUF tensors {planned[hf_name].gguf_name!r} and {t.name!r} both map to {hf_name!r}")
        planned[hf_name] = _GGUFTensor(t, hf_name)
    missing = sorted(set(model.state_dict()) - skip - set(planned))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"the GGUF file has no tensor for {', '.join(missing[:3])}{more}")
    return processor, list(planned.values())


#: Rows of a tensor the processor leaves as they are are dequantized this many float32 bytes at a time.
GGUF_CHUNK_BYTES = 64 * 2**20


def _per_row(processor: Any, t: _GGUFTensor) -> bool:
    """Whether ``t`` can be converted a slice of rows at a time: a matrix (or more) that
    transformers' processor returns unchanged (all of them but a ``llama`` file's Q and K,
    whose rows are permuted across heads) and larger than one slice."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    permuted = isinstance(processor, LlamaTensorProcessor) and (".attn_q." in t.gguf_name or ".attn_k." in t.gguf_name)
    return len(t.shape) >= 2 and not permuted and t.nbytes > GGUF_CHUNK_BYTES


def _write_gguf_shards(gguf_path: Path, plan: tuple[Any, list[_GGUFTensor]], out: Path, max_shard_bytes: int) -> None:
    """Write the planned tensors as safetensors shards, each tensor dequantized as it is written.

    Every size is known before a weight is read (float32, the GGUF's shapes), so each shard's
    header is written first and then its tensors, one at a time: no shard is ever in memory.
    The GGUF is read with plain reads, not through a memory map: a map's pages would stay in
    this process's RSS.
    """
    import struct

    import numpy as np
    from gguf import dequantize

    from .shards import shard_name

    processor, tensors = plan
    shards: list[list[_GGUFTensor]] = []
    size = 0
    for t in tensors:
        if not shards or (shards[-1] and size + t.nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    count = len(shards)
    weight_map: dict[str, str] = {}
    with open(gguf_path, "rb") as src:
        for i, shard in enumerate(shards, start=1):
            file_name = SAFETENSORS_SINGLE if count == 1 else shard_name(i, count)
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for t in shard:
                header[t.name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
                offset += t.nbytes
                weight_map[t.name] = file_name
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
            with open(out / file_name, "wb") as dst:
                dst.write(struct.pack("<Q", len(blob)))
                dst.write(blob)
                for t in shard:
                    src.seek(t.offset)
                    if _per_row(processor, t):  # blocks never span rows: a slice of rows at a time
                        rows, row_raw = t.raw_shape[0], t.nbytes_raw // t.raw_shape[0]
                        step = max(1, GGUF_CHUNK_BYTES * rows // t.nbytes)
                        for start in range(0, rows, step):
                            n = min(step, rows - start)
                            raw = np.frombuffer(src.read(n * row_raw), dtype=t.raw_dtype).reshape(n, *t.raw_shape[1:])
                            dst.write(np.ascontiguousarray(dequantize(raw, t.qtype), dtype="<f4").data)
                            del raw
                        continue
                    raw = np.frombuffer(src.read(t.nbytes_raw), dtype=t.raw_dtype).reshape(t.raw_shape)
                    values = processor.process(weights=dequantize(raw, t.qtype), name=t.gguf_name).weights
                    del raw
                    values = np.ascontiguousarray(values, dtype="<f4")
                    if values.shape != t.shape:
                        raise ValueError(f"GGUF tensor {t.gguf_name!r} came out {values.shape}, not {t.shape}")
                    dst.write(values.data)
                    del values
    if count > 1:
        total = sum(t.nbytes for t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _convert_gguf_whole(gguf_path: Path, out: Path) -> None:
    """The whole-model conversion, through ``from_pretrained(..., gguf_file=...)``: holds the
    whole dequantized model in RAM. Only for GGUF architectures :func:`convert_gguf` cannot
    stream."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    model.config.dtype = model.dtype  # what the weights are stored in, read back by SourceCheckpoint.dtype
    model.config.architectures = [type(model).__name__]  # other tools (llama.cpp, vLLM) dispatch on it
    if hasattr(model.config, "quantization_config"):  # {"quant_method": "gguf"}: the weights here are plain
        del model.config.quantization_config
    with ShardedWriter(out, skip=tied_weights_to_skip(model)) as writer:
        writer.add_state_dict(model.state_dict())
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def convert_gguf_command(gguf_path: Path, out: Path) -> list[str]:
    """The command line of :func:`convert_gguf_in_child`'s child (the memory test runs it too)."""
    import sys

    code = "import sys; from pathlib import Path; from intraslice.checkpoint import convert_gguf; "
    code += "convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))"
    return [sys.executable, "-c", code, str(gguf_path), str(out)]


def convert_gguf_in_child(gguf_path: Path, out: Path) -> None:
    """:func:`convert_gguf` in a child process.

    The conversion's transient memory (the GGUF metadata and tokenizer, one dequantized tensor
    at a time, allocator fragmentation) goes back to the system when the child ends instead
    of staying in this process's heap for the rest of a long run. A run's reported peak RSS
    counts the child (``engine.run.peak_memory_mb``), its plan the conversion
    (``plan.gguf_conversion_bytes``).
    """
    import subprocess

    proc = subprocess.run(convert_gguf_command(gguf_path, out), capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit status {proc.returncode}")


def _temp_prefix(key: str) -> str:
    return f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_dead_conversions(root: Path) -> None:
    """Delete temporary directories of conversions killed on this host (they can be huge)."""
    host = socket.gethostname()
    for entry in root.glob(".*.tmp-*"):
        try:
            owner, pid, _ = entry.name.split(".tmp-", 1)[1].rsplit("-", 2)
            if owner == host and entry.is_dir() and not _pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
        except ValueError:
            continue


def converted_gguf(
    gguf_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    converter: Callable[[Path, Path], None] | None = None,
) -> Path:
    """The safetensors conversion of a GGUF file: from the cache, or converted now, once.

    The conversion is written to a temporary directory renamed into place at the end, so a
    killed conversion never leaves a half cache entry (its temporary directory is removed
    by the next conversion on this host). Two processes converting the same file at once
    both convert; the first rename wins and the other uses it.
    """
    path = Path(gguf_path)
    if not path.is_file():
        raise IntraSliceError(f"GGUF file missing: {path}")
    root = gguf_cache_root(cache_dir)
    key = gguf_cache_key(path)
    final = root / key
    if (final / "config.json").is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        _sweep_dead_conversions(root)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(key), dir=root))
    except OSError as exc:
        raise IntraSliceError(f"cannot write the GGUF conversion cache {root}: {_first_line(exc)}") from exc
    try:
        try:
            (converter or convert_gguf_in_child)(path, tmp)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise IntraSliceError(f"could not convert GGUF {path}: {_first_line(exc)}") from exc
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise IntraSliceError(f"GGUF cache entry {final} is incomplete: delete it and retry") from None
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# -- locating a source -----------------------------------------------------------------------
def _download(repo_id: str, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(HUB_PATTERNS), local_files_only=local_only))
    except Exception as exc:  # hub errors have many types; every one is "cannot get it"
        offline = local_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        where = "the local Hugging Face cache (offline)" if offline else "the Hugging Face hub"
        raise IntraSliceError(f"could not get {repo_id!r} from {where}: {_first_line(exc)}") from exc


def _download_file(repo_id: str, filename: str, local_only: bool) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=local_only))
    except Exception as exc:
        raise IntraSliceError(f"could not get {filename!r} of {repo_id!r}: {_first_line(exc)}") from exc


def _looks_like_hub_id(model: str) -> bool:
    return model.count("/") == 1 and not model.startswith(("/", ".", "~")) and not model.endswith("/")


def _weight_map(directory: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or from the shards' headers."""
    from safetensors import safe_open

    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntraSliceError(f"unreadable safetensors index {index}: {_first_line(exc)}") from exc
        if not isinstance(weight_map, dict) or not weight_map:
            raise IntraSliceError(f"safetensors index {index} has no weight_map")
        return {str(k): str(v) for k, v in weight_map.items()}
    single = directory / SAFETENSORS_SINGLE
    files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        found = f" (found {', '.join(others)})" if others else ""
        raise IntraSliceError(
            f"no safetensors weights in {directory}{found}: streamed loading reads safetensors only "
            "(re-save the model with save_pretrained, or pass the GGUF file)"
        )
    weight_map = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                weight_map.update(dict.fromkeys(fh.keys(), f.name))
        except Exception as exc:
            raise _unreadable(f, exc) from exc
    return weight_map


# -- the checkpoint ----------------------------------------------------------------------------
class SourceCheckpoint:
    """A source model on disk, read one module at a time (never materialised whole).

    Use :meth:`open`. ``dtype`` is the dtype modules are loaded in by default: the one given
    to ``open``, else the checkpoint's (config ``dtype``/``torch_dtype``, else the first
    tensor's).
    """

    def __init__(self, directory: Path, config: Any, weight_map: dict[str, str], dtype: torch.dtype, name: str) -> None:
        self.directory = Path(directory)
        self.config = config
        self.weight_map = weight_map
        self.dtype = dtype
        self.name = name
        #: Whether opening it converted a GGUF source in this process (the memory plan counts it).
        self.gguf_converted = False
        #: Meta copies of decoder layers as the checkpoint lays them out, taken before a
        #: layer is converted, so that a released (and converted) layer can be read again.
        self._pristine: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        model: str | None = None,
        gguf_file: str | None = None,
        dtype: str | torch.dtype | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_only: bool = False,
    ) -> SourceCheckpoint:
        """Open a local directory, a hub id, or a GGUF file (``model=None``: the default model).

        ``gguf_file`` names a GGUF inside the directory or hub repo ``model`` (``model`` may
        also be a ``.gguf`` path). A GGUF is dequantized once into a safetensors cache under
        ``cache_dir`` (default ``$INTRASLICE_CACHE/gguf`` or ``~/.cache/intraslice/gguf``),
        keyed by the file's path, size and mtime; that one conversion streams the GGUF one
        tensor at a time (see :func:`convert_gguf`), every later open reuses it. Hub downloads
        use the usual Hugging Face cache; ``local_only`` (or ``HF_HUB_OFFLINE=1``) reads that
        cache only.
        """
        from .models import DEFAULT_MODEL_NAME, default_model_location, resolve_builtin

        model, gguf_file, builtin_name = resolve_builtin(model, gguf_file)
        if model is None:
            model, gguf_file = default_model_location()
            name = DEFAULT_MODEL_NAME
        elif builtin_name is not None:
            name = builtin_name
        else:
            name = model if gguf_file is None else f"{model}:{gguf_file}"
        if gguf_file is None and model.endswith(".gguf") and Path(model).is_file():
            model, gguf_file = str(Path(model).parent), Path(model).name
        if gguf_file is not None:
            if Path(model).is_dir():
                gguf_path = Path(model) / gguf_file
            elif _looks_like_hub_id(model):
                gguf_path = _download_file(model, gguf_file, local_only)
            else:
                raise IntraSliceError(f"model {model!r} is neither a directory nor a hub id (owner/name)")
            entry = gguf_cache_root(cache_dir) / gguf_cache_key(gguf_path) if gguf_path.is_file() else None
            cached = entry is not None and (entry / "config.json").is_file()
            directory = converted_gguf(gguf_path, cache_dir)
            ckpt = cls.from_directory(directory, dtype=dtype, name=name)
            ckpt.gguf_converted = not cached
            return ckpt
        elif Path(model).is_dir():
            directory = Path(model)
        elif Path(model).exists():
            raise IntraSliceError(f"model {model!r} is a file, not a model directory (a GGUF? pass gguf_file)")
        elif _looks_like_hub_id(model):
            directory = _download(model, local_only)
        else:
            raise IntraSliceError(f"model {model!r} is neither a directory nor a hub id (owner/name)")
        return cls.from_directory(directory, dtype=dtype, name=name)

    @classmethod
    def from_directory(
        cls, directory: str | os.PathLike[str], dtype: str | torch.dtype | None = None, name: str | None = None
    ) -> SourceCheckpoint:
        """Open a local safetensors checkpoint directory (reads the config and the index only)."""
        from transformers import AutoConfig

        from . import register_auto_classes

        register_auto_classes()
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise IntraSliceError(f"{directory} has no config.json: not a Hugging Face model directory")
        try:
            config = AutoConfig.from_pretrained(directory)
        except (OSError, ValueError, KeyError) as exc:
            raise IntraSliceError(f"unreadable config in {directory}: {_first_line(exc)}") from exc
        weight_map = _weight_map(directory)
        ckpt = cls(directory, config, weight_map, torch.float32, name or str(directory))
        ckpt.dtype = _as_dtype(dtype) or ckpt._stored_dtype()
        return ckpt

    def _stored_dtype(self) -> torch.dtype:
        """The checkpoint's dtype: the config's, else the first floating tensor's."""
        declared = config_dtype(self.config)
        if isinstance(declared, str):
            declared = getattr(torch, declared, None)
        if isinstance(declared, torch.dtype) and declared.is_floating_point:
            return declared
        from safetensors import safe_open

        name = next(iter(self.weight_map))
        path = self.directory / self.weight_map[name]
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    dtype = _SAFETENSORS_DTYPES.get(fh.get_slice(key).get_dtype())
                    if dtype is not None:
                        return dtype
        except Exception as exc:
            raise _unreadable(path, exc) from exc
        return torch.float32

    # -- facts ----------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return str(self.config.model_type)

    @property
    def arch(self) -> ArchSpec | None:
        """The architecture mapping, or None for a family intraslice does not know."""
        return ARCHITECTURES.get(self.model_type)

    @property
    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def tokenizer(self) -> Any:
        """The tokenizer stored with the checkpoint."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.directory)
        except (OSError, ValueError, KeyError) as exc:
            raise IntraSliceError(f"could not load the tokenizer of {self.name!r}: {_first_line(exc)}") from exc

    # -- the model without weights ----------------------------------------------------------
    def skeleton(self, attn_implementation: str = "sdpa", prepare: bool = True) -> nn.Module:
        """The model built from the config on the meta device, in eval mode; no weight is read.

        Buffers computed from the config rather than stored (the rotary embedding's
        ``inv_freq``) are real, on the CPU. With ``prepare``, the model-level part of the
        architecture's conversion is applied (``ArchSpec.prepare_globals``), matching what
        ``load_module`` does to each layer.
        """
        from transformers import AutoModelForCausalLM

        arch = self.arch
        if prepare and arch is not None and arch.prepare is not None and arch.convert_layer is None:
            raise IntraSliceError(f"{arch.name} models can only be converted whole: they cannot be streamed")
        config = copy.deepcopy(self.config)
        with torch.device("meta"):  # unlike accelerate's init_empty_weights, keeps tied weights tied
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=self.dtype)
        model.eval()
        _materialise_computed_buffers(model)
        if prepare and arch is not None:
            arch.prepare_globals(model)
        return model

    # -- reading tensors --------------------------------------------------------------------
    def resolve(self, name: str, model: nn.Module | None = None) -> str:
        """The checkpoint tensor holding model tensor ``name`` (a tied LM head: the embedding)."""
        if name in self.weight_map:
            return name
        tied = _tied_map(model) if model is not None else {}
        if not tied and name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
            tied = {"lm_head.weight": "model.embed_tokens.weight"}
        source = tied.get(name)
        if source is not None and source in self.weight_map:
            return source
        raise self._missing(name)

    def read(
        self,
        names: Iterable[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read checkpoint tensors (only these, shard by shard); floating ones cast to ``dtype``."""
        from safetensors import safe_open

        device = torch.device(device)
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise self._missing(name)
            by_file[self.weight_map[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            path = self.directory / file
            if not path.is_file():
                raise IntraSliceError(f"shard {path} is missing (it holds tensor {keys[0]!r})")
            try:
                fh_ctx = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:
                raise _unreadable(path, exc, keys[0]) from exc
            with fh_ctx as fh:
                for key in keys:
                    try:
                        t = fh.get_tensor(key)
                    except Exception as exc:
                        raise _unreadable(path, exc, key) from exc
                    if dtype is not None and t.is_floating_point():
                        t = t.to(device=device, dtype=dtype)
                    out[key] = t.to(device)
        return out

    # -- materialising modules ---------------------------------------------------------------
    def load_module(
        self,
        model: nn.Module,
        prefix: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        prepare: bool = True,
    ) -> nn.Module:
        """Materialise exactly the parameters and buffers under ``prefix`` from the shards.

        ``prefix`` is a module path of ``model`` (a skeleton from :meth:`skeleton`):
        ``"model.layers.3"``, ``"model.embed_tokens"``, ``"model.norm"``, ``"lm_head"``, ...;
        ``""`` loads everything. Tensors are read in ``dtype`` (default: :attr:`dtype`) onto
        ``device`` and replace the meta ones; a tied LM head absent from the checkpoint is
        read from the embedding (and shares its tensor if the embedding is loaded alike).
        Computed buffers (rotary ``inv_freq``) are moved to ``device``. With ``prepare``, every
        decoder layer made complete by this call is converted (``ArchSpec.prepare_layer``).
        Returns the (possibly converted) module at ``prefix``.
        """
        device = torch.device(device)
        dtype = dtype or self.dtype
        module = model.get_submodule(prefix)
        arch = self.arch
        layers = self._covered_layers(model, prefix) if arch is not None else []
        converts = prepare and arch is not None and arch.convert_layer is not None
        for _, layer in layers:
            pristine = self._pristine.get(layer)
            if pristine is not None and _differs(layer, pristine):
                _restore_children(layer, pristine)  # converted earlier: back to the stored layout
            elif converts and pristine is None and all(t.is_meta for t in _tensors(layer)):
                self._pristine[layer] = copy.deepcopy(layer)  # meta: costs no memory
        module = model.get_submodule(prefix)

        entries = list(_stored_entries(module, prefix))
        tied = _tied_map(model)
        partners: dict[str, list[str]] = defaultdict(list)
        for target, source in tied.items():
            partners[target].append(source)
            partners[source].append(target)
        keys = {full: self.resolve(full, model) for _, _, full, _, _ in entries}
        inside = set(keys)
        shared: dict[str, torch.Tensor] = {}
        for full, key in keys.items():
            for other in partners.get(full, ()):
                if other in inside or key in shared:
                    continue
                current = _get_tensor(model, other)
                if (
                    current is not None
                    and not current.is_meta
                    and current.device == device
                    and (current.dtype == dtype or not current.is_floating_point())
                    and self.resolve(other, model) == key
                ):
                    shared[key] = current  # the tied partner is loaded already: share it, do not read twice
        loaded = self.read(sorted(set(keys.values()) - set(shared)), device=device, dtype=dtype)
        loaded.update(shared)

        params: dict[str, nn.Parameter] = {}
        for owner, attr, full, old, is_param in entries:
            key = keys[full]
            t = loaded[key]
            if tuple(t.shape) != tuple(old.shape):
                raise IntraSliceError(
                    f"tensor {key!r} in {self.directory / self.weight_map[key]} has shape {tuple(t.shape)}, "
                    f"the model expects {tuple(old.shape)} for {full!r}"
                )
            if is_param:
                if key not in params:
                    params[key] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=old.requires_grad)
                owner._parameters[attr] = params[key]
            else:
                owner._buffers[attr] = t
        for owner, attr, buf in _computed_buffers(module):
            if buf.is_meta:
                raise IntraSliceError(
                    f"buffer {_join(prefix, attr)!r} is computed at construction, not stored: build the model "
                    "with SourceCheckpoint.skeleton()"
                )
            owner._buffers[attr] = buf.to(device)
        if converts:
            for index, layer in layers:
                if not any(t.is_meta for t in _tensors(layer)):
                    arch.prepare_layer(model, index)
        return model.get_submodule(prefix)

    def release_module(self, model: nn.Module, prefix: str) -> None:
        """Put the module under ``prefix`` back on the meta device (frees its memory).

        A converted decoder layer gets back the checkpoint's layout, so that it can be loaded
        again. Computed buffers stay real (moved to the CPU): they are not in the checkpoint.
        A tied partner outside ``prefix`` keeps its real tensor.
        """
        if self.arch is not None:
            for _, layer in self._covered_layers(model, prefix, whole_only=True):
                pristine = self._pristine.get(layer)
                if pristine is not None and _differs(layer, pristine):
                    _restore_children(layer, pristine)
        module = model.get_submodule(prefix)
        for owner in module.modules():
            for attr, p in list(owner._parameters.items()):
                if p is not None and not p.is_meta:
                    owner._parameters[attr] = nn.Parameter(
                        torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
                    )
            for attr, b in list(owner._buffers.items()):
                if b is None or b.is_meta:
                    continue
                if attr in owner._non_persistent_buffers_set:
                    owner._buffers[attr] = b.to("cpu")
                else:
                    owner._buffers[attr] = torch.empty_like(b, device="meta")

    def _missing(self, name: str) -> IntraSliceError:
        return IntraSliceError(f"tensor {name!r} is missing from the checkpoint {self.name!r} ({self.directory})")

    def _covered_layers(self, model: nn.Module, prefix: str, whole_only: bool = False) -> list[tuple[int, nn.Module]]:
        """Decoder layers under ``prefix`` (and, unless ``whole_only``, the one containing it)."""
        assert self.arch is not None
        try:
            layers = self.arch.decoder_layers(model)
        except AttributeError:
            return []
        out = []
        for i, layer in enumerate(layers):
            path = f"{self.arch.layers}.{i}"
            under = prefix == "" or path == prefix or path.startswith(prefix + ".")
            contains = prefix.startswith(path + ".")
            if under or (contains and not whole_only):
                out.append((i, layer))
        return out


# -- module helpers ----------------------------------------------------------------------------
def _tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _stored_entries(module: nn.Module, prefix: str) -> Iterable[tuple[nn.Module, str, str, torch.Tensor, bool]]:
    """(owner, attribute, full name, current tensor, is parameter) of every stored tensor."""
    for path, owner in module.named_modules():
        for attr, p in owner._parameters.items():
            if p is not None:
                yield owner, attr, _join(prefix, path, attr), p, True
        for attr, b in owner._buffers.items():
            if b is not None and attr not in owner._non_persistent_buffers_set:
                yield owner, attr, _join(prefix, path, attr), b, False


def _computed_buffers(module: nn.Module) -> Iterable[tuple[nn.Module, str, torch.Tensor]]:
    for owner in module.modules():
        for attr, b in owner._buffers.items():
            if b is not None and attr in owner._non_persistent_buffers_set:
                yield owner, attr, b


def _tied_map(model: nn.Module | None) -> dict[str, str]:
    """Tied tensor names, target -> source (``lm_head.weight`` -> ``model.embed_tokens.weight``)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    return dict(tied) if isinstance(tied, dict) else {}


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    owner_path, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_path)
    except AttributeError:
        return None
    return owner._parameters.get(attr, owner._buffers.get(attr))


def _differs(layer: nn.Module, pristine: nn.Module) -> bool:
    return any(type(getattr(layer, n, None)) is not type(c) for n, c in pristine.named_children())


def _restore_children(layer: nn.Module, pristine: nn.Module) -> None:
    for name, child in pristine.named_children():
        setattr(layer, name, copy.deepcopy(child))


def _materialise_computed_buffers(model: nn.Module) -> None:
    """Rebuild, on the CPU, the modules whose computed buffers were created on meta.

    These are buffers derived from the config at construction and never stored (the rotary
    embedding's ``inv_freq``); Hugging Face modules holding them take ``(config)``.
    """
    for path, module in list(model.named_modules()):
        if not any(b.is_meta for _, _, b in _computed_buffers_here(module)):
            continue
        config = getattr(module, "config", None)
        if not path or config is None or any(True for _ in module.parameters(recurse=False)):
            raise IntraSliceError(f"cannot build {path} ({type(module).__name__}) off the meta device")
        with torch.device("cpu"):
            rebuilt = type(module)(config)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, rebuilt)


def _computed_buffers_here(module: nn.Module) -> Iterable[tuple[nn.Module, str, torch.Tensor]]:
    for attr, b in module._buffers.items():
        if b is not None and attr in module._non_persistent_buffers_set:
            yield module, attr, b
