"""Benchmark: how many calibration windows does the mask-gradient estimator need?

Why (issue #12, item 6): the estimator costs one forward, one re-forward and one backward
per calibration window (about 25 s for a 2048-token window of SmolLM2 on 2 CPU cores), so
on the README's quick start (32 x 2048) it is half of the run. The pruning itself uses all
windows whatever the estimator used (``--grad-samples`` only limits the gradients). If 8
windows give the allocation that 32 give, the default should use 8.

Protocol, exact and cheap: the gradients of windows 0-7, 8-15, 16-23 and 24-31 (one
gradient group of 8 each, the default ``--group-size``) are computed once, each chunk
with its own o_proj-input covariance. Since the estimator's statistics are sums over
groups (gradients) and samples (covariance), combining chunks gives exactly what
``--grad-samples 8|16|32`` would compute on those windows, so each variant below is the
allocation a real run would choose:

* ``8a`` .. ``8d``: the four disjoint 8-window estimates (their spread is the noise of 8),
* ``16a``, ``16b``: windows 0-15 and 16-31,
* ``32``: all of them (today's quick start).

For each variant and ratio the script records the per-layer keep ratios and their mean
absolute distance to ``32``; with ``--prune`` it also prunes SmolLM2 with that allocation
(``intraslice prune --ratios FILE``: the same 32 x 2048 calibration for the layer-wise
pruning, only the allocation differs) and measures WikiText-2 perplexity on the quick
start's 8 windows (``intraslice eval ppl``).

    python bench/grad_samples.py --ratios 0.2 0.3 --prune 8a 8b 16a 32 --prune-ratio 0.2

``--model qwen2.5-coder-0.5b`` runs the same study on the second built-in model (its
own work directory, results file and table); ``--rope-score`` passes the pair score to
the prunes.

Chunk gradients are cached in ``--work-dir`` (safetensors), so an interrupted run resumes.
Results: ``results/grad-samples-<model>.json``; ``--benchmarks-md`` writes the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import BUILTIN_MODELS, ROOT, update_benchmarks_md
from safetensors.torch import load_file, save_file
from torch import nn

from intraslice import stages
from intraslice.data import calibration_windows
from intraslice.importance import MaskGradients, estimate_allocation, importances, mask_gradients
from intraslice.pipeline.devices import DevicePolicy
from intraslice.pipeline.streaming import StreamedLayers

CHUNK = 8
#: --model -> (name in the table, BENCHMARKS.md section); result files use the shared stem
MODELS = {
    "smollm2-135m": ("SmolLM2-135M", "grad-samples"),
    "qwen2.5-coder-0.5b": ("Qwen2.5-Coder-0.5B", "grad-samples-qwen"),
}
VARIANTS = {
    "8a": [0],
    "8b": [1],
    "8c": [2],
    "8d": [3],
    "16a": [0, 1],
    "16b": [2, 3],
    "32": [0, 1, 2, 3],
}


def chunk_gradients(ckpt: Any, tokens: torch.Tensor, work: Path, c: int) -> MaskGradients:
    """Mask gradients of windows [8c, 8c+8), cached as safetensors in ``work``."""
    path = work / f"grads-chunk{c}.safetensors"
    if path.exists():
        t = load_file(str(path))
        return MaskGradients(t["attention"], t["mlp"], t["head_cov"], CHUNK, CHUNK, float(t["seconds"]))
    access = StreamedLayers(ckpt, DevicePolicy("cpu"))
    paths = {id(m): name for name, m in access.model.named_modules()}

    def onload(module: nn.Module) -> nn.Module:
        return ckpt.load_module(access.model, paths[id(module)], device="cpu")

    def offload(module: nn.Module) -> None:
        ckpt.release_module(access.model, paths[id(module)])

    print(f"mask gradients of windows {c * CHUNK}-{c * CHUNK + CHUNK - 1}", flush=True)
    mg = mask_gradients(access.model, tokens[c * CHUNK : (c + 1) * CHUNK], CHUNK, "cpu", onload=onload, offload=offload)
    save_file(
        {
            "attention": mg.attention.contiguous(),
            "mlp": mg.mlp.contiguous(),
            "head_cov": mg.head_cov.contiguous(),
            "seconds": torch.tensor(mg.seconds, dtype=torch.float64),
        },
        str(path),
    )
    return mg


def combine(parts: list[MaskGradients]) -> MaskGradients:
    """What one estimator run over the union of the chunks' windows computes."""
    return MaskGradients(
        torch.cat([p.attention for p in parts]),
        torch.cat([p.mlp for p in parts]),
        sum(p.head_cov for p in parts),
        sum(p.samples for p in parts),
        CHUNK,
        sum(p.seconds for p in parts),
    )


