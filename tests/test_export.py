"""Export-compatible pruning and the deployable formats (issue #11), on tiny float64 models.

* the new RoPE selection modes and shape constraints, checked against independent
  computations (pair scores from hooks on the dense model; attention probabilities of the
  dense Hugging Face attention with the dropped q/k rows zeroed);
* the stock export loads in a process where ``intraslice`` cannot be imported, without
  ``trust_remote_code``, and reproduces the pruned model's logits;
* refusals name the constraint and the prune option;
* the GGUF (llama.cpp ``deci``) export, structurally, through the ``gguf`` reader.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from intraslice import IntraSliceError, PruneConfig, prune, save_pruned
from intraslice.algo.attention import pair_dims
from intraslice.cli import main

from .conftest import build_tokenizer, calib_tokens, dense_rotated_qk, make_tiny

torch.set_num_threads(2)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def pruned_pair(arch: str, n_layers: int = 3, **cfg: object) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """(dense copy, pruned model, result) of a tiny float64 model."""
    dense = make_tiny(arch, n_layers=n_layers)
    work = copy.deepcopy(dense)
    result = prune(work, calib_tokens(), PruneConfig(**cfg), progress=False)
    return dense, result.model, result


# -- the selection modes ---------------------------------------------------------------------------


def dense_pair_scores(dense: torch.nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """sigma[l][i, p] = mean_t |q_ip k_g(i)p| + |q_i,p+h/2 k_g(i),p+h/2| after RoPE, per dense layer."""
    h = dense.config.head_dim
    sig = []
    for q, k in dense_rotated_qk(dense, tokens):
        mu = (q * k).abs().mean((0, 1))
        sig.append(mu[:, : h // 2] + mu[:, h // 2 :])
    return sig


def test_global_selection_is_the_top_pairs_over_every_head_of_every_layer() -> None:
    # the spec's score, recomputed here independently (the attention score: tests/test_rope_score.py)
    dense, model, result = pruned_pair("llama-gqa", ratio=0.3, rope_selection="global", head_width=8, rope_score="qk")
    sig = dense_pair_scores(dense, calib_tokens())
    expected = sorted(torch.topk(torch.stack(sig).sum((0, 1)), 4).indices.tolist())
    pairs = {tuple(p) for spec in model.config.layers for p in spec["rope_pairs"]}
    assert pairs == {tuple(expected)}
    assert result.method["constraints"]["global_rope_pairs"] == expected
    assert all(spec["head_dim"] == 8 for spec in model.config.layers)


def test_per_layer_selection_shares_one_set_within_each_layer() -> None:
    _, model, _ = pruned_pair("llama-gqa", ratio=0.3, rope_selection="per-layer", head_width=8)
    sets = [{tuple(p) for p in spec["rope_pairs"]} for spec in model.config.layers]
    assert all(len(s) == 1 for s in sets)


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
@pytest.mark.parametrize(
    "options",
    [
        {"rope_selection": "per-layer"},
        {"rope_selection": "global", "head_width": 8},
        {"deploy": "llamacpp", "head_width": 8},
        {"deploy": "stock", "min_head_width": 0.5},
    ],
)
def test_constrained_attention_equals_the_dense_attention_on_the_kept_pairs(arch: str, options: dict) -> None:
    """Per layer, on the same hidden states: the pruned attention probabilities of every kept
    head equal those of the dense Hugging Face attention whose q/k rows outside the kept pairs
    are zeroed (scale 1/sqrt(h)); checks pairs, per-head frequencies and the scale folding."""
    dense, model, _ = pruned_pair(arch, ratio=0.3, **options)
    cfg = model.config
    if options.get("deploy"):
        assert all(spec["kv_index"] == sorted(spec["kv_index"]) for spec in cfg.layers)
        assert all(len(set(map(spec["kv_index"].count, set(spec["kv_index"])))) == 1 for spec in cfg.layers)
    if options.get("deploy") == "stock":
        shapes = {(s["num_heads"], s["num_kv_heads"], s["head_dim"], s["intermediate_size"]) for s in cfg.layers}
        assert len(shapes) == 1
    dense.config._attn_implementation = "eager"
    cfg._attn_implementation = "eager"
    h, g = dense.config.head_dim, dense.config.num_attention_heads // dense.config.num_key_value_heads
    t = 12
    x = torch.randn(2, t, dense.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(t)[None]
    mask = torch.full((t, t), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)[None, None]
    for li, spec in enumerate(cfg.layers):
        attn_d = copy.deepcopy(dense.model.layers[li].self_attn)
        pairs_by_kv = spec["rope_pairs"]
        # Which source heads survived: recover them from the kept q rows (scaled copies of source rows).
        kept = []
        wq_p = model.model.layers[li].self_attn.q_proj.weight
        r = spec["head_dim"]
        for a in range(spec["num_heads"]):
            dims = pair_dims(pairs_by_kv[spec["kv_index"][a]], h)
            row = wq_p[a * r]
            src = [i for i in range(dense.config.num_attention_heads) if i not in kept]
            w_src = attn_d.q_proj.weight.detach()
            best = min(src, key=lambda i: float((w_src[i * h + dims[0]] * (r / h) ** 0.5 - row).norm()))
            kept.append(best)
        q_keep = torch.zeros(attn_d.q_proj.out_features, dtype=torch.bool)
        k_keep = torch.zeros(attn_d.k_proj.out_features, dtype=torch.bool)
        for a, i in enumerate(kept):
            dims = torch.tensor(pair_dims(pairs_by_kv[spec["kv_index"][a]], h))
            q_keep[i * h + dims] = True
            k_keep[(i // g) * h + dims] = True
        with torch.no_grad():
            for lin, keep in ((attn_d.q_proj, q_keep), (attn_d.k_proj, k_keep)):
                lin.weight[~keep] = 0
                if lin.bias is not None:
                    lin.bias[~keep] = 0
            pe_d = dense.model.rotary_emb(x, pos)
            _, w_dense = attn_d(hidden_states=x, position_embeddings=pe_d, attention_mask=mask)
            pe_p = model.model.rotary_emb(x, pos)
            _, w_pruned = model.model.layers[li].self_attn(x, position_embeddings=pe_p, attention_mask=mask)
        torch.testing.assert_close(w_pruned, w_dense[:, kept], atol=1e-12, rtol=0)


def test_uniform_layers_need_the_uniform_allocation() -> None:
    with pytest.raises(IntraSliceError, match="--allocation uniform"):
        PruneConfig(deploy="stock", layer_ratios=[(0.3, 0.3), (0.2, 0.4)]).validate(2)
    PruneConfig(deploy="stock", layer_ratios=[(0.0, 0.4)] * 2).validate(2)  # one pair for every layer: alike
    with pytest.raises(IntraSliceError, match="--method intraslice"):
        PruneConfig(method="channel", deploy="llamacpp").validate(2)
    cfg = PruneConfig(head_width=13)
    cfg.validate(2)
    assert cfg.head_width == 16  # a multiple of 8


def test_llamacpp_rounds_mlp_widths_to_q8_0_blocks() -> None:
    """--deploy llamacpp rounds MLP widths to 32 (whole Q8_0/Q4_0 blocks) unless told otherwise."""
    for deploy, given, want in (("llamacpp", None, 32), ("stock", None, 8), (None, None, 8), ("llamacpp", 256, 256)):
        cfg = PruneConfig(deploy=deploy, mlp_multiple=given)
        cfg.validate(2)
        assert cfg.mlp_multiple == want
    for bad in (0, -8, 2.5):
        with pytest.raises(IntraSliceError, match="--mlp-multiple must be a positive integer"):
            PruneConfig(mlp_multiple=bad).validate(2)


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_deploy_with_whole_attention_skips_the_dense_pass_and_keeps_it(arch: str, monkeypatch) -> None:
    """At attention ratio 0 in every layer (the default share 0) the unpruned attention meets
    every llama.cpp constraint, so ``--deploy llamacpp`` gives the unconstrained run's model
    bit for bit, without the dense statistics pass; a fixed narrower width still shrinks it."""
    from intraslice.arch import get_arch
    from intraslice.export.common import check_deployable
    from intraslice.methods import deploy

    calls = []
    real = deploy.dense_rope_statistics
    monkeypatch.setattr(deploy, "dense_rope_statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    ratios = [(0.0, 0.3)] * 3
    dense, model, result = pruned_pair(arch, layer_ratios=ratios, deploy="llamacpp")
    _, plain, _ = pruned_pair(arch, layer_ratios=ratios, mlp_multiple=32)
    assert not calls and result.method["constraints"]["attention_kept_whole"]
    get_arch(dense.config).prepare_model(dense)
    for a, b in zip(dense.model.layers, model.model.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(a.self_attn, name).weight, getattr(b.self_attn, name).weight)
    ids = calib_tokens(2, 24, seed=5)
    assert torch.equal(logits(model, ids), logits(plain, ids))
    h = dense.config.head_dim
    assert [s.head_dim for s in check_deployable(model.config, "gguf", uniform=False)] == [h] * 3
    assert all(s["head_dim"] == h and s["rope_pairs"][0] == list(range(h // 2)) for s in model.config.layers)
    _, narrow, narrow_result = pruned_pair(arch, layer_ratios=ratios, deploy="llamacpp", head_width=h // 2)
    assert calls and "attention_kept_whole" not in narrow_result.method["constraints"]
    assert all(s["head_dim"] == h // 2 for s in narrow.config.layers)


# -- stock export ----------------------------------------------------------------------------------

STOCK_CHILD = """
import sys, torch
sys.modules['intraslice'] = None  # the package cannot be imported
from transformers import AutoModelForCausalLM
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2
out_dir, data = sys.argv[1], sys.argv[2]
ids, ref = torch.load(data)
m = AutoModelForCausalLM.from_pretrained(out_dir)
assert type(m).__module__.startswith('transformers.models'), type(m).__module__
with torch.no_grad():
    plain = m(input_ids=ids).logits
