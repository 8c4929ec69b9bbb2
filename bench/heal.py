"""Recovery by distillation (issue #33): gap closed against tokens, per recipe.

    python bench/heal.py --threads 1 --tokens 50000 --recipes lora-3e-4 full-5e-5
    python bench/heal.py --threads 1 --tokens 200000 1000000 --recipes lora-3e-4   # the longer budgets

What it does, with every number written to ``results/heal-smollm2.json`` (``--model
qwen2.5-coder-0.5b --ratio 0.3`` writes ``results/heal-qwen-coder-0.5b.json``):

1. prunes the quick-start model (``intraslice prune --ratio R --nsamples 16 --seqlen 1024
   --no-eval``) into ``~/.cache/intraslice/bench-heal/`` unless ``--pruned DIR`` is given;
2. measures the dense and the pruned model once on the held-out check's windows (4 x 2048
   of WikiText-2 test and of held-out C4, the quick start's ``--eval-windows 4``) and the
   copy loss (span 200), and records them in the pruned report, where ``intraslice heal``
   reads its before-numbers (so each heal evaluates only its result);
3. runs ``intraslice heal`` (the library call, offline: training text is the bundled C4
   sample's calibration split, never WikiText, never held-out C4) once per recipe and
   budget, and measures the healed copy loss (and ``--zeroshot`` the zero-shot mean);
4. writes the table into BENCHMARKS.md ("Heal") and plots gap closed against tokens
   (``results/heal-<model>.png``).

Gap closed = (pruned - healed) / (pruned - dense) perplexity. A recipe is NAME-LR with
NAME ``lora`` or ``full`` (``lora-3e-4``), optionally ``:k=v`` overrides of HealConfig
fields (``lora-1e-3:batch=2:topk=0``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BUILTIN_MODELS, ROOT, update_benchmarks_md

TEXTS = ("wikitext2", "c4-heldout")


def parse_recipe(text: str) -> dict[str, Any]:
    head, *over = text.split(":")
    method, _, lr = head.partition("-")
    out: dict[str, Any] = {"method": method, "lr": float(lr)}
    for item in over:
        k, _, v = item.partition("=")
        out[k] = type(getattr(__import__("intraslice.heal", fromlist=["HealConfig"]).HealConfig(), k))(v) if v else v
    return out


def ensure_pruned(args: argparse.Namespace, root: Path) -> Path:
    if args.pruned:
        return Path(args.pruned)
    out = root / f"{args.stem}-r{args.ratio}"
    if not out.is_dir():
        cmd = [sys.executable, "-m", "intraslice", "prune", "--model", args.model, "--ratio", str(args.ratio),
               "--nsamples", "16", "--seqlen", "1024", "--no-eval", "--no-progress", "--out", str(out)]  # fmt: skip
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return out


def measure(directory: Path, windows: int, seqlen: int, texts: tuple[str, ...] = TEXTS) -> dict[str, Any]:
    from intraslice import stages
    from intraslice.checkpoint import SourceCheckpoint
    from intraslice.eval.incontext import prune_report_copy_loss
    from intraslice.pipeline import DevicePolicy

    ckpt = SourceCheckpoint.from_directory(directory)
    tok, policy = ckpt.tokenizer(), DevicePolicy("cpu")
    out: dict[str, Any] = {"ppl": {}}
    for text in texts:
        out["ppl"][text] = stages.evaluate(ckpt, tok, policy, seqlen, windows, progress=False, text=text)
    out["copy"] = prune_report_copy_loss(ckpt, policy)
    return out


def zeroshot(directory: Path, limit: int) -> dict[str, Any]:
    from intraslice.checkpoint import SourceCheckpoint
    from intraslice.engine.run import whole_model
    from intraslice.eval.zeroshot import evaluate

    ckpt = SourceCheckpoint.from_directory(directory)
    res = evaluate(whole_model(directory, torch.float32, "cpu"), ckpt.tokenizer(), "piqa,arc_easy,winogrande",
                   limit=limit, progress=False)  # fmt: skip
    values = {t: r["value"] for t, r in res["tasks"].items()}
    return {"tasks": values, "mean": sum(values.values()) / len(values), "limit": limit}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=sorted(BUILTIN_MODELS))
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--pruned", default=None, help="an existing pruned directory (default: prune the quick start)")
    p.add_argument("--tokens", type=int, nargs="+", default=[50_000])
    p.add_argument("--recipes", nargs="+", default=["lora-3e-4"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--zeroshot", type=int, default=0, help="zero-shot mean on N items per task (0: skipped)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.stem, display = BUILTIN_MODELS[args.model]
    root = Path(os.environ.get("INTRASLICE_CACHE") or Path.home() / ".cache" / "intraslice") / "bench-heal"
    root.mkdir(parents=True, exist_ok=True)
    path = Path(args.json or ROOT / "results" / f"heal-{args.stem}.json")
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    pruned = ensure_pruned(args, root)
    key = f"{args.eval_windows}x{args.eval_seqlen}"

    base = results.setdefault("reference", {}).get(key)
    if base is None:
        t = time.perf_counter()
        from intraslice.checkpoint import SourceCheckpoint  # noqa: F401
        from intraslice.heal import HealConfig
        from intraslice.heal.run import open_student, open_teacher

        teacher = open_teacher(HealConfig(), open_student(pruned))
        base = {"dense": measure(teacher.directory, args.eval_windows, args.eval_seqlen),
                "pruned": measure(pruned, args.eval_windows, args.eval_seqlen)}  # fmt: skip
        if args.zeroshot:
            base["dense"]["zeroshot"] = zeroshot(teacher.directory, args.zeroshot)
            base["pruned"]["zeroshot"] = zeroshot(pruned, args.zeroshot)
        base["seconds"] = time.perf_counter() - t
        results["reference"][key] = base
        path.write_text(json.dumps(results, indent=1))
    # the before-numbers where `intraslice heal` reads them: the pruned report
    report_file = pruned / "intraslice.json"
    report = json.loads(report_file.read_text())
    report["perplexities"] = {t: {w: base[w]["ppl"][t] for w in ("dense", "pruned")} for t in TEXTS}
    report_file.write_text(json.dumps(report, indent=2, default=str))
    for w in ("dense", "pruned"):
        print(f"{w}: " + ", ".join(f"{t} {base[w]['ppl'][t]['ppl']:.3f}" for t in TEXTS)
              + f", copy loss {base[w]['copy']['copy_loss']:.3f}", flush=True)  # fmt: skip

    from intraslice.heal import HealConfig, heal

    for recipe in args.recipes:
        for tokens in args.tokens:
            name = f"{recipe}@{tokens}"
            if name in results["runs"]:
                continue
            cfg = HealConfig(tokens=tokens, eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen,
                             **parse_recipe(recipe))  # fmt: skip
            out = root / f"{args.stem}-r{args.ratio}-{recipe.replace(':', '_')}-{tokens}"
            print(f"== {name}", flush=True)
            rec = heal(pruned, out, cfg, overwrite=True, progress=False)
            m = measure(out, 0, args.eval_seqlen, texts=()) if rec["kept"] == "healed" else base["pruned"]
            row = {
                "recipe": recipe,
                "tokens": rec["training"]["tokens"],
                "config": rec["config"],
                "ppl": {t: rec["held_out"]["after"][t]["ppl"] for t in TEXTS},
                "gap_closed": rec["gap_closed"],
                "copy_loss": m["copy"]["copy_loss"],
                "kept": rec["kept"],
                "train_seconds": rec["training"]["train_seconds"],
                "teacher_seconds": rec["timings_s"]["teacher"],
                "total_seconds": rec["timings_s"]["total"],
                "tokens_per_s": rec["training"]["tokens_per_s"],
                "step_tflops": rec["training"]["step_tflops"],
                "achieved_gflops_per_s": rec["training"]["achieved_gflops_per_s"],
                "matmul_gflops_per_s": rec["training"]["matmul_gflops_per_s"],
                "kl_first": rec["training"]["kl_first"],
                "kl_last": rec["training"]["kl_last"],
                "threads": args.threads,
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            if args.zeroshot and rec["kept"] == "healed":
                row["zeroshot"] = zeroshot(out, args.zeroshot)
            results["runs"][name] = row
            path.write_text(json.dumps(results, indent=1))
            print(json.dumps({k: row[k] for k in ("ppl", "gap_closed", "copy_loss", "tokens_per_s")}), flush=True)
    results["model"], results["ratio"] = display, args.ratio
    path.write_text(json.dumps(results, indent=1))
    write_table(results, key, args)
    return 0


def write_table(results: dict[str, Any], key: str, args: argparse.Namespace) -> None:
    base = results["reference"][key]
    d, pr = base["dense"], base["pruned"]
    lines = [
        f"{results['model']} at {results['ratio']} (the quick-start model; {key} held-out windows; "
        f"{args.threads} thread; offline: trained on the bundled C4 sample's calibration split, windows of 512 "
        "tokens, top-64 teacher cache).",
        "",
        "| model | tokens | WikiText-2 ppl | gap closed | C4 held-out ppl | gap closed | copy loss (span 200) "
        "| teacher pass | training | tokens/s | one step: TFLOP, GFLOP/s (matmul GFLOP/s) | whole heal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | | {d['ppl']['wikitext2']['ppl']:.2f} | | {d['ppl']['c4-heldout']['ppl']:.2f} | | "
        f"{d['copy']['copy_loss']:.3f} | | | | | |",
        f"| pruned | | {pr['ppl']['wikitext2']['ppl']:.2f} | | {pr['ppl']['c4-heldout']['ppl']:.2f} | | "
        f"{pr['copy']['copy_loss']:.3f} | | | | | |",
    ]
    for _, r in sorted(results["runs"].items(), key=lambda kv: (kv[1]["tokens"], kv[0])):
        g = r["gap_closed"] or {}
        lines.append(
            f"| heal {r['recipe']}{'' if r['kept'] == 'healed' else ' (worse: pre-heal kept)'} | {r['tokens']:,} | "
            f"{r['ppl']['wikitext2']:.2f} | {g.get('wikitext2', 0):.0%} | {r['ppl']['c4-heldout']:.2f} | "
            f"{g.get('c4-heldout', 0):.0%} | {r['copy_loss']:.3f} | {r['teacher_seconds'] / 60:.1f} min | "
            f"{r['train_seconds'] / 60:.1f} min | {r['tokens_per_s']:.0f} | {r['step_tflops']:.2f}, "
            f"{r['achieved_gflops_per_s']:.0f} ({r['matmul_gflops_per_s']:.0f}) | {r['total_seconds'] / 60:.1f} min |"
        )
    update_benchmarks_md("heal", "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        recipes = sorted({r["recipe"] for r in results["runs"].values()})
        for recipe in recipes:
            rows = sorted((r for r in results["runs"].values() if r["recipe"] == recipe), key=lambda r: r["tokens"])
            for text, style in (("wikitext2", "-o"), ("c4-heldout", "--s")):
                ax.plot([r["tokens"] for r in rows], [100 * (r["gap_closed"] or {}).get(text, 0) for r in rows],
                        style, label=f"{recipe} ({text})")  # fmt: skip
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("perplexity gap closed (%)")
        ax.set_title(f"{results['model']} at {results['ratio']}: heal by distillation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(ROOT / "results" / f"heal-{args.stem}.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
