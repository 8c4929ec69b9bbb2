"""Serving memory: the KV cache per token and the weights plus KV cache at a context and batch.

The KV cache is what a serving user runs short of: Llama-2-7B (MHA, 32 layers x 32 KV heads
x 128) holds 512 KiB of f16 K and V per token, 32 GiB at 4096 tokens x 16 sequences, beside
12.6 GiB of f16 weights. Pruning the attention shrinks it: a pruned layer ``l`` keeps
``layers[l]["num_kv_heads"]`` KV heads of one common width ``layers[l]["head_dim"]`` (r), and
that width is both K's (the kept RoPE pairs) and V's (the per-KV-group V/O PCA basis keeps r
directions: ``docs/method.md`` step E; ``k_proj`` and ``v_proj`` both have
``num_kv_heads * head_dim`` rows). A dense config has ``num_hidden_layers`` layers of
``num_key_value_heads * head_dim`` values each for K and for V.

Counted as llama.cpp's server allocates them: every layer holds a K and a V row of those
widths per token per sequence (``blk.N.attn_k.weight`` / ``attn_v.weight`` output rows of the
exported GGUF), at the cache type's size per value: f16 and bf16 2 bytes, f32 4, q8_0 34
bytes per block of 32 values. The weights count every parameter once (tied embeddings
once) at the same size per value, as the model would be served in that type. Stated, not
counted: llama.cpp keeps norms in f32 and may pad its cache to a multiple of 256 cells;
sliding-window layers are counted at the full context; the compute buffers are left out.
"""

from __future__ import annotations

from typing import Any

from .errors import IntraSliceError

#: Bytes per stored value of each serving type (q8_0: llama.cpp's block of 32 int8 + an f16 scale).
BYTES_PER_VALUE: dict[str, float] = {"f16": 2.0, "bf16": 2.0, "f32": 4.0, "q8_0": 34 / 32}
SERVING_DTYPES = tuple(BYTES_PER_VALUE)


