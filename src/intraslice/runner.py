"""Layer-by-layer runner: the model plumbing between calibration data and the pure math.

Captures the inputs of decoder layer 0, then for each layer: collects statistics with
hooks, calls the attention and MLP math, swaps in physically smaller modules, and passes
the pruned layer's outputs on to the next layer. Only the current layer's weights sit on
the compute device; calibration activations of one layer at a time are kept (on the
offload device). Statistics are accumulated in float64 whatever the model dtype.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .algo.attention import AttentionPlan, compress_attention, head_channel_mask, plan_attention, qk_row_masks
from .algo.mlp import compress_mlp, mlp_keep_count
from .arch import ArchSpec, get_arch
from .config import PruneConfig
from .errors import NonFiniteError
from .modeling import IntraSliceAttention, IntraSliceConfig
from .modeling.modeling_intraslice import rotate_half
from .params import layer_linear_params


class _StopForward(Exception):
    pass


@dataclass
class LayerReport:
    index: int
    attention_ratio: float
    mlp_ratio: float
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    attention_rel_error: float | None = None
    mlp_rel_error: float | None = None
    seconds: float = 0.0


@dataclass
class PruneOutcome:
    """What :func:`prune_layers` did, layer by layer, and how long each stage took."""

    config: IntraSliceConfig
    layers: list[LayerReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _fit_batch(obj: Any, captured_bs: int, bs: int) -> Any:
    """Slice tensors captured for a batch of ``captured_bs`` down to ``bs`` (the last batch)."""
    if captured_bs == bs or captured_bs == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj[:bs] if obj.dim() > 0 and obj.shape[0] == captured_bs else obj
    if isinstance(obj, tuple):
        return tuple(_fit_batch(o, captured_bs, bs) for o in obj)
    if isinstance(obj, dict):
        return {k: _fit_batch(v, captured_bs, bs) for k, v in obj.items()}
    return obj


def check_finite(t: torch.Tensor, what: str, layer: int) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"NaN/Inf in {what} of layer {layer}: the model or its dtype overflows on this data")


@torch.no_grad()
def capture_layer0_inputs(
    model: nn.Module, arch: ArchSpec, tokens: torch.Tensor, cfg: PruneConfig
) -> tuple[torch.Tensor, dict[str, Any], int]:
    """Run the model up to decoder layer 0 and keep its hidden-state inputs and kwargs."""
    layers = arch.decoder_layers(model)
    device = torch.device(cfg.device)
    moved: list[nn.Module] = []
    for path in (arch.embed, arch.rotary):
        try:
            mod = ArchSpec._get(model, path)
        except AttributeError:
            continue
        mod.to(device)
        moved.append(mod)
    captured: dict[str, Any] = {}
    chunks: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        chunks.append(hidden.to(cfg.offload_device))
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    bs = cfg.batch_size
    try:
        for start in range(0, tokens.shape[0], bs):
            try:
                model(input_ids=tokens[start : start + bs].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for mod in moved:
            mod.to(cfg.offload_device)
    captured.pop("cache", None)
    captured.pop("past_key_values", None)
    captured["use_cache"] = False
    return torch.cat(chunks), _to(captured, device), min(bs, tokens.shape[0])


def _batches(inps: torch.Tensor, bs: int) -> Iterator[torch.Tensor]:
    for start in range(0, inps.shape[0], bs):
        yield inps[start : start + bs]


@contextmanager
def _hooks(*pairs: tuple[nn.Module, Callable, bool]) -> Iterator[None]:
    """Register (module, fn, is_pre) hooks for the duration of a block."""
    handles = [m.register_forward_pre_hook(fn) if pre else m.register_forward_hook(fn) for m, fn, pre in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return x.T @ x


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_half RoPE on (B, T, heads, h) with (B|1, T, h) tables."""
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotate_half(x) * sin