err_plain = (plain - ref).abs().max().item()
# The stock RMSNorm computes in float32 even for float64 inputs; in float64 throughout the
# two models agree to rounding.
def norm64(self, x):
    var = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))
modeling_llama.LlamaRMSNorm.forward = norm64
modeling_qwen2.Qwen2RMSNorm.forward = norm64
with torch.no_grad():
    exact = m(input_ids=ids).logits
    gen_c = m.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
print(type(m).__name__, m.config.rope_parameters.get('rope_type'), err_plain, (exact - ref).abs().max().item())
print('GEN', gen_c[0].tolist())
"""


@pytest.mark.parametrize(
    ("arch", "width", "share"),
    [("llama-mha", 8, 1.0), ("llama-gqa", 8, 1.0), ("llama-gqa", None, 1.0), ("qwen2", 8, 1.0), ("qwen2", None, None)],
)
def test_stock_export_loads_without_intraslice_and_matches(
    arch: str, width: int | None, share: float | None, tmp_path: Path
) -> None:
    """Share 1 prunes the attention too (the shapes the export must express); no share is the
    default split, attention kept whole and every MLP alike."""
    from intraslice.export.stock_hf import export_stock_hf

    _, model, _ = pruned_pair(arch, ratio=0.3, deploy="stock", head_width=width, attention_share=share)
    whole = model.config.num_attention_heads * model.config.head_dim
    assert all((spec["num_heads"] * spec["head_dim"] == whole) == (share is None) for spec in model.config.layers)
    ids = calib_tokens(2, 40, seed=9)
    ref = logits(model, ids)
    src = save_pruned(model, build_tokenizer(tmp_path / "tok"), tmp_path / "pruned")
    out = export_stock_hf(src, tmp_path / "stock")
    assert not list(out.glob("*.py"))  # no remote code travels
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("qwen2" if arch == "qwen2" else "llama") and "auto_map" not in config
    assert config["head_dim"] == model.config.layers[0]["head_dim"]
    torch.save((ids, ref), tmp_path / "data.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_CHILD, str(out), str(tmp_path / "data.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    head, gen_line = proc.stdout.strip().splitlines()[-2:]
    cls, rope_type, err_plain, err_exact = head.split()
    assert cls == ("Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM")
    kept_all = model.config.layers[0]["rope_pairs"][0] == list(range(model.config.head_dim // 2))
    assert rope_type == ("default" if kept_all and width is None else "longrope")
    assert float(err_plain) < 1e-6 and float(err_exact) < 1e-10
    with torch.no_grad():
        gen = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert gen_line == "GEN " + str(gen[0].tolist())


def test_longrope_factors_reproduce_the_frequencies_exactly() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from intraslice.export.stock_hf import longrope_factors

    h, r, base = 64, 48, 100000.0
    src = 1.0 / (base ** (torch.arange(0, h, 2, dtype=torch.int64).float() / h))
    pairs = [0, 1, 2, 3, 5, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21, 22, 23, 24, 25, 27, 28, 29, 30, 31]
    f = longrope_factors(src[pairs], base, r)
    cfg = LlamaConfig(
        hidden_size=96,
        num_attention_heads=2,
        head_dim=r,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": base,
            "short_factor": f,
            "long_factor": f,
            "original_max_position_embeddings": 512,
        },
    )
    inv, scale = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu")
    # Exactly where a float32 factor gives it (23 of 24 here), else within one float32 ulp.
    assert scale == 1.0 and (inv == src[pairs]).sum() >= 20
    torch.testing.assert_close(inv, src[pairs], rtol=1.2e-7, atol=0)


# -- refusals --------------------------------------------------------------------------------------


def test_models_that_break_a_constraint_are_refused(capsys, tmp_path: Path) -> None:
    _, model, _ = pruned_pair("llama-gqa", ratio=0.6, min_head_width=0.5)
    src = save_pruned(model, None, tmp_path / "plain")
    code = main(["export", str(src), "--format", "stock-hf", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("intraslice: error:")]
    assert code == 2 and len(lines) == 1 and "--deploy stock" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "s").exists()
    code = main(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert code == 2 and "--deploy llamacpp" in err and not (tmp_path / "m.gguf").exists()
    # A llamacpp model has per-layer shapes: fine for GGUF, refused for the stock classes.
    _, model, _ = pruned_pair("llama-gqa", n_layers=3, ratio=0.3, deploy="llamacpp", head_width=8)
    src = save_pruned(model, None, tmp_path / "lcpp")
    if len({s["intermediate_size"] for s in model.config.layers}) > 1:
        code = main(["export", str(src), "--format", "stock-hf", "--out", str(tmp_path / "s2")])
        assert code == 2 and "--uniform-layers" in capsys.readouterr().err


# -- GGUF ------------------------------------------------------------------------------------------


def _llama_cpp() -> Path:
    from intraslice.export.gguf import find_llama_cpp

    try:
        return find_llama_cpp(download=False)
    except IntraSliceError as exc:
        pytest.skip(str(exc))


def _interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's row order for its RoPE: per head, dims (i, i + r/2) become rows (2i, 2i + 1)."""
    r = w.shape[0] // n_heads
    out = torch.empty_like(w)
    for a in range(n_heads):
        for i in range(r // 2):
            out[a * r + 2 * i] = w[a * r + i]
            out[a * r + 2 * i + 1] = w[a * r + i + r // 2]
    return out


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_gguf_export_structure(arch: str, tmp_path: Path) -> None:
    import gguf

    from intraslice.export.gguf import export_gguf

    root = _llama_cpp()
    _, model, _ = pruned_pair(arch, ratio=0.3, deploy="llamacpp", head_width=8)
    tok = build_tokenizer(tmp_path / "tok")
    tok.chat_template = "{% for m in messages %}<eos>{{ m['content'] }}{% endfor %}"
    src = save_pruned(model, tok, tmp_path / "pruned")
    cfg = model.config
    layers = cfg.layers
    path = export_gguf(src, tmp_path / "m.gguf", "f32", llama_cpp=root, tokenizer_pre="gpt2")
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [s["num_heads"] for s in layers]
    assert fields["deci.attention.head_count_kv"] == [s["num_kv_heads"] for s in layers]
    assert fields["deci.feed_forward_length"] == [s["intermediate_size"] for s in layers]
    assert fields["deci.attention.key_length"] == fields["deci.attention.value_length"] == 8
    assert fields["deci.rope.dimension_count"] == 8 and fields["deci.block_count"] == len(layers)
    assert fields["tokenizer.chat_template"] == tok.chat_template  # carried from the source
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size  # the vocabulary, padded to the embedding rows
    tensors = {t.name: t for t in reader.tensors}
    d = cfg.hidden_size
    for li, s in enumerate(layers):
        n, kv, r, m = s["num_heads"], s["num_kv_heads"], s["head_dim"], s["intermediate_size"]
        assert tensors[f"blk.{li}.attn_q.weight"].shape.tolist() == [d, n * r]
        assert tensors[f"blk.{li}.attn_k.weight"].shape.tolist() == [d, kv * r]
        assert tensors[f"blk.{li}.attn_v.weight"].shape.tolist() == [d, kv * r]
        assert tensors[f"blk.{li}.attn_output.weight"].shape.tolist() == [n * r, d]
        assert tensors[f"blk.{li}.ffn_down.weight"].shape.tolist() == [m, d]
        attn = model.model.layers[li].self_attn
        q = torch.from_numpy(tensors[f"blk.{li}.attn_q.weight"].data.copy()).reshape(n * r, d)
        k = torch.from_numpy(tensors[f"blk.{li}.attn_k.weight"].data.copy()).reshape(kv * r, d)
        torch.testing.assert_close(q.double(), _interleave(attn.q_proj.weight, n).float().double())
        torch.testing.assert_close(k.double(), _interleave(attn.k_proj.weight, kv).float().double())
        assert (f"blk.{li}.attn_q.bias" in tensors) == (arch == "qwen2")
    # rope_freqs: base^(-2i/r) / factor_i is the source frequency of kept pair i.
    pairs = layers[0]["rope_pairs"][0]
    factors = torch.from_numpy(tensors["rope_freqs.weight"].data.copy()).double()
    base = cfg.rope_parameters["rope_theta"]
    src_freq = 1.0 / base ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    got = base ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8) / factors
    torch.testing.assert_close(got, src_freq[pairs], rtol=1e-6, atol=0)
    # Run as llama.cpp's deci graph runs it (independent float64 code), the f32 file gives the
    # pruned model's logits to float32 rounding of the stored weights.
    ids = calib_tokens(1, 24, seed=11)
    torch.testing.assert_close(deci_reference_logits(path, ids[0]), logits(model, ids)[0], atol=2e-5, rtol=1e-5)
    # f16 and Q8_0 through llama.cpp's own quantization (one architecture is enough).
    for kind, qtype in (("f16", "F16"), ("q8_0", "Q8_0")) if arch == "qwen2" else ():
        p = export_gguf(src, tmp_path / f"m-{kind}.gguf", kind, llama_cpp=root, tokenizer_pre="gpt2")
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(p).tensors}
        assert types["blk.0.attn_q.weight"] == qtype and types["blk.0.attn_norm.weight"] == "F32"
        # --deploy llamacpp keeps MLP widths whole Q8_0 blocks (32): no down_proj falls back to f16
        assert all(s["intermediate_size"] % 32 == 0 for s in layers)
        assert all(types[f"blk.{li}.ffn_down.weight"] == qtype for li in range(len(layers)))


