"""Benchmark: does a streamed prune stay flat in memory and time per layer as models deepen?

Why (issue #10): ``intraslice prune`` streams weights from the safetensors shards one layer
at a time, so its peak host memory should not grow with depth (beyond the output shard
being filled, capped at 2 GiB) and its time should grow linearly, i.e. be flat *per
layer*. The memory plan (``intraslice.plan``) predicts the peak from the config alone and
the CLI refuses runs it thinks will not fit, so the prediction must track what is really
resident. Real checkpoints of one family at many depths do not exist, so this benchmark
writes synthetic Llama checkpoints (random weights, std 0.02, norms 1) of one width at
several depths, prunes each in its own process exactly as a user would (``intraslice
prune --ratio 0.3 --no-eval --device cpu``, default global_pca allocation with the
streamed estimator) and measures:

* the process's peak RSS (``os.wait4`` rusage of that one child) against the plan's
  predicted ``peak_host`` (from the run's ``intraslice.json``; ``--plan`` is run as well
  and must print the same plan);
* wall time, prune seconds per layer (``layers[*].seconds``) and estimator seconds per
  layer (``timings_s.allocation`` / depth);
* flatness against the shallowest row: RSS and seconds per layer within 15 %.

The checkpoints are written tensor by tensor through :class:`intraslice.shards.ShardedWriter`
(500 MB shards, as ``save_pretrained(max_shard_size="500MB")`` would), so building the
32-layer, 1.5B-parameter fp32 model (~6 GB) holds one shard in RAM, not the model. Weights
are seeded per tensor name, so a shallow model is the prefix of a deeper one. The tokenizer
is a byte-level BPE trained in-process on the bundled WikiText-2 validation split, which is
also the calibration text (``--calib wikitext2-valid``: no network).

    python bench/scale.py --depths 4 8 16 32 --threads 2 --keep-models /tmp/scale-models

Writes the raw results to ``--out`` (default ``results/scale-cpu-<N>x<T>.json``) and
prints a markdown table for BENCHMARKS.md (``--benchmarks-md`` also writes it there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, update_benchmarks_md

from intraslice.plan import PROCESS_BASE

GiB = 2**30
#: ``save_pretrained(max_shard_size="500MB")`` counts decimal megabytes.
SHARD_BYTES = 500 * 10**6
INIT_STD = 0.02
FLAT_TOLERANCE = 0.15
BUILD_MARKER = "scale-build.json"
TOKENIZER_MARKER = "scale-tokenizer.json"
#: Bump when the way models are built changes, so --keep-models rebuilds them.
BUILD_VERSION = 1


# -- synthetic checkpoints --------------------------------------------------------------------
def build_tokenizer(directory: Path, vocab: int) -> Any:
    """A byte-level BPE trained on the bundled WikiText-2 validation text (cached in ``directory``).

    BPE training stops early when the text runs out of merges, so the tokenizer may be
    smaller than ``vocab``; the model's embedding keeps ``vocab`` rows regardless.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from intraslice.data import calibration_text

    marker = directory / TOKENIZER_MARKER
    spec = {"vocab": vocab, "version": BUILD_VERSION}
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == spec:
        return PreTrainedTokenizerFast.from_pretrained(directory)
    text = calibration_text("wikitext2-valid").text
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    marker.write_text(json.dumps(spec) + "\n", encoding="utf-8")
    return fast


def llama_config(args: argparse.Namespace, depth: int, vocab: int, eos_id: int) -> Any:
    from transformers import LlamaConfig

    if args.width % args.heads or args.heads % args.kv_heads:
        raise SystemExit("--width must be a multiple of --heads, and --heads of --kv-heads")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.width,
        intermediate_size=args.mlp,
        num_hidden_layers=depth,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.width // args.heads,
        max_position_embeddings=max(4096, args.seqlen),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        dtype=torch.float32,
    )


def init_tensor(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """Norm weights 1, other vectors 0, matrices N(0, 0.02^2), seeded by the tensor's name."""
    if len(shape) == 1:
        return torch.ones(shape) if name.endswith("norm.weight") else torch.zeros(shape)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ seed)
    return torch.randn(shape, generator=gen).mul_(INIT_STD)


