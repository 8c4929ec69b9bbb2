"""The sequential pipeline: streamed evaluation equals the whole-model forward, every
activation store gives the same pruned model, and the device policy resolves as documented."""

from __future__ import annotations

import copy

import pytest
import torch

from intraslice import PruneConfig, prune
from intraslice.eval.ppl import perplexity, streamed_window_nlls
from intraslice.pipeline import DevicePolicy, ModelLayers

from .conftest import VOCAB, calib_tokens, make_tiny


def _whole_model_nll(model: torch.nn.Module, windows: torch.Tensor) -> list[float]:
    out = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0, :-1]
            out.append(float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum")))
    return out


def test_streamed_nll_equals_whole_model(arch_name: str) -> None:
    model = make_tiny(arch_name)
    windows = calib_tokens(3, 24, seed=5)
    ref = _whole_model_nll(model, windows)
    policy = DevicePolicy("cpu")
    got = streamed_window_nlls(ModelLayers(model, policy), windows, policy, batch_size=2)
    assert got == pytest.approx(ref, rel=1e-12)


def test_streamed_nll_of_a_pruned_model() -> None:
    model = make_tiny("llama-gqa")
    pruned = prune(model, calib_tokens(), PruneConfig(ratio=0.3), progress=False).model
    windows = calib_tokens(2, 20, seed=6)
    policy = DevicePolicy("cpu")
    got = streamed_window_nlls(ModelLayers(pruned, policy), windows, policy)
    assert got == pytest.approx(_whole_model_nll(pruned, windows), rel=1e-12)


def test_perplexity_stream_flag_matches() -> None:
    model = make_tiny("qwen2")
    ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(3))
    a = perplexity(model, None, seqlen=40, token_ids=ids, progress=False)
    b = perplexity(model, None, seqlen=40, token_ids=ids, progress=False, stream=True)
    assert b["streamed"] and b["ppl"] == pytest.approx(a["ppl"], rel=1e-6)  # a scores in float32


