"""Issue #11 check: llama.cpp runs an IntraSlice-pruned SmolLM2 (GGUF ``deci``) like intraslice does.

The exported f32 GGUF of a model pruned with ``--deploy llamacpp`` must give, against the
intraslice model (``AutoModelForCausalLM`` after ``import intraslice``, float32):

* the same greedy continuation of a fixed prompt (token ids, prompt fed as the same ids);
* a WikiText-2 test perplexity within 0.5% on the same windows (same token ids fed to both).

llama.cpp runs through ``llama-cpp-python`` (built from its sdist, see README). Writes a JSON.

    intraslice prune --ratio 0.2 --nsamples 8 --seqlen 512 --deploy llamacpp --out /tmp/sm-llamacpp \\
        --export gguf --llama-cpp llama_cpp_python-0.3.36.tar.gz
    python bench/llamacpp_smollm2.py --model /tmp/sm-llamacpp --json results/llamacpp-smollm2-r0.20.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROMPT = "The capital of France is Paris. The capital of Germany is"


def _nll_rows(logits: np.ndarray, ids: list[int]) -> float:
    """Summed next-token NLL of ``ids`` from per-position logits (float64 log-softmax)."""
    x = torch.from_numpy(np.asarray(logits, dtype=np.float64))[: len(ids) - 1]
    logp = torch.log_softmax(x, dim=-1)
    return float(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())


def compare(
    model_dir: str | Path,
    gguf_path: str | Path | None = None,
    seqlen: int = 512,
    windows: int = 4,
    new_tokens: int = 24,
    threads: int = 2,
) -> dict[str, Any]:
    """The intraslice model and llama.cpp on the same token ids (see module docstring)."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import intraslice  # noqa: F401  (registers the pruned model class)
    from intraslice.data import tokenize, wikitext2_test_text

    model_dir = Path(model_dir)
    gguf_path = Path(gguf_path) if gguf_path else model_dir / "model-f32.gguf"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.set_num_threads(threads)
    llm = Llama(
        model_path=str(gguf_path), n_ctx=max(seqlen, 256), n_batch=max(seqlen, 256), n_threads=threads,
        logits_all=True, verbose=False,
    )  # fmt: skip

    # Greedy continuation, token by token, from the same prompt ids.
    prompt = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    hf_new = hf[0, len(prompt) :].tolist()
    llm.reset()
    llm.eval(prompt)
    cpp_new: list[int] = []
    for _ in range(new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        cpp_new.append(nxt)
        llm.eval([nxt])

    # Perplexity on the same WikiText-2 test windows.
    text = wikitext2_test_text()
    ids = tokenize(tok, text.text)
    n = min(windows, ids.numel() // seqlen)
    win = ids[: n * seqlen].view(n, seqlen)
    hf_sum = cpp_sum = 0.0
    t_hf = t_cpp = 0.0
    for row in win:
        ids_list = row.tolist()
        t = time.perf_counter()
        with torch.no_grad():
            logits = model(input_ids=row[None], use_cache=False).logits[0].double().numpy()
        t_hf += time.perf_counter() - t
        hf_sum += _nll_rows(logits, ids_list)
        t = time.perf_counter()
        llm.reset()
        llm.eval(ids_list)
        t_cpp += time.perf_counter() - t
        cpp_sum += _nll_rows(llm.scores[:seqlen], ids_list)
    count = n * (seqlen - 1)
    ppl_hf, ppl_cpp = math.exp(hf_sum / count), math.exp(cpp_sum / count)
    cfg = model.config
    return {
        "model": str(model_dir),
        "gguf": str(gguf_path),
        "layers": [
            {k: s[k] for k in ("num_heads", "num_kv_heads", "head_dim", "intermediate_size")} for s in cfg.layers
        ],
        "prompt": PROMPT,
        "prompt_ids": prompt,
        "llama_cpp_prompt_ids": llm.tokenize(PROMPT.encode(), add_bos=False, special=False),
        "greedy_intraslice": hf_new,
        "greedy_llama_cpp": cpp_new,
        "greedy_equal": hf_new == cpp_new,
        "greedy_text_intraslice": tok.decode(hf_new),
        "greedy_text_llama_cpp": tok.decode(cpp_new),
        "ppl_windows": n,
        "ppl_seqlen": seqlen,
        "ppl_source": text.name,
        "ppl_intraslice": ppl_hf,
        "ppl_llama_cpp": ppl_cpp,
        "ppl_rel_diff": abs(ppl_cpp - ppl_hf) / ppl_hf,
        "seconds_intraslice": t_hf,
        "seconds_llama_cpp": t_cpp,
        "threads": threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/sm-llamacpp", help="a pruned directory (--deploy llamacpp)")
    ap.add_argument("--gguf", default=None, help="its f32 GGUF (default MODEL/model-f32.gguf)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="results/llamacpp-smollm2-r0.20.json")
    args = ap.parse_args()
    import llama_cpp
    import transformers

    res = compare(args.model, args.gguf, args.seqlen, args.windows, threads=args.threads)
    report = Path(args.model) / "intraslice.json"
    if report.is_file():  # how the model was made
        res["prune_command"] = json.loads(report.read_text(encoding="utf-8")).get("command")
    res["versions"] = {
        "llama_cpp_python": llama_cpp.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(
        f"greedy equal: {res['greedy_equal']}; ppl intraslice {res['ppl_intraslice']:.4f} vs llama.cpp "
        f"{res['ppl_llama_cpp']:.4f} ({res['ppl_rel_diff']:.3%}) on {res['ppl_windows']}x{res['ppl_seqlen']}; "
        f"wrote {out}"
    )


if __name__ == "__main__":
    main()
