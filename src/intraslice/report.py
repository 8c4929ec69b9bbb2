"""Plots of a pruning run, from its ``intraslice.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import IntraSliceError
from .saving import REPORT_FILE

PLOT_FILE = "allocation.png"


def keep_fractions(report: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Actual per-layer keep fractions of the attention (o_proj input width) and the MLP."""
    dims = (report.get("allocation") or {}).get("dims")
    if not dims:
        raise IntraSliceError("the report has no allocation.dims (written by intraslice >= 0.1 prune)")
    full_att = dims["n_heads"] * dims["head_dim"]
    att = [layer["num_heads"] * layer["head_dim"] / full_att for layer in report["layers"]]
    mlp = [layer["intermediate_size"] / dims["m"] for layer in report["layers"]]
    return att, mlp


def plot_allocation(report: dict[str, Any], path: str | Path) -> Path:
    """Per-layer attention and MLP keep ratios as bars (planned allocation as markers)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise IntraSliceError("plotting needs matplotlib: pip install matplotlib") from None
    att, mlp = keep_fractions(report)
    alloc = report.get("allocation") or {}
    planned = alloc.get("layer_ratios")
    x = list(range(len(att)))
    serving = report.get("serving_memory")
    width = max(6.0, 0.3 * len(x) + 2)
    if serving:  # a small panel beside the layers: weights plus KV cache, dense and pruned
        fig, (ax, side) = plt.subplots(
            1, 2, figsize=(width + 2.2, 3.6), gridspec_kw={"width_ratios": [width, 1.6]}, squeeze=True
        )
        plot_serving_memory(side, serving)
    else:
        fig, ax = plt.subplots(figsize=(width, 3.6))
    w = 0.4
    ax.bar([i - w / 2 for i in x], att, w, label="attention kept (o_proj input width)", color="#4C72B0")
    ax.bar([i + w / 2 for i in x], mlp, w, label="MLP kept (intermediate width)", color="#DD8452")
    if planned:
        ax.plot([i - w / 2 for i in x], [1 - a for a, _ in planned], "k_", markersize=8, label="planned")
        ax.plot([i + w / 2 for i in x], [1 - m for _, m in planned], "k_", markersize=8)
    red = report.get("reduction", {}).get("decoder_linear")
    title = f"{alloc.get('mode', '?')} allocation"
    if red is not None:
        title += f": {red:.1%} of decoder linear parameters removed"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.22)
    ax.set_xticks(x)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_serving_memory(ax: Any, serving: dict[str, Any]) -> None:
    """Weights and KV cache of the dense and the pruned model as stacked bars (``serving_memory``)."""
    from .kvcache import format_bytes, percent_change

    dense_total = serving["dense"]["total_bytes"]
    unit, size = next(
        ((u, s) for u, s in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)) if dense_total >= s), ("KiB", 2**10)
    )
    names = ("dense", "pruned")
    weights = [serving[k]["weights_bytes"] / size for k in names]
    kv = [serving[k]["kv_bytes"] / size for k in names]
    ax.bar(names, weights, 0.6, label="weights", color="#8C8C8C")
    ax.bar(names, kv, 0.6, bottom=weights, label="KV cache", color="#55A868")
    for i, k in enumerate(names):
        per_token = format_bytes(serving[k]["kv_bytes_per_token"])
        ax.annotate(
            f"{weights[i] + kv[i]:.3g}"
            + (f" ({percent_change(serving['reduction']['total'])})" if i else "")
            + f"\nKV {per_token}/tok",
            (i, weights[i] + kv[i]),
            ha="center",
            va="bottom",
            fontsize=6,
        )
    ax.set_ylim(0, 1.35 * (weights[0] + kv[0]))
    ax.set_ylabel(unit, fontsize=8)
    ax.set_title(f"weights + KV\n{serving['context']} x {serving['batch']} ({serving['dtype']})", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper right", frameon=False)


def report_directory(directory: str | Path, out: str | Path | None = None) -> Path:
    path = Path(directory) / REPORT_FILE
    if not path.is_file():
        raise IntraSliceError(f"no {REPORT_FILE} in {directory}: is it a directory written by intraslice prune?")
    report = json.loads(path.read_text(encoding="utf-8"))
    return plot_allocation(report, out or Path(directory) / PLOT_FILE)
