"""Helpers shared by the benchmark scripts (timing, memory, BENCHMARKS.md sections)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

#: built-in model name -> (stem of the scripts' result files, display name)
BUILTIN_MODELS = {
    "smollm2-135m": ("smollm2", "SmolLM2-135M-Instruct"),
    "qwen2.5-coder-0.5b": ("qwen-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct"),
}


class PeakRSS:
    """Peak resident set size (MB) while the block runs, sampled from /proc every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_mb())
            time.sleep(0.02)

    def __enter__(self) -> PeakRSS:
        self.base = self.rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_mb())


@torch.no_grad()
def dense_forward_seconds(model: Any, tokens: torch.Tensor) -> float:
    """One dense forward pass (logits included) over every calibration window, batch 1."""
    model(input_ids=tokens[:1, :64])  # warm-up
    t0 = time.perf_counter()
    for row in tokens:
        model(input_ids=row.view(1, -1), use_cache=False)
    return time.perf_counter() - t0


def update_benchmarks_md(section: str, body: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\n{body}{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def run_child(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, check=True)``, and the child goes down with the bench.

    Why: a bench killed with SIGTERM (or Ctrl-C) used to leave its ``intraslice prune`` child
    running for minutes on a shared 2-core machine. SIGTERM becomes SystemExit here, and the
    child is terminated (then killed) on the way out; a pruned run resumes with the same command.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if kw.pop("capture_output", False):
        kw.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.Popen(cmd, **kw)
    try:
        out, err = proc.communicate()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out, err)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
