"""Export to a stock ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` directory.

Loads with plain ``from_pretrained`` (no ``intraslice``, no ``trust_remote_code``), hence also in
vLLM and anything else that reads these classes. Possible only for a model pruned with
``--deploy stock``: every layer the same shape, equal query groups, one RoPE pair set.

What changes against the pruned directory is the config alone; the weight files are copied
byte for byte (the tensor names are the stock ones already):

* ``head_dim`` = the common width r (the classes scale scores by 1/sqrt(head_dim); the
  source scale 1/sqrt(h) is folded into ``q_proj`` at pruning time);
* when the kept pairs are not all of the source's, the frequencies of the kept pairs are
  given as ``rope_parameters = {"rope_type": "longrope", short_factor = long_factor = f,
  original_max_position_embeddings = max_position_embeddings}``. transformers 5.24
  (``modeling_rope_utils._compute_longrope_parameters``) computes inv_freq_i =
  1 / (f_i * theta^(2i/r)) with attention factor 1 (factor = max/original = 1), and the
  dynamic update picks short or long factors by length, equal here. Each f_i is chosen
  among the float32 neighbours of (theta^(2i/r) * inv_freq_src)^-1 so that this float32
  computation gives the source model's float32 frequency of the kept pair exactly, or
  within one float32 ulp where no float32 factor rounds to it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import IntraSliceError
from ..models import config_dtype
from .common import check_deployable, check_static_rope, kept_pairs, load_pruned_config, source_frequencies

FORMAT = "stock-hf"
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
#: Files of the pruned directory that travel unchanged (weights, tokenizer, generation settings).
COPIED_SUFFIXES = (".safetensors", ".json", ".jinja", ".model", ".txt")
NOT_COPIED = ("config.json", "intraslice.json")


def longrope_factors(target: torch.Tensor, base: float, dim: int) -> list[float]:
    """Per-pair factors f with 1 / (f * base^(2i/dim)) == target_i in float32, as transformers computes it."""
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    denom = base**shape  # the same float32 expression as transformers'
    target = target.to(torch.float32)
    guess = (1.0 / (target.double() * denom.double())).to(torch.float32)
    best = guess.clone()
    best_err = (1.0 / (best * denom) - target).abs()
    up, down = guess.clone(), guess.clone()
    inf = torch.tensor(float("inf"))
    for _ in range(16):  # the exact value is within a few ulps of the guess
        up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
        for cand in (up, down):
            err = (1.0 / (cand * denom) - target).abs()
            better = err < best_err
            best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    return [float(f) for f in best]


def stock_rope_parameters(config: Any, pairs: list[int], width: int, fmt: str = FORMAT) -> dict[str, Any]:
    """``rope_parameters`` of the stock config for the kept pairs at head width ``width``.

    ``fmt`` names the export format in a refusal (the vLLM export builds on this one).
    """
    h = int(config.head_dim)
    rope = dict(config.rope_parameters)
    if width == h and pairs == list(range(h // 2)):
        return rope  # every frequency kept: the source's own RoPE
    check_static_rope(config, fmt)
    inv_freq, scaling = source_frequencies(config)
    base = float(rope.get("rope_theta", 10000.0))
    factors = longrope_factors(inv_freq[pairs], base, width)
    out: dict[str, Any] = {
        "rope_type": "longrope",
        "rope_theta": base,
        "short_factor": factors,
        "long_factor": list(factors),
        "original_max_position_embeddings": int(config.max_position_embeddings),
    }
    if scaling != 1.0:
        out["attention_factor"] = scaling  # e.g. a yarn source: its cos/sin scale travels too
    return out


def stock_config_dict(config: Any) -> dict[str, Any]:
    """config.json of the stock model for a pruned config (refused if not expressible)."""
    shapes = check_deployable(config, FORMAT, uniform=True)
    src = config.source_model_type
    shape = shapes[0]
    qkv_bias, o_bias = bool(config.attention_bias), bool(config.o_proj_bias)
    if src == "qwen2" and (not qkv_bias or o_bias):
        raise IntraSliceError(f"cannot export to {FORMAT}: Qwen2 has q/k/v biases and no o_proj bias, this model not")
    if src != "qwen2" and qkv_bias != o_bias:
        raise IntraSliceError(f"cannot export to {FORMAT}: Llama biases q/k/v/o all or none, this model not")
    if src == "mistral" and qkv_bias:
        raise IntraSliceError(f"cannot export to {FORMAT}: Mistral has no attention biases, this model has")
    from transformers import AutoConfig

    fields: dict[str, Any] = {
        "vocab_size": int(config.vocab_size),
        "hidden_size": int(config.hidden_size),
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": int(config.num_hidden_layers),
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": int(config.max_position_embeddings),
        "rms_norm_eps": float(config.rms_norm_eps),
        "rope_parameters": stock_rope_parameters(config, kept_pairs(config), shape.head_dim),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "use_cache": True,
    }
    if src == "llama":
        fields.update(attention_bias=qkv_bias, mlp_bias=False)
    if src == "mistral":
        fields["sliding_window"] = None
    if src == "qwen2":
        fields.update(use_sliding_window=False, sliding_window=None)
    stock = AutoConfig.for_model(src, **fields)
    stock.architectures = [CLASSES[src]]
    dtype = config_dtype(config)
    if dtype is not None:
        stock.dtype = dtype
    return stock.to_dict()


def export_stock_hf(directory: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the stock model directory ``out`` from the pruned ``directory`` (atomically)."""
    from ..saving import atomic_directory

    src = Path(directory)
    config = load_pruned_config(src)
    stock = stock_config_dict(config)  # refuses before anything is written

    def write(tmp: Path) -> None:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name.endswith(COPIED_SUFFIXES) and f.name not in NOT_COPIED:
                shutil.copy2(f, tmp / f.name)
        with open(tmp / "config.json", "w", encoding="utf-8") as fh:
            json.dump(stock, fh, indent=2, sort_keys=True)
            fh.write("\n")

    return atomic_directory(out, write, overwrite)
