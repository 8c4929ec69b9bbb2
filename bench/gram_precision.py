"""Benchmark: covariances from float32 blocks summed in float64 against float64 products.

Why: ``pipeline.hooks.cross_gram`` multiplies float32 activations in float32 over blocks of
``GRAM_CHUNK`` tokens and sums the blocks in float64 (a README Decision). This script
measures what that costs in accuracy and saves in CPU time, on activations shaped like
SmolLM2's (one batch of 4 x 2048 tokens; widths 576 for the o_proj input and 1536 for the
down_proj input), with heavy-tailed channels like real ones (a few channels 100x larger).
CPU seconds (``time.process_time``) with one thread, so a busy machine does not skew the ratio.

    python bench/gram_precision.py --benchmarks-md

Writes ``results/gram-precision.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import ROOT, update_benchmarks_md

from intraslice.pipeline.hooks import GRAM_CHUNK, gram


def float64_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return x.T @ x


def cpu_seconds(fn, x: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn(x)
        best = min(best, time.process_time() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--benchmarks-md", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for width in (576, 1536):
        x = torch.randn(4, 2048, width, generator=gen)
        x[..., :4] *= 100.0  # outlier channels, as real activations have
        exact = float64_gram(x.double())
        err = float((gram(x) - exact).abs().max() / exact.abs().max())
        t64 = cpu_seconds(float64_gram, x, args.repeats)
        t32 = cpu_seconds(gram, x, args.repeats)
        rows.append({"width": width, "tokens": 8192, "max_rel_error": err, "cpu_s_float64": t64, "cpu_s_blocked": t32})
    out = ROOT / "results/gram-precision.json"
    out.write_text(json.dumps({"gram_chunk": GRAM_CHUNK, "threads": 1, "rows": rows}, indent=1))
    lines = [
        f"One batch of 4 x 2048 tokens, float32 activations with 4 outlier channels (x100); blocks of {GRAM_CHUNK} "
        "tokens; CPU seconds, 1 thread, best of 3. Error: max |blocked - exact| / max |exact|.",
        "",
        "| width | float64 products (s) | float32 blocks, float64 sum (s) | speedup | max relative error |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['cpu_s_float64']:.3f} | {r['cpu_s_blocked']:.3f} "
            f"| {r['cpu_s_float64'] / r['cpu_s_blocked']:.2f}x | {r['max_rel_error']:.1e} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.benchmarks_md:
        update_benchmarks_md("gram-precision", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