def build_model(directory: Path, config: Any, tokenizer: Any, seed: int) -> dict[str, Any]:
    """Write a random-weight checkpoint tensor by tensor (never the whole model in RAM).

    Reused as is when ``directory`` holds a finished build of the same spec.
    """
    from transformers import AutoModelForCausalLM

    from intraslice.shards import ShardedWriter, tied_weights_to_skip

    spec = {"config": config.to_diff_dict(), "seed": seed, "init_std": INIT_STD, "version": BUILD_VERSION}
    marker = directory / BUILD_MARKER
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if done.get("spec") == json.loads(json.dumps(spec, default=str)):
            return {**done, "reused": True}
    if directory.exists():
        shutil.rmtree(directory)  # an unfinished or different build of ours
    directory.mkdir(parents=True)
    t0 = time.perf_counter()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in skeleton.parameters())
    with ShardedWriter(directory, max_shard_bytes=SHARD_BYTES, skip=tied_weights_to_skip(config)) as writer:
        for name, meta in skeleton.state_dict().items():
            writer.add(name, init_tensor(name, meta.shape, seed))
    del skeleton
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    files = sorted(directory.glob("*.safetensors"))
    done = {
        "spec": json.loads(json.dumps(spec, default=str)),
        "params": params,
        "checkpoint_bytes": sum(f.stat().st_size for f in files),
        "shards": len(files),
        "build_seconds": time.perf_counter() - t0,
        # the builder's high-water mark so far (this process; monotonic over the builds)
        "builder_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    marker.write_text(json.dumps(done, indent=2) + "\n", encoding="utf-8")
    return {**done, "reused": False}


# -- measurement -----------------------------------------------------------------------------
def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float, int]:
    """Run ``cmd`` with output to ``log``: (exit code, wall seconds, wait4's peak RSS bytes).

    ``wait4``'s ``ru_maxrss`` starts at *this* process's RSS at fork (Linux carries the old
    address space's high-water mark across ``exec``), so it is only an upper bound when this
    script is the larger process; rows use the child's own ``VmHWM`` (``peak_rss_bytes``).
    """
    with open(log, "w", encoding="utf-8") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss * 1024  # Linux reports KiB


def process_base_rss(env: dict[str, str], log: Path) -> int:
    """Peak RSS (its own VmHWM) of a process that only imports what the CLI imports (the
    plan's ``PROCESS_BASE``)."""
    code = (
        "import torch, transformers, safetensors, tokenizers, intraslice, intraslice.cli, intraslice.stages\n"
        "from intraslice.memory import peak_rss_bytes\nprint('peak_rss_bytes', peak_rss_bytes())"
    )
    rc, _, _ = run_measured([sys.executable, "-c", code], env, log)
    text = log.read_text(encoding="utf-8")
    m = re.search(r"^peak_rss_bytes (\d+)$", text, flags=re.M)
    if rc != 0 or m is None:
        raise SystemExit(f"the baseline import failed:\n{text}")
    return int(m.group(1))


