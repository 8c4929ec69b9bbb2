"""Weights streamed both ways: pruning from safetensors shards into output shards gives the
same model as pruning in memory, for every architecture and method, and the directory
loads with plain ``from_pretrained``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from intraslice import PruneConfig, prune, stages
from intraslice.params import param_report
from intraslice.pipeline import DevicePolicy

from .conftest import calib_tokens, make_tiny


@pytest.mark.parametrize("method", ["intraslice", "channel", "slicegpt"])
def test_streamed_prune_equals_in_memory(arch_name: str, method: str, tmp_path: Path) -> None:
    if method == "slicegpt" and arch_name == "phi":
        pytest.skip("slicegpt does not handle parallel LayerNorm blocks")
    src = make_tiny(arch_name)
    src.save_pretrained(tmp_path / "src", max_shard_size="50KB")  # several source shards
    ids = calib_tokens()
    # stages.prune takes unset layer_ratios as uniform (its allocation is stages.allocate)
    cfg = PruneConfig(ratio=0.3, method=method, allocation="uniform")
    ref = prune(copy.deepcopy(src), ids, cfg, progress=False).model
    out = tmp_path / "out"
    res = stages.prune(
        stages.load(str(tmp_path / "src")), ids, PruneConfig(ratio=0.3, method=method), out, False, 20000
    )
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    x = calib_tokens(1, 12, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-12, atol=1e-12)
    assert res.params_after == param_report(ref) == param_report(got)
    assert res.params_before == param_report(make_tiny(arch_name))


def test_streamed_evaluation_of_source_and_output(tmp_path: Path) -> None:
    from intraslice.checkpoint import SourceCheckpoint
    from intraslice.eval.ppl import perplexity

    from .conftest import build_tokenizer

    src = make_tiny("llama-gqa", dtype=torch.float32)
    tok = build_tokenizer(tmp_path / "src")
    src.save_pretrained(tmp_path / "src", max_shard_size="50KB")
    ckpt = stages.load(str(tmp_path / "src"))
    policy = DevicePolicy("cpu")
    streamed = stages.evaluate(ckpt, tok, policy, seqlen=64, windows=3, progress=False)
    whole = perplexity(src, tok, seqlen=64, windows=3, progress=False)
    assert streamed["ppl"] == pytest.approx(whole["ppl"], rel=1e-5)
    out = tmp_path / "out"
    stages.prune(ckpt, calib_tokens(), PruneConfig(ratio=0.3), out, progress=False)
    pruned = stages.evaluate(SourceCheckpoint.from_directory(out), tok, policy, seqlen=64, windows=3, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert pruned["ppl"] == pytest.approx(
        perplexity(loaded, tok, seqlen=64, windows=3, progress=False)["ppl"], rel=1e-5
    )
    assert json.loads((out / "config.json").read_text())["auto_map"]


def test_cli_eval_ppl_streams_and_matches_the_whole_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    from intraslice.cli import main
    from intraslice.eval.ppl import perplexity
    from intraslice.models import load_model

    out = tmp_path / "ppl.json"
    assert (
        main(["eval", "ppl", "--model", str(tiny_model_dir), "--seqlen", "64", "--windows", "20", "--json", str(out)])
        == 0
    )
    res = json.loads(out.read_text())
    src = load_model(str(tiny_model_dir))
    whole = perplexity(src.model, src.tokenizer, seqlen=64, windows=20, progress=False)
    assert res["streamed"] and res["windows"] == 20  # two chunks of windows
    assert res["ppl"] == pytest.approx(whole["ppl"], rel=1e-5)
