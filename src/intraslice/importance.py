"""Mask-gradient importance for the global allocation (method.md section 4) - model plumbing.

All-ones multiplicative masks sit on the o_proj input and the down_proj input of every
layer, as forward pre-hooks on the *unmodified* Hugging Face model (no copied forward
code). For each calibration sample the causal-LM loss is back-propagated to the masks
only: the weights are frozen and get no ``.grad``; one sample at a time (optionally with
gradient checkpointing) keeps the memory at one sample's activations. Gradients are summed
within groups of ``group_size`` samples. The same forward passes accumulate each head's
o_proj-input covariance block, whose eigenvectors give the PCA basis of ``global_pca``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .algo.allocation import (
    Allocation,
    allocate,
    param_model,
    rotate_head_gradients,
    uniform_allocation,
    unit_importance,
)
from .algo.linalg import eigh_desc
from .arch import get_arch
from .errors import IntraSliceError, NonFiniteError

MODES = ("uniform", "global", "global_pca")


@dataclass
class MaskGradients:
    """Grouped mask gradients and the per-head covariance blocks of the o_proj input."""

    attention: torch.Tensor  # (groups, layers, n_heads, h) float64
    mlp: torch.Tensor  # (groups, layers, m) float64
    head_cov: torch.Tensor  # (layers, n_heads, h, h) float64
    samples: int
    group_size: int
    seconds: float


def mask_gradients(
    model: nn.Module,
    tokens: torch.Tensor,
    group_size: int = 8,
    device: str = "cpu",
    checkpointing: bool = False,
    progress: bool = True,
) -> MaskGradients:
    """Gradients of the causal-LM loss w.r.t. all-ones masks on o_proj and down_proj inputs."""
    if group_size < 1:
        raise IntraSliceError(f"--group-size must be >= 1, got {group_size}")
    arch = get_arch(model.config)
    arch.prepare_model(model)
    dims = arch.dims(model.config)
    n_l, n_h, h, m = dims["n_layers"], dims["n_heads"], dims["head_dim"], dims["m"]
    n = tokens.shape[0]
    groups = (n + group_size - 1) // group_size
    dtype = next(model.parameters()).dtype
    model.to(device)
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    att_masks = [torch.ones(n_h * h, device=device, dtype=dtype, requires_grad=True) for _ in range(n_l)]
    mlp_masks = [torch.ones(m, device=device, dtype=dtype, requires_grad=True) for _ in range(n_l)]
    g_att = torch.zeros(groups, n_l, n_h, h, dtype=torch.float64)
    g_mlp = torch.zeros(groups, n_l, m, dtype=torch.float64)
    cov = torch.zeros(n_l, n_h, h, h, dtype=torch.float64, device=device)

    def o_hook(li: int) -> Any:
        def hook(_m: nn.Module, args: tuple) -> tuple:
            x = args[0]
            xd = x.detach().reshape(-1, n_h, h).to(torch.float64)
            cov[li] += torch.einsum("tha,thb->hab", xd, xd)
            return (x * att_masks[li], *args[1:])

        return hook

    def down_hook(li: int) -> Any:
        def hook(_m: nn.Module, args: tuple) -> tuple:
            return (args[0] * mlp_masks[li], *args[1:])

        return hook

    handles = []
    for li, layer in enumerate(arch.decoder_layers(model)):
        o_proj = arch.qkvo(layer)[3]
        down = arch.gate_up_down(layer)[2]
        handles.append(o_proj.register_forward_pre_hook(o_hook(li)))
        handles.append(down.register_forward_pre_hook(down_hook(li)))
    was_training = model.training
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # HF checkpoints only in train mode; there is no dropout in these models
    t0 = time.perf_counter()
    try:
        for s in tqdm(range(n), desc="mask gradients", unit="sample", disable=not progress):
            ids = tokens[s : s + 1].to(device)
            loss = causal_lm_loss(model, ids)
            if not torch.isfinite(loss):
                raise NonFiniteError(f"NaN/Inf loss on calibration sample {s} while computing mask gradients")
            grads = torch.autograd.grad(loss, att_masks + mlp_masks)
            grp = s // group_size
            for li in range(n_l):
                g_att[grp, li] += grads[li].detach().to("cpu", torch.float64).view(n_h, h)
                g_mlp[grp, li] += grads[n_l + li].detach().to("cpu", torch.float64)
    finally:
        for hd in handles:
            hd.remove()
        for p, req in frozen.items():
            p.requires_grad_(req)
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
    if not torch.isfinite(g_att).all() or not torch.isfinite(g_mlp).all():
        raise NonFiniteError("NaN/Inf in the mask gradients")
    return MaskGradients(g_att, g_mlp, cov.cpu(), n, group_size, time.perf_counter() - t0)


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL, in float32 or (for float64 models) float64 - never in half precision."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def head_bases(head_cov: torch.Tensor) -> torch.Tensor:
    """(layers, n_heads, h, h) eigenvector bases, columns by decreasing eigenvalue."""
    out = torch.empty_like(head_cov)
    for li in range(head_cov.shape[0]):
        for hi in range(head_cov.shape[1]):
            out[li, hi] = eigh_desc(head_cov[li, hi])[1]
    return out


def importances(mg: MaskGradients, mode: str, units_per_head: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer attention-unit and MLP-neuron importances for ``global`` or ``global_pca``."""
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


def estimate_allocation(
    model: nn.Module,
    ratio: float,
    mode: str = "global_pca",
    tokens: torch.Tensor | None = None,
    units_per_head: int = 1,
    mlp_bias: float = 1.0,
    cap: float = 0.8,
    group_size: int = 8,
    device: str = "cpu",
    checkpointing: bool = False,
    progress: bool = True,
    saved: dict[str, Any] | None = None,
) -> tuple[Allocation, dict[str, Any]]:
    """The per-layer ratios for ``mode`` and a JSON-able record of how they were obtained.

    ``saved`` is the ``allocation`` record of an earlier run (its importances): with it no
    gradient is recomputed, and a different ``ratio`` re-runs only the budget.
    """
    if mode not in MODES:
        raise IntraSliceError(f"unknown allocation {mode!r}: use one of {', '.join(MODES)}")
    arch = get_arch(model.config)
    dims = arch.dims(model.config)
    pm = param_model(dims, units_per_head, arch.qkv_bias(model.config), arch.mlp_bias(model.config), arch.mlp_matrices)
    record: dict[str, Any] = {
        "mode": mode,
        "units_per_head": units_per_head,
        "mlp_bias": mlp_bias,
        "cap": cap,
        "dims": dims,
    }
    if mode == "uniform":
        alloc = uniform_allocation(pm, ratio)
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
            mg = mask_gradients(model, tokens, group_size, device, checkpointing, progress)
            att, mlp = importances(mg, mode, units_per_head)
            record.update({"gradient_samples": mg.samples, "group_size": group_size, "estimator_seconds": mg.seconds})
        alloc = allocate(att, mlp, pm, ratio, mlp_bias, cap)
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
