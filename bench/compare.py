"""Side-by-side benchmark: IntraSlice vs SliceGPT vs channel pruning on a built-in real model.

For each requested real decoder-parameter reduction, every method prunes a fresh copy of
the same source model from the *same* calibration windows (SliceGPT's width is searched so
that its shortcut matrices are paid for inside the budget), then P1 perplexity is measured
on the same WikiText-2 test windows, and prefill throughput / decode latency are timed
interleaved with the dense model (medians after warm-up). Writes results/compare-*.json,
two plots (perplexity vs real parameter reduction, perplexity vs measured prefill speedup)
and a table in BENCHMARKS.md.

    python bench/compare.py --ratios 0.1 0.2 0.3 0.4 0.5 --nsamples 16 --seqlen 2048 --eval-windows 16
    python bench/compare.py --model qwen2.5-coder-0.5b --nsamples 16 --seqlen 1024 --eval-seqlen 1024 ...
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from _common import BUILTIN_MODELS, ROOT, update_benchmarks_md

from intraslice import PruneConfig, calibration_windows, load_model, prune
from intraslice.cli import _versions
from intraslice.config import share_arg
from intraslice.data import tokenize, wikitext2_test_text
from intraslice.engine.config import AllocationSection
from intraslice.eval.ppl import perplexity
from intraslice.importance import estimate_allocation, importances, mask_gradients
from intraslice.speed import benchmark_speed

METHODS = ("intraslice", "slicegpt", "channel")
SHORT = BUILTIN_MODELS


def _short(model: str) -> str:
    return SHORT[model][0]


LABELS = {
    "intraslice": "IntraSlice (global_pca)",
    "slicegpt": "SliceGPT",
    "channel": "channel (FLAP-style)",
    "dense": "dense",
}


def _plot(
    rows: list[dict[str, Any]], dense: dict[str, Any], out: Path, prefill_len: int, args: argparse.Namespace
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for kind in ("params", "speed"):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [  # in ratio order: a noisy speed reading must not reorder the line
                (
                    r["reduction"]["decoder_linear"] * 100
                    if kind == "params"
                    else r["speed"]["prefill"][str(prefill_len)]["speedup"],
                    r["ppl"]["ppl"],
                )
                for r in sorted(rows, key=lambda r: r["ratio"])
                if r["method"] == method
            ]
            ax.plot(*zip(*pts, strict=True), marker="o", label=LABELS[method])
        ax.scatter([0 if kind == "params" else 1.0], [dense["ppl"]], color="black", zorder=5, label="dense")
        ax.set_yscale("log")
        ax.set_ylabel(f"WikiText-2 perplexity ({dense['windows']} x {args.eval_seqlen}, log scale)")
        if kind == "params":
            ax.set_xlabel("real decoder-linear parameters removed (%)")
            ax.set_title(f"{SHORT[args.model][1]}: perplexity vs real size")
        else:
            ax.set_xlabel(f"measured prefill speedup over dense ({prefill_len} tokens)")
            ax.set_title(f"{SHORT[args.model][1]}: perplexity vs measured speed")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"compare-{_short(args.model)}{args.tag}-ppl-vs-{kind}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=tuple(SHORT), help="built-in model")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib", default="wikitext2")
    ap.add_argument(
        "--attention-share",
        type=share_arg,
        default=1.0,
        help="IntraSlice's split between attention and MLP (the rows recorded so far: 1, the spec's; the "
        "library's default is config.DEFAULT_ATTENTION_SHARE)",
    )
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window length (P1: 2048)")
    ap.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--decode", type=int, nargs="+", default=[512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for pruning and timing")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--save-models", default=None, help="also save every pruned model under this directory")
    ap.add_argument("--tag", default="")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--retime",
        action="store_true",
        help="prune nothing: re-time the models saved by an earlier --save-models run (on a quiet machine) "
        "and rewrite the results, plots and table",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="prune and time nothing: rewrite the table and plots from the per-run JSONs already written "
        "(the ratios of an interrupted run that finished)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.retime:
        retime(args, out)
        return
    if args.report_only:
        report_only(args, out)
        return

    src = load_model(args.model)
    calib = calibration_windows(src.tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
    test_ids = tokenize(src.tokenizer, wikitext2_test_text().text)
    base = src.model.to(args.device)
    dense = perplexity(base, src.tokenizer, args.eval_seqlen, args.eval_windows, token_ids=test_ids, progress=False)
    print(f"dense ppl {dense['ppl']:.3f}", flush=True)
    imp = None
    grad_seconds = 0.0
    if "intraslice" in args.methods:
        mg = mask_gradients(copy.deepcopy(base), calib.tokens, 8, args.device, progress=False)
        att, mlp = importances(mg, "global_pca", 1)
        imp = {"mode": "global_pca", "units_per_head": 1, "gradient_samples": mg.samples,
               "importance": {"attention": [a.tolist() for a in att], "mlp": [x.tolist() for x in mlp]}}  # fmt: skip
        grad_seconds = mg.seconds
        print(f"gradients {grad_seconds:.0f}s", flush=True)

    rows: list[dict[str, Any]] = []
    for ratio in args.ratios:
        models: dict[str, Any] = {}
        for method in args.methods:
            layer_ratios = None
            if method == "intraslice":
                # the library's allocation on the importances computed once above (cap: the CLI's default)
                alloc, _ = estimate_allocation(
                    base, ratio, "global_pca", saved=imp, attention_share=args.attention_share,
                    cap=AllocationSection().max_layer_ratio, progress=False,
                )  # fmt: skip
                layer_ratios = alloc.layer_ratios
            cfg = PruneConfig(method=method, ratio=ratio, layer_ratios=layer_ratios, device=args.device)
            t = time.perf_counter()
            result = prune(copy.deepcopy(base).to("cpu"), calib.tokens, cfg, progress=False)
            seconds = time.perf_counter() - t + (grad_seconds if method == "intraslice" else 0.0)
            model = result.model.to(args.device)
            ppl = perplexity(
                model, src.tokenizer, args.eval_seqlen, args.eval_windows, token_ids=test_ids, progress=False
            )
            models[method] = model
            rows.append(
                {
                    "model": src.name,
                    "method": method,
                    "ratio": ratio,
                    "reduction": result.reduction(),
                    "params_before": result.params_before,
                    "params_after": result.params_after,
                    "method_info": result.method,
                    "ppl": ppl,
                    "dense_ppl": dense,
                    "prune_seconds": seconds,
                    "layers": result.layers,
                    "calibration": calib.describe(),
                }
            )
            print(
                f"ratio {ratio:.2f} {method:>10}: decoder -{rows[-1]['reduction']['decoder_linear']:.2%} "
                f"whole -{rows[-1]['reduction']['whole_model']:.2%} ppl {ppl['ppl']:.3f} ({seconds:.0f}s)",
                flush=True,
            )
            if args.save_models:
                from intraslice import save_pruned

                save_pruned(
                    model.to("cpu"),
                    src.tokenizer,
                    Path(args.save_models) / f"{_short(args.model)}-{method}-{ratio:.2f}",
                    report=rows[-1],
                    overwrite=True,
                )
                model.to(args.device)
        time_group(args, out, base, models, rows[-len(args.methods) :])
        del models
    write_report(args, out, rows, dense, calib.tokens.shape, calib.source)


def time_group(args: argparse.Namespace, out: Path, base: Any, models: dict[str, Any], rows: list[dict]) -> None:
    """Time one ratio's models interleaved with the dense model; store the speeds in their rows."""
    speed = benchmark_speed(
        [("dense", base), *models.items()],
        args.prefill,
        args.decode,
        repeats=args.repeats,
        warmup=1,
        log=lambda m: print("  " + m, flush=True),
    ).to_dict()
    for row in rows:
        row["speed"] = {**speed["models"][row["method"]], "reference": speed["models"]["dense"]}
        row["speed_setup"] = {
            "device": args.device,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "warmup": 1,
            "batch": 1,
        }
        row["versions"] = _versions()
        name = f"compare-{_short(args.model)}-{row['method']}-r{row['ratio']:.2f}{args.tag}.json"
        (out / name).write_text(json.dumps(row, indent=2) + "\n")