def test_cli_prune_deploy_stock_export(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    """``prune --deploy stock --export stock-hf``: the stock directory lands inside the output."""
    from transformers import AutoModelForCausalLM

    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. Pruning makes models smaller.\n\n" * 80)
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tiny_model_dir), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32"]
    argv += ["--out", str(out), "--no-progress", "--no-eval", "--device", "cpu", "--ratio", "0.3"]
    code = main([*argv, "--deploy", "stock", "--export", "stock-hf", "--min-head-width", "0.5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "intraslice.json").read_text())
    assert report["allocation"]["mode"] == "uniform" and report["method"]["constraints"]["uniform_layers"]
    # the default split: every layer keeps its whole attention and loses the same MLP share
    assert report["allocation"]["attention_share"] == 0 and report["method"]["constraints"]["attention_kept_whole"]
    stock = AutoModelForCausalLM.from_pretrained(out / "stock-hf")
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert type(stock).__name__ == "LlamaForCausalLM"
    ids = calib_tokens(1, 16, seed=2)
    torch.testing.assert_close(logits(stock, ids), logits(pruned, ids), atol=1e-5, rtol=0)
    # --export without the deploy constraints is refused before any work.
    code = main([*argv[:-1], "0.3", "--export", "stock-hf", "--overwrite"])
    assert code == 2 and "--deploy stock" in capsys.readouterr().err


def deci_reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a ``deci`` GGUF computed as llama.cpp's graph does (``src/models/deci.cpp``),
    written independently in float64 from the file alone: per-layer head counts, RMSNorm,
    RoPE of type NORM (adjacent dims (2i, 2i+1) rotate by p * base^(-2i/n_rot) / rope_freqs[i]),
    query head j reading KV head j // (n_head / n_head_kv), scale 1/sqrt(head dim), SwiGLU."""
    import gguf

    reader = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in reader.fields.items()}
    t = {x.name: torch.from_numpy(x.data.copy()).double() for x in reader.tensors}
    eps, base, r = f["deci.attention.layer_norm_rms_epsilon"], f["deci.rope.freq_base"], f["deci.rope.dimension_count"]
    factors = t.get("rope_freqs.weight", torch.ones(r // 2))

    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x: torch.Tensor) -> torch.Tensor:  # (T, heads, r)
        pos = torch.arange(x.shape[0], dtype=torch.float64)[:, None]
        theta = pos * base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r) / factors
        c, s = theta.cos()[:, None], theta.sin()[:, None]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * c - x1 * s, x0 * s + x1 * c
        return out

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ t[f"{name}.weight"].T
        return y + t[f"{name}.bias"] if f"{name}.bias" in t else y

    x = t["token_embd.weight"][ids]
    n_t = ids.shape[0]
    causal = torch.ones(n_t, n_t, dtype=torch.bool).tril()
    for li, (n, kv) in enumerate(zip(f["deci.attention.head_count"], f["deci.attention.head_count_kv"], strict=True)):
        p = f"blk.{li}"
        h = norm(x, t[f"{p}.attn_norm.weight"])
        q = rope(lin(h, f"{p}.attn_q").view(n_t, n, r))
        k = rope(lin(h, f"{p}.attn_k").view(n_t, kv, r))
        v = lin(h, f"{p}.attn_v").view(n_t, kv, r)
        kq = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(n // kv, dim=1)) / r**0.5
        att = kq.masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", att, v.repeat_interleave(n // kv, dim=1)).reshape(n_t, n * r)
        x = x + lin(o, f"{p}.attn_output")
        h = norm(x, t[f"{p}.ffn_norm.weight"])
        x = x + lin(torch.nn.functional.silu(lin(h, f"{p}.ffn_gate")) * lin(h, f"{p}.ffn_up"), f"{p}.ffn_down")
    out = t.get("output.weight", t["token_embd.weight"])
    return norm(x, t["output_norm.weight"]) @ out.T
