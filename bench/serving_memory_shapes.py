"""Benchmark (issue #35): what a memory target asks of each split, on the shapes users serve.

Arithmetic only (models built on the meta device from their published shapes, nothing
downloaded): the weights and the KV cache in f16 at a context and batch, the cache's share
of the total, and the decoder ratio that ``--target-memory 0.7`` (30% of weights + KV
removed) needs with attention share 0 (the MLP alone), 0.25 and 1 (the method's split), with
the MLP's mean ratio each implies: above the per-layer cap of 0.8, a split cannot meet the
target at all. The MHA shape (Llama-2-7B, 32 query and 32 KV heads) is where the cache is
largest; GQA shapes hold 4-8x less per token.

    python bench/serving_memory_shapes.py --benchmarks-md

Results: ``results/serving-memory-shapes.json``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from _common import ROOT, update_benchmarks_md

#: Published shapes (config.json of each hub repository).
SHAPES: dict[str, dict[str, Any]] = {
    "Llama-2-7B (MHA 32/32)": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False,
    ),
    "Llama-3-8B (GQA 32/8)": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
    ),
    "Qwen2.5-7B (GQA 28/4)": dict(
        model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
    ),
    "SmolLM2-135M (GQA 9/3)": dict(
        model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
    ),
    "Qwen2.5-0.5B (GQA 14/2)": dict(
        model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
    ),
}  # fmt: skip
SETTINGS = [(4096, 1), (4096, 16), (32768, 1)]
SHARES = [0.0, 0.25, 1.0]


def rows() -> list[dict[str, Any]]:
    from transformers import AutoConfig

    from intraslice.algo.allocation import param_model, ratio_for_cost
    from intraslice.arch import get_arch
    from intraslice.kvcache import count_params, kv_values_per_token, memory_goal

    out = []
    for name, shape in SHAPES.items():
        config = AutoConfig.for_model(**shape)
        params = count_params(config)
        arch = get_arch(config)
        dims = arch.dims(config)
        pm = param_model(dims, 1, arch.qkv_bias(config), arch.mlp_bias(config), arch.mlp_matrices)
        mlp_share = (
            dims["m"] * pm.mlp_per_neuron / (dims["m"] * pm.mlp_per_neuron + pm.units_per_layer * pm.attn_per_unit)
        )
        for context, batch in SETTINGS:
            goal = memory_goal(("fraction", 0.7), params, kv_values_per_token(config), context, batch, "f16")
            kv_bytes = goal["kv_weight"] * kv_values_per_token(config) * 2
            splits = {}
            for share in SHARES:
                ratio = ratio_for_cost(pm, goal["remove"], share, goal["kv_weight"])
                mlp_ratio = ratio * (1 - share * (1 - mlp_share)) / mlp_share
                splits[str(share)] = {
                    "ratio": ratio,
                    "mlp_ratio": mlp_ratio,
                    "feasible": mlp_ratio <= 0.8 and ratio <= 0.8,
                }
            out.append({
                "model": name, "context": context, "batch": batch, "params": params,
                "weights_gib": params * 2 / 2**30, "kv_gib": kv_bytes / 2**30,
                "kv_share": kv_bytes / goal["dense_bytes"], "splits": splits,
            })  # fmt: skip
    return out


def table(data: list[dict[str, Any]]) -> str:
    head = "| model | context x batch | weights (f16) | KV cache (f16) | KV share | " + " | ".join(
        f"ratio for 0.7, share {s:g} (MLP ratio)" for s in SHARES
    )
    lines = [head + " |", "|" + "---|" * (5 + len(SHARES))]
    for r in data:
        cells = []
        for s in SHARES:
            x = r["splits"][str(s)]
            cell = f"{x['ratio']:.2f} ({x['mlp_ratio']:.2f})"
            cells.append(cell if x["feasible"] else f"{cell}: out of reach")
        lines.append(
            f"| {r['model']} | {r['context']} x {r['batch']} | {r['weights_gib']:.2f} GiB | {r['kv_gib']:.2f} GiB | "
            f"{r['kv_share']:.0%} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmarks-md", action="store_true")
    args = ap.parse_args()
    data = rows()
    (ROOT / "results" / "serving-memory-shapes.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    body = (
        "`--target-memory 0.7` (weights + KV cache in f16), the decoder ratio each fixed split needs "
        "(`ratio_for_cost`) and its MLP's mean ratio; the per-layer cap is 0.8. Command: "
        "`python bench/serving_memory_shapes.py --benchmarks-md`.\n\n" + table(data)
    )
    print(body)
    if args.benchmarks_md:
        update_benchmarks_md("serving-memory-shapes", body)


if __name__ == "__main__":
    main()
