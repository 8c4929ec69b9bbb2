"""Issue #11, item 4: what the deployment constraints cost, and what llama.cpp gains.

Two measurements on SmolLM2-135M (``--model qwen2.5-coder-0.5b``: the second built-in model,
its own work directory, results file and table), each resumable (every finished step leaves a file in
``--work-dir`` and is skipped when run again):

**quality**: at each ratio, IntraSlice as specified (RoPE pairs chosen per KV group) and
four constrained variants, all from the *same* estimator importances (the first run
computes the mask gradients; every other run reuses them with ``--ratios``), the same
calibration windows and the same evaluation:

* ``per-layer``: ``--rope-selection per-layer`` (one pair set per layer);
* ``global``: ``--rope-selection global`` (one pair set for the model);
* ``llamacpp``: ``--deploy llamacpp`` (global pair set, one head width, equal query heads
  per kept KV head: what llama.cpp's ``deci`` graph runs);
* ``stock``: ``--deploy stock`` (also every layer alike: plain LlamaForCausalLM).

``--variants llamacpp-w56 llamacpp-w48`` adds the llamacpp set at a fixed narrower head width
(a global pair set of 28 or 24 pairs instead of deleting whole heads only).

Each pruned model gets WikiText-2 perplexity (``intraslice eval ppl``) and the in-context
tests of issue #14 (copy loss at span 200, key-value lookup; ``intraslice eval incontext``).

**speed**: the dense model and each ratio's ``llamacpp`` model as GGUF at the same type
(f16 and Q8_0: the dense one by llama.cpp's own ``convert_hf_to_gguf.py``, the pruned one by
``intraslice export``), timed by llama.cpp's own ``llama-bench`` (prompt processing of
``--pp`` tokens, generation of ``--tg`` tokens) at 1 and 2 threads. Repeats are interleaved:
round r runs every model once (``llama-bench -r 1``) before round r+1, so a slow spell of
the machine hits all models alike; medians are reported, with the decoder-linear FLOPs
limit (dense / pruned decoder-linear parameters) beside them.

    python bench/deploy_smollm2.py quality --ratios 0.2 0.3 --nsamples 16 --seqlen 2048 --eval-windows 16
    bash bench/build_llama_bench.sh              # llama-bench from the llama-cpp-python sdist's sources
    python bench/deploy_smollm2.py speed --ratios 0.2 0.3 --threads 1 2 --repeats 5
    python bench/deploy_smollm2.py report --benchmarks-md

Results: ``results/deploy-<model>.json`` (``deploy-smollm2.json`` for the default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import BUILTIN_MODELS, ROOT, run_child, update_benchmarks_md

#: In the order they run: the method, then the target comparison (issue #11's 5% at 0.3) first.
VARIANTS: dict[str, list[str]] = {
    "per-kv-group": [],
    "llamacpp": ["--deploy", "llamacpp"],
    "stock": ["--deploy", "stock"],
    "per-layer": ["--rope-selection", "per-layer"],
    "global": ["--rope-selection", "global"],
}
#: The layer steps' calibration of the CLI's default since 2026-12-06 (issue #14).
APPENDED = ["--calib-repeat", "0.5", "--calib-repeat-mode", "append"]
#: Run only when named in ``--variants``: the llamacpp set at a fixed narrower head width (the
#: default keeps every pair, r = h, and deletes heads; a global pair set at r < h is the other
#: way to meet llama.cpp's one head dimension).
EXTRA: dict[str, list[str]] = {
    "llamacpp-w56": ["--deploy", "llamacpp", "--head-width", "56"],
    "llamacpp-w48": ["--deploy", "llamacpp", "--head-width", "48"],
    # attention loses half the ratio, the MLP the rest (issue #14's split), unconstrained and llamacpp
    "per-kv-group-a0.5": ["--attention-share", "0.5"],
    "llamacpp-a0.5": ["--deploy", "llamacpp", "--attention-share", "0.5"],
    # the llamacpp set as recorded before 2026-12-03: MLP widths in multiples of 8 (since then
    # --deploy llamacpp rounds them to 32, whole Q8_0 blocks)
    "llamacpp-m8": ["--deploy", "llamacpp", "--mlp-multiple", "8"],
    # the CLI's default split since 2026-12-03 (attention loses a quarter of the ratio)
    "per-kv-group-a0.25": ["--attention-share", "0.25"],
    "llamacpp-a0.25": ["--deploy", "llamacpp", "--attention-share", "0.25"],
    # the CLI's defaults since 2026-12-06 (issue #14): attention untouched, the layer steps on
    # windows with a repeated span appended (half their length); named in full so the rows keep
    # their meaning if the defaults move again
    "per-kv-group-a0": ["--attention-share", "0", *APPENDED],
    "llamacpp-a0": ["--deploy", "llamacpp", "--attention-share", "0", *APPENDED],
    "stock-a0": ["--deploy", "stock", "--attention-share", "0", *APPENDED],
}
CACHE = Path(os.environ.get("INTRASLICE_CACHE", Path.home() / ".cache" / "intraslice"))
SDIST = CACHE / "sdist" / "llama_cpp_python-0.3.36.tar.gz"
DEFAULT_BENCH = CACHE / "llama-bench" / "bin" / "llama-bench"
LLAMA_SRC = CACHE / "llama-bench" / "src"  # the full llama.cpp tree build_llama_bench.sh unpacks
PY = sys.executable


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return run_child(cmd, **kw)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def save(path: Path, data: dict[str, Any]) -> None:
    """Write the results, keeping what another step (quality beside speed) wrote since we read
    the file: rows and runs merge by key, ours winning. In place: the callers hold references to
    the nested dicts (``models``, ``speed``), so those are filled, never replaced."""
    on_disk = load(path)
    for key, value in on_disk.items():
        ours = data.setdefault(key, value)
        if ours is value or not isinstance(ours, dict) or not isinstance(value, dict):
            continue
        for k, v in value.items():
            ours.setdefault(k, v)
        if key == "quality" and isinstance(value.get("models"), dict):
            for k, v in value["models"].items():
                ours["models"].setdefault(k, v)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# -- quality ---------------------------------------------------------------------------------
def quality(args: argparse.Namespace, results: dict[str, Any], out: Path) -> None:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    q = results.setdefault("quality", {})
    q["protocol"] = {
        "calibration": f"{args.nsamples} x {args.seqlen} wikitext2 (offline: bundled validation), seed 0",
        "eval": f"WikiText-2 test, first {args.eval_windows} windows of 2048 (P1)",
        "incontext": "copy loss span 200 (8 sequences), key-value lookup 24 prompts of 1024, seed 0",
        "estimator": "global_pca, f = 1, beta = 1.0 (--attention-share 1, the spec's split) unless a variant "
        'names a share; each row names the run whose importances it reused ("importances": the first '
        "ratio's unconstrained run, or --importances); plain calibration windows except in the -a0 "
        "variants (the default since 2026-12-06: a repeated span of half the window appended in the layer steps)",
    }
    models = q.setdefault("models", {})
    results["model"] = BUILTIN_MODELS[args.model][1]
    if "dense" not in models:
        models["dense"] = evaluate(None, work / "dense", args)
        save(out, results)
    # every variant reuses the importances of the first ratio's unconstrained run (pruned first),
    # or of --importances (an earlier intraslice.json on the same calibration windows)
    first = work / f"per-kv-group-r{args.ratios[0]}"
    chosen = ["per-kv-group", *[v for v in args.variants if v != "per-kv-group"]]
    if args.importances:
        first = Path(args.importances).parent
        chosen = list(args.variants)
    options = {**VARIANTS, **EXTRA}
    # a lost work dir with rows still to run: prune the first model again for its importances
    refresh = any(f"{v}@{r}" not in models for r in args.ratios for v in chosen)
    for ratio in args.ratios:
        for variant in chosen:
            extra = options[variant]
            key = f"{variant}@{ratio}"
            model_dir = work / f"{variant}-r{ratio}"
            if key in models and not (refresh and model_dir == first and not (first / "intraslice.json").exists()):
                continue
            if not (model_dir / "intraslice.json").exists():
                # (the importances do not depend on the split; a lost work dir recomputes them); the
                # spec's split (beta = 1) unless the variant names one
                reuse = ["--ratios", str(first / "intraslice.json")] if (first / "intraslice.json").exists() else []
                t = time.perf_counter()
                run(
                    [PY, "-m", "intraslice", "prune", "--model", args.model, "--ratio", str(ratio),
                     "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--no-eval", "--no-incontext",
                     "--calib", "wikitext2",  # the default before issue #38, as these rows were recorded
                     "--no-progress", "--overwrite", "--units-per-head", "1", "--out", str(model_dir), *reuse, *extra,
                     *([] if {"--attention-share", "--mlp-bias"} & set(extra) else ["--attention-share", "1"]),
                     # plain calibration windows unless the variant names spans (rows before 2026-12-06)
                     *([] if "--calib-repeat" in extra else ["--calib-repeat", "0"])]
                )  # fmt: skip
                (model_dir / "bench-prune-seconds.txt").write_text(f"{time.perf_counter() - t:.1f}\n")
            if key in models:
                continue  # (pruned again only for its importances)
            report = json.loads((model_dir / "intraslice.json").read_text())
            row = evaluate(model_dir, model_dir, args)
            row.update(
                {
                    "ratio": ratio,
                    "variant": variant,
                    "options": extra,
                    "importances": first.name,  # (the --importances run's directory when one is given)
                    "reduction": report["reduction"],
                    "params_after": report["params_after"],
                    "shapes": [
                        {k: layer.get(k) for k in ("num_heads", "num_kv_heads", "head_dim", "intermediate_size")}
                        for layer in report.get("layers", [])
                    ],
                }
            )
            models[key] = row
            save(out, results)
            print(f"{key}: ppl {row['ppl']:.3f} copy200 {row['copy200']:.3f} lookup {row['lookup']:.1%}", flush=True)


def evaluate(model_dir: Path | None, where: Path, args: argparse.Namespace) -> dict[str, Any]:
    where.mkdir(parents=True, exist_ok=True)
    model = ["--model", str(model_dir) if model_dir else args.model]
    ppl_json, ic_json = where / "bench-ppl.json", where / "bench-incontext.json"
    if not ppl_json.exists():
        run([PY, "-m", "intraslice", "eval", "ppl", *model, "--windows", str(args.eval_windows), "--json",
             str(ppl_json), "--no-progress"])  # fmt: skip
    if not ic_json.exists():
        run([PY, "-m", "intraslice", "eval", "incontext", *model, "--parts", "copy,lookup", "--spans", "200",
             "--json", str(ic_json), "--no-progress"])  # fmt: skip
    ppl, ic = json.loads(ppl_json.read_text()), json.loads(ic_json.read_text())
    return {
        "ppl": ppl["ppl"],
        "ppl_windows": ppl["windows"],
        "copy200": ic["copy"]["spans"]["200"]["copy_loss"],
        "lookup": ic["lookup"]["accuracy"],
        "lookup_loss": ic["lookup"]["answer_loss"],
    }


# -- speed ------------------------------------------------------------------------------------
def dense_gguf(args: argparse.Namespace, gtype: str) -> Path:
    """The dense model as GGUF, by llama.cpp's own converter from the dequantized checkpoint
    (for SmolLM2 its Llama vocabulary path imports ``sentencepiece``: ``pip install sentencepiece``)."""
    from intraslice.checkpoint import SourceCheckpoint
    from intraslice.export.gguf import find_llama_cpp

    out = Path(args.work_dir) / f"dense-{gtype}.gguf"
    if out.exists():
        return out
    src = SourceCheckpoint.open(args.model).directory  # the safetensors cache of the built-in GGUF
    # The whole llama.cpp tree (the export's cache unpacks only its ``conversion`` package):
    # the sources build_llama_bench.sh unpacked, else the one given.
    root = LLAMA_SRC if (LLAMA_SRC / "convert_hf_to_gguf.py").is_file() else find_llama_cpp(args.llama_cpp or SDIST)
    if not (root / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"no convert_hf_to_gguf.py in {root}: run bash bench/build_llama_bench.sh first")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), str(root)])}
    tmp = out.with_suffix(".tmp")
    run([PY, str(root / "convert_hf_to_gguf.py"), str(src), "--outtype", gtype, "--outfile", str(tmp)], env=env)
    os.replace(tmp, out)
    return out


def pruned_gguf(args: argparse.Namespace, variant: str, ratio: float, gtype: str) -> Path:
    model_dir = Path(args.work_dir) / f"{variant}-r{ratio}"
    out = model_dir / f"model-{gtype}.gguf"
    if not out.exists():
        run([PY, "-m", "intraslice", "export", str(model_dir), "--format", "gguf", "--type", gtype, "--out", str(out),
             "--llama-cpp", str(args.llama_cpp or SDIST)])  # fmt: skip
    return out


def bench_once(binary: Path, gguf: Path, threads: int, pp: int, tg: int) -> dict[str, float]:
    """One llama-bench repetition: tokens/s of prompt processing and of generation."""
    proc = run(
        [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(pp), "-n", str(tg), "-r", "1", "-o", "json"],
        capture_output=True,
        text=True,
    )
    rows = json.loads(proc.stdout)
    found = {}
    for row in rows:
        kind = "pp" if row["n_prompt"] and not row["n_gen"] else "tg"
        found[kind] = float(row["avg_ts"])
    return found


def cpu() -> str:
    """The CPU the speed runs ran on: its name and the SIMD sets ggml's kernels choose between
    (absolute tokens/s differ several-fold between an AVX2 and an AVX-512 machine; ratios less)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    lines = info.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    sets = ("avx2", "f16c", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
    simd = [f for f in sets if f in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(simd) or 'no AVX2'}"


def speed(args: argparse.Namespace, results: dict[str, Any], out: Path) -> None:
    binary = Path(args.llama_bench)
    if not binary.is_file():
        raise SystemExit(f"no llama-bench at {binary}: run bash bench/build_llama_bench.sh first")
    s = results.setdefault("speed", {})
    before = dict(s.get("protocol", {}))  # the protocol of the runs this one may replace
    s["protocol"] = {
        "tool": "llama-bench (llama.cpp of llama-cpp-python 0.3.36, built with GGML_NATIVE=ON)",
        "pp": args.pp,
        "tg": args.tg,
        "repeats": args.repeats,
        "interleaved": True,
        "cpu": cpu(),
    }
    params = results.get("quality", {}).get("models", {})
    for gtype in args.types:
        models = {"dense": dense_gguf(args, gtype)}
        for variant in args.speed_variants:
            for ratio in args.ratios:
                models[f"{variant}@{ratio}"] = pruned_gguf(args, variant, ratio, gtype)
        for threads in args.threads:
            key = f"{gtype}/t{threads}"
            if key in s and set(models) <= set(s[key]["median"]):
                continue  # (a run with other models is replaced: the figures compared come from one run)
            samples: dict[str, dict[str, list[float]]] = {m: {"pp": [], "tg": []} for m in models}
            for r in range(args.repeats):
                for name, path in models.items():
                    got = bench_once(binary, path, threads, args.pp, args.tg)
                    for kind, v in got.items():
                        samples[name][kind].append(v)
                print(f"{key} round {r + 1}/{args.repeats}", flush=True)
            med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in samples.items()}
            if key in s:  # the replaced run stays in the file, for the figures quoted from it
                s.setdefault("earlier", []).append({"run": key, "protocol": before, **s[key]})
            s[key] = {"samples": samples, "median": med}
            save(out, results)
    s.setdefault("flops_limit", {}).update(
        {
            key: 1.0 / (1.0 - params[key]["reduction"]["decoder_linear"])
            for key in (f"{v}@{r}" for v in args.speed_variants for r in args.ratios)
            if key in params
        }
    )
    save(out, results)


