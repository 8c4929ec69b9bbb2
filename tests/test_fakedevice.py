"""The emulated-CUDA harness (issue #10 item 6): device mixing fails on a CPU-only machine as on a GPU.

The first half checks the harness against what CUDA does (the rules it mirrors), the
second uses it on the package: a whole pruning run on ``"cuda"`` without a GPU.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from intraslice.api import prune
from intraslice.config import PruneConfig
from intraslice.testing import EmulatedCudaTensor, emulated_cuda, is_emulated_cuda, memory_stats

from .conftest import calib_tokens, make_tiny

MIXED = "Expected all tensors to be on the same device"


@pytest.fixture
def cuda() -> object:
    with emulated_cuda():
        yield


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)


MIXING_OPS = {
    "matmul": lambda a, b: a @ b,
    "add": lambda a, b: a + b,
    "inplace_add": lambda a, b: a.add_(b),
    "cat": lambda a, b: torch.cat([a, b]),
    "stack": lambda a, b: torch.stack([a, b]),
    "linear": lambda a, b: F.linear(a, b),
    "where": lambda a, b: torch.where(a > 0, a, b),
    "sdpa": lambda a, b: F.scaled_dot_product_attention(a[None], a[None], a[None], attn_mask=b[None] > 0),
    "index_select": lambda a, b: a.index_select(0, torch.arange(2, device=b.device)),
    "embedding": lambda a, b: F.embedding(torch.tensor([1, 2], device=b.device), a),
}


@pytest.mark.parametrize("op", list(MIXING_OPS))
@pytest.mark.parametrize("cuda_first", [True, False])
def test_mixing_devices_raises_like_cuda(cuda: object, op: str, cuda_first: bool) -> None:
    a, b = _pair()
    a, b = (a.to("cuda"), b) if cuda_first else (a, b.to("cuda"))
    with pytest.raises(RuntimeError, match=MIXED):
        MIXING_OPS[op](a, b)


@pytest.mark.parametrize("op", list(MIXING_OPS))
def test_same_device_ops_run_and_stay_on_the_device(cuda: object, op: str) -> None:
    a, b = _pair()
    ref = MIXING_OPS[op](a.clone(), b.clone())
    out = MIXING_OPS[op](a.to("cuda"), b.to("cuda"))
    assert is_emulated_cuda(out) and out.device == torch.device("cuda", 0) and out.is_cuda
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


def test_cuda_exceptions_scalars_and_cpu_indices(cuda: object) -> None:
    x = torch.arange(6.0).to("cuda")
    # CPU scalars (0-dim tensors) mix with CUDA tensors ...
    assert is_emulated_cuda(x + torch.tensor(2.0))
    assert is_emulated_cuda(torch.where(x > 2, x, torch.tensor(0.0)))
    # ... but a CUDA tensor does not mix with a CPU one, and cat/stack take no scalars.
    with pytest.raises(RuntimeError, match=MIXED):
        torch.stack([x[0], torch.tensor(1.0)])
    # A CUDA tensor may be indexed by CPU indices and masks (CUDA copies them over).
    idx, mask = torch.tensor([0, 2]), torch.tensor([True, False] * 3)
    assert is_emulated_cuda(x[idx]) and is_emulated_cuda(x[mask]) and x[idx].tolist() == [0.0, 2.0]
    x[idx] = 7.0
    x[idx] = torch.tensor(8.0)
    x[0:2] = torch.tensor([1.0, 1.0])  # basic slicing assigns with copy_: any device
    assert x.cpu().tolist() == [1.0, 1.0, 8.0, 3.0, 4.0, 5.0]
    with pytest.raises(RuntimeError, match=MIXED):
        x[idx] = torch.tensor([5.0, 5.0])  # advanced indexing: the values must be on x's device
    # A CPU tensor indexed by CUDA indices is an error; a 0-dim index is a plain integer.
    y = torch.arange(6.0)
    with pytest.raises(RuntimeError, match="indices should be either on cpu or on the same device"):
        y[idx.to("cuda")]
    assert y[torch.tensor(3).to("cuda")].item() == 3.0


def test_transfers_and_factories(cuda: object) -> None:
    a, _ = _pair()
    c = a.to("cuda")
    assert c.to("cuda") is c and c.cuda() is c and c.to(torch.device("cuda:0")) is c
    back = c.cpu()
    assert type(back) is torch.Tensor and back.device.type == "cpu" and torch.equal(back, a)
    assert back.data_ptr() != c.data_ptr()  # a device move copies
    assert is_emulated_cuda(a.to(0)) and is_emulated_cuda(a.to(c)) and is_emulated_cuda(a.type_as(c))
    assert is_emulated_cuda(c.to(torch.float32)) and not is_emulated_cuda(c.to("cpu", torch.float32))
    dst = torch.zeros(4, 4)
    dst.copy_(c)  # copy_ is a transfer: allowed both ways
    c.copy_(dst)
    factories = [
        torch.zeros(2, device="cuda"),
        torch.ones(2, device="cuda:0"),
        torch.empty(2, device=torch.device("cuda")),
        torch.full((2,), 3.0, device="cuda"),
        torch.arange(3, device="cuda"),
        torch.randn(2, device="cuda"),
        torch.eye(2, device="cuda"),
        torch.tensor([1, 2], device="cuda"),
        torch.zeros_like(a, device="cuda"),
        torch.zeros_like(c),
        c.new_zeros(3),
        torch.as_tensor(a, device="cuda"),
    ]
    assert all(is_emulated_cuda(t) for t in factories)
    with torch.device("cuda"):
        assert is_emulated_cuda(torch.zeros(2))
    assert not is_emulated_cuda(torch.zeros_like(c, device="cpu"))
    assert torch.empty(2, pin_memory=True).device.type == "cpu" and a.pin_memory() is a
    with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
        c.numpy()
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        a.to("cuda:1")
    with pytest.raises(RuntimeError, match="generator"):
        torch.randn(2, device="cuda", generator=torch.Generator().manual_seed(0))
    assert "device='cuda:0'" in repr(c) and f"{c[0, 0]:.3f}" == f"{a[0, 0].item():.3f}"


def test_module_to_cuda_keeps_parameter_objects_and_ties(cuda: object) -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=True))
    model[1].weight = model[0].weight  # tied, as in an LM head
    before = list(model.parameters())
    model.to("cuda")
    params = list(model.parameters())
    assert [id(p) for p in params] == [id(p) for p in before] and model[1].weight is model[0].weight
    for p in params:
        assert isinstance(p, nn.Parameter) and isinstance(p, EmulatedCudaTensor) and p.requires_grad
        assert p.device == torch.device("cuda", 0)
    assert all(is_emulated_cuda(b) for b in nn.BatchNorm1d(3).cuda().buffers())
    clone = copy.deepcopy(model)
    assert clone[1].weight is clone[0].weight and is_emulated_cuda(clone[0].weight)
    assert torch.equal(clone[0].weight.cpu(), model[0].weight.cpu())
    assert clone[0].weight.data_ptr() != model[0].weight.data_ptr()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # saved as CPU tensors: loads with weights_only=True
    buf.seek(0)
    state = torch.load(buf)
    assert all(v.device.type == "cpu" for v in state.values())
    model.load_state_dict(state)
    assert is_emulated_cuda(model[0].weight)
    assert is_emulated_cuda(nn.Parameter(torch.zeros(2).to("cuda")))
    model.cpu()
    assert all(type(p) is nn.Parameter for p in model.parameters()) and model[1].weight is model[0].weight


def test_autograd_through_emulated_tensors(cuda: object) -> None:
    x = torch.randn(5, dtype=torch.float64, device="cuda", requires_grad=True)
    assert x.is_leaf and is_emulated_cuda(x)
    (g,) = torch.autograd.grad((x * x).sum(), x)
    assert is_emulated_cuda(g) and torch.equal(g.cpu(), 2 * x.detach().cpu())
    lin = nn.Linear(5, 3).double().cuda()
    w = torch.zeros(3, dtype=torch.float64).to("cuda").requires_grad_()
    (lin(x) * w).sum().backward()
    assert lin.weight.grad is lin.weight.grad and is_emulated_cuda(lin.weight.grad)
    assert is_emulated_cuda(x.grad) and is_emulated_cuda(w.grad)
    # A CPU input's gradient stays on the CPU even when the graph went through CUDA.
    p = torch.randn(3, requires_grad=True)
    (gp,) = torch.autograd.grad(p.to("cuda").sum(), p)
    assert not is_emulated_cuda(gp) and torch.equal(gp, torch.ones(3))


def test_linalg_on_emulated_tensors(cuda: object) -> None:
    a, b = _pair()
    spd = a @ a.T + 4 * torch.eye(4, dtype=torch.float64)
    ref = (torch.linalg.eigh(spd), torch.linalg.solve(spd, b), torch.linalg.cholesky(spd))
    s = spd.to("cuda")
    vals, vecs = torch.linalg.eigh(s)
    sol, chol = torch.linalg.solve(s, b.to("cuda")), torch.linalg.cholesky(s)
    assert all(is_emulated_cuda(t) for t in (vals, vecs, sol, chol))
    assert torch.equal(vals.cpu(), ref[0].eigenvalues) and torch.equal(sol.cpu(), ref[1])
    # The same op on both sides: einsum and @ may take different BLAS paths (bitwise equal on some CPUs only).
    assert torch.equal(chol.cpu(), ref[2])
    assert torch.equal(torch.einsum("ij,jk->ik", s, s).cpu(), torch.einsum("ij,jk->ik", spd, spd))
    with pytest.raises(RuntimeError, match=MIXED):
        torch.linalg.solve(s, b)


def test_hf_model_forward_and_generate_match_cpu() -> None:
    model = make_tiny("llama-gqa")
    ids = calib_tokens(2, 16, seed=3)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        ref_gen = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    with emulated_cuda(), torch.no_grad():
        model.to("cuda")
        assert model.device == torch.device("cuda", 0)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        out = model(input_ids=ids.to("cuda")).logits
        assert is_emulated_cuda(out) and torch.equal(out.cpu(), ref)
        gen = model.generate(ids[:1, :8].to("cuda"), max_new_tokens=6, do_sample=False)
        assert is_emulated_cuda(gen) and torch.equal(gen.cpu(), ref_gen)
        with pytest.raises(RuntimeError, match=MIXED):
            model(input_ids=ids)  # CPU token ids into a CUDA model


def test_torch_cuda_api_while_active_and_restored_after() -> None:
    assert not torch.cuda.is_available()
    saved = {n: getattr(torch.cuda, n) for n in ("is_available", "synchronize", "max_memory_allocated")}
    with pytest.raises(ValueError, match="boom"), emulated_cuda():
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1 and torch.cuda.current_device() == 0
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        x = torch.zeros(1000, dtype=torch.float64, device="cuda")
        assert torch.cuda.memory_allocated() == base + 8000 == memory_stats()["allocated_bytes.all.current"]
        del x
        assert torch.cuda.memory_allocated() == base and torch.cuda.max_memory_allocated() >= base + 8000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        end.record()
        assert start.elapsed_time(end) >= 0
        raise ValueError("boom")  # the harness must restore everything on the way out
    assert not torch.cuda.is_available()
    assert all(getattr(torch.cuda, n) is f for n, f in saved.items())
    assert torch._C._len_torch_function_stack() == 0
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(2, device="cuda")


def test_prune_on_cpu_under_the_harness_is_unchanged() -> None:
    """Nothing on cuda: the harness must not change a CPU run (same pruned model, bit for bit)."""
    model = make_tiny("llama-gqa")
    twin = copy.deepcopy(model)
    tokens, ids = calib_tokens(), calib_tokens(2, 16, seed=5)
    ref = prune(twin, tokens, PruneConfig(ratio=0.3), progress=False)
    with emulated_cuda():
        res = prune(model, tokens, PruneConfig(ratio=0.3, device="cpu"), progress=False)
        assert not any(is_emulated_cuda(p) for p in res.model.parameters())
    with torch.no_grad():
        assert torch.equal(res.model(input_ids=ids).logits, ref.model(input_ids=ids).logits)


@pytest.mark.parametrize("method", ["intraslice", "channel", "slicegpt"])
def test_prune_on_emulated_cuda_issue_10(method: str) -> None:
    """Regression test of issue #10 (a layer-0 device crash on CUDA machines).

    Before the pipeline rewrite (e892e02) this raised, for intraslice, "Expected all tensors
    to be on the same device ... cuda:0 and cpu" in ``channel_scores`` (algo/attention.py):
    the o_proj-input covariance stayed on the device and met a CPU ``w_o``. Now the run
    must succeed and give the model a CPU run gives.
    """
    model = make_tiny("llama-gqa")
    twin = copy.deepcopy(model)
    tokens, ids = calib_tokens(), calib_tokens(2, 16, seed=5)
    ref = prune(twin, tokens, PruneConfig(ratio=0.3, method=method), progress=False)
    with emulated_cuda(), torch.no_grad():
        res = prune(model.to("cuda"), tokens, PruneConfig(ratio=0.3, device="cuda", method=method), progress=False)
        res.model.to("cuda")
        out = res.model(input_ids=ids.to("cuda")).logits
    assert torch.equal(out.cpu(), ref.model(input_ids=ids).logits)


def test_pruned_model_from_a_cuda_source_lives_on_one_device() -> None:
    model = make_tiny("llama-gqa")
    with emulated_cuda():
        res = prune(model.to("cuda"), calib_tokens(), PruneConfig(ratio=0.3, device="cuda"), progress=False)
        devices = {str(t.device) for t in [*res.model.parameters(), *res.model.buffers()]}
    assert len(devices) == 1, devices
