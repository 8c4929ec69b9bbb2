"""Every streamed stage on an emulated second device (intraslice.testing.fakedevice): the
estimator, the pruning of every method, the evaluation and the saving, through the stages
and through the CLI, give the same result as on the CPU and never mix devices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from intraslice import PruneConfig, stages
from intraslice.checkpoint import SourceCheckpoint
from intraslice.cli import main
from intraslice.pipeline import DevicePolicy
from intraslice.testing import emulated_cuda

from .conftest import build_tokenizer, calib_tokens, make_tiny


def _stages_run(src: Path, out: Path, device: str, method: str, store: str) -> tuple[dict, float]:
    ckpt = stages.load(str(src))
    policy = DevicePolicy(device, store=store)
    ratios = None
    if method == "intraslice":
        alloc, _ = stages.allocate(ckpt, policy, calib_tokens(4, 16), 0.3, "global_pca", progress=False)
        ratios = alloc.layer_ratios
    cfg = PruneConfig(ratio=0.3, method=method, device=device, activations=store, layer_ratios=ratios)
    stages.prune(ckpt, calib_tokens(), cfg, out, progress=False)
    tok = build_tokenizer(out)
    pruned = SourceCheckpoint.from_directory(out)
    ppl = stages.evaluate(pruned, tok, policy, seqlen=32, windows=2, progress=False)["ppl"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    return {k: v.clone() for k, v in model.state_dict().items()}, ppl


@pytest.mark.parametrize("store", ["device", "cpu"])
@pytest.mark.parametrize("method", ["intraslice", "channel", "slicegpt"])
def test_streamed_stages_on_emulated_cuda_equal_cpu(method: str, store: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tiny("qwen2").save_pretrained(src, max_shard_size="50KB")
    ref, ref_ppl = _stages_run(src, tmp_path / "cpu", "cpu", method, store)
    with emulated_cuda():
        got, ppl = _stages_run(src, tmp_path / "cuda", "cuda", method, store)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k].cpu(), ref[k], rtol=1e-12, atol=1e-12)
    assert ppl == pytest.approx(ref_ppl, rel=1e-12)


def test_cli_prune_on_emulated_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["prune", "--model", str(tiny_model_dir), "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32"]
    args += ["--eval-windows", "1", "--eval-seqlen", "32", "--no-progress"]
    assert main([*args, "--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    with emulated_cuda():
        assert main([*args, "--device", "cuda", "--out", str(tmp_path / "cuda")]) == 0
    reports = [json.loads((tmp_path / d / "intraslice.json").read_text()) for d in ("cpu", "cuda")]
    assert reports[1]["method"]["devices"]["device"] == "cuda"
    assert reports[1]["perplexity"]["pruned"]["ppl"] == pytest.approx(reports[0]["perplexity"]["pruned"]["ppl"], 1e-5)
    assert [x["head_dim"] for x in reports[1]["layers"]] == [x["head_dim"] for x in reports[0]["layers"]]
