"""Mask-gradient importance for the global allocation (method.md section 4) - model plumbing.

All-ones multiplicative masks sit on the o_proj input and the down_proj input of every
layer, as forward pre-hooks on the *unmodified* Hugging Face modules (no copied forward
code). For each calibration sample the gradient of the causal-LM loss w.r.t. the masks is
summed within groups of ``group_size`` samples. The forward passes also accumulate each
head's o_proj-input covariance block, whose eigenvectors give the PCA basis of
``global_pca``.

The gradients are computed **layer by layer**, so that no whole-model autograd graph (with
the attention matrices of every layer) ever exists and only one decoder layer needs to be
on the compute device at a time. Per sample:

1. the model's own forward runs up to decoder layer 0 (embedding, rotary embedding and the
   attention mask, exactly as Hugging Face builds them) and is stopped there;
2. layers 0..L-1 run forward without autograd; each layer's input is kept on the host,
   and the o_proj-input covariance is accumulated (once per sample);
3. final norm + LM head + loss are differentiated w.r.t. the last hidden state only;
4. in reverse layer order, layer i is re-run from its stored input with ``requires_grad``
   on that input and on layer i's two masks, and ``torch.autograd.grad`` gives the mask
   gradients and the input gradient, which becomes the output gradient of layer i-1.

By the chain rule this equals the whole-model backward (the re-run of a layer is the same
computation as its forward: an all-ones mask is exact in any dtype). Every move of a
module to or from the compute device goes through ``onload``/``offload`` so that a caller
can stream layers from disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .algo.allocation import (
    Allocation,
    ParamModel,
    allocate,
    check_cap,
    check_units_per_head,
    feasible_share,
    joint_attention_share,
    joint_split_for_cost,
    mlp_bias_for_share,
    param_model,
    ratio_for_cost,
    rotate_head_gradients,
    split_fits,
    uniform_allocation,
    unit_importance,
)
from .algo.linalg import eigh_desc
from .arch import ArchSpec, get_arch
from .config import DEFAULT_ATTENTION_SHARE, DEFAULT_GRAD_SAMPLES, DEFAULT_UNITS_PER_HEAD
from .errors import IntraSliceError, NonFiniteError
from .memory import trim
from .pipeline import distributed as dist

MODES = ("uniform", "global", "global_pca")
#: Tokens per chunk of the LM-head gradient (bounds the float32 logits to chunk x vocabulary).
HEAD_CHUNK = 256

#: ``onload(module) -> module``: bring a module (a decoder layer, the embedding, ...) onto
#: the compute device and return the module to run (the same one, or a freshly loaded copy).
Onload = Callable[[nn.Module], nn.Module]
#: ``offload(module)``: release a module returned by ``onload`` once it is no longer needed.
Offload = Callable[[nn.Module], None]


@dataclass
class MaskGradients:
    """Grouped mask gradients and the per-head covariance blocks of the o_proj input."""

    attention: torch.Tensor  # (groups, layers, n_heads, h) float64
    mlp: torch.Tensor  # (groups, layers, m) float64
    head_cov: torch.Tensor  # (layers, n_heads, h, h) float64
    samples: int
    group_size: int
    seconds: float


class _StopForward(Exception):
    """Raised by the layer-0 pre-hook: the model's forward is only needed up to there."""


def _mask_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 models, else float32: a half-precision mask gradient (a sum over
    thousands of tokens) would lose the small differences the allocation ranks by."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask`` computed in the mask's dtype, returned in ``x``'s dtype.

    The product is exact (the mask is all ones), so the model computes what it computes
    without the mask; autograd then forms the mask gradient in float32/float64.
    """
    return (x.to(mask.dtype) * mask).to(x.dtype)


@contextmanager
def _pre_hooks(*pairs: tuple[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Forward pre-hooks for the duration of one layer pass (removed even on errors)."""
    handles = [m.register_forward_pre_hook(fn) for m, fn in pairs]
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


