"""Benchmark (issue #34): dense vs pruned speed in llama.cpp's own server, with the FLOPs limit.

Runs ``intraslice bench speed --engine llamacpp`` (the server from the prebuilt ``xllamacpp``
wheel; see ``src/intraslice/serve/speed.py``) on the dense source and every pruned directory
given, in one run and interleaved, and writes ``results/llamacpp-speed-MODEL.json`` and the
BENCHMARKS table: prompt tokens/s at 512 and 2048 and decode tokens/s at contexts 512 and 4096
(llama.cpp's own timings, best of repeats, one thread), each speedup over dense and its ratio
to the linear-FLOPs limit (dense / pruned decoder-linear parameters, from the GGUF tensors).

    intraslice prune --ratio 0.2 --nsamples 16 --seqlen 1024 --out /tmp/sm-02     # the quick start
    intraslice prune --ratio 0.3 --nsamples 16 --seqlen 1024 --out /tmp/sm-03
    python bench/llamacpp_speed.py --pruned /tmp/sm-02 /tmp/sm-03 --benchmarks-md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from _common import ROOT, run_child, update_benchmarks_md


def table(data: dict[str, Any]) -> str:
    keys = [f"prompt_{n}" for n in data["prompts"]] + [f"decode_{c}" for c in data["contexts"]]
    head = ["model", "ratio", "FLOPs limit"] + [k.replace("_", " ") for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in data["models"].items():
        ratio = data.get("ratios", {}).get(name, "")
        cells = [f"{m['tokens_per_s'][k]:.1f} ({m['speedup'][k]:.2f}x, {m['speedup_over_limit'][k]:.2f})" for k in keys]
        label = "dense" if name == "dense" else Path(name).name
        lines.append(f"| {label} | {ratio} | {m['linear_flops_limit']:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pruned", nargs="+", required=True, help="pruned directories (the dense source is recorded)")
    ap.add_argument("--type", default="f16", choices=("f32", "f16", "q8_0"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="smollm2")
    ap.add_argument("--benchmarks-md", action="store_true")
    ap.add_argument("--report", action="store_true", help="print the table of the recorded results only")
    args = ap.parse_args()
    out = ROOT / "results" / f"llamacpp-speed-{args.name}.json"
    if not args.report:
        cmd = [sys.executable, "-m", "intraslice", "bench", "speed", "--engine", "llamacpp", "--model", "dense"]
        for p in args.pruned:
            cmd += ["--model", p]
        cmd += ["--type", args.type, "--repeats", str(args.repeats), "--threads", str(args.threads)]
        cmd += ["--decode-steps", "32", "--json", str(out)]
        run_child(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        data = json.loads(out.read_text(encoding="utf-8"))
        data["ratios"] = {}
        for p in args.pruned:
            report = json.loads((Path(p) / "intraslice.json").read_text(encoding="utf-8"))
            data["ratios"][p] = report["goal"].get("ratio", report.get("reduction"))
            data["models"][p]["prune_command"] = report.get("command")
        data["cpu"] = platform.processor() or platform.machine()
        out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    data = json.loads(out.read_text(encoding="utf-8"))
    body = (
        f"llama.cpp server (xllamacpp {data['versions'].get('xllamacpp')}), GGUF {data.get('type')}, "
        f"{data['threads']} thread, best of {data['repeats']} interleaved repeats, decode of "
        f"{data['decode_tokens']} tokens; cells: tokens/s (speedup over dense, speedup / FLOPs limit). "
        f"Timed {data['timed_at']}. Command: `python bench/llamacpp_speed.py --pruned "
        + " ".join(args.pruned)
        + " --benchmarks-md`\n\n"
        + table(data)
    )
    print(body)
    if args.benchmarks_md:
        update_benchmarks_md(f"llamacpp-speed-{args.name}", body)


if __name__ == "__main__":
    main()