def bytes_per_value(dtype: str) -> float:
    """Bytes one weight or cache value takes in ``dtype`` (f16, bf16, f32, q8_0)."""
    try:
        return BYTES_PER_VALUE[str(dtype).lower()]
    except KeyError:
        raise IntraSliceError(f"unknown serving dtype {dtype!r}: choose one of {', '.join(SERVING_DTYPES)}") from None


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def kv_layer_widths(config: Any) -> list[tuple[int, int]]:
    """Per decoder layer, the (K, V) values one token stores: a dense config or a pruned one.

    ``config``: a ``transformers`` config or its ``config.json`` as a dict. A pruned
    (intraslice or slicegpt) config lists its layers; each keeps ``num_kv_heads`` KV heads
    of width ``head_dim`` for K and for V alike.
    """
    layers = _get(config, "layers")
    if layers:
        return [(int(s["num_kv_heads"]) * int(s["head_dim"]),) * 2 for s in layers]  # type: ignore[misc]
    n_heads = int(_get(config, "num_attention_heads"))
    n_kv = int(_get(config, "num_key_value_heads") or n_heads)
    head_dim = int(_get(config, "head_dim") or int(_get(config, "hidden_size")) // n_heads)
    return [(n_kv * head_dim, n_kv * head_dim)] * int(_get(config, "num_hidden_layers"))


def kv_values_per_token(config: Any) -> int:
    """K and V values one token adds to the cache, over all layers."""
    return sum(k + v for k, v in kv_layer_widths(config))


def kv_bytes_per_token(config: Any, dtype: str = "f16") -> float:
    """Bytes one token of one sequence adds to the KV cache in ``dtype``."""
    return kv_values_per_token(config) * bytes_per_value(dtype)


def count_params(config: Any) -> int:
    """Every parameter of the model ``config`` describes (tied weights once), built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import register_auto_classes

    register_auto_classes()
    if isinstance(config, dict):
        kwargs = {k: v for k, v in config.items() if k != "model_type"}
        config = AutoConfig.for_model(config["model_type"], **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def serving_memory(
    config: Any, context: int = 4096, batch: int = 1, dtype: str = "f16", params: int | None = None
) -> dict[str, Any]:
    """Weights plus KV cache of ``batch`` sequences of ``context`` tokens, all in ``dtype``.

    ``params``: the model's parameter count (default: counted from ``config``).
    """
    if context < 1 or batch < 1:
        raise IntraSliceError(f"context and batch must be >= 1, got {context} and {batch}")
    per_value = bytes_per_value(dtype)
    params = count_params(config) if params is None else int(params)
    values = kv_values_per_token(config)
    weights = params * per_value
    kv = values * per_value * context * batch
    return {
        "params": params,
        "weights_bytes": weights,
        "kv_values_per_token": values,
        "kv_bytes_per_token": values * per_value,
        "kv_bytes": kv,
        "total_bytes": weights + kv,
    }


def compare_serving_memory(
    dense: Any,
    pruned: Any,
    context: int = 4096,
    batch: int = 1,
    dtype: str = "f16",
    dense_params: int | None = None,
    pruned_params: int | None = None,
) -> dict[str, Any]:
    """Dense and pruned serving memory and the fraction pruning removes (``intraslice.json``'s record)."""
    d = serving_memory(dense, context, batch, dtype, dense_params)
    p = serving_memory(pruned, context, batch, dtype, pruned_params)
    keys = {"kv_per_token": "kv_bytes_per_token", "weights": "weights_bytes", "total": "total_bytes"}
    return {
        "context": int(context),
        "batch": int(batch),
        "dtype": str(dtype).lower(),
        "bytes_per_value": bytes_per_value(dtype),
        "dense": d,
        "pruned": p,
        "reduction": {k: 1.0 - p[v] / d[v] for k, v in keys.items()},
    }


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units with three significant figures: 22.5 KiB, 1.21 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g} B"


def describe(record: dict[str, Any]) -> str:
    """The summary line of a :func:`compare_serving_memory` record."""
    d, p, r = record["dense"], record["pruned"], record["reduction"]
    return (
        f"KV cache: {format_bytes(d['kv_bytes_per_token'])}/token dense -> "
        f"{format_bytes(p['kv_bytes_per_token'])}/token pruned ({percent_change(r['kv_per_token'])}); "
        f"weights + KV at {record['context']} tokens x batch {record['batch']} ({record['dtype']}): "
        f"{format_bytes(d['total_bytes'])} -> {format_bytes(p['total_bytes'])} ({percent_change(r['total'])})"
    )


def percent_change(reduction: float) -> str:
    """-33% for a third removed; +0% (never -0%) when nothing is."""
    change = round(-100 * reduction)
    return f"{change:+d}%" if change else "+0%"


def parse_target_memory(text: str) -> tuple[str, float]:
    """``--target-memory``: a fraction of the dense total to keep (``0.7``, ``70%``) or a size (``6GB``).

    Sizes take their unit: B, KB, MB, GB, TB (binary: GB and GiB both mean 2^30 bytes, as
    ``--device-memory`` reads them). Returns ("fraction", f) or ("bytes", n).
    """
    s = str(text).strip().replace("_", "").replace(",", "")
    bad = IntraSliceError(
        f"--target-memory must be a fraction of the dense weights + KV cache to keep (0.7, 70%) or a size "
        f"(6GB, 300MiB), got {text!r}"
    )
    try:
        if s.endswith("%"):
            value = float(s[:-1]) / 100.0
            kind = "fraction"
        elif s and (s[-1].isalpha()):
            up = s.upper().replace("IB", "B")
            units = {"TB": 2**40, "GB": 2**30, "MB": 2**20, "KB": 2**10, "B": 1}
            unit = next((u for u in units if up.endswith(u)), None)
            if unit is None:
                raise bad
            value, kind = float(up[: -len(unit)]) * units[unit], "bytes"
        else:
            value = float(s)
            kind = "fraction"
            if value >= 1:  # "85" is a percentage or a byte count: a size takes its unit
                raise IntraSliceError(
                    f"--target-memory {text}: give a fraction below 1 (0.85), a percentage (85%) or a size with "
                    "its unit (300MB, 6GB)"
                )
    except ValueError:
        raise bad from None
    if not value > 0 or value != value or value == float("inf"):
        raise bad
    if kind == "fraction" and value >= 1:
        raise IntraSliceError(f"--target-memory {text} keeps all of the dense model: give a fraction below 1")
    return kind, value


def memory_goal(
    target: tuple[str, float],
    params: int,
    kv_values_per_token: int,
    context: int,
    batch: int,
    dtype: str = "f16",
) -> dict[str, Any]:
    """What a ``--target-memory`` asks of the decoder, in serving-cost units.

    The weights and the KV cache are counted in one type (``dtype``), so bytes divide out:
    one parameter costs 1 and one cache value per token costs ``kv_weight`` = context x batch
    (every token of every sequence stores it). ``remove`` is the cost the pruning must take
    out of the dense model's: parameters removed plus ``kv_weight`` x cache values removed.
    """
    per_value = bytes_per_value(dtype)
    kv_weight = float(context) * float(batch)
    dense_cost = float(params) + kv_weight * kv_values_per_token
    dense_bytes = dense_cost * per_value
    kind, value = target
    target_bytes = value * dense_bytes if kind == "fraction" else float(value)
    if target_bytes >= dense_bytes:
        raise IntraSliceError(
            f"--target-memory {format_bytes(target_bytes)} is not below the dense model's "
            f"{format_bytes(dense_bytes)} (weights + KV at {context} tokens x batch {batch}, {dtype})"
        )
    return {
        "context": int(context),
        "batch": int(batch),
        "dtype": str(dtype).lower(),
        "dense_bytes": dense_bytes,
        "target_bytes": target_bytes,
        "kv_weight": kv_weight,
        "bytes_per_value": per_value,
        "kv_share": kv_weight * kv_values_per_token / dense_cost,
        "remove": dense_cost - target_bytes / per_value,
    }
