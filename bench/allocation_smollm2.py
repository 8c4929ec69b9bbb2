"""Benchmark: uniform vs global vs global_pca allocation on SmolLM2-135M-Instruct.

Same calibration windows for every run. Mask gradients are computed once (``global`` and
``global_pca`` share them; only the rotation differs) and timed against one dense forward
over the calibration set. Writes results/alloc-*.json and a table in BENCHMARKS.md.

    python bench/allocation_smollm2.py --ratios 0.2 0.3 0.4 0.5 --nsamples 32 --seqlen 1024 --eval-windows 16
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from _common import ROOT, dense_forward_seconds, update_benchmarks_md

from intraslice import PruneConfig, calibration_windows, load_model, prune
from intraslice.algo.allocation import allocate, param_model, uniform_allocation
from intraslice.arch import get_arch
from intraslice.cli import _versions
from intraslice.data import tokenize, wikitext2_test_text
from intraslice.eval.ppl import perplexity
from intraslice.importance import importances, mask_gradients

MODES = ("uniform", "global", "global_pca")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--calib", default="wikitext2")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--units-per-head", type=int, default=1)
    ap.add_argument("--mlp-bias", type=float, default=1.0)
    ap.add_argument("--cap", type=float, default=0.8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--tag", default="", help="suffix of the results files and the BENCHMARKS.md section")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    src = load_model()
    calib = calibration_windows(src.tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
    test_ids = tokenize(src.tokenizer, wikitext2_test_text().text)
    base = src.model
    arch = get_arch(base.config)
    dims = arch.dims(base.config)
    pm = param_model(dims, args.units_per_head, arch.qkv_bias(base.config), arch.mlp_bias(base.config))
    fwd = dense_forward_seconds(base.to(args.device), calib.tokens.to(args.device))
    dense = perplexity(base, src.tokenizer, 2048, args.eval_windows, token_ids=test_ids, progress=False)
    mg = mask_gradients(copy.deepcopy(base), calib.tokens, args.group_size, args.device, progress=False)
    base.to("cpu")
    imps = {m: importances(mg, m, args.units_per_head) for m in args.modes if m != "uniform"}
    print(
        f"dense ppl {dense['ppl']:.3f}; gradients {mg.seconds:.0f}s = "
        f"{mg.seconds / fwd:.1f}x dense forward ({fwd:.0f}s)"
    )

    rows = []
    for ratio in args.ratios:
        for mode in args.modes:
            if mode == "uniform":
                alloc = uniform_allocation(pm, ratio)
                layer_ratios = None
            else:
                alloc = allocate(*imps[mode], pm, ratio, args.mlp_bias, args.cap)
                layer_ratios = alloc.layer_ratios
            result = prune(
                copy.deepcopy(base),
                calib.tokens,
                PruneConfig(ratio=ratio, layer_ratios=layer_ratios, device=args.device),
                progress=False,
            )
            ppl = perplexity(
                result.model.to(args.device), src.tokenizer, 2048, args.eval_windows, token_ids=test_ids, progress=False
            )
            row = {
                "model": src.name,
                "mode": mode,
                "ratio": ratio,
                "planned_ratio": alloc.planned_ratio,
                "reduction": result.reduction(),
                "ppl": ppl,
                "dense_ppl": dense,
                "layer_ratios": [list(x) for x in alloc.layer_ratios],
                "layers": result.layers,
                "calibration": calib.describe(),
                "estimator": {
                    "units_per_head": args.units_per_head,
                    "mlp_bias": args.mlp_bias,
                    "cap": args.cap,
                    "group_size": args.group_size,
                    "gradient_seconds": mg.seconds,
                    "dense_forward_seconds": fwd,
                    "gradient_over_dense_forward": mg.seconds / fwd,
                },
                "prune_seconds": result.timings["total"],
                "device": args.device,
                "versions": _versions(),
            }
            (out / f"alloc-smollm2-{mode}-r{ratio:.2f}{args.tag}.json").write_text(json.dumps(row, indent=2) + "\n")
            rows.append(row)
            print(
                f"ratio {ratio:.2f} {mode:>10}: decoder -{row['reduction']['decoder_linear']:.1%} ppl {ppl['ppl']:.3f}",
                flush=True,
            )

    n, t = calib.tokens.shape
    by = {(r["ratio"], r["mode"]): r for r in rows}
    head = "| ratio | " + " | ".join(args.modes) + " |\n|---|" + "---|" * len(args.modes) + "\n"
    lines = []
    for ratio in args.ratios:
        cells = [
            f"{by[(ratio, m)]['ppl']['ppl']:.2f} ({by[(ratio, m)]['reduction']['decoder_linear']:.1%})"
            for m in args.modes
        ]
        lines.append(f"| {ratio:.1f} | " + " | ".join(cells) + " |")
    body = (
        f"P1 perplexity on the first {dense['windows']} WikiText-2 test windows (dense {dense['ppl']:.2f}); "
        "in brackets "
        f"the real decoder-parameter reduction. Calibration {n} x {t} tokens from `{calib.source}`, the same windows "
        f"for every run. Estimator: f = {args.units_per_head}, β = {args.mlp_bias}, cap {args.cap}, groups of "
        f"{args.group_size}; mask gradients took {mg.seconds:.0f} s = {mg.seconds / fwd:.1f}x one dense forward over "
        f"the calibration set ({fwd:.0f} s), device {args.device}.\n\n"
        + head
        + "\n".join(lines)
        + "\n\nReproduce: `python bench/allocation_smollm2.py --ratios "
        + " ".join(f"{r:g}" for r in args.ratios)
        + (" --modes " + " ".join(args.modes) if tuple(args.modes) != MODES else "")
        + f" --nsamples {n} --seqlen {t} --calib {args.calib} --eval-windows {args.eval_windows}"
        + f" --units-per-head {args.units_per_head} --mlp-bias {args.mlp_bias} --cap {args.cap}"
        + (f" --tag={args.tag}" if args.tag else "")
        + "`\n"
    )
    update_benchmarks_md(f"allocation-smollm2{args.tag}", body)


if __name__ == "__main__":
    main()
