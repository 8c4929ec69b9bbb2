"""What every exporter needs: the saved pruned model's config, the deployability checks, the RoPE
frequencies of the kept pairs.

A format's constraints are checked on the saved config alone (no weights read), and a model
that breaks one is refused with one line that names the constraint and the ``prune`` option
that meets it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import IntraSliceError

#: Source families whose pruned layout is a plain Llama decoder (RMSNorm, gated SiLU MLP,
#: rotate_half RoPE over the whole head, separate q/k/v/o).
LLAMA_LAYOUT = ("llama", "mistral", "qwen2")


def load_pruned_config(directory: str | Path) -> Any:
    """The IntraSlice config of a saved pruned model directory (no weights read)."""
    from ..modeling import IntraSliceConfig

    path = Path(directory)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise IntraSliceError(f"{path} is not a model directory (no config.json)")
    with open(cfg_file, encoding="utf-8") as fh:
        raw = json.load(fh)
    if raw.get("model_type") != "intraslice":
        raise IntraSliceError(
            f"{path} is not an IntraSlice-pruned model (model_type {raw.get('model_type')!r}); "
            "export reads the directory `intraslice prune` wrote"
        )
    return IntraSliceConfig.from_pretrained(path)


@dataclass(frozen=True)
class Shape:
    """The attention/MLP shape of one layer as an engine sees it."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


def _refuse(fmt: str, constraint: str, option: str) -> IntraSliceError:
    return IntraSliceError(f"cannot export to {fmt}: {constraint}; prune with {option}")


def check_deployable(config: Any, fmt: str, uniform: bool, target: str | None = None) -> list[Shape]:
    """Refuse (one line) a pruned model that ``fmt`` cannot express; return the layer shapes.

    ``uniform``: every layer must have the same shape (the stock HF classes). The llama.cpp
    ``deci`` architecture takes per-layer head counts and MLP widths but one head width.
    ``target``: the ``--deploy`` option a refusal names (default: stock, or llamacpp).
    """
    target = target or ("--deploy stock" if uniform else "--deploy llamacpp")
    src = getattr(config, "source_model_type", None)
    if src not in LLAMA_LAYOUT:
        raise IntraSliceError(
            f"cannot export to {fmt}: the model was pruned from a {src!r} model; "
            f"{fmt} export supports {', '.join(LLAMA_LAYOUT)} sources"
        )
    if getattr(config, "down_proj_bias", False) or getattr(config, "mlp_bias", False):
        raise _refuse(fmt, "the MLP has biases (FLAP bias compensation) the target lacks", "--method intraslice")
    shapes = []
    for li, spec in enumerate(config.layers):
        n, kv, r = int(spec["num_heads"]), int(spec["num_kv_heads"]), int(spec["head_dim"])
        kv_index = [int(i) for i in spec["kv_index"]]
        if n % kv or kv_index != [i // (n // kv) for i in range(n)]:
            what = f"layer {li}: its {kv} KV heads serve unequal numbers of its {n} query heads"
            raise _refuse(fmt, what, f"{target} (or --equal-kv-groups)")
        shapes.append(Shape(n, kv, r, int(spec["intermediate_size"])))
    widths = sorted({s.head_dim for s in shapes})
    if len(widths) > 1:
        raise _refuse(fmt, f"layers have different head widths {widths}", f"{target} (or --head-width N)")
    pair_sets = {tuple(int(p) for p in ps) for spec in config.layers for ps in spec["rope_pairs"]}
    if len(pair_sets) > 1:
        raise _refuse(
            fmt, "heads rotate with different RoPE frequency subsets", f"{target} (or --rope-selection global)"
        )
    if uniform and len(set(shapes)) > 1:
        raise _refuse(fmt, "layers differ in shape (heads, KV heads or MLP width)", f"{target} (or --uniform-layers)")
    return shapes


def kept_pairs(config: Any) -> list[int]:
    """The one RoPE pair set of a model that passed :func:`check_deployable`."""
    return [int(p) for p in config.layers[0]["rope_pairs"][0]]


def source_frequencies(config: Any) -> tuple[torch.Tensor, float]:
    """The source model's head_dim/2 inverse frequencies (float32, as the model computes them)
    and its attention scaling, exactly as the pruned model's rotary module has them."""
    from ..modeling.modeling_intraslice import IntraSliceRotaryEmbedding

    rot = IntraSliceRotaryEmbedding(config)
    return rot.inv_freq.to(torch.float32), float(rot.attention_scaling)


def check_static_rope(config: Any, fmt: str) -> None:
    """Frequencies that depend on the sequence length have no fixed per-pair factors."""
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise IntraSliceError(
            f"cannot export to {fmt}: the source's {rope_type!r} RoPE changes its frequencies with the "
            "sequence length, which one set of per-pair factors cannot express"
        )
    if float(config.rope_parameters.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise IntraSliceError(f"cannot export to {fmt}: a partial rotary embedding is not supported")
