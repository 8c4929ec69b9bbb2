"""Zero-shot accuracy (lm-eval, 7 tasks) of dense SmolLM2 and pruned models (issue #5).

Each model is evaluated once per ``--limit`` and seed and its result kept in
``results/zeroshot-smollm2-<label>-limit<N>.json`` (an existing file is reused unless
``--force``), so models can be added as their pruning finishes; the table in
BENCHMARKS.md is rebuilt from the result files of the models named on the command line.

    python bench/zeroshot_smollm2.py --model dense --model /tmp/zs/smollm2-0.2 --limit 200 --threads 1

``dense`` is the built-in SmolLM2-135M-Instruct (GGUF); a directory is a saved pruned
model (its ``intraslice.json`` gives method, ratio and perplexity for the table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, update_benchmarks_md

from intraslice.eval.zeroshot import AVERAGES, DEFAULT_TASKS, TASKS, evaluate, load_task_dataset, sample_indices
from intraslice.models import load_model
from intraslice.params import param_report

SECTION = "zeroshot-smollm2"
SHORT = {
    "piqa": "PIQA",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "winogrande": "WinoG",
    "boolq": "BoolQ",
    "openbookqa": "OBQA",
    "hellaswag": "HellaS",
}


def label_of(model: str) -> str:
    return "dense" if model == "dense" else Path(model).name


def result_path(label: str, limit: int | None) -> Path:
    return ROOT / "results" / f"zeroshot-smollm2-{label}-limit{limit or 'all'}.json"


def describe(model: str) -> dict[str, Any]:
    """Method, ratio, real reductions and perplexity of a pruned directory (from its report)."""
    if model == "dense":
        return {"method": "dense"}
    rep_file = Path(model) / "intraslice.json"
    if not rep_file.is_file():
        return {"method": "?"}
    rep = json.loads(rep_file.read_text())
    ppl = (rep.get("perplexity") or {}).get("pruned")
    return {
        "method": rep.get("method", "intraslice"),
        "ratio": rep.get("config", {}).get("ratio"),
        "goal": rep.get("goal"),
        "reduction": rep.get("reduction"),
        "ppl": ppl["ppl"] if ppl else None,
        "ppl_windows": ppl["windows"] if ppl else None,
        "dense_ppl": (rep.get("perplexity") or {}).get("dense"),
    }


def run_one(model: str, args: argparse.Namespace) -> dict[str, Any]:
    label = label_of(model)
    out = result_path(label, args.limit)
    if out.exists() and not args.force:
        print(f"{label}: reusing {out.relative_to(ROOT)}")
        return json.loads(out.read_text())
    src = load_model(None if model == "dense" else model)
    t0 = time.perf_counter()
    res = evaluate(src.model, src.tokenizer, tasks=args.tasks, limit=args.limit, seed=args.seed, progress=False)
    res = {
        "label": label,
        "model": src.name,
        "model_path": model,
        **describe(model),
        "params": param_report(src.model),
        "threads": torch.get_num_threads(),
        **res,
        "wall_s": time.perf_counter() - t0,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": sys.argv,
        "versions": {"torch": torch.__version__, "lm_eval": res["lm_eval_version"]},
    }
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"{label}: {res['requests']} requests in {res['seconds']:.0f}s -> {out.relative_to(ROOT)}")
    return res


def method_of(r: dict[str, Any]) -> dict[str, Any]:
    """Method name (and SliceGPT's width): reports hold either a name or a dict with details."""
    m = r.get("method")
    if isinstance(m, dict):
        return {"method": m.get("method", "?"), "slice_dim": m.get("slice_dim")}
    return {"method": m}


def boolq_note(args: argparse.Namespace) -> str:
    """BoolQ at this scale mostly measures a yes/no bias: give the always-yes accuracy."""
    docs = load_task_dataset("boolq")["test"]
    idx = sample_indices("boolq", len(docs), args.limit, args.seed) or range(len(docs))
    yes = sum(docs[i]["gold"] for i in idx) / len(idx)
    return (
        f'BoolQ: answering always "yes" scores {100 * yes:.1f} and always "no" {100 * (1 - yes):.1f} on this '
        "subset; a 135M model sits near one of the two, so BoolQ (and avg7) mostly measure a yes/no bias here. "
        "avg5 is the better summary."
    )


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    first = results[0]
    lines = [
        f"lm-eval {first['lm_eval_version']}, zero-shot, tasks from the bundled offline copies (lm-eval's prompts; "
        f"see README). **`--limit {args.limit}`**: a seeded random subset of {args.limit} documents per task "
        f"(seed {args.seed}), the same for every model, so each accuracy has a standard error of about "
        f"{100 * (0.25 / (args.limit or 1)) ** 0.5:.1f} points near 50% (stderr columns in the JSON). "
        "Metrics: acc_norm for PIQA, ARC, HellaSwag, OpenBookQA; acc for WinoGrande and BoolQ. "
        "avg5 = PIQA, ARC-e, ARC-c, WinoGrande, HellaSwag (the SliceGPT set); avg7 adds BoolQ and OpenBookQA. "
        "Params: whole model (embeddings included), real counts of the saved model.",
        "",
        "| model | params | P1 ppl | " + " | ".join(SHORT[t] for t in DEFAULT_TASKS) + " | avg5 | avg7 | time |",
        "|---" * (len(DEFAULT_TASKS) + 6) + "|",
    ]
    dense_ppl = next((d for r in results if (d := r.get("dense_ppl"))), None)
    for r in results:
        r = {**r, **method_of(r)}
        if r["method"] == "dense" and dense_ppl:
            r = {**r, "ppl": dense_ppl["ppl"], "ppl_windows": dense_ppl["windows"]}
        name = f"{r['method']} {r.get('ratio')}"
        if r.get("slice_dim"):
            name += f" (slice dim {r['slice_dim']})"
        if r["method"] == "dense":
            name = "dense SmolLM2-135M"
        params = r["params"]["whole_model"] / 1e6
        ppl = f"{r['ppl']:.2f} ({r['ppl_windows']})" if r.get("ppl") else "-"
        cells = [f"{100 * r['tasks'][t]['value']:.1f}" if t in r["tasks"] else "-" for t in DEFAULT_TASKS]
        avgs = [
            f"**{100 * r['averages'][a]['value']:.1f}**" if r["averages"][a]["value"] is not None else "-"
            for a in AVERAGES
        ]
        rate = f"{r['seconds']:.0f} s ({r['requests_per_s']:.1f} req/s)"
        lines.append(f"| {name} | {params:.1f} M | {ppl} | " + " | ".join(cells + avgs) + f" | {rate} |")
    lines += ["", boolq_note(args)] if "boolq" in first["tasks"] else []
    lines += [
        "",
        f"Device: CPU, {first['threads']} thread(s), shared with other jobs (times are indicative). "
        "P1 perplexity: from the pruned models' reports (first N WikiText-2 test windows, N in "
        "brackets; the dense value from the same windows). Raw results: `results/zeroshot-smollm2-*.json`.",
        "",
        "Pruned models: `intraslice prune --ratio R --nsamples 32 --seqlen 2048 --out DIR` (global_pca "
        "allocation); SliceGPT: `intraslice prune --method slicegpt --target-params 0.3 --nsamples 32 "
        "--seqlen 2048 --out DIR`, the same 30% decoder reduction counting its shortcut matrices, hence equal "
        "real parameters. Calibration: bundled WikiText-2 validation (offline), seed 0, for all. Reproduce:",
        "",
        "    " + " ".join(["python bench/zeroshot_smollm2.py", *args.argv]),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="'dense' or a pruned model directory")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"of {', '.join(TASKS)}")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="re-evaluate models that have a result file")
    ap.add_argument("--no-md", action="store_true", help="do not touch BENCHMARKS.md")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run_one(m, args) for m in args.model]
    if not args.no_md:
        update_benchmarks_md(SECTION, table(results, args))
        print("updated BENCHMARKS.md")


if __name__ == "__main__":
    main()