@contextmanager
def _no_param_grads(module: nn.Module) -> Iterator[None]:
    """Freeze a module's parameters and restore their flags afterwards.

    Frozen weights keep autograd from saving tensors for weight gradients nobody asks for.
    Applied per onloaded module, so a copy that ``onload`` loaded from disk is frozen too.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, req in flags:
            p.requires_grad_(req)


@contextmanager
def _onloaded(module: nn.Module, onload: Onload, offload: Offload) -> Iterator[nn.Module]:
    """The module as returned by ``onload``, frozen, and offloaded afterwards."""
    mod = onload(module)
    try:
        with _no_param_grads(mod):
            yield mod
    finally:
        offload(mod)


@contextmanager
def _swapped_in(model: nn.Module, path: str, module: nn.Module) -> Iterator[None]:
    """Put ``module`` at ``path`` inside ``model`` while the model's own forward runs.

    Only matters when ``onload`` returns a different object than the model holds.
    """
    owner_path, _, name = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    old = getattr(owner, name)
    setattr(owner, name, module)
    try:
        yield
    finally:
        setattr(owner, name, old)


def _optional(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return ArchSpec._get(model, path)
    except AttributeError:
        return None


def layer0_inputs(
    model: nn.Module, arch: ArchSpec, ids: torch.Tensor, onload: Onload, offload: Offload
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states and kwargs with which the model's forward calls decoder layer 0.

    Running the model's own forward (stopped by a pre-hook on layer 0) builds the attention
    mask, position ids and rotary tables exactly as the whole-model forward does, for any
    architecture, without copying its code. Only the embedding and rotary modules are
    onloaded; the decoder layers are not touched.
    """
    paths = [p for p in (arch.embed, arch.rotary) if _optional(model, p) is not None]
    captured: dict[str, Any] = {}

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    with ExitStack() as stack:
        for path in paths:
            mod = stack.enter_context(_onloaded(ArchSpec._get(model, path), onload, offload))
            stack.enter_context(_swapped_in(model, path, mod))
        handle = arch.decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
        stack.callback(handle.remove)
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        except _StopForward:
            pass
    if "hidden" not in captured:
        raise IntraSliceError("the model's forward never reached decoder layer 0")
    kwargs = captured["kwargs"]
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    kwargs["use_cache"] = False
    return captured["hidden"].detach(), kwargs


def _check_one_mask_for_all_layers(config: Any, seqlen: int) -> None:
    """Refuse models whose layers need different attention masks at this length.

    Layer 0's captured kwargs are reused for every layer; with alternating full/sliding
    layers that is exact only when the window covers the whole sequence.
    """
    types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if len(types) > 1 and window is not None and window < seqlen:
        raise IntraSliceError(
            f"layers of types {sorted(types)} with a sliding window of {window} < {seqlen} tokens need different "
            "attention masks; the layer-wise mask gradients support one mask for all layers"
        )


def _layer_output(out: Any) -> torch.Tensor:
    """A decoder layer returns its hidden states, alone or first in a tuple (older HF)."""
    return out[0] if isinstance(out, tuple) else out