def allocation_record(
    model: nn.Module, mg: MaskGradients, ratio: float, f: int = 1, beta: float = 1.0
) -> dict[str, Any]:
    att, mlp = importances(mg, "global_pca", f)
    saved = {
        "mode": "global_pca",
        "units_per_head": f,
        "gradient_samples": mg.samples,
        "group_size": CHUNK,
        "importance": {"attention": [a.tolist() for a in att], "mlp": [x.tolist() for x in mlp]},
    }
    _, record = estimate_allocation(
        model, ratio, "global_pca", units_per_head=f, mlp_bias=beta, saved=saved, progress=False
    )
    record["gradient_samples"] = mg.samples
    record["estimator_seconds"] = mg.seconds
    return record


def distance(a: list[list[float]], b: list[list[float]]) -> dict[str, float]:
    ta, tb = torch.tensor(a), torch.tensor(b)
    d = (ta - tb).abs()
    return {"attention": float(d[:, 0].mean()), "mlp": float(d[:, 1].mean()), "max": float(d.max())}


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", choices=list(MODELS))
    ap.add_argument("--rope-score", default=None, help="the prunes' --rope-score (default: the CLI's)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--prune", nargs="*", default=[], choices=list(VARIANTS), help="variants to prune and evaluate")
    ap.add_argument("--prune-ratio", type=float, default=0.2)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--work-dir", default=None, help="default: ~/.cache/intraslice/bench-grad-samples[-<model>]")
    ap.add_argument("--out", default=None, help="default: results/grad-samples-<model>.json")
    ap.add_argument("--chunks", type=int, default=4, help="compute only the first N chunks of 8 windows (1-4)")
    ap.add_argument(
        "--reference",
        default=str(ROOT / "results/quickstart-32x2048-streamed-final.json"),
        help="intraslice.json of a run with all 32 windows: its allocation is the reference when --chunks < 4",
    )
    ap.add_argument(
        "--units-per-head",
        type=int,
        default=1,
        help="f of the estimator (1: the spec's and the CLI default; 64 = h: one unit per dim)",
    )
    ap.add_argument(
        "--mlp-bias",
        type=float,
        default=1.0,
        help="beta of the estimator (1.0: the spec's split, not the CLI default since 2026-12-03)",
    )
    ap.add_argument(
        "--incontext", action="store_true", help="also copy loss (spans 50, 200) and key-value lookup of --prune models"
    )
    ap.add_argument("--benchmarks-md", action="store_true")
    args = ap.parse_args()
    name_, section = MODELS[args.model]
    slug = BUILTIN_MODELS[args.model][0]
    if args.work_dir is None:
        suffix = "" if args.model == "smollm2-135m" else f"-{slug}"
        args.work_dir = str(Path.home() / f".cache/intraslice/bench-grad-samples{suffix}")
    if args.out is None:
        args.out = str(ROOT / f"results/grad-samples-{slug}.json")
    model_args = ["--model", args.model]
    prune_args = model_args + (["--rope-score", args.rope_score] if args.rope_score else [])
    # result keys: 8a@0.2, 8a@0.2/f64, 8a@0.2/b1.2, 8a@0.2/f64/b1.2
    sfx = ("" if args.units_per_head == 1 else f"/f{args.units_per_head}") + (
        "" if args.mlp_bias == 1.0 else f"/b{args.mlp_bias:g}"
    )
    fsfx = sfx.replace("/", "-")
    if args.nsamples != 4 * CHUNK:
        raise SystemExit("the variants assume 32 windows (4 chunks of 8)")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results.update({"model": name_, "calibration": f"{args.nsamples} x {args.seqlen}, seed 0"})
    if args.rope_score:
        results["rope_score"] = args.rope_score

    ckpt = stages.load(args.model)
    tokens = calibration_windows(ckpt.tokenizer(), "wikitext2", args.nsamples, args.seqlen, 0).tokens
    parts = [chunk_gradients(ckpt, tokens, work, c) for c in range(args.chunks)]
    results["seconds_per_window"] = sum(p.seconds for p in parts) / (CHUNK * len(parts))
    skeleton = ckpt.skeleton()
    variants = {name: idx for name, idx in VARIANTS.items() if max(idx) < len(parts)}
    ref_run = json.loads(Path(args.reference).read_text()) if len(parts) < 4 and args.model == "smollm2-135m" else None
    if len(parts) < 4 and (ref_run is None or sfx):  # the real run's allocation is f = 1, beta = 1
        raise SystemExit("--chunks < 4 compares with a real 32-window run: SmolLM2, f = 1 and beta = 1 only")
    reference = ref_run["allocation"] if ref_run else None

    allocs: dict[str, Any] = results.setdefault("allocations", {})
    for ratio in args.ratios:
        recs = {
            name: allocation_record(
                skeleton, combine([parts[c] for c in idx]), ratio, args.units_per_head, args.mlp_bias
            )
            for name, idx in variants.items()
        }
        if reference is not None and not sfx:  # the 32-window allocation of a real run, at its own ratio only
            if abs(reference["target_ratio"] - ratio) > 1e-9:
                continue
            recs["32"] = reference
        ref = recs["32"]["layer_ratios"]
        for name, rec in recs.items():
            allocs[f"{name}@{ratio}{sfx}"] = {
                "gradient_samples": rec["gradient_samples"],
                "planned_ratio": rec["planned_ratio"],
                "layer_ratios": rec["layer_ratios"],
                "distance_to_32": distance(rec["layer_ratios"], ref),
            }
            (work / f"alloc-{name}-r{ratio}{fsfx}.json").write_text(json.dumps({"allocation": rec}))
            dist = allocs[f"{name}@{ratio}{sfx}"]["distance_to_32"]
            print(f"ratio {ratio} {name:>4}{sfx}: mean |keep - keep(32)| {dist}")

    ppl: dict[str, Any] = results.setdefault("perplexity", {})
    if reference is None:  # all four chunks here: "32" is this code's own 32-window allocation
        for key in [k for k, v in ppl.items() if isinstance(v, dict) and "from" in v]:
            results["quickstart_reference"] = {"key": key, **ppl.pop(key)}
    if ref_run and ref_run.get("perplexity", {}).get("pruned", {}).get("windows") == args.eval_windows:
        ratio = ref_run["allocation"]["target_ratio"]
        ppl.setdefault("dense", ref_run["perplexity"]["dense"]["ppl"])
        ppl.setdefault(f"32@{ratio}", {"ppl": ref_run["perplexity"]["pruned"]["ppl"], "from": args.reference})
    py = sys.executable
    if args.prune and "dense" not in ppl:
        res = work / "ppl-dense.json"
        run(
            [
                py,
                "-m",
                "intraslice",
                "eval",
                "ppl",
                *model_args,
                "--windows",
                str(args.eval_windows),
                "--json",
                str(res),
                "--no-progress",
            ]
        )
        ppl["dense"] = json.loads(res.read_text())["ppl"]
    for name in args.prune:
        key = f"{name}@{args.prune_ratio}{sfx}"
        if key in ppl:
            continue
        model_dir = work / f"pruned-{name}-r{args.prune_ratio}{fsfx}"
        t = time.perf_counter()
        run(
            [py, "-m", "intraslice", "prune", *prune_args, "--ratio", str(args.prune_ratio),
             "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calib", "wikitext2",
             "--ratios", str(work / f"alloc-{name}-r{args.prune_ratio}{fsfx}.json"),
             "--units-per-head", str(args.units_per_head), "--mlp-bias", str(args.mlp_bias),
             "--no-eval", "--no-progress", "--overwrite", "--out", str(model_dir)]
        )  # fmt: skip
        prune_s = time.perf_counter() - t
        res = work / f"ppl-{name}-r{args.prune_ratio}{fsfx}.json"
        run([py, "-m", "intraslice", "eval", "ppl", "--model", str(model_dir), "--windows", str(args.eval_windows),
             "--json", str(res), "--no-progress"])  # fmt: skip
        ppl[key] = {"ppl": json.loads(res.read_text())["ppl"], "prune_seconds": prune_s}
        out.write_text(json.dumps(results, indent=1))
    if args.incontext:  # what perplexity does not show (issue #14): copying and lookup of each model
        ic_all: dict[str, Any] = results.setdefault("incontext", {})
        for name in args.prune:
            key = f"{name}@{args.prune_ratio}{sfx}"
            res = work / f"incontext-{name}-r{args.prune_ratio}{fsfx}.json"
            if not res.exists():
                model_dir = work / f"pruned-{name}-r{args.prune_ratio}{fsfx}"
                run([py, "-m", "intraslice", "eval", "incontext", "--model", str(model_dir), "--parts", "copy,lookup",
                     "--spans", "50", "200", "--json", str(res), "--no-progress"])  # fmt: skip
            r = json.loads(res.read_text())
            ic_all[key] = {
                "copy50": r["copy"]["spans"]["50"]["copy_loss"],
                "copy200": r["copy"]["spans"]["200"]["copy_loss"],
                "lookup": r["lookup"]["accuracy"],
            }
        out.write_text(json.dumps(results, indent=1))
    out.write_text(json.dumps(results, indent=1))
    table = markdown(results, args.eval_windows)
    print(table)
    if args.benchmarks_md:
        update_benchmarks_md(section, table)
    return 0


