"""Kill -9 a real SmolLM2 prune mid-way, resume it, and compare with an uninterrupted run.

Three runs of the same ``intraslice prune`` command (default model, small calibration):

1. uninterrupted, into ``WORK/ref``;
2. into ``WORK/run``, killed with SIGKILL from outside once its checkpoint says
   ``--kill-after`` layers are done (the kill lands wherever the run then is: inside the
   next layer, or writing its checkpoint);
3. the same command again: it must say it resumes, and its output must equal run 1's
   byte for byte (every file but ``intraslice.json`` and ``allocation.png``, which hold
   timings).

It also prints the checkpoint overhead measured in the uninterrupted run: the seconds each
layer's checkpoint took against the layer's own time (``timings_s.prune_checkpoint`` and
``layers[*].seconds`` of ``intraslice.json``).

    nice python bench/resume_smollm2.py --nsamples 8 --seqlen 512 --kill-after 12
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

VARYING = {"intraslice.json", "allocation.png"}


def command(args: argparse.Namespace, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "intraslice", "prune", "--ratio", str(args.ratio), "--out", str(out)]
    cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--allocation", args.allocation]
    cmd += ["--no-eval", "--no-progress", "--device", "cpu"]
    return cmd + (["--model", args.model] if args.model else [])


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


def layers_done(state: Path) -> int:
    try:
        layers = json.loads(state.read_text()).get("layers") or {}
    except (OSError, ValueError):
        return 0
    return int(layers.get("done", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the SmolLM2 GGUF of the quick start")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--kill-after", type=int, default=12, help="kill once this many layers are checkpointed")
    ap.add_argument("--work", default="/tmp/intraslice-resume-bench")
    args = ap.parse_args()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ref, out = work / "ref", work / "run"

    seconds, _ = run(command(args, ref))
    report = json.loads((ref / "intraslice.json").read_text())
    layer_s = [layer["seconds"] for layer in report["layers"]]
    ckpt_s = report["timings_s"].get("prune_checkpoint", 0.0)
    n = len(layer_s)
    print(
        f"uninterrupted: {seconds:.1f}s wall, {n} layers, {sum(layer_s) / n:.3f}s per layer (median "
        f"{sorted(layer_s)[n // 2]:.3f}s), checkpoint {ckpt_s / n * 1000:.1f} ms per layer = "
        f"{ckpt_s / sum(layer_s):.2%} of the layers' time"
    )

    state = out.parent / f".{out.name}.resume" / "state.json"
    proc = subprocess.Popen(command(args, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and layers_done(state) < args.kill_after:
        time.sleep(0.05)
    if proc.poll() is not None:
        sys.exit(f"the run ended (status {proc.returncode}) before {args.kill_after} layers: lower --kill-after")
    time.sleep(0.5 * sum(layer_s) / n)  # land inside the next layer
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = layers_done(state)
    assert not out.exists(), "a killed run left an output directory"
    print(f"killed with SIGKILL after {killed_at} checkpointed layers (status {proc.returncode})")

    seconds, stdout = run(command(args, out))
    resumed = [line for line in stdout.splitlines() if line.startswith("resuming")]
    if not resumed:
        sys.exit("the rerun did not resume")
    print(f"{resumed[0]}\nresumed run: {seconds:.1f}s wall")

    names = sorted(p.name for p in ref.iterdir() if p.name not in VARYING)
    assert names == sorted(p.name for p in out.iterdir() if p.name not in VARYING), "different files"
    for name in names:
        if (ref / name).read_bytes() != (out / name).read_bytes():
            sys.exit(f"{name} differs between the uninterrupted and the resumed run")
    leftovers = [p.name for p in work.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"leftovers: {leftovers}"
    print(f"identical: {len(names)} files ({', '.join(names)}) byte for byte; no leftovers")


if __name__ == "__main__":
    main()