@pytest.mark.parametrize("store", ["device", "cpu", "disk"])
@pytest.mark.parametrize("method", ["intraslice", "channel", "slicegpt"])
def test_every_activation_store_gives_the_same_model(store: str, method: str, tmp_path) -> None:
    src = make_tiny("llama-gqa")
    ids = calib_tokens(6, 16)
    ref = prune(copy.deepcopy(src), ids, PruneConfig(ratio=0.3, method=method, batch_size=4), progress=False).model
    cfg = PruneConfig(ratio=0.3, method=method, batch_size=4, activations=store, offload_dir=str(tmp_path))
    got = prune(copy.deepcopy(src), ids, cfg, progress=False).model
    x = calib_tokens(1, 12, seed=9)
    with torch.no_grad():
        # A batch read back from disk is a fresh contiguous tensor: BLAS may round it differently.
        torch.testing.assert_close(got(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-11, atol=1e-11)
    assert list(tmp_path.iterdir()) == []  # the disk store cleans up after itself


def test_policy_resolution() -> None:
    cpu = DevicePolicy("cpu")
    assert (cpu.store, cpu.math_device.type) == ("cpu", "cpu")
    gpu = DevicePolicy("cuda")  # constructing a policy touches no GPU
    assert gpu.math_device.type == "cuda" and gpu.store == "cpu"
    assert DevicePolicy("cuda", math="cpu").math_device.type == "cpu"
    from intraslice.errors import IntraSliceError

    with pytest.raises(IntraSliceError, match="activation store"):
        DevicePolicy("cpu", store="ram")


def test_each_layer_is_pruned_on_the_pruned_outputs_of_the_one_before(arch_name: str, monkeypatch) -> None:
    """The inputs the pipeline hands layer i + 1 are the *pruned model's* layer-i outputs.

    The pipeline forms them without running the pruned layer as a module: the attention
    output comes from pass B's X~ through ``output_map`` (a parallel block runs the layer),
    then the installed MLP. An independent check: pre-hooks on the finished model's layers,
    run on the same calibration tokens, must see the same tensors (float64, 1e-10).
    """
    _check_layer_inputs(make_tiny(arch_name, n_layers=3), _spy_layer_inputs(monkeypatch))


def test_layer_inputs_with_attention_and_mlp_biases(monkeypatch) -> None:
    """As above, for a Llama with q/k/v/o and MLP biases: the o_proj bias enters the residual
    that pass C builds from X~ once, as the installed o_proj adds it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .conftest import COMMON

    cfg = LlamaConfig(**{**COMMON, "num_hidden_layers": 3}, hidden_size=96, num_attention_heads=6)
    cfg.update(dict(num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    _check_layer_inputs(model, _spy_layer_inputs(monkeypatch))


def _spy_layer_inputs(monkeypatch) -> dict[int, torch.Tensor]:
    """Record, for each layer index i > 0, the inputs the pipeline hands layer i."""
    import intraslice.api as api

    seen: dict[int, torch.Tensor] = {}
    real = api.run_layers

    def spy(*args, **kwargs):
        def capture(index: int, inputs, outcome) -> None:
            seen[index + 1] = torch.cat(list(inputs))

        kwargs["after_layer"] = capture
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "run_layers", spy)
    return seen


def _check_layer_inputs(model: torch.nn.Module, seen: dict[int, torch.Tensor]) -> None:
    ids = calib_tokens(6, 16)
    pruned = prune(model, ids, PruneConfig(ratio=0.4, batch_size=4), progress=False).model
    layers = list(pruned.model.layers)
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, args, kw, i=i: got[i].append(args[0] if args else kw["hidden_states"]), with_kwargs=True
        )
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], 4):
                pruned(input_ids=ids[start : start + 4], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert set(seen) >= {1, 2}
    for i in (1, 2):
        torch.testing.assert_close(seen[i], torch.cat(got[i]), rtol=0, atol=1e-10)


def test_nested_stage_timers_count_each_second_once(monkeypatch) -> None:
    """A stage timed inside another (the attention output inside the attention math) is
    not counted in the outer stage too, so the per-stage times add up to the layer's."""
    from intraslice.pipeline import sequential

    clock = iter([0.0, 1.0, 4.0, 10.0])  # outer starts, inner starts, inner ends, outer ends
    monkeypatch.setattr(sequential.time, "perf_counter", lambda: next(clock))
    timings: dict[str, float] = {}
    ctx = sequential.LayerContext(0, None, None, {}, None, None, timings)  # type: ignore[arg-type]
    with ctx.timed("outer"):
        with ctx.timed("inner"):
            pass
    assert timings == {"outer": 7.0, "inner": 3.0}


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2", "phi3", "phi"])
def test_attention_at_ratio_zero_is_kept_as_is_and_equals_the_full_step(arch: str, monkeypatch) -> None:
    """A layer whose attention ratio is 0 keeps its attention weights bit for bit, without the
    attention statistics; the full step (V/O basis and damped correction) gives the same model
    to float64 rounding, so skipping it changes nothing but the time (the default share 0)."""
    from intraslice.methods import intraslice as method

    def pruned(skip: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
        if not skip:  # an empty constraint list: no constraint, but the step runs in full
            init = method.IntraSliceAttentionStep.__init__

            def full(self, cfg):
                init(self, cfg)
                self.constraints = []

            monkeypatch.setattr(method.IntraSliceAttentionStep, "__init__", full)
        from intraslice.arch import get_arch

        source = make_tiny(arch)
        dense = make_tiny(arch)
        get_arch(dense.config).prepare_model(dense)  # the layout pruning reads (Phi's q/k re-paired)
        result = prune(source, calib_tokens(4, 32), PruneConfig(layer_ratios=[(0.0, 0.3)] * 2), progress=False)
        monkeypatch.undo()
        return dense, result.model

    dense, fast = pruned(skip=True)
    _, full = pruned(skip=False)
    for a, b in zip(dense.model.layers, fast.model.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            da, db = getattr(a.self_attn, name), getattr(b.self_attn, name)
            assert torch.equal(da.weight, db.weight)
            assert (da.bias is None) == (db.bias is None) and (da.bias is None or torch.equal(da.bias, db.bias))
    tokens = calib_tokens(2, 24, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens).logits, full(tokens).logits, rtol=1e-8, atol=1e-8)