# -- report -----------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    q = results.get("quality", {})
    models = q.get("models", {})
    lines = []
    if models:
        d = models["dense"]
        p = q["protocol"]
        lines += [
            f"{results.get('model', 'SmolLM2-135M')}, calibration {p['calibration']}; {p['eval']}; "
            f"{p['incontext']}. Estimator: "
            f"{p['estimator']}. Cost: perplexity of a variant against IntraSlice as specified (per-KV-group pairs) "
            "at the same ratio.",
            "",
            "| ratio | variant | decoder removed | perplexity | cost | copy loss 200 | key-value lookup |",
            "|---|---|---|---|---|---|---|",
            f"| - | dense | - | {d['ppl']:.2f} | | {d['copy200']:.2f} | {d['lookup']:.1%} |",
        ]
        for key, m in models.items():
            if key == "dense":
                continue
            # against the unconstrained model of the same split (a variant "...-a0.25" names one)
            tag = m["variant"][m["variant"].rfind("-a") :] if "-a0" in m["variant"] else ""
            base = models.get(f"per-kv-group{tag}@{m['ratio']}")
            cost = f"{m['ppl'] / base['ppl'] - 1:+.1%}" if base else ""
            lines.append(
                f"| {m['ratio']} | {m['variant']} | {m['reduction']['decoder_linear']:.1%} | {m['ppl']:.2f} | "
                f"{cost} | {m['copy200']:.2f} | {m['lookup']:.1%} |"
            )
    s = results.get("speed", {})
    runs = {k: v for k, v in s.items() if "/" in k}
    if runs:
        p = s["protocol"]
        lines += [
            "",
            f"llama.cpp speed ({p['tool']}): prompt processing of {p['pp']} tokens and generation of {p['tg']} "
            f"tokens, tokens/s, median of {p['repeats']} interleaved repeats"
            f"{'; CPU ' + p['cpu'] if p.get('cpu') else ''}; speedup over the dense GGUF of the "
            "same type and threads; FLOPs limit = dense / pruned decoder-linear parameters; pp / limit = pp "
            "speedup / limit (issue #11's target: at least 0.9); pp gain / possible = (pp speedup - 1) / (limit - 1).",
            "",
            "| type | threads | model | pp tok/s | pp speedup | tg tok/s | tg speedup | FLOPs limit | pp / limit "
            "| pp gain / possible |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, run_ in runs.items():
            gtype, threads = key.split("/t")
            med = run_["median"]
            dense = med["dense"]
            for name, m in med.items():
                limit = s.get("flops_limit", {}).get(name)
                pp_up, tg_up = m["pp"] / dense["pp"], m["tg"] / dense["tg"]
                lines.append(
                    f"| {gtype} | {threads} | {name} | {m['pp']:.0f} | {pp_up:.2f}x | {m['tg']:.1f} | {tg_up:.2f}x | "
                    f"{'' if limit is None else f'{limit:.2f}x'} | "
                    f"{'' if limit is None else f'{pp_up / limit:.2f}'} | "
                    f"{'' if limit is None else f'{(pp_up - 1) / (limit - 1):.2f}'} |"
                )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=("quality", "speed", "report"))
    ap.add_argument("--model", default="smollm2-135m", choices=list(BUILTIN_MODELS))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, *EXTRA], help="quality: which to run"
    )
    ap.add_argument(
        "--importances",
        default=None,
        help="quality: an intraslice.json whose importances every variant reuses (same --nsamples/--seqlen)",
    )
    ap.add_argument("--work-dir", default=None, help="default: ~/.cache/intraslice/bench-deploy[-<model>]")
    ap.add_argument("--llama-cpp", default=None, help="llama.cpp sources or the llama-cpp-python sdist")
    ap.add_argument("--llama-bench", default=str(DEFAULT_BENCH))
    ap.add_argument(
        "--speed-variants",
        nargs="+",
        default=["llamacpp"],
        choices=[v for v in (*VARIANTS, *EXTRA) if v.startswith("llamacpp")],
        help="speed: which quality variants' models to time (interleaved in one run)",
    )
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"], choices=("f32", "f16", "q8_0"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="default: results/deploy-<model>.json")
    ap.add_argument("--benchmarks-md", action="store_true")
    args = ap.parse_args()
    slug = BUILTIN_MODELS[args.model][0]
    suffix = "" if args.model == "smollm2-135m" else f"-{slug}"
    if args.work_dir is None:
        args.work_dir = str(CACHE / f"bench-deploy{suffix}")
    if args.out is None:
        args.out = str(ROOT / "results" / f"deploy-{slug}.json")
    out = Path(args.out)
    results = load(out)
    if args.step == "quality":
        quality(args, results, out)
    elif args.step == "speed":
        speed(args, results, out)
    table = markdown(results)
    print(table)
    if args.benchmarks_md:
        update_benchmarks_md(f"deploy-{slug}", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
