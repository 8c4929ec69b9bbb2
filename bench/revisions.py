"""The same ``intraslice prune`` command under two or more git revisions, interleaved.

Why: a speed change is only believable measured side by side on this noisy machine, in one
run, alternating the revisions (A B A B ...) so that drifting load hits both alike. Each
revision is checked out into a temporary worktree and imported through ``PYTHONPATH`` (the
installed package is not touched); the stage timings each run records in
``intraslice.json`` are compared, medians over ``--repeat``.

    python bench/revisions.py --revs 6c75f5a HEAD --repeat 1 -- \
        --ratio 0.2 --nsamples 16 --seqlen 1024 --allocation uniform --no-eval
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def run_once(src: Path, prune_args: list[str], out: Path, threads: int | None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "intraslice", "prune", *prune_args, "--no-progress", "--out", str(out)]
    t0 = time.perf_counter()
    # cwd: ``python -m`` puts the working directory before PYTHONPATH, so run from the tree's root
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=src.parent)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{src}: prune failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "intraslice.json").read_text(encoding="utf-8"))
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "timings_s": report["timings_s"], "perplexity": report.get("perplexity")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--revs", nargs="+", required=True, help="git revisions to compare (HEAD = the committed tree)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of A B ... (medians are reported)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs")
    ap.add_argument("--out", default=None, help="results JSON (default results/revisions-<revs>.json)")
    ap.add_argument("prune_args", nargs=argparse.REMAINDER, help="after --: the intraslice prune options")
    args = ap.parse_args()
    prune_args = [a for a in args.prune_args if a != "--"]
    shas = {rev: git("rev-parse", "--short", rev) for rev in args.revs}
    if len(set(shas.values())) != len(shas):
        raise SystemExit(f"two revisions are the same commit: {shas}")
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="intraslice-revs-"))
    runs: dict[str, list[dict[str, Any]]] = {rev: [] for rev in args.revs}
    try:
        trees = {}
        for rev in args.revs:
            trees[rev] = tmp / shas[rev]
            git("worktree", "add", "--detach", str(trees[rev]), shas[rev])
        for rnd in range(args.repeat):
            for rev in args.revs:
                res = run_once(trees[rev] / "src", prune_args, tmp / "out", args.threads)
                runs[rev].append(res)
                stages = {k: round(v, 1) for k, v in res["timings_s"].items() if not k.startswith("prune_")}
                print(f"round {rnd + 1} {rev} ({shas[rev]}): wall {res['wall_s']:.1f}s {stages}", flush=True)
    finally:
        for rev in args.revs:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / shas[rev])], check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {}
    for rev, rs in runs.items():
        keys = sorted({k for r in rs for k in r["timings_s"] if not k.startswith("prune_")})
        summary[rev] = {
            "sha": shas[rev],
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "timings_s": {k: statistics.median(r["timings_s"].get(k, 0.0) for r in rs) for k in keys},
        }
    print("median " + " | ".join(f"{rev}: total {s['timings_s'].get('total', 0):.1f}s" for rev, s in summary.items()))
    out = Path(args.out or ROOT / "results" / f"revisions-{'-'.join(shas.values())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "revisions", "prune_args": prune_args, "repeat": args.repeat, "threads": args.threads}
    payload.update({"summary": summary, "runs": runs, "load_average_before": load_before})
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
