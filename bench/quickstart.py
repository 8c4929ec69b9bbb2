"""Benchmark: the README's quick start, exactly as written, timed end to end.

Why (issue #12, item 7): the README states how long its quick start takes on a 2-core
machine and what it prints; both must be what a new user measures. This script reads the
``intraslice prune ...`` line of the README's quick-start block (so it cannot drift from
the README), runs it in a fresh process in a temporary directory, and records the wall
time, the peak resident memory of the process, the load average before and after (a
loaded machine makes the time meaningless; run it alone), the per-stage timings and the
perplexities and copy losses the run printed (from its ``intraslice.json``).

    python bench/quickstart.py --benchmarks-md

``--extra`` appends options to the README's command (to time a candidate before the README
changes); such runs are recorded under their own key and never in BENCHMARKS.md.
Results: ``results/quickstart-readme.json`` (one entry per command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, update_benchmarks_md


def readme_command() -> list[str]:
    """The ``intraslice prune`` line of the README's quick-start code block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    if block is None:
        raise SystemExit("README.md: no bash block in the quick start")
    for line in block.group(1).splitlines():
        if line.strip().startswith("intraslice prune"):
            return shlex.split(line.strip())
    raise SystemExit("README.md: no 'intraslice prune' line in the quick start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extra", default="", help="options appended to the README's command (a candidate)")
    ap.add_argument("--keep", default=None, help="keep the output directory here")
    ap.add_argument("--out", default=str(ROOT / "results/quickstart-readme.json"))
    ap.add_argument("--benchmarks-md", action="store_true")
    args = ap.parse_args()

    cmd = readme_command() + shlex.split(args.extra)
    argv = [sys.executable, "-m", "intraslice", *cmd[1:]]  # the `intraslice` entry point of this venv
    out_idx = cmd.index("--out") + 1
    work = Path(tempfile.mkdtemp(prefix="intraslice-quickstart-"))
    load_before = os.getloadavg()
    t = time.perf_counter()
    proc = subprocess.run(argv, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t
    load_after = os.getloadavg()
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
        raise SystemExit(f"the quick start failed (exit {proc.returncode})")
    model_dir = work / cmd[out_idx]
    report = json.loads((model_dir / "intraslice.json").read_text())
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    entry: dict[str, Any] = {
        "command": " ".join(cmd),
        "wall_s": wall,
        "peak_rss_mb": peak_mb,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.processor() or platform.machine(),
        "plot_written": (model_dir / "allocation.png").exists(),
        "timings_s": report.get("timings_s"),
        "perplexity": {k: v.get("ppl") for k, v in (report.get("perplexity") or {}).items()},
        "incontext": report.get("incontext"),
        "reduction": report.get("reduction"),
        "calibration": report.get("calibration"),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(proc.stdout[-3000:])
    print(json.dumps({k: entry[k] for k in ("command", "wall_s", "peak_rss_mb", "perplexity", "plot_written")}))
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results[entry["command"]] = entry
    out.write_text(json.dumps(results, indent=1) + "\n")
    if args.keep:
        shutil.rmtree(args.keep, ignore_errors=True)
        shutil.move(str(model_dir), args.keep)
    shutil.rmtree(work, ignore_errors=True)
    if args.benchmarks_md and not args.extra:
        update_benchmarks_md("quickstart", markdown(entry))
    return 0


def markdown(e: dict[str, Any]) -> str:
    ts = e["timings_s"] or {}
    stages = ", ".join(
        f"{name} {ts[key]:.0f} s"
        for name, key in (
            ("load", "load"),
            ("dense eval", "eval_dense"),
            ("dense copy", "incontext_dense"),
            ("mask gradients", "allocation"),
            ("layer-wise pruning", "prune_total"),
            ("pruned eval", "eval_pruned"),
            ("pruned copy", "incontext_pruned"),
        )
        if key in ts
    )
    ppl = e["perplexity"]
    ic = e.get("incontext") or {}
    copy = ""
    if ic.get("dense") and ic.get("pruned"):
        span, before, after = ic["dense"]["span"], ic["dense"]["copy_loss"], ic["pruned"]["copy_loss"]
        copy = f", copy loss (span {span}) {before:.2f} -> {after:.2f}"
    return (
        f"`{e['command']}` ({e['date']}, {e['cpus']} CPUs, load average {e['loadavg_before'][0]:.1f} before): "
        f"**{e['wall_s'] / 60:.1f} min** wall, peak RSS {e['peak_rss_mb'] / 1024:.2f} GB; perplexity "
        f"{ppl.get('dense', float('nan')):.3f} -> {ppl.get('pruned', float('nan')):.3f}{copy}; "
        f"decoder parameters removed {e['reduction']['decoder_linear']:.1%}; plot written: {e['plot_written']}. "
        f"Stages: {stages}.\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