def _ic(cell: dict[str, float] | None) -> str:
    if not cell:
        return " | "
    lookup = "" if cell.get("lookup") is None else f"{cell['lookup']:.1%}"
    return f"{cell['copy50']:.2f} / {cell['copy200']:.2f} | {lookup}"


def parse_key(key: str) -> tuple[str, float, int, float]:
    """``8a@0.3/f64/b1.2`` -> (variant, ratio, f, beta); a missing part is the CLI default."""
    name, rest = key.split("@")
    ratio, *opts = rest.split("/")
    f = next((int(o[1:]) for o in opts if o.startswith("f")), 1)
    beta = next((float(o[1:]) for o in opts if o.startswith("b")), 1.0)
    return name, float(ratio), f, beta


def markdown(results: dict[str, Any], windows: int) -> str:
    ppl = results.get("perplexity", {})
    betas = any(parse_key(k)[3] != 1.0 for k in results["allocations"])  # a beta column only when varied
    lines = [
        f"{results['model']}, global_pca, calibration {results['calibration']}"
        + (f", pair score {results['rope_score']}" if results.get("rope_score") else "")
        + ". Distance: mean |per-layer removed ratio - "
        f"the 32-window allocation's (same f{' and beta' if betas else ''})| (attention / MLP). Perplexity: "
        f"WikiText-2 test, {windows} windows of 2048 (dense {ppl.get('dense', float('nan')):.3f}); every model "
        "pruned from all 32 windows, only the allocation differs.",
        "",
        f"| f |{' beta |' if betas else ''} windows for the gradients | ratio | distance attention | distance MLP "
        "| perplexity | copy loss 50 / 200 | key-value lookup |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if betas else ""),
    ]
    ic_all = results.get("incontext", {})

    def order(key: str) -> tuple:
        name, ratio, f, beta = parse_key(key)
        return (f, beta, ratio, list(VARIANTS).index(name))

    for key in sorted(results["allocations"], key=order):
        a = results["allocations"][key]
        name, ratio, f, beta = parse_key(key)
        cell = ppl.get(key, {})
        p = cell.get("ppl")
        text = "" if p is None else f"{p:.3f}"
        if p is not None and "from" in cell:
            text += " (the quick start's own run, before canonical eigenvector signs)"
        first, last = VARIANTS[name][0] * CHUNK, (VARIANTS[name][-1] + 1) * CHUNK - 1
        lines.append(
            f"| {f} |{f' {beta:g} |' if betas else ''} {first}-{last} ({a['gradient_samples']}) "
            f"| {ratio:g} | {a['distance_to_32']['attention']:.4f} | {a['distance_to_32']['mlp']:.4f} | {text} "
            f"| {_ic(ic_all.get(key))} |"
        )
    ref = results.get("quickstart_reference")
    if ref:
        lines.append(
            f"| 1 |{' 1 |' if betas else ''} 0-31 (32), the quick start's own run before canonical eigenvector signs | "
            f"{ref['key'].split('@')[1]} | | | {ref['ppl']:.3f} | {_ic(results.get('quickstart_incontext'))} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