class LayerRunner:
    """Runs one decoder layer over all calibration batches with the captured kwargs."""

    def __init__(self, layer: nn.Module, kwargs: dict[str, Any], captured_bs: int, cfg: PruneConfig) -> None:
        self.layer = layer
        self.kwargs = kwargs
        self.captured_bs = captured_bs
        self.cfg = cfg
        self.device = torch.device(cfg.device)

    def run(self, inps: torch.Tensor) -> None:
        """Run the whole layer over every batch (for the statistics its hooks collect)."""
        for batch, kw in self.each_batch(inps):
            self.layer(batch, **kw)

    def each_batch(self, inps: torch.Tensor) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        for batch in _batches(inps, self.cfg.batch_size):
            yield batch.to(self.device), _fit_batch(self.kwargs, self.captured_bs, batch.shape[0])

    def input_of(self, module: nn.Module, batch: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
        """Run the layer only as far as ``module`` and return that module's input.

        Statistics of the attention never need the rest of the layer (the MLP), so the
        forward stops there: roughly half the cost of a full layer pass.
        """
        slot: dict[str, torch.Tensor] = {}

        def grab(_m: nn.Module, args: tuple) -> None:
            slot["x"] = args[0]
            raise _StopForward

        handle = module.register_forward_pre_hook(grab)
        try:
            self.layer(batch, **kw)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return slot["x"]


@torch.no_grad()
def _attention_stats(
    runner: LayerRunner, arch: ArchSpec, dims: dict[str, int], inps: torch.Tensor, layer_idx: int
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Pass A: H = X^T X of the o_proj input, mu[i, j] = mean |q_ij k_g(i)j| after RoPE, and X.

    X (the unpruned o_proj input) is kept per batch on the offload device: pass B needs it
    token-aligned with the pruned attention output, and recomputing it would cost a pass.
    """
    q_proj, k_proj, _, o_proj = arch.qkvo(runner.layer)
    n_h, n_kv, h = dims["n_heads"], dims["n_kv"], dims["head_dim"]
    g = n_h // n_kv
    d_o = n_h * h
    h_acc = torch.zeros(d_o, d_o, dtype=torch.float64, device=runner.device)
    mu = torch.zeros(n_h, h, dtype=torch.float64, device=runner.device)
    n_tok = 0
    xs: list[torch.Tensor] = []
    slot: dict[str, torch.Tensor] = {}

    def on_q(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        slot["q"] = out

    def on_k(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        slot["k"] = out

    with _hooks((q_proj, on_q, False), (k_proj, on_k, False)):
        for batch, kw in runner.each_batch(inps):
            x = runner.input_of(o_proj, batch, kw)
            h_acc += _gram(x)
            xs.append(x.to(runner.cfg.offload_device))
            cos, sin = kw["position_embeddings"]
            b, t, _ = slot["q"].shape
            q = _rope(slot["q"].view(b, t, n_h, h).to(torch.float64), cos, sin)
            k = _rope(slot["k"].view(b, t, n_kv, h).to(torch.float64), cos, sin)
            mu += (q * k.repeat_interleave(g, dim=2)).abs().sum((0, 1))
            n_tok += b * t
    check_finite(h_acc, "the o_proj input covariance", layer_idx)
    check_finite(mu, "the q/k statistics", layer_idx)
    return h_acc, mu / max(n_tok, 1), xs


@contextmanager
def _masked_rows(linear: nn.Linear, mask: torch.Tensor) -> Iterator[None]:
    """Temporarily zero the rows of a linear (and its bias) outside ``mask``."""
    w0 = linear.weight.data.clone()
    b0 = linear.bias.data.clone() if linear.bias is not None else None
    keep = mask.to(linear.weight.device)
    linear.weight.data[~keep] = 0
    if linear.bias is not None:
        linear.bias.data[~keep] = 0
    try:
        yield
    finally:
        linear.weight.data.copy_(w0)
        if b0 is not None:
            linear.bias.data.copy_(b0)


@torch.no_grad()
def _pruned_attention_stats(
    runner: LayerRunner,
    arch: ArchSpec,
    plan: AttentionPlan,
    inps: torch.Tensor,
    dense_x: list[torch.Tensor],
    layer_idx: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass B: H~ = X~^T X~ and X~^T X on the same tokens (X~: pruned Q/K, deleted heads zeroed)."""
    q_proj, k_proj, _, o_proj = arch.qkvo(runner.layer)
    q_mask, k_mask = qk_row_masks(plan)
    head_mask = head_channel_mask(plan).to(runner.device)
    d_o = plan.n_heads * plan.head_dim
    h_t = torch.zeros(d_o, d_o, dtype=torch.float64, device=runner.device)
    cross = torch.zeros_like(h_t)
    with _masked_rows(q_proj, q_mask), _masked_rows(k_proj, k_mask):
        for (batch, kw), x in zip(runner.each_batch(inps), dense_x, strict=True):
            xt = runner.input_of(o_proj, batch, kw).reshape(-1, d_o).to(torch.float64) * head_mask
            h_t += xt.T @ xt
            cross += xt.T @ x.to(runner.device).reshape(-1, d_o).to(torch.float64)
    check_finite(h_t, "the pruned attention output covariance", layer_idx)
    return h_t, cross


@torch.no_grad()
def _mlp_stats(
    runner: LayerRunner, arch: ArchSpec, inps: torch.Tensor, layer_idx: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Pass C: H = Z^T Z of the down_proj input, with this layer's attention already pruned.

    Also keeps the residual stream after the (pruned) attention, so that pass D only has
    to run the pruned MLP block instead of the whole layer again.
    """
    _, _, down = arch.gate_up_down(runner.layer)
    h_acc: dict[str, torch.Tensor] = {}
    mids: list[torch.Tensor] = []

    def on_down(_m: nn.Module, args: tuple) -> None:
        g = _gram(args[0])
        h_acc["h"] = h_acc["h"] + g if "h" in h_acc else g

    def on_mid(_m: nn.Module, args: tuple) -> None:
        mids.append(args[0].to(runner.cfg.offload_device))

    with _hooks((down, on_down, True), (arch.mlp_input_module(runner.layer), on_mid, True)):
        runner.run(inps)
    check_finite(h_acc["h"], "the down_proj input covariance", layer_idx)
    return h_acc["h"], mids


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=device, dtype=dtype)
    lin.weight.data.copy_(weight.to(dtype))
    if bias is not None:
        lin.bias.data.copy_(bias.to(dtype))
    return lin


def install_attention(
    arch: ArchSpec,
    layer: nn.Module,
    pruned_config: IntraSliceConfig,
    li: int,
    spec: dict[str, Any],
    weights: tuple[tuple[torch.Tensor, torch.Tensor | None], ...],
    dtype: torch.dtype,
    device: torch.device | str,
) -> None:
    """Swap into ``layer`` a physically smaller attention with (weight, bias) for q, k, v, o."""
    attn = IntraSliceAttention(pruned_config, li, spec).to(device=device, dtype=dtype)
    attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = (_linear(w, b, dtype, device) for w, b in weights)
    arch.set_attention(layer, attn)


def _bias(lin: nn.Linear) -> torch.Tensor | None:
    return lin.bias.data if lin.bias is not None else None


def _prune_attention(
    runner: LayerRunner,
    arch: ArchSpec,
    dims: dict[str, int],
    inps: torch.Tensor,
    att_ratio: float,
    cfg: PruneConfig,
    pruned_config: IntraSliceConfig,
    li: int,
    timings: dict[str, float],
) -> tuple[dict[str, Any], float | None]:
    """Passes A and B, the attention math, and the swap to a smaller attention module."""
    layer, dtype = runner.layer, next(runner.layer.parameters()).dtype
    n_h, n_kv, h = dims["n_heads"], dims["n_kv"], dims["head_dim"]
    t = time.perf_counter()
    h_dense, mu, dense_x = _attention_stats(runner, arch, dims, inps, li)
    keep = n_h * h - round(n_h * h * att_ratio)
    q_proj, k_proj, v_proj, o_proj = arch.qkvo(layer)
    w_o = o_proj.weight.data.cpu()
    plan = plan_attention(h_dense, mu.cpu(), w_o, n_h, n_kv, h, max(keep, 2), cfg.min_head_width)
    h_t, cross = _pruned_attention_stats(runner, arch, plan, inps, dense_x, li)
    del dense_x
    timings["attention_stats"] += time.perf_counter() - t

    t = time.perf_counter()
    comp = compress_attention(
        plan,
        h_t.cpu(),
        cross.cpu(),
        q_proj.weight.data.cpu(),
        k_proj.weight.data.cpu(),
        v_proj.weight.data.cpu(),
        w_o,
        b_q=_cpu(_bias(q_proj)),
        b_k=_cpu(_bias(k_proj)),
        b_v=_cpu(_bias(v_proj)),
        damp=cfg.damp,
        h_dense=h_dense.cpu() if cfg.diagnostics else None,
    )
    spec = {
        "num_heads": len(plan.kept_heads),
        "num_kv_heads": len(plan.kept_kv),
        "head_dim": plan.width,
        "kv_index": plan.kv_index(),
        "rope_pairs": [plan.pairs[kv] for kv in plan.kept_kv],
        "intermediate_size": dims["m"],
    }
    pruned_config.layers[li] = spec
    weights = ((comp.w_q, comp.b_q), (comp.w_k, comp.b_k), (comp.w_v, comp.b_v), (comp.w_o, _bias(o_proj)))
    install_attention(arch, layer, pruned_config, li, spec, weights, dtype, cfg.device)
    timings["attention_math"] += time.perf_counter() - t
    return spec, comp.rel_error


def _mlp_keep(
    arch: ArchSpec, layer: nn.Module, m: int, mlp_ratio: float, planned: float, carry: float, cfg: PruneConfig
) -> int:
    """MLP channels to keep: the planned ratio, or (exact budget) whatever makes the layer hit its plan."""
    if not cfg.exact_budget:
        return mlp_keep_count(m, mlp_ratio, cfg.mlp_multiple)
    down = arch.gate_up_down(layer)[2]
    att_actual, mlp_dense = layer_linear_params(arch, layer)
    per_neuron = (mlp_dense - _numel_bias(down)) / m
    want = (planned - att_actual - carry - _numel_bias(down)) / per_neuron
    return mlp_keep_count(m, 1.0 - min(max(want, 0.0), m) / m, cfg.mlp_multiple)


def _prune_mlp(
    runner: LayerRunner,
    arch: ArchSpec,
    inps: torch.Tensor,
    keep: int,
    cfg: PruneConfig,
    li: int,
    timings: dict[str, float],
) -> tuple[list[torch.Tensor], float | None]:
    """Pass C, the MLP math, and the swap to smaller MLP linears; returns the mid residuals."""
    layer, dtype = runner.layer, next(runner.layer.parameters()).dtype
    t = time.perf_counter()
    h_z, mids = _mlp_stats(runner, arch, inps, li)
    timings["mlp_stats"] += time.perf_counter() - t
    t = time.perf_counter()
    gate, up, down = arch.gate_up_down(layer)
    mc = compress_mlp(h_z.cpu(), down.weight.data.cpu(), keep, cfg.damp)
    kept = mc.kept
    arch.set_mlp_linears(
        layer,
        _rows(gate, kept, dtype, cfg.device),
        _rows(up, kept, dtype, cfg.device),
        _linear(mc.w_down, _bias(down), dtype, cfg.device),
    )
    timings["mlp_math"] += time.perf_counter() - t
    return mids, mc.rel_error


@torch.no_grad()
def prune_layers(
    model: nn.Module,
    tokens: torch.Tensor,
    cfg: PruneConfig,
    pruned_config: IntraSliceConfig,
    progress: bool = True,
    attention_step: Callable[..., tuple[dict[str, Any], float | None]] | None = None,
    mlp_step: Callable[..., tuple[list[torch.Tensor], float | None]] | None = None,
) -> PruneOutcome:
    """Prune every decoder layer of ``model`` in place (modules are swapped for smaller ones).

    ``attention_step`` and ``mlp_step`` default to IntraSlice (method.md sections 2 and 3);
    the channel baseline passes its own, so that both share the data flow and the budget.
    """
    attention_step = attention_step or _prune_attention
    mlp_step = mlp_step or _prune_mlp
    arch = get_arch(model.config)
    dims = arch.dims(model.config)
    n_layers, m = dims["n_layers"], dims["m"]
    cfg.validate(n_layers)
    ratios = cfg.ratios_for(n_layers)
    outcome = PruneOutcome(config=pruned_config)
    carry = 0.0  # parameters the earlier layers kept beyond (+) or below (-) their plan
    timings = dict.fromkeys(("capture", "attention_stats", "attention_math", "mlp_stats", "mlp_math", "propagate"), 0.0)
    pruned_config._attn_implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"

    t0 = time.perf_counter()
    inps, kwargs, captured_bs = capture_layer0_inputs(model, arch, tokens, cfg)
    timings["capture"] = time.perf_counter() - t0
    check_finite(inps, "the inputs", 0)

    layers = arch.decoder_layers(model)
    bar = tqdm(range(n_layers), desc="pruning layers", unit="layer", disable=not progress)
    for li in bar:
        t_layer = time.perf_counter()
        layer = layers[li].to(cfg.device)
        runner = LayerRunner(layer, kwargs, captured_bs, cfg)
        att_ratio, mlp_ratio = ratios[li]
        att_dense, mlp_dense = layer_linear_params(arch, layer)
        planned = att_dense * (1.0 - att_ratio) + mlp_dense * (1.0 - mlp_ratio)

        spec, att_err = attention_step(runner, arch, dims, inps, att_ratio, cfg, pruned_config, li, timings)
        keep = _mlp_keep(arch, layer, m, mlp_ratio, planned, carry, cfg)
        mids, mlp_err = mlp_step(runner, arch, inps, keep, cfg, li, timings)
        spec["intermediate_size"] = keep
        carry += sum(layer_linear_params(arch, layer)) - planned

        # Finish the layer from the residual after attention: its outputs feed the next layer.
        # A parallel block's MLP reads the layer input, not that residual: run the whole layer.
        t = time.perf_counter()
        if arch.parallel_block:
            inps = torch.cat([layer(b, **kw).to(cfg.offload_device) for b, kw in runner.each_batch(inps)])
        else:
            inps = torch.cat([arch.mlp_block(layer, mid.to(cfg.device)).to(cfg.offload_device) for mid in mids])
        del mids
        check_finite(inps, "the outputs", li)
        timings["propagate"] += time.perf_counter() - t
        layer.to(cfg.offload_device)
        outcome.layers.append(
            LayerReport(
                li,
                att_ratio,
                mlp_ratio,
                spec["num_heads"],
                spec["num_kv_heads"],
                spec["head_dim"],
                keep,
                att_err,
                mlp_err,
                time.perf_counter() - t_layer,
            )
        )
        bar.set_postfix(heads=spec["num_heads"], r=spec["head_dim"], mlp=keep)
    outcome.timings = timings
    return outcome


def _numel_bias(lin: nn.Linear) -> int:
    return lin.bias.numel() if lin.bias is not None else 0


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.cpu() if t is not None else None


def _rows(lin: nn.Linear | None, idx: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> nn.Linear | None:
    """A new linear with the rows ``idx`` of ``lin`` (and of its bias); None stays None."""
    if lin is None:
        return None
    idx = idx.to(lin.weight.device)
    bias = lin.bias.data[idx] if lin.bias is not None else None
    return _linear(lin.weight.data[idx], bias, dtype, device)