def plan_block(text: str) -> str:
    """The memory plan as ``MemoryPlan.describe`` prints it (from 'memory plan:' to 'available')."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("memory plan:")), None)
    if start is None:
        return ""
    end = next((i for i in range(start, len(lines)) if lines[i].lstrip().startswith("available")), len(lines) - 1)
    return "\n".join(lines[start : end + 1])


def plan_peak_host_gib(block: str) -> float | None:
    m = re.search(r"^\s*peak\s+device\s+[\d.]+ GiB\s+host\s+([\d.]+) GiB", block, flags=re.M)
    return float(m.group(1)) if m else None


def measure(model_dir: Path, depth: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``--plan`` then the prune itself, each in a fresh process; the row for this depth."""
    base = [sys.executable, "-m", "intraslice", "prune", "--model", str(model_dir), "--ratio", str(args.ratio)]
    base += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calib", args.calib]
    base += ["--no-eval", "--device", "cpu", "--no-progress"]
    env = child_env(args.threads)

    plan_proc = subprocess.run([*base, "--plan"], env=env, capture_output=True, text=True, check=False)
    plan_text = plan_block(plan_proc.stdout)
    if plan_proc.returncode not in (0, 2) or not plan_text:
        raise SystemExit(
            f"depth {depth}: --plan failed ({plan_proc.returncode}):\n{plan_proc.stdout}{plan_proc.stderr}"
        )

    out = work / f"pruned-L{depth}"
    log = work / f"prune-L{depth}.log"
    rc, wall, wait4_rss = run_measured([*base, "--out", str(out)], env, log)
    log_text = log.read_text(encoding="utf-8")
    if rc != 0:
        raise SystemExit(f"depth {depth}: prune failed ({rc}):\n{log_text[-4000:]}")
    report = json.loads((out / "intraslice.json").read_text(encoding="utf-8"))
    shutil.rmtree(out)
    rss = int(report["peak_memory"]["host_peak_rss_mb"] * 2**20)  # the child's own VmHWM

    layer_s = [float(layer["seconds"]) for layer in report["layers"]]
    timings = report["timings_s"]
    plan = report["memory_plan"]
    run_plan_text = plan_block(log_text)
    return {
        "depth": depth,
        "exit_code": rc,
        "wall_seconds": wall,
        "peak_rss_bytes": rss,
        "peak_rss_wait4_bytes": wait4_rss,
        "plan_peak_host_bytes": int(plan["peak_host"]),
        "plan_stage_host_bytes": {k: int(v["host"]) for k, v in plan["stages"].items()},
        "plan_policy": plan["policy"],
        "rss_over_plan": rss / plan["peak_host"],
        "plan_cli_peak_host_gib": plan_peak_host_gib(plan_text),
        "plan_cli_exit_code": plan_proc.returncode,
        "plan_cli_matches_run": plan_text == run_plan_text,
        "plan_text": plan_text,
        "layer_seconds": layer_s,
        "prune_s_per_layer": statistics.fmean(layer_s),
        "prune_s_per_layer_median": statistics.median(layer_s),
        "estimator_s_per_layer": float(timings.get("allocation", float("nan"))) / depth,
        "timings_s": timings,
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "reduction": report["reduction"],
        "calibration": report["calibration"],
        "allocation": {k: v for k, v in report["allocation"].items() if not isinstance(v, (list, dict))},
    }


# -- report ----------------------------------------------------------------------------------
def _rel(a: float, b: float) -> float:
    return a / b if b else float("nan")


