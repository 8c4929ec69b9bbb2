"""Benchmark (issue #35): the attention/MLP split at equal *serving* cost.

Equal serving cost means equal weights plus KV cache at a context (batch 1, f16), and, since
decoding one token at batch 1 reads exactly those bytes, about equal decode speed there,
which the bench measures in llama.cpp's own server. For each ratio R and context C:

- ``share 0``: the default before this issue: ``intraslice prune --ratio R --attention-share 0``
  (attention and the KV cache untouched, the MLP takes the whole ratio). Its memory at C is
  the target of the other rows (one model serves both contexts: its KV cache is the dense one).
- ``share 1``: the method's split (attention and MLP lose the same fraction), at
  ``--target-memory <share 0's bytes at C> --context C --attention-share 1``.
- ``auto``: the estimator's ranking by importance per byte at C (``--target-memory`` with no
  share: the new default of a memory target).

Every row is pruned with ``--deploy llamacpp`` (so the server can load it) and the quick
start's calibration (16 x 1024, the default text), and scored on text it never saw: held-out
C4 and WikiText-2 test perplexity, the copy loss at span 200 and the key-value lookup
(``intraslice eval incontext``), and the zero-shot mean of PIQA, ARC-Easy and WinoGrande.
``--speed`` then times every model and the dense one in the server, interleaved (prompt 512,
decode at contexts 512 and 4096, one thread), alone on the machine.

    python bench/serving_split.py --ratios 0.2 0.4 --contexts 512 4096 --jobs 2
    python bench/serving_split.py --speed
    python bench/serving_split.py --report --benchmarks-md

Results: ``results/serving-split-MODEL.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import BUILTIN_MODELS, ROOT, run_child, update_benchmarks_md

PY = sys.executable
TASKS = "piqa,arc_easy,winogrande"
LOCK = threading.Lock()


def results_path(model: str) -> Path:
    return ROOT / "results" / f"serving-split-{BUILTIN_MODELS[model][0]}.json"


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"rows": {}, "dense": None}


def save(path: Path, data: dict[str, Any]) -> None:
    with LOCK:
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def env(args: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads)}


def evaluate(args: argparse.Namespace, model: str, work: Path, tag: str) -> dict[str, Any]:
    """Held-out perplexities, in-context copying and lookup, and the zero-shot mean of one model."""
    out: dict[str, Any] = {}
    for text in ("c4-heldout", "wikitext2"):
        res = work / f"{tag}-ppl-{text}.json"
        if not res.exists():
            run_child([PY, "-m", "intraslice", "eval", "ppl", "--model", model, "--text", text, "--windows",
                       str(args.eval_windows), "--no-progress", "--json", str(res)], env=env(args))  # fmt: skip
        out[text] = json.loads(res.read_text())["ppl"]
    res = work / f"{tag}-incontext.json"
    if not res.exists():
        run_child([PY, "-m", "intraslice", "eval", "incontext", "--model", model, "--parts", "copy,lookup",
                   "--spans", "200", "--no-progress", "--json", str(res)], env=env(args))  # fmt: skip
    r = json.loads(res.read_text())
    out["copy200"] = r["copy"]["spans"]["200"]["copy_loss"]
    out["lookup"] = r["lookup"]["accuracy"]
    res = work / f"{tag}-zeroshot.json"
    if not res.exists():
        run_child([PY, "-m", "intraslice", "eval", "zeroshot", "--model", model, "--tasks", TASKS, "--limit",
                   str(args.zeroshot_limit), "--threads", str(args.threads), "--no-progress", "--json", str(res)],
                  env=env(args))  # fmt: skip
    r = json.loads(res.read_text())
    values = {t: v["value"] for t, v in r["tasks"].items()}
    out["zeroshot"] = {"tasks": values, "mean": sum(values.values()) / len(values), "limit": args.zeroshot_limit}
    return out


def memory_at(directory: Path, context: int) -> dict[str, Any]:
    """Weights + KV (f16, batch 1) of a saved model at ``context``, counted from its config and report."""
    from intraslice.kvcache import serving_memory

    report = json.loads((directory / "intraslice.json").read_text())
    config = json.loads((directory / "config.json").read_text())
    return serving_memory(config, context, 1, "f16", report["params_after"]["whole_model"])


def prune(args: argparse.Namespace, out: Path, extra: list[str]) -> None:
    if (out / "intraslice.json").exists() and not args.force:
        return
    run_child([PY, "-m", "intraslice", "prune", "--model", args.model, "--nsamples", str(args.nsamples), "--seqlen",
               str(args.seqlen), "--deploy", "llamacpp", "--no-eval", "--no-progress", "--overwrite", "--out",
               str(out), *extra], env=env(args))  # fmt: skip


def row_record(args: argparse.Namespace, name: str, out: Path, split: str, ratio: float, context: int | None,
               work: Path) -> dict[str, Any]:  # fmt: skip
    report = json.loads((out / "intraslice.json").read_text())
    alloc = report.get("allocation") or {}
    goal = report.get("goal") or {}
    share = goal.get("attention_share_chosen", alloc.get("attention_share_chosen", alloc.get("attention_share")))
    return {
        "split": split,
        "ratio": ratio,
        "context": context,
        "dir": str(out),
        "command": report.get("command"),
        "decoder_reduction": report["reduction"]["decoder_linear"],
        "attention_share": share,
        "memory": {str(c): memory_at(out, c) for c in sorted({512, 4096, *args.contexts})},
        "target_bytes": goal.get("target_bytes"),
        "prune_s": report.get("timings_s", {}).get("total"),
        **evaluate(args, str(out), work, name),
    }


def run_rows(args: argparse.Namespace) -> None:
    path = results_path(args.model)
    data = load(path)
    work = Path(args.work).expanduser() / BUILTIN_MODELS[args.model][0]
    work.mkdir(parents=True, exist_ok=True)
    if data.get("dense") is None:
        data["dense"] = {"memory": {}, **evaluate(args, args.model, work, "dense")}
        save(path, data)

    def base(ratio: float) -> None:
        name = f"share0-r{ratio}"
        out = work / name
        prune(args, out, ["--ratio", str(ratio), "--attention-share", "0"])
        rec = row_record(args, name, out, "share 0", ratio, None, work)
        data["rows"][name] = rec
        save(path, data)

    def other(ratio: float, context: int, split: str) -> None:
        name = f"{split.replace(' ', '')}-r{ratio}-c{context}"
        target = data["rows"][f"share0-r{ratio}"]["memory"][str(context)]["total_bytes"]
        share = ["--attention-share", "1"] if split == "share 1" else []
        out = work / name
        prune(args, out, ["--target-memory", f"{int(target)}B", "--context", str(context), *share])
        rec = row_record(args, name, out, split, ratio, context, work)
        data["rows"][name] = rec
        save(path, data)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(base, args.ratios))
        jobs = [(r, c, s) for r in args.ratios for c in args.contexts for s in args.splits]
        list(pool.map(lambda j: other(*j), jobs))


def run_speed(args: argparse.Namespace) -> None:
    path = results_path(args.model)
    data = load(path)
    dirs = [r["dir"] for r in data["rows"].values()]
    out = Path(args.work).expanduser() / f"speed-{BUILTIN_MODELS[args.model][0]}.json"
    cmd = [PY, "-m", "intraslice", "bench", "speed", "--engine", "llamacpp", "--model", "dense"]
    for d in dirs:
        cmd += ["--model", d]
    cmd += ["--type", "f16", "--repeats", str(args.repeats), "--threads", "1", "--decode-steps", "32",
            "--prefill", "512", "--decode", "512", "4096", "--json", str(out)]  # fmt: skip
    run_child(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    speed = json.loads(out.read_text())
    data["speed"] = speed
    data["allocation"] = allocations(data)
    save(path, data)


def allocations(data: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """What llama.cpp's server allocates (model buffer + f16 KV cache, one slot) for every model at each context."""
    from intraslice.serve.llamacpp import dense_gguf_for, gguf_for, server_allocation

    rows = list(data["rows"].values())
    contexts = sorted({int(c) for r in rows for c in r["memory"]})
    files = {"dense": dense_gguf_for(rows[0]["dir"], "f16")}
    files.update({r["dir"]: gguf_for(r["dir"], "f16") for r in rows})
    return {name: {str(c): server_allocation(f, c, 1, "f16") for c in contexts} for name, f in files.items()}


