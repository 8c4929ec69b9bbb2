"""Export to a llama.cpp GGUF of architecture ``deci`` (Nemotron-NAS): per-layer head counts.

llama.cpp's ``deci`` graph (``src/models/deci.cpp``) reads ``attention.head_count``,
``attention.head_count_kv`` and ``feed_forward_length`` per layer, one head width
(key length = value length = RoPE dimension count, asserted), one RoPE frequency set
(``rope_freqs.weight``: per-pair factors dividing theta_i = p * base^(-2i/n_rot)), optional
q/k/v/o biases, and groups query head i onto KV head i / (n_head / n_head_kv). A model pruned
with ``--deploy llamacpp`` fits; any other is refused in one line (:mod:`.common`).

Nothing llama.cpp's own converter does is rewritten here: its ``conversion`` package (shipped
with the llama.cpp sources, e.g. inside the ``llama-cpp-python`` sdist) provides the vocabulary
and merges, the pre-tokenizer detection, the special tokens and chat template, the tensor names,
the Q/K row permutation for its RoPE layout and the f16/Q8_0 quantization. We subclass its
``DeciModel`` and write only what is ours: the per-layer shapes, the head width and the
``rope_freqs`` factors of the kept pairs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import IntraSliceError
from .common import check_deployable, check_static_rope, kept_pairs, load_pruned_config, source_frequencies

FORMAT = "gguf"
TYPES = ("f32", "f16", "q8_0")
ENV = "INTRASLICE_LLAMA_CPP"
#: Where an sdist's llama.cpp sources are unpacked once.
CACHE = Path(os.environ.get("INTRASLICE_CACHE", Path.home() / ".cache" / "intraslice")) / "llama.cpp"
HOW = (
    f"GGUF export runs llama.cpp's own converter: set {ENV} (or pass --llama-cpp) to a llama.cpp source "
    "tree or to a llama-cpp-python sdist (pip download llama-cpp-python==0.3.36 --no-deps -d DIR)"
)


def _is_tree(path: Path) -> bool:
    return (path / "conversion" / "deci.py").is_file() and (path / "gguf-py" / "gguf" / "__init__.py").is_file()


def _unpack_sdist(sdist: Path) -> Path:
    """The ``vendor/llama.cpp`` converter files of a llama-cpp-python sdist, unpacked once."""
    dest = CACHE / sdist.name.removesuffix(".tar.gz")
    if _is_tree(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    with tarfile.open(sdist) as tar:
        parts = ("/vendor/llama.cpp/conversion/", "/vendor/llama.cpp/gguf-py/")
        wanted = [m for m in tar.getmembers() if any(part in m.name for part in parts)]
        if not wanted:
            raise IntraSliceError(f"{sdist} holds no vendor/llama.cpp/conversion: {HOW}")
        tar.extractall(tmp, members=wanted, filter="data")
    root = next(tmp.glob("*/vendor/llama.cpp"))
    try:
        os.replace(root, dest)
    except OSError:  # another process unpacked it meanwhile
        pass
    return dest


def find_llama_cpp(path: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """The llama.cpp source tree whose ``conversion`` package converts (argument, env, cache).

    ``download``: failing those, fetch the sdist once (pip download, never built); the tests
    pass False, so they skip rather than reach the network.
    """
    candidates = [Path(p) for p in (path, os.environ.get(ENV)) if p]
    for cand in candidates:
        if cand.is_file() and cand.name.endswith(".tar.gz"):
            return _unpack_sdist(cand)
        for root in (cand, cand / "vendor" / "llama.cpp"):
            if _is_tree(root):
                return root
        raise IntraSliceError(f"{cand} is neither a llama.cpp source tree nor a llama-cpp-python sdist: {HOW}")
    cached = sorted(p for p in CACHE.glob("*") if _is_tree(p)) if CACHE.is_dir() else []
    if cached:
        return cached[-1]
    if not download:
        raise IntraSliceError(HOW)
    return _unpack_sdist(_download_sdist())


#: The llama-cpp-python release whose vendored llama.cpp converter the export is tested with.
SDIST = "llama-cpp-python==0.3.36"


def _download_sdist() -> Path:
    """Download (never build) the converter's sdist once into the cache, as CI does; one line if offline."""
    dest = CACHE.parent / "sdist"
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz")) if dest.is_dir() else []
    if found:
        return found[-1]
    print(f"intraslice: downloading llama.cpp's GGUF converter once ({SDIST} sdist, 77 MB, not built)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz")) if dest.is_dir() else []
    if proc.returncode != 0 or not found:
        raise IntraSliceError(HOW)
    return found[-1]