def mask_gradients(
    model: nn.Module,
    tokens: torch.Tensor,
    group_size: int = 8,
    device: str | torch.device = "cpu",
    checkpointing: bool = False,
    progress: bool = True,
    onload: Onload | None = None,
    offload: Offload | None = None,
    resident: bool = False,
) -> MaskGradients:
    """Gradients of the causal-LM loss w.r.t. all-ones masks on o_proj and down_proj inputs.

    Computed layer by layer (see the module docstring): the result equals a whole-model
    backward, but only one decoder layer's weights and autograd graph are alive at a time.

    ``onload``/``offload`` do every device move of a module (decoder layers, embedding,
    rotary embedding, final norm, LM head); by default ``module.to(device)`` and
    ``module.to("cpu")``, or no offload at all with ``resident=True`` (the whole model stays
    on ``device`` afterwards, which saves the per-sample transfers when it fits).
    ``checkpointing`` is accepted for compatibility and ignored: the layer-wise backward
    already recomputes each layer from its stored input. The model stays in eval mode (no
    dropout); its weights and ``requires_grad`` flags are left as they were.
    """
    del checkpointing  # the layer-wise backward is a per-layer recomputation already
    if group_size < 1:
        raise IntraSliceError(f"--group-size must be >= 1, got {group_size}")
    device = torch.device(device)
    if onload is None:

        def onload(module: nn.Module) -> nn.Module:
            return module.to(device)

    if offload is None:

        def offload(module: nn.Module) -> None:
            if not resident:
                module.to("cpu")

    arch = get_arch(model.config)
    arch.prepare_model(model)
    _check_one_mask_for_all_layers(model.config, tokens.shape[1])
    dims = arch.dims(model.config)
    n_l, n_h, h, m = dims["n_layers"], dims["n_heads"], dims["head_dim"], dims["m"]
    n = tokens.shape[0]
    groups = (n + group_size - 1) // group_size
    mask_dtype = _mask_dtype(next(model.parameters()).dtype)
    g_att = torch.zeros(groups, n_l, n_h, h, dtype=torch.float64)
    g_mlp = torch.zeros(groups, n_l, m, dtype=torch.float64)
    cov = torch.zeros(n_l, n_h, h, h, dtype=torch.float64, device=device)
    layers = arch.decoder_layers(model)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with _no_param_grads(model):
            # Under torchrun each rank takes the samples rank::world; sums are reduced below.
            mine = range(dist.rank(), n, dist.world_size())
            for s in tqdm(mine, desc="mask gradients", unit="sample", disable=not progress):
                ids = tokens[s : s + 1].to(device)
                hidden, kwargs = layer0_inputs(model, arch, ids, onload, offload)
                inputs, last = _forward_layers(layers, arch, hidden, kwargs, cov, onload, offload)
                grad = _head_gradient(model, arch, last, ids, device, onload, offload, s)
                grp = s // group_size
                for li in reversed(range(n_l)):
                    grad, g_a, g_m = _layer_backward(
                        layers[li], arch, inputs.pop(), kwargs, grad, mask_dtype, li > 0, device, onload, offload
                    )
                    g_att[grp, li] += g_a.to("cpu", torch.float64).view(n_h, h)
                    g_mlp[grp, li] += g_m.to("cpu", torch.float64)
                    trim()  # this layer's graph is gone: give its pages back (see memory.py)
    finally:
        if was_training:
            model.train()  # the caller's mode, as it came in
    for t in (g_att, g_mlp, cov):  # every rank ends with the sums over all samples
        dist.all_reduce_(t)
    if not torch.isfinite(g_att).all() or not torch.isfinite(g_mlp).all():
        raise NonFiniteError("NaN/Inf in the mask gradients")
    return MaskGradients(g_att, g_mlp, cov.cpu(), n, group_size, time.perf_counter() - t0)


