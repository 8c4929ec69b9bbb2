"""Benchmark: IntraSlice on SmolLM2-135M-Instruct at several ratios.

For each ratio: real decoder-linear and whole-model parameter reduction, P1 perplexity on
the first ``--eval-windows`` WikiText-2 test windows, prune wall time, peak resident
memory during the prune, and prune time as a multiple of one dense forward pass over the
calibration set measured in the same run. Writes one JSON per ratio under ``--out`` and
rewrites the matching table in BENCHMARKS.md.

    python bench/prune_smollm2.py --ratios 0.1 0.2 0.3 0.4 0.5 --nsamples 32 --seqlen 2048 --eval-windows 16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, PeakRSS, dense_forward_seconds, update_benchmarks_md

from intraslice import PruneConfig, calibration_windows, load_model, prune
from intraslice.cli import _versions
from intraslice.data import tokenize, wikitext2_test_text
from intraslice.eval.ppl import perplexity


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| ratio | decoder params removed | whole model removed | P1 ppl (windows) | prune time | "
        "prune / dense fwd | peak RSS |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['ratio']:.1f} | {r['reduction']['decoder_linear']:.1%} | {r['reduction']['whole_model']:.1%} | "
            f"{r['ppl']['ppl']:.2f} ({r['ppl']['windows']}) | {r['prune_seconds']:.0f} s | "
            f"{r['prune_over_dense_forward']:.1f}x | {r['peak_rss_mb']:.0f} MB |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib", default="wikitext2")
    ap.add_argument("--eval-windows", type=int, default=None, help="default: all 148")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-markdown", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    src = load_model()
    calib = calibration_windows(src.tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
    test_ids = tokenize(src.tokenizer, wikitext2_test_text().text)
    dense_model = src.model.to(args.device)
    fwd = dense_forward_seconds(dense_model, calib.tokens.to(args.device))
    dense_ppl = perplexity(dense_model, src.tokenizer, 2048, args.eval_windows, token_ids=test_ids, progress=False)
    dense_model.to("cpu")
    print(f"dense: ppl {dense_ppl['ppl']:.3f} on {dense_ppl['windows']} windows; forward over calibration {fwd:.1f}s")

    rows = []
    for ratio in args.ratios:
        model = copy.deepcopy(src.model)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            result = prune(
                model, calib.tokens, PruneConfig(ratio=ratio, device=args.device, allocation="uniform"), progress=False
            )
            prune_s = time.perf_counter() - t0
        pruned = result.model.to(args.device)
        ppl = perplexity(pruned, src.tokenizer, 2048, args.eval_windows, token_ids=test_ids, progress=False)
        row = {
            "method": "intraslice",
            "allocation": "uniform",
            "model": src.name,
            "ratio": ratio,
            "calibration": calib.describe(),
            "params_before": result.params_before,
            "params_after": result.params_after,
            "reduction": result.reduction(),
            "ppl": ppl,
            "dense_ppl": dense_ppl,
            "prune_seconds": prune_s,
            "prune_stage_seconds": result.timings,
            "dense_forward_seconds": fwd,
            "prune_over_dense_forward": prune_s / fwd,
            "peak_rss_mb": mem.peak,
            "rss_before_prune_mb": mem.base,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "versions": _versions(),
            "layers": result.layers,
        }
        name = f"prune-smollm2-r{ratio:.2f}-{calib.tokens.shape[0]}x{calib.tokens.shape[1]}.json"
        (out / name).write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
        rows.append(row)
        print(
            f"ratio {ratio:.2f}: decoder -{row['reduction']['decoder_linear']:.1%}, "
            f"whole -{row['reduction']['whole_model']:.1%}, ppl {ppl['ppl']:.3f}, prune {prune_s:.0f}s "
            f"({prune_s / fwd:.1f}x dense fwd), peak RSS {mem.peak:.0f} MB",
            flush=True,
        )
        del model, pruned, result

    if not args.no_markdown:
        n, t = calib.tokens.shape
        body = (
            f"Dense: P1 perplexity **{dense_ppl['ppl']:.2f}** on {dense_ppl['windows']} of "
            f"{dense_ppl['windows_total']} windows. Calibration: {n} x {t} tokens from `{calib.source}` (seed 0). "
            f"Device: {args.device}, {torch.get_num_threads()} threads. One dense forward over the calibration set: "
            f"{fwd:.0f} s.\n\n"
            + table(rows)
            + "\nReproduce: `python bench/prune_smollm2.py --ratios "
            + " ".join(f"{r:g}" for r in args.ratios)
            + f" --nsamples {n} --seqlen {t} --calib {args.calib}"
            + (f" --eval-windows {args.eval_windows}" if args.eval_windows else "")
            + "`\n"
        )
        update_benchmarks_md(f"prune-smollm2-{args.device}-{n}x{t}", body)


if __name__ == "__main__":
    main()