def add_flatness(rows: list[dict[str, Any]]) -> None:
    """Each row against the shallowest one: RSS and prune seconds per layer within ``FLAT_TOLERANCE``."""
    ref = min(rows, key=lambda r: r["depth"])
    for r in rows:
        f = {
            "reference_depth": ref["depth"],
            "rss": _rel(r["peak_rss_bytes"], ref["peak_rss_bytes"]),
            "plan_peak_host": _rel(r["plan_peak_host_bytes"], ref["plan_peak_host_bytes"]),
            "prune_s_per_layer": _rel(r["prune_s_per_layer"], ref["prune_s_per_layer"]),
            "estimator_s_per_layer": _rel(r["estimator_s_per_layer"], ref["estimator_s_per_layer"]),
        }
        # The estimator's per-layer figure also carries the per-model LM-head cost (logits and
        # their gradient per sample), so it falls with depth by design: see the fits instead.
        keys = ("rss", "prune_s_per_layer")
        f["flat"] = all(abs(f[k] - 1.0) <= FLAT_TOLERANCE for k in keys)
        r["flatness"] = f


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares ``y = fixed + per_layer * x``: separates per-model from per-layer cost."""
    if len(xs) < 2:
        return {"fixed": float("nan"), "per_layer": float("nan")}
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return {"fixed": my - slope * mx, "per_layer": slope}


def depth_fits(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """How each measured quantity grows with depth (RSS and plan in MiB, times in seconds)."""
    xs = [float(r["depth"]) for r in rows]
    return {
        "peak_rss_mib": linear_fit(xs, [r["peak_rss_bytes"] / 2**20 for r in rows]),
        "plan_peak_host_mib": linear_fit(xs, [r["plan_peak_host_bytes"] / 2**20 for r in rows]),
        "prune_total_s": linear_fit(xs, [float(r["timings_s"]["prune_total"]) for r in rows]),
        "estimator_s": linear_fit(xs, [float(r["timings_s"]["allocation"]) for r in rows]),
        "wall_s": linear_fit(xs, [r["wall_seconds"] for r in rows]),
    }


def fits_text(fits: dict[str, dict[str, float]], base_rss: int) -> str:
    def line(key: str, label: str, unit: str) -> str:
        f = fits[key]
        return f"{label} {f['fixed']:.1f} {unit} + {f['per_layer']:.2f} {unit}/layer"

    return (
        "Least-squares fits over depth L (fixed + per-layer): "
        + "; ".join(
            line(k, label, unit)
            for k, label, unit in (
                ("peak_rss_mib", "peak RSS", "MiB"),
                ("plan_peak_host_mib", "plan peak host", "MiB"),
                ("prune_total_s", "prune", "s"),
                ("estimator_s", "estimator", "s"),
                ("wall_s", "wall", "s"),
            )
        )
        + f". A process that only imports torch, transformers and intraslice: {base_rss / 2**20:.0f} MiB RSS "
        f"(the plan counts {PROCESS_BASE / 2**20:.0f} MiB).\n"
    )


def table(rows: list[dict[str, Any]]) -> str:
    ref = rows[0]["flatness"]["reference_depth"]
    head = (
        f"| layers | params | checkpoint | peak RSS | plan peak host | RSS / plan | wall | prune s/layer | "
        f"estimator s/layer | vs {ref} layers: RSS (plan), s/layer, est. s/layer | "
        f"flat (RSS, s/layer ±{FLAT_TOLERANCE:.0%}) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        f = r["flatness"]
        lines.append(
            f"| {r['depth']} | {r['params'] / 1e9:.3f}B | {r['checkpoint_bytes'] / 1e9:.2f} GB | "
            f"{r['peak_rss_bytes'] / GiB:.2f} GiB | {r['plan_peak_host_bytes'] / GiB:.2f} GiB | "
            f"{r['rss_over_plan']:.2f} | {r['wall_seconds']:.1f} s | {r['prune_s_per_layer']:.2f} s | "
            f"{r['estimator_s_per_layer']:.2f} s | x{f['rss']:.2f} (x{f['plan_peak_host']:.2f}), "
            f"x{f['prune_s_per_layer']:.2f}, x{f['estimator_s_per_layer']:.2f} | {'yes' if f['flat'] else 'no'} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--width", type=int, default=2048, help="hidden size d")
    ap.add_argument("--mlp", type=int, default=5632, help="MLP intermediate size m")
    ap.add_argument("--heads", type=int, default=32, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=4, help="key/value heads (GQA)")
    ap.add_argument("--vocab", type=int, default=32000, help="embedding rows (the tokenizer may have fewer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib", default="wikitext2-valid", help="calibration source passed to intraslice prune")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the prune processes")
    ap.add_argument("--keep-models", default=None, help="build (and reuse) the checkpoints here; else a temp dir")
    ap.add_argument("--work-dir", default=None, help="where the pruned outputs and logs go (default: temp)")
    ap.add_argument("--out", default=None, help="results JSON (default results/scale-cpu-<N>x<T>.json)")
    ap.add_argument("--benchmarks-md", action="store_true", help="also write the table into BENCHMARKS.md")
    args = ap.parse_args()
    os.environ.update(child_env(None))  # offline here too: the same calibration text (and cache key) as the runs
    from intraslice.data import calibration_windows

    depths = sorted(set(args.depths))
    out = Path(args.out or ROOT / "results" / f"scale-cpu-{args.nsamples}x{args.seqlen}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="intraslice-scale-", dir=args.work_dir))
    models_root = Path(args.keep_models) if args.keep_models else tmp / "models"
    rows: list[dict[str, Any]] = []
    try:
        tokenizer = build_tokenizer(models_root / f"tokenizer-v{args.vocab}", args.vocab)
        vocab = max(args.vocab, len(tokenizer))
        # Tokenize the calibration text once here: otherwise only the first depth's process pays
        # for it (cache miss, ~100 MB of tokenizer buffers), and the rows would not be comparable.
        calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
        base_rss = process_base_rss(child_env(args.threads), tmp / "base.log")
        print(f"bare process (import torch, transformers, intraslice): {base_rss / 2**20:.0f} MB RSS", flush=True)
        for depth in depths:
            config = llama_config(args, depth, vocab, tokenizer.eos_token_id)
            name = f"llama-L{depth}-d{args.width}-m{args.mlp}-h{args.heads}kv{args.kv_heads}-v{vocab}-s{args.seed}"
            model_dir = models_root / name
            built = build_model(model_dir, config, tokenizer, args.seed)
            how = "reused" if built["reused"] else f"built in {built['build_seconds']:.0f}s"
            print(
                f"L={depth}: {built['params'] / 1e9:.3f}B params, {built['checkpoint_bytes'] / 1e9:.2f} GB in "
                f"{built['shards']} shard(s) ({how}, builder max RSS {built['builder_max_rss_mb']:.0f} MB)",
                flush=True,
            )
            row = measure(model_dir, depth, args, tmp)
            row.update({k: built[k] for k in ("params", "checkpoint_bytes", "shards", "build_seconds", "reused")})
            row["builder_max_rss_mb"] = built["builder_max_rss_mb"]
            rows.append(row)
            print(
                f"L={depth}: peak RSS {row['peak_rss_bytes'] / GiB:.2f} GiB "
                f"(plan {row['plan_peak_host_bytes'] / GiB:.2f} GiB, x{row['rss_over_plan']:.2f}), "
                f"wall {row['wall_seconds']:.1f}s, prune {row['prune_s_per_layer']:.2f} s/layer, "
                f"estimator {row['estimator_s_per_layer']:.2f} s/layer, "
                f"--plan matches the run's plan: {row['plan_cli_matches_run']}",
                flush=True,
            )
            if not args.keep_models:
                shutil.rmtree(model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # pruned outputs, logs, and the models unless --keep-models

    add_flatness(rows)
    fits = depth_fits(rows)
    threads = args.threads or torch.get_num_threads()
    result = {
        "benchmark": "scale",
        "model": {
            "family": "llama (synthetic, random weights)",
            "width": args.width,
            "mlp": args.mlp,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab": vocab,
            "tokenizer_size": len(tokenizer),
            "dtype": "float32",
            "init_std": INIT_STD,
            "seed": args.seed,
            "shard_bytes": SHARD_BYTES,
        },
        "ratio": args.ratio,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "calib": args.calib,
        "threads": threads,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "command": sys.argv,
        "process_base_rss_bytes": base_rss,
        "plan_process_base_bytes": PROCESS_BASE,
        "depth_fits": fits,
        "rows": rows,
    }
    from intraslice.cli import _versions

    result["versions"] = _versions()
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md = table(rows) + "\n" + fits_text(fits, base_rss)
    print(f"\nwrote {out}\n\n{md}")
    if args.benchmarks_md:
        body = (
            f"Synthetic Llama (d {args.width}, m {args.mlp}, {args.heads}/{args.kv_heads} heads, vocab {vocab}, fp32, "
            f"random weights), `intraslice prune --ratio {args.ratio:g} --no-eval --device cpu`, calibration "
            f"{args.nsamples} x {args.seqlen} from `{args.calib}`, {threads} threads, each run its own process.\n\n"
            + md
            + "\nReproduce: `python bench/scale.py --depths "
            + " ".join(map(str, depths))
            + f" --width {args.width} --mlp {args.mlp} --heads {args.heads} --kv-heads {args.kv_heads}"
            + f" --nsamples {args.nsamples} --seqlen {args.seqlen} --threads {threads}`\n"
        )
        update_benchmarks_md(f"scale-cpu-{args.nsamples}x{args.seqlen}", body)


if __name__ == "__main__":
    main()