def _forward_layers(
    layers: nn.ModuleList,
    arch: ArchSpec,
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    cov: torch.Tensor,
    onload: Onload,
    offload: Offload,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Inputs of every layer, kept on the host, and the last layer's output; accumulates ``cov``.

    Runs without autograd, so a layer's activations die with its forward. The covariance is
    taken here only (the backward re-runs do not add to it again).
    """
    n_h, h = cov.shape[1], cov.shape[2]

    def cov_hook(li: int) -> Callable[[nn.Module, tuple], None]:
        def hook(_m: nn.Module, args: tuple) -> None:
            xd = args[0].detach().reshape(-1, n_h, h).to(cov.device, torch.float64)
            cov[li] += torch.einsum("tha,thb->hab", xd, xd)

        return hook

    stored = []
    with torch.no_grad():
        for li, layer in enumerate(layers):
            stored.append(hidden.detach().to("cpu"))
            with _onloaded(layer, onload, offload) as lyr, _pre_hooks((arch.qkvo(lyr)[3], cov_hook(li))):
                hidden = _layer_output(lyr(hidden, **kwargs))
    return stored, hidden


def _head_gradient(
    model: nn.Module,
    arch: ArchSpec,
    last: torch.Tensor,
    ids: torch.Tensor,
    device: torch.device,
    onload: Onload,
    offload: Offload,
    sample: int,
) -> torch.Tensor:
    """Gradient of the mean next-token loss w.r.t. the last decoder layer's output.

    Final norm, LM head and cross-entropy act on each token alone, so the gradient is taken
    over chunks of ``HEAD_CHUNK`` tokens: the same per-token values as one pass, but the
    float32 logits (tokens x vocabulary, the largest tensor of a small model with a big
    vocabulary) exist for one chunk at a time. The last token predicts nothing: zero gradient.
    """
    x = last.detach().to(device)
    grad = torch.zeros_like(x)
    n_pred = ids.shape[1] - 1
    with (
        _onloaded(ArchSpec._get(model, arch.final_norm), onload, offload) as norm,
        _onloaded(ArchSpec._get(model, arch.lm_head), onload, offload) as head,
        torch.enable_grad(),
    ):
        for a in range(0, n_pred, HEAD_CHUNK):
            b = min(a + HEAD_CHUNK, n_pred)
            xc = x[:, a:b].detach().requires_grad_(True)
            logits = head(norm(xc))
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, a + 1 : b + 1].reshape(-1), reduction="sum"
            )
            if not torch.isfinite(nll):
                raise NonFiniteError(f"NaN/Inf loss on calibration sample {sample} while computing mask gradients")
            grad[:, a:b] = torch.autograd.grad(nll / n_pred, [xc])[0]
    return grad


def _layer_backward(
    layer: nn.Module,
    arch: ArchSpec,
    inp: torch.Tensor,
    kwargs: dict[str, Any],
    grad_out: torch.Tensor,
    mask_dtype: torch.dtype,
    need_input_grad: bool,
    device: torch.device,
    onload: Onload,
    offload: Offload,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Re-run one layer from its stored input and back-propagate ``grad_out`` through it.

    Returns (gradient w.r.t. the layer input or None for layer 0, attention-mask gradient,
    MLP-mask gradient). Only this layer's graph exists, and only until the call returns.
    """
    x = inp.to(device).requires_grad_(need_input_grad)
    with _onloaded(layer, onload, offload) as lyr:
        o_proj, down = arch.qkvo(lyr)[3], arch.gate_up_down(lyr)[2]
        att_mask = torch.ones(o_proj.in_features, device=device, dtype=mask_dtype, requires_grad=True)
        mlp_mask = torch.ones(down.in_features, device=device, dtype=mask_dtype, requires_grad=True)
        hooks = (
            (o_proj, lambda _m, args: (apply_mask(args[0], att_mask), *args[1:])),
            (down, lambda _m, args: (apply_mask(args[0], mlp_mask), *args[1:])),
        )
        with _pre_hooks(*hooks), torch.enable_grad():
            out = _layer_output(lyr(x, **kwargs))
            wrt = [x, att_mask, mlp_mask] if need_input_grad else [att_mask, mlp_mask]
            grads = torch.autograd.grad(out, wrt, grad_outputs=grad_out)
    if need_input_grad:
        return grads[0], grads[1], grads[2]
    return None, grads[0], grads[1]


def _next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL, in float32 or (for float64 models) float64 - never in half precision."""
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of a whole-model forward, in float32 or (float64 models) float64."""
    return _next_token_nll(model(input_ids=ids, use_cache=False).logits, ids)


def head_bases(head_cov: torch.Tensor) -> torch.Tensor:
    """(layers, n_heads, h, h) eigenvector bases, columns by decreasing eigenvalue."""
    out = torch.empty_like(head_cov)
    for li in range(head_cov.shape[0]):
        for hi in range(head_cov.shape[1]):
            out[li, hi] = eigh_desc(head_cov[li, hi])[1]
    return out


def importances(
    mg: MaskGradients, mode: str, units_per_head: int | None = DEFAULT_UNITS_PER_HEAD
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer attention-unit and MLP-neuron importances for ``global`` or ``global_pca``
    (``units_per_head`` None: one unit per dimension)."""
    if mode not in ("global", "global_pca"):
        raise IntraSliceError(f"unknown allocation {mode!r}: use one of {', '.join(MODES)}")
    n_l = mg.attention.shape[1]
    att = []
    bases = head_bases(mg.head_cov) if mode == "global_pca" else None
    for li in range(n_l):
        g = mg.attention[:, li]
        if bases is not None:
            g = rotate_head_gradients(g, bases[li])
        att.append(unit_importance(g, units_per_head))
    mlp = [mg.mlp[:, li].pow(2).sum(0) for li in range(n_l)]
    return att, mlp


def resolve_split(
    config: Any,
    ratio: float,
    mode: str,
    units_per_head: int | None = None,
    mlp_bias: float | None = None,
    attention_share: float | str | None = None,
    saved: dict[str, Any] | None = None,
    cap: float = 0.8,
    split_uniform: bool = False,
) -> tuple[int, ParamModel, float, str | None, float | str | None]:
    """(f, parameter model, β, the option that set β, the attention share) of an allocation,
    checked before any gradient.

    f is ``units_per_head``, or the f of a ratios file's importances, or the default 1. The
    split between attention and MLP is β (``mlp_bias``), or the β of an ``attention_share``
    (a number, or ``"auto"``: chosen later from the importances, β is then a placeholder);
    neither: :data:`~intraslice.config.DEFAULT_ATTENTION_SHARE`, moved into the feasible range
    if this ratio needs it (:func:`~intraslice.algo.allocation.feasible_share`); both together are refused.
    The uniform allocation splits only when asked: a share or β given, or ``split_uniform``
    (a target whose layers must all be alike, ``--deploy stock``, which takes the default
    split like a global allocation); otherwise both modules lose the ratio, as the spec's
    uniform allocation does. Raises :class:`IntraSliceError` when f does not divide the head or the split cannot
    reach ``ratio`` (the CLI calls this before its dense evaluation,
    :func:`estimate_allocation` before its mask gradients).
    """
    arch = get_arch(config)
    dims = arch.dims(config)
    if units_per_head is None:  # f = 1, or the f a ratios file's importances were summed with
        reused = mode != "uniform" and saved is not None and saved.get("importance") and saved.get("units_per_head")
        units_per_head = int(saved["units_per_head"]) if reused else DEFAULT_UNITS_PER_HEAD
    check_units_per_head(units_per_head, dims["head_dim"], mode)
    pm = param_model(dims, units_per_head, arch.qkv_bias(config), arch.mlp_bias(config), arch.mlp_matrices)
    if attention_share is not None and mlp_bias is not None:
        raise IntraSliceError("give --attention-share or --mlp-bias, not both (each sets the other)")
    if attention_share == "auto" and mode == "uniform":
        raise IntraSliceError("--attention-share auto ranks the estimator's importances: it needs a global allocation")
    default = attention_share is None and mlp_bias is None
    if mode == "uniform" and default and not split_uniform:
        return units_per_head, pm, 1.0, None, None  # the spec's uniform: both modules lose the ratio
    check_cap(ratio, cap)
    if default and saved is not None and saved.get("importance"):  # a ratios file keeps its own split
        if saved.get("attention_share") is not None:
            attention_share = saved["attention_share"]
        elif saved.get("mlp_bias") is not None:  # a file from before the share existed
            mlp_bias = float(saved["mlp_bias"])
        default = False
    if default:
        attention_share = DEFAULT_ATTENTION_SHARE
    if attention_share == "auto":
        feasible_share(pm, ratio, 1.0, cap)  # some split fits; the importances choose which, later
        return units_per_head, pm, 1.0, "--attention-share auto", "auto"
    option = None
    if attention_share is not None:
        attention_share = float(attention_share)
        if default:
            attention_share = feasible_share(pm, ratio, attention_share, cap)
        mlp_bias = mlp_bias_for_share(pm, attention_share)
        option = f"--attention-share {attention_share:g}"
    mlp_bias = 1.0 if mlp_bias is None else float(mlp_bias)
    split_fits(pm, ratio, mlp_bias, cap, option)
    return units_per_head, pm, mlp_bias, option, attention_share


def estimate_allocation(
    model: nn.Module,
    ratio: float,
    mode: str = "global_pca",
    tokens: torch.Tensor | None = None,
    units_per_head: int | None = None,
    mlp_bias: float | None = None,
    cap: float = 0.8,
    group_size: int = 8,
    attention_share: float | str | None = None,
    device: str | torch.device = "cpu",
    checkpointing: bool = False,
    progress: bool = True,
    saved: dict[str, Any] | None = None,
    onload: Onload | None = None,
    offload: Offload | None = None,
    resident: bool = False,
    grad_samples: int | None = DEFAULT_GRAD_SAMPLES,
    split_uniform: bool = False,
    serving_cost: tuple[float, float] | None = None,
) -> tuple[Allocation, dict[str, Any]]:
    """The per-layer ratios for ``mode`` and a JSON-able record of how they were obtained.

    The gradients use the first ``grad_samples`` windows of ``tokens`` (0 or None: all).

    ``units_per_head`` f splits each head into f units of h/f dimensions; None is the
    default, f = 1 (a unit is a head, as the method specifies), or the f a ratios file's
    importances were summed with. **Decision (default, 2026-12-03)**: f = h (every PCA
    direction its own unit) prunes to lower perplexity on both built-in models (five of six
    pairs) but copies worse on five of six (BENCHMARKS.md, "The same study on
    Qwen2.5-Coder-0.5B, and the defaults"), so the default stays the spec's f = 1.

    ``attention_share`` A (instead of ``mlp_bias`` β): attention loses A x ``ratio`` of its
    parameters and the MLP the rest (:func:`~intraslice.algo.allocation.mlp_bias_for_share`);
    the estimator still spreads each budget over the layers. Neither given: A =
    :data:`~intraslice.config.DEFAULT_ATTENTION_SHARE` (0: **Decision**, docs/method.md
    sections 4 and 8; attention pruning costs copying and perplexity more per parameter). ``"auto"``: A from one ranking
    of every unit and neuron by importance per parameter
    (:func:`~intraslice.algo.allocation.joint_attention_share`).

    ``saved`` is the ``allocation`` record of an earlier run (its importances): with it no
    gradient is recomputed, and a different ``ratio`` re-runs only the budget.

    ``serving_cost`` (remove, kv_weight), with ``attention_share="auto"``: a ``--target-memory``.
    The ranking prices each attention unit at its parameters plus kv_weight x its cache
    values (:func:`~intraslice.algo.allocation.joint_split_for_cost`) and goes until
    ``remove`` cost units are gone; that sets the ratio (``ratio`` is then only a lower
    bound for the checks) as well as the split. The record's ``target_ratio`` is the one used.
    ``checkpointing`` (ignored), ``onload``, ``offload`` and ``resident`` are passed to
    :func:`mask_gradients`, which says what they do.
    """
    if mode not in MODES:
        raise IntraSliceError(f"unknown allocation {mode!r}: use one of {', '.join(MODES)}")
    arch = get_arch(model.config)
    dims = arch.dims(model.config)
    units_per_head, pm, mlp_bias, option, attention_share = resolve_split(
        model.config, ratio, mode, units_per_head, mlp_bias, attention_share, saved, cap, split_uniform
    )  # a bad f or an impossible split fails here, before the mask gradients (minutes)
    record: dict[str, Any] = {
        "mode": mode,
        "units_per_head": units_per_head,
        "mlp_bias": mlp_bias,
        "attention_share": attention_share,
        "cap": cap,
        "dims": dims,
    }
    if mode == "uniform":
        alloc = uniform_allocation(pm, ratio, mlp_bias)
    else:
        if saved is not None and saved.get("importance"):
            att = [torch.tensor(x, dtype=torch.float64) for x in saved["importance"]["attention"]]
            mlp = [torch.tensor(x, dtype=torch.float64) for x in saved["importance"]["mlp"]]
            if saved.get("mode") != mode or saved.get("units_per_head") != units_per_head:
                raise IntraSliceError(
                    f"the ratios file holds {saved.get('mode')} importances with units_per_head "
                    f"{saved.get('units_per_head')}; asked for {mode} with {units_per_head}"
                )
            record.update(
                {
                    "gradient_samples": saved.get("gradient_samples"),
                    "group_size": saved.get("group_size"),
                    "estimator_seconds": 0.0,
                    "reused_from_file": True,
                }
            )
        else:
            if tokens is None:
                raise IntraSliceError(f"allocation {mode} needs calibration tokens for the mask gradients")
            if grad_samples:
                tokens = tokens[:grad_samples]
            mg = mask_gradients(
                model,
                tokens,
                group_size,
                device,
                checkpointing,
                progress,
                onload=onload,
                offload=offload,
                resident=resident,
            )
            att, mlp = importances(mg, mode, units_per_head)
            record.update({"gradient_samples": mg.samples, "group_size": group_size, "estimator_seconds": mg.seconds})
        if attention_share == "auto" and serving_cost is not None:
            remove, kv_weight = serving_cost
            ratio, share = joint_split_for_cost(att, mlp, pm, remove, kv_weight)
            chosen = None
            for step in range(101):  # the ranking's split, or the nearest larger attention share that fits the cap
                candidate = share if step == 0 else min(1.0, share + step / 100)
                r = ratio if step == 0 else ratio_for_cost(pm, remove, candidate, kv_weight)
                try:
                    chosen = feasible_share(pm, r, candidate, cap)
                except IntraSliceError:
                    continue
                if chosen != round(candidate, 6):  # the cap moved the split: the ratio that meets the cost at it
                    r = ratio_for_cost(pm, remove, chosen, kv_weight)
                    try:
                        chosen = feasible_share(pm, r, chosen, cap)
                    except IntraSliceError:
                        chosen = None
                        continue
                ratio = r
                break
            if chosen is None:
                raise IntraSliceError(
                    f"--target-memory cannot be met under the per-layer cap {cap} (--max-layer-ratio): "
                    "ask for more memory"
                )
            mlp_bias = mlp_bias_for_share(pm, chosen)
            record.update({"attention_share_chosen": chosen, "mlp_bias": mlp_bias, "serving_cost": list(serving_cost)})
        elif attention_share == "auto":
            chosen = feasible_share(pm, ratio, joint_attention_share(att, mlp, pm, ratio), cap)
            mlp_bias = mlp_bias_for_share(pm, chosen)
            record.update({"attention_share_chosen": chosen, "mlp_bias": mlp_bias})
        alloc = allocate(att, mlp, pm, ratio, mlp_bias, cap, option)
        record["importance"] = {"attention": [a.tolist() for a in att], "mlp": [x.tolist() for x in mlp]}
    record.update(
        {
            "target_ratio": ratio,
            "planned_ratio": alloc.planned_ratio,
            "layer_ratios": [list(x) for x in alloc.layer_ratios],
            "kept_units": alloc.kept_units,
            "kept_neurons": alloc.kept_neurons,
        }
    )
    return alloc, record


def load_ratios_file(path: str, model_config: Any) -> dict[str, Any]:
    """The ``allocation`` record of an intraslice.json (or a bare record), checked against the model."""
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise IntraSliceError(f"cannot read ratios file {path}: {exc}") from None
    record = data.get("allocation", data)
    if not isinstance(record, dict) or "layer_ratios" not in record:
        raise IntraSliceError(f"ratios file {path} has no allocation.layer_ratios")
    dims = get_arch(model_config).dims(model_config)
    saved_dims = record.get("dims")
    if len(record["layer_ratios"]) != dims["n_layers"] or (saved_dims is not None and saved_dims != dims):
        raise IntraSliceError(
            f"ratios file {path} is for another model: it has {len(record['layer_ratios'])} layers and dims "
            f"{saved_dims}, this model has {dims}"
        )
    return record