def retime(args: argparse.Namespace, out: Path) -> None:
    """Re-time saved models without pruning again (timings need a machine with nothing else running)."""
    if not args.save_models:
        raise SystemExit("--retime needs --save-models DIR (where the earlier run saved the models)")
    base = load_model(args.model).model.to(args.device)
    rows: list[dict[str, Any]] = []
    for ratio in args.ratios:
        group = []
        for method in args.methods:
            group.append(
                json.loads((out / f"compare-{_short(args.model)}-{method}-r{ratio:.2f}{args.tag}.json").read_text())
            )
        models = {
            r["method"]: load_model(
                str(Path(args.save_models) / f"{_short(args.model)}-{r['method']}-{ratio:.2f}")
            ).model.to(args.device)
            for r in group
        }
        print(f"ratio {ratio:.2f}", flush=True)
        time_group(args, out, base, models, group)
        rows.extend(group)
        del models
    calib = rows[0]["calibration"]
    write_report(args, out, rows, rows[0]["dense_ppl"], (calib["nsamples"], calib["seqlen"]), calib["source"])


def report_only(args: argparse.Namespace, out: Path) -> None:
    """The table and plots from the per-(method, ratio) JSONs on disk; missing ratios are left out."""
    rows = []
    done = []
    for ratio in args.ratios:
        paths = [out / f"compare-{_short(args.model)}-{m}-r{ratio:.2f}{args.tag}.json" for m in args.methods]
        if all(p.exists() for p in paths):
            rows.extend(json.loads(p.read_text()) for p in paths)
            done.append(ratio)
    if not rows:
        raise SystemExit("no finished ratio to report")
    args.ratios = done
    setup = rows[0]["speed_setup"]  # how the timings on disk were taken
    args.threads, args.repeats, args.device = setup["threads"], setup["repeats"], setup["device"]
    calib = rows[0]["calibration"]
    write_report(args, out, rows, rows[0]["dense_ppl"], (calib["nsamples"], calib["seqlen"]), calib["source"])