def rope_freq_factors(config: Any, pairs: list[int], width: int) -> torch.Tensor | None:
    """llama.cpp ``rope_freqs`` factors f_i with base^(-2i/width) / f_i = the kept pair's frequency.

    None when the kept frequencies are the standard ones at this width (nothing to write).
    """
    check_static_rope(config, FORMAT)
    inv_freq, scaling = source_frequencies(config)
    if scaling != 1.0:
        raise IntraSliceError(f"cannot export to {FORMAT}: the source RoPE scales cos/sin by {scaling}")
    base = float(config.rope_parameters.get("rope_theta", 10000.0))
    standard = base ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)
    factors = standard / inv_freq[pairs].to(torch.float64)
    if torch.allclose(factors, torch.ones_like(factors), rtol=1e-6, atol=0):
        return None
    return factors.to(torch.float32)


def _converter_class(root: Path) -> type:
    """A subclass of llama.cpp's ``DeciModel`` that writes a pruned model's own shapes."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from conversion.base import TextModel, gguf  # type: ignore[import-not-found]
        from conversion.deci import DeciModel  # type: ignore[import-not-found]
    except ImportError as exc:
        raise IntraSliceError(f"cannot import llama.cpp's converter from {root}: {exc}") from None

    class IntraSliceDeciModel(DeciModel):  # type: ignore[misc, valid-type]
        model_arch = gguf.MODEL_ARCH.DECI

        def __init__(self, *args: Any, pruned: Any, tokenizer_pre: str | None = None, **kwargs: Any) -> None:
            self.pruned = pruned
            self.tokenizer_pre = tokenizer_pre
            super().__init__(*args, **kwargs)

        def set_vocab(self) -> None:
            if self.tokenizer_pre is not None:  # a tokenizer llama.cpp's hash table does not know
                self.get_vocab_base_pre = lambda _tokenizer: self.tokenizer_pre
            if (self.dir_model / "tokenizer.model").is_file():
                self._set_vocab_sentencepiece()
            else:
                self._set_vocab_gpt2()

        def set_gguf_parameters(self) -> None:
            c, w = self.pruned, self.gguf_writer
            layers = c.layers
            width = int(layers[0]["head_dim"])
            w.add_block_count(len(layers))
            w.add_context_length(int(c.max_position_embeddings))
            w.add_embedding_length(int(c.hidden_size))
            w.add_feed_forward_length([int(s["intermediate_size"]) for s in layers])
            w.add_head_count([int(s["num_heads"]) for s in layers])
            w.add_head_count_kv([int(s["num_kv_heads"]) for s in layers])
            w.add_key_length(width)
            w.add_value_length(width)
            w.add_rope_dimension_count(width)
            w.add_rope_freq_base(float(c.rope_parameters.get("rope_theta", 10000.0)))
            w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
            w.add_vocab_size(int(c.vocab_size))
            w.add_file_type(self.ftype)

        def modify_tensors(self, data_torch: Any, name: str, bid: int | None) -> Any:
            # llama.cpp's RoPE rotates adjacent dims: its converter's Q/K row permutation, per
            # layer with this layer's head counts (each head is r = head_dim wide).
            if bid is not None and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
                spec = self.pruned.layers[bid]
                n, kv = int(spec["num_heads"]), int(spec["num_kv_heads"])
                data_torch = DeciModel.permute(data_torch, n, n if "q_proj" in name else kv)
            yield from TextModel.modify_tensors(self, data_torch, name, bid)

        def generate_extra_tensors(self) -> Any:
            width = int(self.pruned.layers[0]["head_dim"])
            factors = rope_freq_factors(self.pruned, kept_pairs(self.pruned), width)
            if factors is not None:
                yield (self.format_tensor_name(gguf.MODEL_TENSOR.ROPE_FREQS), factors)

    return IntraSliceDeciModel


def gguf_hparams(config: Any) -> dict[str, Any]:
    """What llama.cpp's converter reads from config.json, for a pruned config."""
    hp = config.to_dict()
    hp["architectures"] = ["DeciLMForCausalLM"]
    return hp


