"""The headline table and plot: IntraSlice against SliceGPT and channel pruning at equal real
parameters, with the measured speedup, on both built-in models.

It reads what ``bench/compare.py`` recorded (``results/compare-MODEL.json``: the same
calibration windows and test windows for every method) and writes

- ``results/headline.png``: perplexity against the whole-model parameters removed, per
  method, one panel per model;
- the table between the ``headline`` markers of BENCHMARKS.md (its top) and of README.md.

    python bench/headline.py
"""

from __future__ import annotations

import json

from _common import ROOT, update_benchmarks_md

MODELS = {"smollm2": "SmolLM2-135M", "qwen-coder-0.5b": "Qwen2.5-Coder-0.5B"}
METHODS = ("intraslice", "slicegpt", "channel")
RATIOS = (0.2, 0.3, 0.5)
PLOT = ROOT / "results" / "headline.png"


def load(model: str) -> dict:
    return json.loads((ROOT / "results" / f"compare-{model}.json").read_text(encoding="utf-8"))


def table() -> str:
    head = "| model | dense ppl | removed: decoder (whole model) | " + " | ".join(METHODS)
    head += " | prefill speedup (IntraSlice) |"
    rows = [head, "|" + "---|" * (4 + len(METHODS))]
    for model, name in MODELS.items():
        data = load(model)
        by = {(r["method"], round(r["ratio"], 2)): r for r in data["rows"]}
        for ratio in RATIOS:
            ours = by.get(("intraslice", ratio))
            if ours is None:
                continue
            cells = []
            best = min(by[(m, ratio)]["ppl"]["ppl"] for m in METHODS if (m, ratio) in by)
            for m in METHODS:
                r = by.get((m, ratio))
                text = "-" if r is None else f"{r['ppl']['ppl']:.1f}"
                cells.append(f"**{text}**" if r is not None and r["ppl"]["ppl"] == best else text)
            prefill = ours["speed"]["prefill"]
            seq = max(prefill, key=int)
            removed = ours["reduction"]["whole_model"]
            rows.append(
                f"| {name} | {data['dense_ppl']['ppl']:.1f} | {ratio:.0%} ({removed:.1%}) | "
                + " | ".join(cells)
                + f" | {prefill[seq]['speedup']:.2f}x ({seq} tokens) |"
            )
    return "\n".join(rows) + "\n"


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(10, 4))
    for ax, (model, name) in zip(axes, MODELS.items(), strict=True):
        data = load(model)
        for m, marker in zip(METHODS, "osd", strict=True):
            pts = sorted((r["reduction"]["whole_model"], r["ppl"]["ppl"]) for r in data["rows"] if r["method"] == m)
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker=marker, label=m)
        ax.axhline(data["dense_ppl"]["ppl"], color="grey", linestyle=":", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("whole-model parameters removed (%)")
        ax.set_title(name)
    axes[0].set_ylabel("WikiText-2 perplexity (P1)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    plot()
    body = (
        "Perplexity (WikiText-2 test, P1) at equal *real* parameters removed (SliceGPT's shortcut matrices "
        "counted), the best in bold, and IntraSlice's measured prefill speedup (CPU, 1 thread). From "
        "`bench/compare.py` (the same calibration and test windows for every method; its sections below "
        "give the protocol, date and defaults of each run). Written by `python bench/headline.py`.\n\n"
        + table()
        + f"\n![headline](results/{PLOT.name})\n"
    )
    update_benchmarks_md("headline", body)
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = "<!-- headline:start -->", "<!-- headline:end -->"
    if start in text:
        before, rest = text.split(start, 1)
        readme.write_text(before + start + "\n" + table() + end + rest.split(end, 1)[1], encoding="utf-8")
    print(table())


if __name__ == "__main__":
    main()
