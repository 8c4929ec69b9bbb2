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