def write_report(
    args: argparse.Namespace,
    out: Path,
    rows: list[dict[str, Any]],
    dense: dict[str, Any],
    calib_shape: tuple[int, int],
    calib_source: str,
) -> None:
    summary = {
        "dense_ppl": dense,
        "rows": [{k: r[k] for k in ("method", "ratio", "reduction", "ppl", "prune_seconds", "speed")} for r in rows],
    }
    (out / f"compare-{_short(args.model)}{args.tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots = _plot(rows, dense, out, args.prefill[-1], args)

    n, t = calib_shape
    p_short, p_long, dec = args.prefill[0], args.prefill[-1], args.decode[0]
    lines = [
        "| target | method | decoder removed | whole model removed | P1 ppl | prefill "
        f"{p_short} | prefill {p_long} | decode @{dec} | linear-FLOPs limit | prune time |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| - | dense | - | - | {dense['ppl']:.2f} | 1.00x | 1.00x | 1.00x | 1.00x | |",
    ]
    for r in rows:
        s = r["speed"]
        lines.append(
            f"| {r['ratio']:.1f} | {r['method']} | {r['reduction']['decoder_linear']:.1%} | "
            f"{r['reduction']['whole_model']:.1%} | {r['ppl']['ppl']:.2f} | "
            f"{s['prefill'][str(p_short)]['speedup']:.2f}x | {s['prefill'][str(p_long)]['speedup']:.2f}x | "
            f"{s['decode'][str(dec)]['speedup']:.2f}x | {s['decoder_linear_flops_speedup_limit']:.2f}x | "
            f"{r['prune_seconds']:.0f} s |"
        )
    ref = rows[0]["speed"]["reference"]
    body = (
        f"{SHORT[args.model][1]}, calibration {n} x {t} tokens from `{calib_source}` (the same windows for every "
        f"method), perplexity on the first {dense['windows']} WikiText-2 test windows of {args.eval_seqlen} tokens "
        f"({'P1' if args.eval_seqlen == 2048 else 'P1 protocol, shorter windows'}). Speedups are measured "
        f"against the dense model timed interleaved with each ratio's models (medians of {args.repeats} repeats "
        f"after 1 warm-up, batch 1, {args.device}, {args.threads} threads; dense prefill "
        f"{ref['prefill'][str(p_long)]['tokens_per_s']:.0f} tok/s at {p_long} tokens, decode "
        f"{ref['decode'][str(dec)]['ms_per_token']:.1f} ms/token at a {dec}-token cache). The linear-FLOPs "
        "limit is dense / pruned decoder-linear parameters (SliceGPT's shortcuts included). IntraSlice prune time "
        "includes its mask gradients.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "".join(f"![{p.stem}](results/{p.name})\n" for p in plots)
        + "\nReproduce: `python bench/compare.py "
        + (f"--model {args.model} " if args.model != "smollm2-135m" else "")
        + "--ratios "
        + " ".join(f"{r:g}" for r in args.ratios)
        + (" --methods " + " ".join(args.methods) if tuple(args.methods) != METHODS else "")
        + f" --nsamples {n} --seqlen {t} --eval-windows {args.eval_windows}"
        + (f" --eval-seqlen {args.eval_seqlen}" if args.eval_seqlen != 2048 else "")
        + " --prefill "
        + " ".join(map(str, args.prefill))
        + " --decode "
        + " ".join(map(str, args.decode))
        + f" --repeats {args.repeats} --threads {args.threads}"
        + (f" --tag={args.tag}" if args.tag else "")
        + " --save-models DIR`; timings alone: the same command with `--retime`\n"
    )
    update_benchmarks_md(f"compare-{_short(args.model)}{args.tag}", body)


if __name__ == "__main__":
    main()
