"""Benchmark (issue #38): which calibration text, and how much of it, on text never calibrated on.

Each row prunes with ``intraslice prune`` (the CLI's defaults but the calibration source,
size and ratio) and scores the pruned model on what no calibration source holds:

- perplexity on the held-out C4 documents (``--eval-texts c4-heldout``: every 5th document of
  the bundled C4 sample; the ``c4`` / ``c4-sample`` sources calibrate on the other four);
- the zero-shot mean of PIQA, ARC-Easy and WinoGrande (a seeded subset of ``--zeroshot-limit``
  documents each, lm-eval, bundled data);
- WikiText-2 test perplexity, the paper's protocol (in-domain for a WikiText calibration);

with the prune's wall time split into the estimator (mask gradients) and the layer fits,
and its peak memory, from the run's own report. The dense model is scored once per model.

    python bench/calibration.py --ratios 0.2 0.4 --sources wikitext2 c4 mix:c4=0.5,wikitext2=0.5
    python bench/calibration.py --ratios 0.2 --sources c4 --nsamples 16 64      # the amount
    python bench/calibration.py --model qwen2.5-coder-0.5b --seqlen 512 --ratios 0.2 --sources wikitext2 c4
    python bench/calibration.py --report --benchmarks-md

Offline, ``wikitext2`` is the bundled WikiText-2 *validation* split and ``c4`` the bundled
sample's calibration split (each row records the source it read). Results:
``results/calibration-MODEL.json``, one entry per (source, size, ratio) row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

from _common import BUILTIN_MODELS, ROOT, run_child, update_benchmarks_md

PY = sys.executable
TASKS = "piqa,arc_easy,winogrande"


def results_path(model: str) -> Path:
    return ROOT / "results" / f"calibration-{BUILTIN_MODELS[model][0]}.json"


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"rows": {}, "dense": None}


def save(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def evaluate(args: argparse.Namespace, model: list[str], work: Path, tag: str) -> dict[str, Any]:
    """Perplexity on both texts and the zero-shot mean of one model (subprocesses, as a user runs them)."""
    out: dict[str, Any] = {}
    for text in ("c4-heldout", "wikitext2"):
        res = work / f"{tag}-ppl-{text}.json"
        run_child([PY, "-m", "intraslice", "eval", "ppl", *model, "--text", text, "--windows", str(args.eval_windows),
                   "--no-progress", "--json", str(res)])  # fmt: skip
        r = json.loads(res.read_text())
        out[text] = {"ppl": r["ppl"], "windows": r["windows"], "source": r["source"]}
    res = work / f"{tag}-zeroshot.json"
    run_child([PY, "-m", "intraslice", "eval", "zeroshot", *model, "--tasks", TASKS, "--limit",
               str(args.zeroshot_limit), "--threads", str(args.threads), "--no-progress",
               "--json", str(res)])  # fmt: skip
    r = json.loads(res.read_text())
    values = {t: v["value"] for t, v in r["tasks"].items()}
    out["zeroshot"] = {"tasks": values, "mean": sum(values.values()) / len(values), "limit": args.zeroshot_limit}
    return out


def run_rows(args: argparse.Namespace) -> None:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the prune children take torch's threads from here
    path = results_path(args.model)
    data = load(path)
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    model_arg = ["--model", args.model]
    if data.get("dense") is None or data["dense"].get("zeroshot", {}).get("limit") != args.zeroshot_limit:
        data["dense"] = evaluate(args, model_arg, work, f"{args.model}-dense")
        save(path, data)
    for ratio in args.ratios:
        for n in args.nsamples:
            for source in args.sources:
                grads = [] if args.grad_samples is None else ["--grad-samples", str(args.grad_samples)]
                key = f"{source}|{n}x{args.seqlen}|{ratio}" + ("" if not grads else f"|g{args.grad_samples}")
                key += "" if args.threads == 2 else f"|t{args.threads}"  # wall times differ by thread count
                if key in data["rows"] and not args.force:
                    continue
                out = work / f"{args.model}-{source.replace(':', '_').replace(',', '_')}-{n}x{args.seqlen}-r{ratio}"
                t = time.perf_counter()
                cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                run_child([PY, "-m", "intraslice", "prune", *model_arg, "--ratio", str(ratio), "--calib", source,
                           "--nsamples", str(n), "--seqlen", str(args.seqlen), "--no-eval", "--no-progress",
                           "--overwrite", "--out", str(out), *grads])  # fmt: skip
                wall = time.perf_counter() - t
                cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
                report = json.loads((out / "intraslice.json").read_text())
                timings = report["timings_s"]
                row = {
                    "source": source,
                    "read": report["calibration"]["source"],
                    "nsamples": n,
                    "seqlen": args.seqlen,
                    "tokens": n * args.seqlen,
                    "ratio": ratio,
                    "wall_s": wall,
                    "cpu_s": cpu,  # the prune's CPU seconds (user + system), robust to a busy machine
                    "threads": args.threads,
                    "estimator_s": timings.get("allocation"),
                    "layers_s": timings.get("prune_total"),
                    "peak_rss_mb": report["peak_memory"]["host_peak_rss_mb"],
                    "gradient_windows": report["allocation"].get("gradient_samples"),
                    "reduction": report["reduction"],
                    **evaluate(args, ["--model", str(out)], work, out.name),
                }
                data["rows"][key] = row
                data["protocol"] = {
                    "eval_windows": args.eval_windows,
                    "zeroshot": f"{TASKS}, seeded subset of {args.zeroshot_limit} each (seed 1234)",
                    "threads": args.threads,
                    "cpu": platform.processor() or platform.machine(),
                }
                save(path, data)
                print(f"{key}: {json.dumps({k: row[k] for k in ('c4-heldout', 'wikitext2', 'zeroshot')})}")


def table(model: str) -> str:
    data = load(results_path(model))
    d = data["dense"]
    lines = [
        "| calibration (read) | windows (estimator) | ratio | C4 held-out ppl | zero-shot mean | WikiText-2 ppl | "
        "estimator | layer fits | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense | | | {d['c4-heldout']['ppl']:.2f} | {d['zeroshot']['mean']:.1%} | {d['wikitext2']['ppl']:.2f} "
        "| | | |",
    ]
    rows = sorted(
        (r for r in data["rows"].values() if "cpu_s" not in r),
        key=lambda r: (r["ratio"], r["tokens"], r["source"]),
    )
    for r in rows:
        lines.append(
            f"| {r['source']} ({r['read']}) | {r['nsamples']} x {r['seqlen']} ({r['gradient_windows']}) "
            f"| {r['ratio']} | "
            f"{r['c4-heldout']['ppl']:.2f} | {r['zeroshot']['mean']:.1%} | {r['wikitext2']['ppl']:.2f} | "
            f"{r['estimator_s']:.0f} s | {r['layers_s']:.0f} s | {r['peak_rss_mb']:.0f} MB |"
        )
    p = data.get("protocol", {})
    return (
        f"{BUILTIN_MODELS[model][1]}. Perplexities on the first {p.get('eval_windows')} windows of 2048 tokens of "
        f"each text; zero-shot: {p.get('zeroshot')}. Times from the run's report (estimator: the mask "
        "gradients on the windows in brackets; layer fits: the layer-by-layer pruning), on the 2-core CPU.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def amount_table(model: str) -> str:
    """The amount rows (one thread, CPU seconds): what each extra window buys per CPU minute."""
    data = load(results_path(model))
    rows = sorted(
        (r for r in data["rows"].values() if "cpu_s" in r),
        key=lambda r: (r["ratio"], r["tokens"], r["gradient_windows"] or 0),
    )
    if not rows:
        return ""
    d = data["dense"]
    base = rows[0]
    lines = [
        "| calibration | layer windows x tokens | estimator windows | C4 held-out ppl | WikiText-2 ppl "
        "| zero-shot mean | prune CPU | C4 held-out per extra CPU minute | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense | | | {d['c4-heldout']['ppl']:.2f} | {d['wikitext2']['ppl']:.2f} | {d['zeroshot']['mean']:.1%} "
        "| | | |",
    ]
    for r in rows:
        extra = (r["cpu_s"] - base["cpu_s"]) / 60
        gain = (
            f"{(r['c4-heldout']['ppl'] - base['c4-heldout']['ppl']) / extra:+.3f} ppl/min" if extra > 0.5 else "(base)"
        )
        lines.append(
            f"| {r['source']} | {r['nsamples']} x {r['seqlen']} | {r['gradient_windows']} | "
            f"{r['c4-heldout']['ppl']:.2f} | {r['wikitext2']['ppl']:.2f} | {r['zeroshot']['mean']:.1%} | "
            f"{r['cpu_s'] / 60:.1f} min | {gain} | {r['peak_rss_mb']:.0f} MB |"
        )
    return (
        f"Amount ({BUILTIN_MODELS[model][1]}, ratio {base['ratio']}, one thread, the machine shared with other "
        "work: CPU time of the prune, not wall time). Zero-shot on 200 items per task moves by about +-3.5 "
        "points (one standard error) between equal models.\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", choices=list(BUILTIN_MODELS))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2])
    ap.add_argument("--sources", nargs="+", default=["wikitext2", "c4", "mix:c4=0.5,wikitext2=0.5"])
    ap.add_argument("--nsamples", type=int, nargs="+", default=[16])
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--zeroshot-limit", type=int, default=200)
    ap.add_argument(
        "--grad-samples", type=int, default=None, help="the estimator's windows (default: the CLI's, the first 8)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="~/.cache/intraslice/bench-calibration")
    ap.add_argument("--force", action="store_true", help="rerun rows already recorded")
    ap.add_argument("--report", action="store_true", help="print the tables only")
    ap.add_argument("--benchmarks-md", action="store_true")
    args = ap.parse_args()
    if not args.report:
        run_rows(args)
    for model in BUILTIN_MODELS:
        if results_path(model).exists():
            body = table(model) + (
                "\nReproduce: `python bench/calibration.py --model MODEL --ratios R --sources S ... --nsamples N ...` "
                "(the commands of the BENCHMARKS section), then `python bench/calibration.py --report "
                "--benchmarks-md`.\n"
            )
            print(body)
            if args.benchmarks_md:
                update_benchmarks_md(f"calibration-{BUILTIN_MODELS[model][0]}", body)
            amount = amount_table(model)
            if amount:
                amount += (
                    "\nReproduce: `python bench/calibration.py --threads 1 --ratios 0.2 --sources "
                    "mix:c4=0.75,wikitext2=0.25 --nsamples 16 64 128`, and `--nsamples 16 --grad-samples 16` "
                    "(the estimator's amount).\n"
                )
                print(amount)
                if args.benchmarks_md:
                    update_benchmarks_md(f"calibration-amount-{BUILTIN_MODELS[model][0]}", amount)


if __name__ == "__main__":
    main()