def table(data: dict[str, Any], model: str) -> str:
    d = data["dense"]
    speed = data.get("speed") or {}
    models = speed.get("models", {})

    def tps(key: str, which: str) -> str:
        m = models.get(key)
        if not m:
            return ""
        return f"{m['tokens_per_s'][which]:.0f} ({m['speedup'][which]:.2f}x)"

    alloc = data.get("allocation") or {}

    def served(key: str, c: int, target: float | None) -> str:
        a = alloc.get(key, {}).get(str(c))
        if not a:
            return ""
        text = f"{a['total_mib']:.1f} MiB"
        return text + (f" ({a['total_mib'] * 2**20 / target - 1:+.1%})" if target else "")

    head = ("| context | split | decoder ratio | attention share | weights + KV (f16, batch 1) | in llama.cpp "
            "(vs target) | KV/token | C4 held-out ppl | WikiText-2 ppl | copy 200 | lookup | zero-shot | "
            "decode tok/s (x dense) |")  # fmt: skip
    lines = [head, "|" + "---|" * 13]
    contexts = sorted({int(c) for r in data["rows"].values() for c in r["memory"]})
    base = {r["ratio"]: r for r in data["rows"].values() if r["split"] == "share 0"}
    for c in contexts:
        dense_cells = f"{d['c4-heldout']:.2f} | {d['wikitext2']:.2f} | {d['copy200']:.2f} | {d['lookup']:.0%}"
        lines.append(
            f"| {c} | dense | | | | {served('dense', c, None)} | | {dense_cells} | {d['zeroshot']['mean']:.1%} | "
            f"{tps('dense', f'decode_{c}')} |"
        )
        for ratio in sorted({r["ratio"] for r in data["rows"].values()}):
            target = base[ratio]["memory"][str(c)]["total_bytes"] if ratio in base else None
            for r in data["rows"].values():
                if r["ratio"] != ratio or (r["context"] not in (None, c)):
                    continue
                mem = r["memory"][str(c)]
                share = r["attention_share"]
                share_s = f"{share:.2f}" if isinstance(share, (int, float)) else str(share)
                quality = f"{r['c4-heldout']:.2f} | {r['wikitext2']:.2f} | {r['copy200']:.2f} | {r['lookup']:.0%}"
                lines.append(
                    f"| {c} | {r['split']} (R {ratio}) | {r['decoder_reduction']:.3f} | {share_s} | "
                    f"{mem['total_bytes'] / 2**20:.1f} MiB | {served(r['dir'], c, target)} | "
                    f"{mem['kv_bytes_per_token'] / 1024:.1f} KiB | {quality} | {r['zeroshot']['mean']:.1%} | "
                    f"{tps(r['dir'], f'decode_{c}')} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=list(BUILTIN_MODELS))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--splits", nargs="+", default=["share 1", "auto"], choices=["share 1", "auto"])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--zeroshot-limit", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2, help="rows pruned and scored side by side (one thread each)")
    ap.add_argument("--repeats", type=int, default=2, help="--speed: interleaved repeats (best kept)")
    ap.add_argument("--work", default="~/.cache/intraslice/bench-serving-split")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--speed", action="store_true", help="time every recorded row in llama.cpp's server")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--benchmarks-md", action="store_true")
    args = ap.parse_args()
    if args.speed:
        run_speed(args)
    elif not args.report:
        run_rows(args)
    data = load(results_path(args.model))
    body = table(data, args.model)
    print(body)
    if args.benchmarks_md:
        name = BUILTIN_MODELS[args.model][0]
        update_benchmarks_md(f"serving-split-{name}", f"{BUILTIN_MODELS[args.model][1]}.\n\n" + body)


if __name__ == "__main__":
    main()
