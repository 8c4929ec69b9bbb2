"""Measured inference speed: prefill throughput and decode latency, interleaved across models.

Why interleaved: on a shared CPU (or a GPU with clock boost) the machine's speed drifts
over minutes; timing model A for a minute and then model B for a minute mixes that drift
into the comparison. Here every repeat of every setting visits all models in turn, and
the median over repeats (after warm-up) is reported.

Also here: :func:`candidate_model` builds an IntraSlice model with *random* weights and
the shapes a given ratio would produce, so ``--target-speedup`` can time shapes on the
user's hardware before anything is pruned.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from .algo.mlp import mlp_keep_count
from .arch import get_arch
from .errors import IntraSliceError
from .params import param_report


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _ids(model: nn.Module, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(0, vocab, (batch, length), generator=g).to(_device_of(model))


@torch.inference_mode()
def time_prefill(model: nn.Module, batch: int, seqlen: int) -> float:
    """Seconds for one forward over ``batch`` x ``seqlen`` tokens (no cache, last logits only)."""
    ids = _ids(model, batch, seqlen)
    device = _device_of(model)
    _sync(device)
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - t


@torch.inference_mode()
def time_decode(model: nn.Module, batch: int, cache_len: int, steps: int, state: dict[str, Any]) -> float:
    """Median seconds per generated token with a KV cache already holding ``cache_len`` tokens.

    The cache is built once per (model, length) and cropped back after each repeat.
    """
    device = _device_of(model)
    key = (id(model), batch, cache_len)
    if key not in state:
        cache = DynamicCache()
        model(input_ids=_ids(model, batch, cache_len), cache=cache, use_cache=True, logits_to_keep=1)
        state[key] = cache
    cache = state[key]
    tok = _ids(model, batch, 1, seed=1)
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        out = model(input_ids=tok, cache=cache, use_cache=True)
        _sync(device)
        times.append(time.perf_counter() - t)
        tok = out.logits[:, -1:].argmax(-1)
    cache.crop(-steps)  # back to cache_len tokens for the next repeat
    return statistics.median(times)


@dataclass
class SpeedResult:
    """Medians per model and setting; speedups relative to the first (reference) model."""

    names: list[str]
    prefill_s: dict[str, dict[int, float]] = field(default_factory=dict)
    decode_s: dict[str, dict[int, float]] = field(default_factory=dict)
    params: dict[str, dict[str, int]] = field(default_factory=dict)
    batch: int = 1
    repeats: int = 0
    warmup: int = 0

    def to_dict(self) -> dict[str, Any]:
        ref = self.names[0]
        out: dict[str, Any] = {"reference": ref, "batch": self.batch, "repeats": self.repeats, "warmup": self.warmup}
        models = {}
        for n in self.names:
            pre = self.prefill_s.get(n, {})
            dec = self.decode_s.get(n, {})
            dense_lin, lin = self.params[ref]["decoder_linear"], self.params[n]["decoder_linear"]
            models[n] = {
                "params": self.params[n],
                "decoder_linear_flops_speedup_limit": dense_lin / lin,
                "prefill": {
                    str(s): {
                        "seconds": v,
                        "tokens_per_s": self.batch * s / v,
                        "speedup": self.prefill_s[ref][s] / v,
                    }
                    for s, v in pre.items()
                },
                "decode": {
                    str(c): {"ms_per_token": 1e3 * v, "speedup": self.decode_s[ref][c] / v} for c, v in dec.items()
                },
            }
        out["models"] = models
        return out


def benchmark_speed(
    models: Sequence[tuple[str, nn.Module]],
    prefill_lengths: Sequence[int] = (128, 512, 2048),
    decode_lengths: Sequence[int] = (128, 512, 2048),
    batch: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    decode_steps: int = 16,
    log: Callable[[str], None] | None = None,
) -> SpeedResult:
    """Time every model at every setting, interleaved; the first model is the reference."""
    if not models:
        raise IntraSliceError("no models to time")
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise IntraSliceError(f"model names must be unique, got {names}")
    res = SpeedResult(names=names, batch=batch, repeats=repeats, warmup=warmup)
    for name, model in models:
        model.eval()
        res.params[name] = param_report(model)
        res.prefill_s[name], res.decode_s[name] = {}, {}
    for s in prefill_lengths:
        samples: dict[str, list[float]] = {n: [] for n in names}
        for rep in range(warmup + repeats):
            for name, model in models:
                dt = time_prefill(model, batch, s)
                if rep >= warmup:
                    samples[name].append(dt)
        for n in names:
            res.prefill_s[n][s] = statistics.median(samples[n])
        if log:
            log(f"prefill {s}: " + ", ".join(f"{n} {batch * s / res.prefill_s[n][s]:.0f} tok/s" for n in names))
    state: dict[str, Any] = {}
    for c in decode_lengths:
        samples = {n: [] for n in names}
        for rep in range(warmup + repeats):
            for name, model in models:
                dt = time_decode(model, batch, c, decode_steps, state)
                if rep >= warmup:
                    samples[name].append(dt)
        for n in names:
            res.decode_s[n][c] = statistics.median(samples[n])
        state.clear()
        if log:
            log(f"decode @{c}: " + ", ".join(f"{n} {1e3 * res.decode_s[n][c]:.1f} ms/tok" for n in names))
    return res


# -- shapes before pruning (for --target-speedup) -------------------------------------------


def predicted_layer_spec(
    dims: dict[str, int],
    ratio: float,
    min_head_width: float,
    mlp_multiple: int,
    mlp_matrices: int = 3,
    attention_share: float = 1.0,
) -> dict[str, Any]:
    """Data-free guess of the uniform-allocation shapes of one layer at ``ratio``.

    Mirrors the attention planner's rules (even common width, at least ``min_head_width``
    of h, whole heads deleted below that) and the runner's exact budget (the MLP absorbs
    what the attention rounding leaves), without calibration data. ``mlp_matrices`` is 3
    for a gated MLP, 2 for a plain one. ``attention_share`` A: the attention loses A x
    ``ratio`` of its parameters (the split the run will use; 0 keeps it whole), the MLP the rest.
    """
    from .baselines.channel import kept_head_layout

    n_h, n_kv, h, d, m = dims["n_heads"], dims["n_kv"], dims["head_dim"], dims["d"], dims["m"]
    att_ratio = min(max(attention_share * ratio, 0.0), 1.0)
    keep = max(2, n_h * h - round(n_h * h * att_ratio))
    width = min(h, keep // n_h) // 2 * 2
    floor = 2 * math.ceil(min_head_width * h / 2)
    if width < floor:
        width = floor
    heads = max(1, min(n_h, keep // width))
    g = n_h // n_kv
    kept = sorted(sorted(range(n_h), key=lambda i: (i % g, i))[:heads])  # spread deletions over KV groups
    layout = kept_head_layout(kept, n_h, n_kv, width)
    kept_kv = layout.pop("kept_kv")
    att_dense = d * h * (2 * n_h + 2 * n_kv)
    att = d * width * (2 * heads + 2 * len(kept_kv))
    planned = (att_dense + mlp_matrices * d * m) * (1.0 - ratio)
    mlp_w = max(0.0, (planned - att) / (mlp_matrices * d))
    inter = mlp_keep_count(m, 1.0 - min(mlp_w, m) / m, mlp_multiple)
    return {**layout, "intermediate_size": inter}


def candidate_model(
    source: nn.Module,
    ratio: float,
    min_head_width: float = 0.75,
    mlp_multiple: int = 8,
    attention_share: float = 1.0,
) -> nn.Module:
    """An IntraSlice model with random weights and the shapes ``ratio`` would give (uniform),
    with ``attention_share`` of the ratio taken from attention (:func:`predicted_layer_spec`)."""
    from .modeling import IntraSliceConfig, IntraSliceForCausalLM

    arch = get_arch(source.config)
    dims = arch.dims(source.config)
    kwargs = arch.pruned_config_kwargs(source.config)
    spec = predicted_layer_spec(dims, ratio, min_head_width, mlp_multiple, arch.mlp_matrices, attention_share)
    config = IntraSliceConfig(**kwargs, layers=[dict(spec) for _ in range(dims["n_layers"])])
    config._attn_implementation = getattr(source.config, "_attn_implementation", None) or "sdpa"
    dtype = next(source.parameters()).dtype
    model = IntraSliceForCausalLM(config).to(device=_device_of(source), dtype=dtype).eval()
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def ratio_for_speedup(
    source: nn.Module,
    target: float,
    seqlen: int = 512,
    batch: int = 1,
    repeats: int = 3,
    ratios: Sequence[float] | None = None,
    min_head_width: float = 0.75,
    mlp_multiple: int = 8,
    log: Callable[[str], None] | None = None,
    attention_share: float | Callable[[float], float] = 1.0,
) -> tuple[float, list[dict[str, float]]]:
    """The smallest ratio (on a 0.05 grid) whose candidate shapes reach ``target`` prefill speedup.

    Bisection over the grid (speed grows with the ratio), each probe timed interleaved
    against the dense source model. ``attention_share``: the split the run will prune with
    (a number, or a function of the ratio), so the candidates have its shapes. Returns the
    ratio and every probe's measurement.
    """
    if target <= 1.0:
        raise IntraSliceError(f"--target-speedup must be > 1, got {target}")
    grid = list(ratios) if ratios is not None else [round(0.05 * i, 2) for i in range(1, 19)]
    probes: list[dict[str, float]] = []

    def speedup(r: float) -> float:
        share = attention_share(r) if callable(attention_share) else attention_share
        cand = candidate_model(source, r, min_head_width, mlp_multiple, share)
        res = benchmark_speed([("dense", source), ("candidate", cand)], [seqlen], [], batch, repeats, warmup=1)
        sp = res.prefill_s["dense"][seqlen] / res.prefill_s["candidate"][seqlen]
        probes.append({"ratio": r, "prefill_speedup": sp})
        if log:
            log(f"  ratio {r:.2f}: prefill speedup {sp:.3f} (target {target})")
        del cand
        return sp

    where = f"prefill speedup at {seqlen} tokens on this machine"
    return smallest_reaching(grid, speedup, target, where), probes


def smallest_reaching(grid: Sequence[float], speedup: Callable[[float], float], target: float, where: str) -> float:
    """The smallest grid ratio whose measured ``speedup`` reaches ``target`` (bisection: speed grows with it)."""
    lo, hi = 0, len(grid) - 1
    top = speedup(grid[hi])
    if top < target:
        raise IntraSliceError(f"even ratio {grid[hi]} reaches only {top:.2f}x {where}; ask for less than {target}x")
    while lo < hi:
        mid = (lo + hi) // 2
        if speedup(grid[mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    return grid[lo]
