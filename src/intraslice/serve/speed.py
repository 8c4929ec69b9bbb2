"""Speed where users run the model: llama.cpp's own server, dense against pruned (issue #34).

Every figure is the server's own ``timings`` of a request (``prompt_per_second``,
``predicted_per_second``), never a Python clock around it:

* **prompt**: tokens/s processing a prompt of N random token ids (no cache reuse);
* **decode at context C**: tokens/s generating ``decode_tokens`` tokens after a C-token
  prompt (the prompt itself is cached after the first repeat and not timed).

Models are timed interleaved (repeat r of every model before repeat r + 1), each setting's best
repeat kept: on a shared machine, noise only ever slows a run down. The speedups are to the
first model (the dense baseline), and each is set against the *linear-FLOPs limit*: dense over
pruned decoder-linear parameters, counted from the GGUF files' own tensor shapes. Attention's
context-dependent work (scores and values) is outside that limit, so decode at long contexts
can beat it when the pruned model keeps fewer or narrower heads, or fall short when it does not.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import IntraSliceError
from .llamacpp import LlamaCppServer

LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def gguf_facts(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the GGUF file itself says: decoder-linear parameters, vocabulary, K/V widths per layer.

    Read with the ``gguf`` reader from the tensors llama.cpp allocates, not from our config.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    linear = 0
    kv_per_token = 0  # K and V values per token, all layers
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEAR and parts[3] == "weight":
            n = int(t.n_elements)
            linear += n
            if parts[2] in ("attn_k", "attn_v"):
                kv_per_token += int(t.shape[1])  # the output rows: n_kv_heads * width
    arch = reader.fields["general.architecture"].contents()
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    return {"architecture": arch, "linear_params": linear, "vocab": vocab, "kv_values_per_token": kv_per_token}


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    """n pseudo-random token ids from the middle of the vocabulary (no special tokens)."""
    import random

    rng = random.Random(seed)
    lo, hi = vocab // 8, vocab // 2
    return [rng.randrange(lo, hi) for _ in range(n)]


def speed_llamacpp(
    models: list[tuple[str, Path]],
    prompts: tuple[int, ...] = (512, 2048),
    contexts: tuple[int, ...] = (512, 4096),
    decode_tokens: int = 32,
    threads: int | None = 1,
    repeats: int = 3,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Prompt and decode tokens/s of each (name, GGUF) in llama.cpp's server; the first is the baseline."""
    if len(models) < 1:
        raise IntraSliceError("give at least one model")
    if repeats < 1 or decode_tokens < 1:
        raise IntraSliceError("--repeats and the decode tokens must be >= 1")
    n_ctx = max([*prompts, *contexts]) + decode_tokens + 8
    facts = {name: gguf_facts(path) for name, path in models}
    vocab = min(f["vocab"] for f in facts.values())
    servers = {name: LlamaCppServer(path, n_ctx=n_ctx, threads=threads) for name, path in models}
    best: dict[str, dict[str, float]] = {name: {} for name, _ in models}
    try:
        for r in range(repeats):
            for name, _ in models:
                s = servers[name]
                for n in prompts:
                    reply = s.complete(
                        {"prompt": _ids(n, vocab, 1000 + r), "n_predict": 1, "cache_prompt": False, "temperature": 0}
                    )
                    key = f"prompt_{n}"
                    best[name][key] = max(best[name].get(key, 0.0), float(reply["timings"]["prompt_per_second"]))
                for c in contexts:
                    req = {
                        "prompt": _ids(c, vocab, 7),
                        "n_predict": decode_tokens,
                        "ignore_eos": True,
                        "cache_prompt": True,
                        "temperature": 0,
                    }
                    reply = s.complete(req)
                    t = reply["timings"]
                    if int(t["predicted_n"]) != decode_tokens:
                        raise IntraSliceError(f"llama.cpp decoded {t['predicted_n']} of {decode_tokens} tokens")
                    key = f"decode_{c}"
                    best[name][key] = max(best[name].get(key, 0.0), float(t["predicted_per_second"]))
                if log:
                    log(f"repeat {r + 1}/{repeats} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in best[name].items()))
    finally:
        for s in servers.values():
            s.close()
    base = models[0][0]
    out: dict[str, Any] = {}
    for name, path in models:
        limit = facts[base]["linear_params"] / facts[name]["linear_params"]
        row: dict[str, Any] = {
            "gguf": str(path),
            **facts[name],
            "linear_flops_limit": limit,
            "tokens_per_s": best[name],
        }
        row["speedup"] = {k: v / best[base][k] for k, v in best[name].items()}
        row["speedup_over_limit"] = {k: v / limit for k, v in row["speedup"].items()}
        out[name] = row
    return {
        "engine": "llama.cpp server (xllamacpp)",
        "baseline": base,
        "prompts": list(prompts),
        "contexts": list(contexts),
        "decode_tokens": decode_tokens,
        "threads": threads,
        "repeats": repeats,
        "statistic": "best of repeats, interleaved",
        "timed_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "models": out,
    }
