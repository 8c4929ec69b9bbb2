"""llama.cpp's own server (``xllamacpp``, prebuilt) runs our GGUF export as intraslice runs the model.

Fast, in-process, on tiny models pruned to a per-layer mix of head counts, KV heads and MLP
widths: the f32 GGUF, served with an f32 KV cache and no flash attention, gives every next-token log-probability of
a text within float32 rounding of the pruned model's own (float64) computation. The
log-probabilities are read from the server (forced tokens, :mod:`intraslice.serve.llamacpp`),
never from our exporter, so the check covers llama.cpp's reading of the file end to end.
CI installs xllamacpp (the ``serve`` extra) and llama.cpp's converter: none of this skips there.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from intraslice import IntraSliceError, PruneConfig, prune, save_pruned
from intraslice.cli import main

from .conftest import build_tokenizer, calib_tokens, make_tiny

xllamacpp = pytest.importorskip("xllamacpp", reason="needs the serve extra: pip install 'intraslice[serve]'")

#: |log p(llama.cpp, f32) - log p(ours, f64)| per token: f32 weights and f32 arithmetic
#: (measured 6e-7; llama.cpp's CPU flash attention, which rounds queries to f16, gives 3e-4).
LOGPROB_ATOL = 1e-5


def _llama_cpp() -> Path:
    from intraslice.export.gguf import find_llama_cpp

    try:
        return find_llama_cpp(download=False)
    except IntraSliceError as exc:
        pytest.skip(str(exc))


def _mixed_pruned(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense, pruned) tiny models whose layers differ in heads, KV heads and MLP width."""
    dense = make_tiny(arch, n_layers=3)
    # Attention ratios above the width's 0.5 delete whole heads (and, in the MHA model, KV heads).
    layer_ratios = [(0.5, 0.2), (0.75, 0.5), (0.875, 0.35)]
    cfg = PruneConfig(ratio=0.35, layer_ratios=layer_ratios, deploy="llamacpp", head_width=8)
    result = prune(copy.deepcopy(dense), calib_tokens(), cfg, progress=False)
    return dense, result.model


def _our_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double(), -1)
    return lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_llamacpp_server_gives_our_logprobs(arch: str, tmp_path: Path) -> None:
    from intraslice.export.gguf import export_gguf
    from intraslice.serve import LlamaCppServer

    root = _llama_cpp()
    _, model = _mixed_pruned(arch)
    layers = model.config.layers
    assert len({s["num_heads"] for s in layers}) > 1, layers
    assert len({s["intermediate_size"] for s in layers}) > 1, layers
    tok = build_tokenizer(tmp_path / "tok")
    src = save_pruned(model, tok, tmp_path / "pruned")
    path = export_gguf(src, tmp_path / "m.gguf", "f32", llama_cpp=root, tokenizer_pre="gpt-2")
    text = "the quick brown fox jumps over the lazy dog, and pruning makes models smaller and faster " * 2
    ids = tok(text)["input_ids"][:40]
    ours = _our_logprobs(model, ids)
    with LlamaCppServer(path, n_ctx=128, threads=1, exact=True) as server:
        theirs = torch.tensor(server.token_logprobs(ids), dtype=torch.float64)
        ppl = server.perplexity([ids])
        # the server answers OpenAI-style completions too
        reply = server.complete({"prompt": "the quick", "n_predict": 4, "temperature": 0.0})
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < LOGPROB_ATOL, (theirs - ours).abs().max().item()
    assert math.isclose(ppl["ppl"], math.exp(-ours.mean().item()), rel_tol=1e-4)
    assert reply["usage"]["completion_tokens"] == 4


def test_kv_heads_mix_is_served(tmp_path: Path) -> None:
    """MHA source: layers keep different numbers of KV heads, and llama.cpp still agrees."""
    from intraslice.export.gguf import export_gguf
    from intraslice.serve import LlamaCppServer

    root = _llama_cpp()
    _, model = _mixed_pruned("llama-mha")
    kv = [s["num_kv_heads"] for s in model.config.layers]
    assert len(set(kv)) > 1, kv
    tok = build_tokenizer(tmp_path / "tok")
    src = save_pruned(model, tok, tmp_path / "pruned")
    path = export_gguf(src, tmp_path / "m.gguf", "f32", llama_cpp=root, tokenizer_pre="gpt-2")
    ids = tok("pruning makes models smaller and faster, the lazy dog " * 3)["input_ids"][:32]
    with LlamaCppServer(path, n_ctx=64, threads=1, exact=True) as server:
        theirs = torch.tensor(server.token_logprobs(ids), dtype=torch.float64)
    assert (theirs - _our_logprobs(model, ids)).abs().max().item() < LOGPROB_ATOL


def test_serve_refuses_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    for arg in (str(tmp_path / "missing"), str(tmp_path / "notes.txt"), str(tmp_path)):
        assert main(["serve", arg, "--prompt", "hi"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("intraslice: error:"), err


@pytest.mark.slow  # one converter child per probe: about a minute
def test_target_speedup_search_in_llamacpp_exports_each_candidate(tmp_path: Path, monkeypatch) -> None:
    """The bisection of ``--speed-engine llamacpp``: every probe is a real GGUF of the candidate shapes.

    The timings are replaced by a known speedup curve (1 + ratio), so the test checks the search
    and the files the server would time, not this machine's noise.
    """
    import gguf

    import intraslice.export.gguf as eg
    import intraslice.serve.speed as sp

    _llama_cpp()
    dense = make_tiny("llama-gqa", n_layers=2)
    src = tmp_path / "dense"
    dense.save_pretrained(src)
    tok = build_tokenizer(src)
    real_export, real_source = eg.export_gguf, eg.export_source_gguf
    monkeypatch.setattr(eg, "export_gguf", lambda *a, **k: real_export(*a, **{**k, "tokenizer_pre": "gpt-2"}))
    monkeypatch.setattr(eg, "export_source_gguf", lambda *a, **k: real_source(*a, **{**k, "tokenizer_pre": "gpt-2"}))
    seen = []

    def fake_speed(models, prompts, contexts, decode_tokens, threads, repeats, log=None):
        (_, dense_path), (_, cand) = models
        # the baseline is the source as llama.cpp's own converter writes it
        assert gguf.GGUFReader(dense_path).fields["general.architecture"].contents() == "llama"
        reader = gguf.GGUFReader(cand)
        ffn = reader.fields["deci.feed_forward_length"].contents()
        seen.append(ffn[0])
        ratio = 1 - ffn[0] / dense.config.intermediate_size  # the MLP share of the candidate
        return {"models": {"candidate": {"speedup": {f"prompt_{prompts[0]}": 1 + ratio}}}}

    monkeypatch.setattr(sp, "speed_llamacpp", fake_speed)
    ratio, probes = sp.ratio_for_speedup_llamacpp(dense, tok, src, 1.3, seqlen=64)
    assert len(probes) >= 3 and len(seen) == len(probes)
    assert seen == sorted(seen, reverse=True) or len(set(seen)) > 1  # widths shrink as the ratio grows
    ok = [p["ratio"] for p in probes if p["prompt_speedup_llamacpp"] >= 1.3]
    assert ratio == min(ok)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--speed-engine", "llamacpp"], "--deploy llamacpp"),  # the speed check exports to GGUF
        (["--deploy", "vllm"], "--deploy vllm keeps whole"),  # candidates would prune attention
    ],
)
def test_target_speedup_refusals_come_before_any_work(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    out = tmp_path / "out"
    code = main(["prune", "--model", str(model_dir), "--target-speedup", "1.2", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()
