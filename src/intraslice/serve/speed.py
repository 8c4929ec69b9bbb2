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
    slot_ctx = max([*prompts, *contexts]) + decode_tokens + 8
    # One server slot per decode context and one for the prompts: llama.cpp sends a request to
    # the slot whose cache shares its prefix, so a decode context's prompt is processed once,
    # not again at every repeat (slots decode one at a time here: requests are sequential).
    slots = len(contexts) + 1
    facts = {name: gguf_facts(path) for name, path in models}
    vocab = min(f["vocab"] for f in facts.values())
    servers = {
        name: LlamaCppServer(path, n_ctx=slot_ctx * slots, threads=threads, parallel=slots) for name, path in models
    }
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


def llamacpp_candidate(
    source: Any, ratio: float, min_head_width: float, mlp_multiple: int, attention_share: float = 1.0
) -> Any:
    """:func:`intraslice.speed.candidate_model` within llama.cpp's ``deci`` constraints.

    llama.cpp groups query head i onto KV head i / (n_head / n_head_kv): every kept KV head
    serves the same number of query heads. The data-free guess may keep e.g. 5 query heads on
    2 KV heads; here the query heads round down to a multiple of the KV heads and the MLP takes
    the parameters they leave (to ``mlp_multiple``), so the candidate keeps its ratio.
    """
    from ..modeling import IntraSliceForCausalLM
    from ..speed import candidate_model

    cand = candidate_model(source, ratio, min_head_width, mlp_multiple, attention_share)
    spec = dict(cand.config.layers[0])
    n, kv, r = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
    n2 = max(kv, n - n % kv)
    if n2 == n and spec["kv_index"] == [i // (n // kv) for i in range(n)]:
        return cand
    d = cand.config.hidden_size
    gated = 3 if hasattr(cand.model.layers[0].mlp, "gate_proj") else 2
    freed = (n - n2) * r * d * 2  # q_proj rows and o_proj columns of the dropped heads
    extra = int(freed / (gated * d)) // mlp_multiple * mlp_multiple
    spec.update(
        num_heads=n2,
        kv_index=[i // (n2 // kv) for i in range(n2)],
        rope_pairs=spec["rope_pairs"][:kv] if len(spec["rope_pairs"]) == kv else spec["rope_pairs"],
        intermediate_size=spec["intermediate_size"] + extra,
    )
    config = cand.config
    config.layers = [dict(spec) for _ in config.layers]
    dtype = next(cand.parameters()).dtype
    del cand
    model = IntraSliceForCausalLM(config).to(dtype=dtype).eval()
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def ratio_for_speedup_llamacpp(
    source: Any,
    tokenizer: Any,
    source_dir: str | os.PathLike[str],
    target: float,
    seqlen: int = 512,
    repeats: int = 3,
    threads: int | None = 1,
    min_head_width: float = 0.75,
    mlp_multiple: int = 8,
    out_type: str = "f16",
    log: Callable[[str], None] | None = None,
    llama_cpp: str | os.PathLike[str] | None = None,
    attention_share: float | Callable[[float], float] = 1.0,
) -> tuple[float, list[dict[str, float]]]:
    """``--target-speedup`` met in llama.cpp's server: the smallest ratio (0.05 grid) whose shapes reach it.

    As :func:`intraslice.speed.ratio_for_speedup`, but each probe's candidate (random weights,
    the shapes the ratio would give) is exported to a GGUF and timed in llama.cpp's server
    against the dense source converted by llama.cpp's own converter, prompt tokens/s at
    ``seqlen`` (the server's timings). Bisection: speed grows with the ratio.
    """
    import shutil
    import tempfile

    from ..export.gguf import export_gguf, export_source_gguf
    from ..saving import save_pruned
    from ..speed import smallest_reaching

    if target <= 1.0:
        raise IntraSliceError(f"--target-speedup must be > 1, got {target}")
    grid = [round(0.05 * i, 2) for i in range(1, 19)]
    probes: list[dict[str, float]] = []
    work = Path(tempfile.mkdtemp(prefix="intraslice-speed-"))
    try:
        dense = export_source_gguf(source_dir, work / "dense.gguf", out_type, llama_cpp=llama_cpp)

        def speedup(r: float) -> float:
            share = attention_share(r) if callable(attention_share) else attention_share
            cand = llamacpp_candidate(source, r, min_head_width, mlp_multiple, share)
            d = save_pruned(cand, tokenizer, work / f"cand-{r}")
            del cand
            path = export_gguf(d, work / f"cand-{r}.gguf", out_type, llama_cpp=llama_cpp)
            shutil.rmtree(d, ignore_errors=True)
            res = speed_llamacpp([("dense", dense), ("candidate", path)], (seqlen,), (), 1, threads, repeats)
            sp = res["models"]["candidate"]["speedup"][f"prompt_{seqlen}"]
            path.unlink(missing_ok=True)
            probes.append({"ratio": r, "prompt_speedup_llamacpp": sp})
            if log:
                log(f"  ratio {r:.2f}: llama.cpp prompt speedup {sp:.3f} (target {target})")
            return sp

        where = f"prompt speedup in llama.cpp at {seqlen} tokens on this machine"
        return smallest_reaching(grid, speedup, target, where), probes
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measured_speedup_llamacpp(
    source_dir: str | os.PathLike[str],
    pruned_dir: str | os.PathLike[str],
    seqlen: int,
    repeats: int = 5,
    threads: int | None = 1,
    out_type: str = "f16",
    llama_cpp: str | os.PathLike[str] | None = None,
) -> float:
    """The pruned directory's prompt speedup over its dense source in llama.cpp's server."""
    import shutil
    import tempfile

    from ..export.gguf import export_gguf, export_source_gguf

    work = Path(tempfile.mkdtemp(prefix="intraslice-speed-"))
    try:
        dense = export_source_gguf(source_dir, work / "dense.gguf", out_type, llama_cpp=llama_cpp)
        pruned = export_gguf(pruned_dir, work / "pruned.gguf", out_type, llama_cpp=llama_cpp)
        res = speed_llamacpp([("dense", dense), ("pruned", pruned)], (seqlen,), (), 1, threads, repeats)
        return float(res["models"]["pruned"]["speedup"][f"prompt_{seqlen}"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
