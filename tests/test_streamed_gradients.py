"""The layer-wise (streamed) mask gradients equal a whole-model backward (issue #10, item 3).

The reference here is deliberately independent of ``importance.py``: all-ones masks as
forward pre-hooks on the o_proj/down_proj inputs of the whole model and one
``torch.autograd.grad`` of the full-model loss per sample.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from intraslice import IntraSliceError, importance
from intraslice.arch import get_arch
from intraslice.importance import MaskGradients, estimate_allocation, mask_gradients

from .conftest import ARCHS, COMMON, calib_tokens, make_tiny

GROUP = 2
SAMPLES = 5  # 3 groups, the last one partial


def tiny(arch: str, n_layers: int = 2, dtype: torch.dtype = torch.float64) -> nn.Module:
    """``make_tiny`` at another depth (built the same way: non-trivial norms and biases)."""
    return make_tiny(arch, dtype=dtype, n_layers=n_layers)


def whole_model_reference(model: nn.Module, tokens: torch.Tensor, group_size: int) -> MaskGradients:
    """Grouped mask gradients and o_proj-input covariance from full-model backwards."""
    arch = get_arch(model.config)
    arch.prepare_model(model)
    dims = arch.dims(model.config)
    n_l, n_h, h, m = dims["n_layers"], dims["n_heads"], dims["head_dim"], dims["m"]
    dtype = next(model.parameters()).dtype
    att = [torch.ones(n_h * h, dtype=dtype, requires_grad=True) for _ in range(n_l)]
    mlp = [torch.ones(m, dtype=dtype, requires_grad=True) for _ in range(n_l)]
    groups = (tokens.shape[0] + group_size - 1) // group_size
    g_att = torch.zeros(groups, n_l, n_h, h, dtype=torch.float64)
    g_mlp = torch.zeros(groups, n_l, m, dtype=torch.float64)
    cov = torch.zeros(n_l, n_h, h, h, dtype=torch.float64)

    def o_hook(li: int) -> Any:
        def hook(_m: nn.Module, args: tuple) -> tuple:
            xd = args[0].detach().reshape(-1, n_h, h).to(torch.float64)
            cov[li] += torch.einsum("tha,thb->hab", xd, xd)
            return (args[0] * att[li],)

        return hook

    def d_hook(li: int) -> Any:
        return lambda _m, args: (args[0] * mlp[li],)

    handles = []
    for li, layer in enumerate(arch.decoder_layers(model)):
        handles.append(arch.qkvo(layer)[3].register_forward_pre_hook(o_hook(li)))
        handles.append(arch.gate_up_down(layer)[2].register_forward_pre_hook(d_hook(li)))
    try:
        for s in range(tokens.shape[0]):
            ids = tokens[s : s + 1]
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            loss = nn.functional.cross_entropy(logits, ids[0, 1:])
            grads = torch.autograd.grad(loss, att + mlp)
            for li in range(n_l):
                g_att[s // group_size, li] += grads[li].view(n_h, h).to(torch.float64)
                g_mlp[s // group_size, li] += grads[n_l + li].to(torch.float64)
    finally:
        for hd in handles:
            hd.remove()
    return MaskGradients(g_att, g_mlp, cov, tokens.shape[0], group_size, 0.0)


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("n_layers", [2, 4])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_layerwise_equals_whole_model_backward(arch: str, n_layers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = calib_tokens(SAMPLES, 24)
    if n_layers == 4:  # the LM-head gradient in chunks of 7 of the 23 predicting tokens
        monkeypatch.setattr(importance, "HEAD_CHUNK", 7)
    ref = whole_model_reference(tiny(arch, n_layers), tokens, GROUP)
    mg = mask_gradients(tiny(arch, n_layers), tokens, group_size=GROUP, progress=False)
    assert mg.attention.shape == ref.attention.shape and mg.attention.dtype == torch.float64
    assert mg.mlp.shape == ref.mlp.shape and mg.head_cov.shape == ref.head_cov.shape
    assert rel_max(mg.attention, ref.attention) < 1e-10
    assert rel_max(mg.mlp, ref.mlp) < 1e-10
    assert rel_max(mg.head_cov, ref.head_cov) < 1e-12  # accumulated once per sample, as the reference


def _mask_leaves(t: torch.Tensor, depth: int = 3) -> list[torch.Tensor]:
    """Leaf tensors (requires_grad, 1-D) a few autograd steps above ``t``: the masks."""
    found, frontier = [], [t.grad_fn]
    for _ in range(depth):
        nxt = []
        for fn in frontier:
            if fn is None:
                continue
            if hasattr(fn, "variable"):
                found.append(fn.variable)
            nxt.extend(f for f, _ in fn.next_functions)
        frontier = nxt
    return [v for v in found if v.dim() == 1]


@pytest.mark.parametrize("arch", ["llama-gqa", "phi3-gqa-partial", "phi"])
def test_bf16_model_uses_float32_masks_and_matches_float32(arch: str) -> None:
    tokens = calib_tokens(4, 24)
    model = tiny(arch, 3, torch.bfloat16)
    arch_spec = get_arch(model.config)
    arch_spec.prepare_model(model)
    seen: list[torch.dtype] = []

    def spy(_m: nn.Module, args: tuple, _out: torch.Tensor) -> None:
        # A forward hook sees the input as the pre-hooks left it: in the backward re-run it
        # is computed from a mask leaf, whose dtype is what we check.
        seen.extend(v.dtype for v in _mask_leaves(args[0]))

    handles = [
        lin.register_forward_hook(spy)
        for layer in arch_spec.decoder_layers(model)
        for lin in (arch_spec.qkvo(layer)[3], arch_spec.gate_up_down(layer)[2])
    ]
    try:
        mg16 = mask_gradients(model, tokens, group_size=GROUP, progress=False)
    finally:
        for hd in handles:
            hd.remove()
    assert seen and set(seen) == {torch.float32}
    assert len(seen) == 2 * 3 * tokens.shape[0]  # two masks per layer, per sample
    mg32 = mask_gradients(tiny(arch, 3, torch.float32), tokens, group_size=GROUP, progress=False)
    for t in (mg16.attention, mg16.mlp, mg16.head_cov):
        assert t.dtype == torch.float64 and torch.isfinite(t).all()
    assert rel_norm(mg16.attention, mg32.attention) < 5e-2
    assert rel_norm(mg16.mlp, mg32.mlp) < 5e-2
    assert rel_norm(mg16.head_cov, mg32.head_cov) < 5e-2


def test_eval_mode_during_passes_and_model_unchanged() -> None:
    model = tiny("phi", 3)
    arch = get_arch(model.config)
    arch.prepare_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen_name = "lm_head.bias"
    model.get_parameter(frozen_name).requires_grad_(False)  # a mixed set of flags to restore
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()  # the caller's mode; the passes must still run without dropout
    modes: list[bool] = []
    handles = [
        mod.register_forward_hook(lambda m, a, o: modes.append(m.training))
        for layer in arch.decoder_layers(model)
        for mod in (layer, arch.attention(layer), arch.mlp_module(layer))
    ]
    try:
        mask_gradients(model, calib_tokens(2, 16), group_size=GROUP, progress=False)
    finally:
        for hd in handles:
            hd.remove()
    assert modes and not any(modes)
    assert model.training  # restored
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


class _Streamer:
    """onload/offload callables that count how many decoder layers are onloaded at once.

    With ``copies`` the onloaded module is a fresh copy (as a loader from disk would give),
    so nothing may rely on the module objects inside the model.
    """

    def __init__(self, model: nn.Module, copies: bool) -> None:
        arch = get_arch(model.config)
        self.layers = {id(x) for x in arch.decoder_layers(model)}
        self.names = {id(m): n for n, m in model.named_modules()}
        self.copies = copies
        self.live: dict[int, bool] = {}  # id(onloaded) -> is a decoder layer
        self.max_layers = 0
        self.loaded: list[str] = []

    def onload(self, module: nn.Module) -> nn.Module:
        self.loaded.append(self.names[id(module)])
        mod = copy.deepcopy(module) if self.copies else module
        assert id(mod) not in self.live
        self.live[id(mod)] = id(module) in self.layers
        self.max_layers = max(self.max_layers, sum(self.live.values()))
        return mod

    def offload(self, module: nn.Module) -> None:
        del self.live[id(module)]


@pytest.mark.parametrize("copies", [False, True])
def test_one_layer_onloaded_at_a_time(copies: bool) -> None:
    tokens = calib_tokens(3, 16)
    expected = mask_gradients(tiny("llama-gqa", 4), tokens, group_size=GROUP, progress=False)
    model = tiny("llama-gqa", 4)
    st = _Streamer(model, copies)
    mg = mask_gradients(model, tokens, group_size=GROUP, progress=False, onload=st.onload, offload=st.offload)
    assert st.max_layers == 1 and not st.live  # every onload was offloaded again
    layer_loads = [n for n in st.loaded if n.startswith("model.layers.")]
    assert len(layer_loads) == 2 * 4 * tokens.shape[0]  # forward + backward re-run, per sample
    others = set(st.loaded) - set(layer_loads)
    assert others == {"model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"}
    assert torch.equal(mg.attention, expected.attention) and torch.equal(mg.mlp, expected.mlp)
    assert torch.equal(mg.head_cov, expected.head_cov)


def test_resident_and_checkpointing_flag_give_the_same_result() -> None:
    tokens = calib_tokens(3, 16)
    base = mask_gradients(tiny("qwen2"), tokens, group_size=GROUP, progress=False)
    other = mask_gradients(tiny("qwen2"), tokens, group_size=GROUP, progress=False, resident=True, checkpointing=True)
    assert torch.equal(base.attention, other.attention) and torch.equal(base.mlp, other.mlp)
    assert torch.equal(base.head_cov, other.head_cov)


def test_estimate_allocation_passes_the_layer_access_through() -> None:
    model = tiny("mistral")
    st = _Streamer(model, copies=False)
    _, record = estimate_allocation(
        model,
        0.3,
        "global_pca",
        calib_tokens(2, 16),
        group_size=GROUP,
        progress=False,
        onload=st.onload,
        offload=st.offload,
    )
    assert record["gradient_samples"] == 2 and st.loaded and st.max_layers == 1


def test_layers_needing_different_masks_are_refused() -> None:
    cfg_cls, model_cls, extra = ARCHS["qwen2"]
    cfg = cfg_cls(**COMMON, **extra, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    cfg._attn_implementation = "sdpa"
    assert len(set(cfg.layer_types)) == 2
    model = model_cls(cfg).double().eval()
    with pytest.raises(IntraSliceError, match="sliding window"):
        mask_gradients(model, calib_tokens(1, 16), progress=False)
    mask_gradients(model, calib_tokens(1, 8), progress=False)  # the window covers 8 tokens: one mask serves all