def export_gguf(
    directory: str | Path,
    out: str | Path,
    out_type: str = "f32",
    llama_cpp: str | os.PathLike[str] | None = None,
    tokenizer_pre: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the GGUF ``out`` of the pruned ``directory`` (refused in one line if not expressible).

    ``out_type``: f32, f16 or q8_0 (llama.cpp's converter quantizes; a tensor whose rows do
    not split into Q8_0 blocks falls back to f16 there). ``tokenizer_pre`` names llama.cpp's
    pre-tokenizer for a tokenizer its converter does not recognise (tests, custom tokenizers).
    """
    if out_type not in TYPES:
        raise IntraSliceError(f"unknown GGUF type {out_type!r}: choose one of {', '.join(TYPES)}")
    src = Path(directory)
    config = load_pruned_config(src)
    check_deployable(config, FORMAT, uniform=False)
    rope_freq_factors(config, kept_pairs(config), int(config.layers[0]["head_dim"]))  # refuse early
    # **Decision**: the converter runs in a child process whose ``gguf`` is the one shipped with
    # the same llama.cpp sources (the converter uses gguf-py features newer than the PyPI
    # release of the same version number), and whose memory goes back to the system after.
    return _run_child(src, Path(out), out_type, tokenizer_pre, overwrite, llama_cpp)


def export_source_gguf(
    directory: str | Path,
    out: str | Path,
    out_type: str = "f16",
    llama_cpp: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    tokenizer_pre: str | None = None,
) -> Path:
    """Write the GGUF of an unpruned Hugging Face directory with llama.cpp's own converter class.

    The dense baseline of the llama.cpp speed bench: the source model as users would convert it
    (``convert_hf_to_gguf.py``: architecture ``llama``/``qwen2``), in the pruned export's type.
    """
    if out_type not in TYPES:
        raise IntraSliceError(f"unknown GGUF type {out_type!r}: choose one of {', '.join(TYPES)}")
    src = Path(directory)
    if not (src / "config.json").is_file():
        raise IntraSliceError(f"{src}: no config.json (a Hugging Face model directory is needed)")
    return _run_child(src, Path(out), out_type, tokenizer_pre, overwrite, llama_cpp, dense=True)


def _run_child(
    src: Path,
    out: Path,
    out_type: str,
    tokenizer_pre: str | None,
    overwrite: bool,
    llama_cpp: str | os.PathLike[str] | None,
    dense: bool = False,
) -> Path:
    if out.exists() and not overwrite:
        raise IntraSliceError(f"{out} exists (pass --overwrite to replace it)")
    root = find_llama_cpp(llama_cpp)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    path = os.pathsep.join([str(root / "gguf-py"), str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    args = json.dumps(
        {"src": str(src), "out": str(tmp), "type": out_type, "tokenizer_pre": tokenizer_pre, "dense": dense}
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "intraslice.export.gguf", args], env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise IntraSliceError(f"llama.cpp's converter failed: {lines[-1] if lines else proc.returncode}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model file is shared like any other
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _convert_dense(src: Path, out: Path, out_type: str, tokenizer_pre: str | None = None) -> None:
    """In the child: llama.cpp's own class for the source architecture writes ``out``."""
    import gguf

    root = Path(gguf.__file__).resolve().parents[2]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from conversion import get_model_class  # type: ignore[import-not-found]

    arch = json.loads((src / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[out_type]
    base = get_model_class(arch)

    class Dense(base):  # type: ignore[misc, valid-type]
        model_arch = base.model_arch

        def set_vocab(self) -> None:
            if tokenizer_pre is not None:  # a tokenizer llama.cpp's hash table does not know
                self.get_vocab_base_pre = lambda _tokenizer: tokenizer_pre
            # llama.cpp's LlamaModel tries sentencepiece first (an import this wheel set may
            # lack); a directory without tokenizer.model is a BPE tokenizer.json.
            if (self.dir_model / "tokenizer.model").is_file():
                super().set_vocab()
            else:
                self._set_vocab_gpt2()

    Dense(src, ftype, out).write()


def _convert(src: Path, out: Path, out_type: str, tokenizer_pre: str | None) -> None:
    """In the child: llama.cpp's converter (our ``DeciModel`` subclass) writes ``out``."""
    import gguf

    from .. import register_auto_classes

    register_auto_classes()  # the converter's AutoTokenizer reads this directory's config.json
    config = load_pruned_config(src)
    root = Path(gguf.__file__).resolve().parents[2]
    cls = _converter_class(root)
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[out_type]
    model = cls(src, ftype, out, hparams=gguf_hparams(config), pruned=config, tokenizer_pre=tokenizer_pre)
    model.write()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    a = json.loads(sys.argv[1])
    if a.get("dense"):
        _convert_dense(Path(a["src"]), Path(a["out"]), a["type"], a["tokenizer_pre"])
    else:
        _convert(Path(a["src"]), Path(a["out"]), a["type"], a["tokenizer_pre"])
