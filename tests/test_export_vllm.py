"""The vLLM export (``--format vllm``, ``DeciLMForCausalLM`` / ``nemotron-nas``; issue #34 item 4).

vLLM is not installed here (its wheels are CUDA builds): what vLLM would do with the written
directory is recomputed in this file from ``config.json`` alone, independently of the writer,
following the code of **vLLM 0.34.0** (read from its wheel):

* ``vllm/model_executor/models/nemotron_nas.py``: ``DeciLMDecoderLayer.__init__`` (per-layer
  KV heads ``num_attention_heads // block.attention.n_heads_in_group``, the MLP width
  ``_ffn_mult_to_intermediate_size`` (round ``int(2 * ffn_mult * hidden / 3)`` up to a
  multiple of 256) when the block has ``ffn_mult``, else ``ffn.intermediate_size``; biases
  from ``attention_bias`` / ``bias`` / ``qkv_bias`` / ``mlp_bias``), ``DeciModel.load_weights``
  (q/k/v stacked into ``qkv_proj``, gate/up into ``gate_up_proj``), ``DeciLMForCausalLM``
  (``lm_head`` tied to the embedding, its checkpoint tensor skipped, when
  ``tie_word_embeddings``);
* ``vllm/model_executor/models/llama.py``: ``LlamaAttention.__init__`` (``head_dim`` from the
  config or hidden / heads, scale ``head_dim ** -0.5``), ``LlamaMLP`` (SiLU and multiply);
* ``vllm/model_executor/layers/linear.py``: ``QKVParallelLinear`` output sizes (tp = 1);
* ``vllm/model_executor/layers/rotary_embedding``: ``get_rope`` (default and ``longrope``),
  ``RotaryEmbedding._compute_inv_freq`` / ``_compute_cos_sin_cache`` (float32 tables),
  ``Phi3LongRoPEScaledRotaryEmbedding._compute_inv_freq`` (1 / (factor * base^(2i/r)),
  cos/sin times ``short_mscale``), neox (rotate-half) style.

The config class the directory carries is loaded as vLLM loads it (``AutoConfig`` with
``trust_remote_code``, then ``standardize_rope_params`` and ``validate_rope`` as vLLM's
``patch_rope_parameters`` calls them) and read by attribute, as vLLM's layer code reads it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from intraslice import IntraSliceError, PruneConfig, prune, save_pruned
from intraslice.cli import main

from .conftest import COMMON, build_tokenizer, calib_tokens, make_tiny

torch.set_num_threads(1)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def make_yarn(n_layers: int) -> torch.nn.Module:
    """A tiny float64 Llama whose yarn RoPE scales cos/sin (attention factor 1 + 0.1 ln 2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 128}
    cfg = LlamaConfig(
        **{**COMMON, "num_hidden_layers": n_layers},
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters=rope,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def pruned(arch: str, n_layers: int = 3, **cfg: object) -> torch.nn.Module:
    model = make_yarn(n_layers) if arch == "llama-yarn" else make_tiny(arch, n_layers=n_layers)
    return prune(model, calib_tokens(), PruneConfig(**cfg), progress=False).model


# -- what vLLM 0.34.0 builds from config.json (independent of the writer) --------------------------


def vllm_layers(cfg: dict) -> list[dict]:
    """Per layer, as ``DeciLMDecoderLayer.__init__`` and ``LlamaAttention.__init__`` compute them."""
    n = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n
    o_bias = bool(cfg.get("attention_bias", False) or cfg.get("bias", False))
    qkv_bias = bool(cfg["qkv_bias"]) if "qkv_bias" in cfg else o_bias
    out = []
    for block in cfg["block_configs"]:
        att, ffn = block["attention"], block["ffn"]
        layer: dict = {"attention": None, "ffn": None}
        if not att.get("no_op", False):
            layer["attention"] = dict(
                n=n, kv=n // att["n_heads_in_group"], r=head_dim, qkv_bias=qkv_bias, o_bias=o_bias
            )
        if not ffn.get("no_op", False):
            if "ffn_mult" in ffn:  # _ffn_mult_to_intermediate_size, _find_multiple(..., 256)
                m = int(2 * ffn["ffn_mult"] * cfg["hidden_size"] / 3)
                m = m if m % 256 == 0 else m + 256 - m % 256
            else:
                m = ffn["intermediate_size"]
            layer["ffn"] = dict(m=m, act=ffn.get("hidden_act", cfg["hidden_act"]), bias=bool(cfg.get("mlp_bias")))
        out.append(layer)
    return out


def vllm_parameters(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter ``DeciLMForCausalLM`` allocates (tp = 1; the embedding rows before vLLM's
    padding to 64, which its loader fills from exactly ``vocab_size`` checkpoint rows)."""
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for li, layer in enumerate(vllm_layers(cfg)):
        p = f"model.layers.{li}"
        if (a := layer["attention"]) is not None:
            shapes[f"{p}.input_layernorm.weight"] = (d,)
            rows = (a["n"] + 2 * a["kv"]) * a["r"]  # QKVParallelLinear.output_sizes
            shapes[f"{p}.self_attn.qkv_proj.weight"] = (rows, d)
            if a["qkv_bias"]:
                shapes[f"{p}.self_attn.qkv_proj.bias"] = (rows,)
            shapes[f"{p}.self_attn.o_proj.weight"] = (d, a["n"] * a["r"])
            if a["o_bias"]:
                shapes[f"{p}.self_attn.o_proj.bias"] = (d,)
        if (f := layer["ffn"]) is not None:
            shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
            shapes[f"{p}.mlp.gate_up_proj.weight"] = (2 * f["m"], d)
            shapes[f"{p}.mlp.down_proj.weight"] = (d, f["m"])
            if f["bias"]:
                shapes[f"{p}.mlp.gate_up_proj.bias"] = (2 * f["m"],)
                shapes[f"{p}.mlp.down_proj.bias"] = (d,)
    return shapes


STACKED = {".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v")}
STACKED |= {".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)}


def check_loads(cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Load the checkpoint tensors into the parameters above as ``DeciModel.load_weights`` maps
    them: every shard the size its weight loader copies, every parameter filled, nothing left over."""
    params = vllm_parameters(cfg)
    layers = vllm_layers(cfg)
    filled: dict[str, int] = {}
    for name, t in tensors.items():
        if name.startswith("lm_head.") and cfg["tie_word_embeddings"]:
            continue  # AutoWeightsLoader(skip_prefixes=["lm_head."])
        for shard_name, (param_name, shard) in STACKED.items():
            if shard_name in name:
                target = name.replace(shard_name, param_name)
                li = int(name.split(".")[2])
                if shard in ("q", "k", "v"):
                    a = layers[li]["attention"]
                    size = (a["n"] if shard == "q" else a["kv"]) * a["r"]
                else:
                    size = layers[li]["ffn"]["m"]
                assert target in params, name
                assert t.shape[0] == size and t.shape[1:] == params[target][1:], (name, tuple(t.shape), size)
                filled[target] = filled.get(target, 0) + size
                break
        else:
            assert name in params, f"vLLM has no parameter for {name}"
            assert tuple(t.shape) == params[name], (name, tuple(t.shape), params[name])
            filled[name] = params[name][0]
    assert set(filled) == set(params), set(params) ^ set(filled)
    assert all(filled[k] == params[k][0] for k in params), "a stacked parameter is not filled exactly"


def vllm_inv_freq(rope: dict, r: int, max_position: int) -> tuple[torch.Tensor, float]:
    """float32 inverse frequencies and the cos/sin scale of vLLM's ``get_rope`` for these parameters
    (``max_position``: the config's ``max_position_embeddings``, as ``LlamaAttention`` passes it)."""
    base = rope.get("rope_theta", 10000)
    exps = torch.arange(0, r, 2, dtype=torch.float) / r
    if rope.get("rope_type", "default") == "default":
        return 1.0 / (base**exps), 1.0
    assert rope["rope_type"] == "longrope"
    factors = torch.tensor(rope["short_factor"], dtype=torch.float32)
    assert rope["short_factor"] == rope["long_factor"]  # vLLM's short/long switch cannot matter
    inv = 1.0 / (factors * (base**exps))
    scale = rope.get("short_mscale")
    if scale is None:  # Phi3LongRoPEScaledRotaryEmbedding's default mscale
        original = rope["original_max_position_embeddings"]
        ratio = max_position / original
        scale = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(original))
    return inv, float(scale)


def vllm_reference_logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    """DeciLM's forward in float64 from the directory alone, one sequence ``ids`` (T,)."""
    cfg = json.loads((out / "config.json").read_text())
    t = {k: v.double() for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    eps = cfg["rms_norm_eps"]
    rope = cfg["rope_parameters"]
    n_t = ids.shape[0]

    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ t[f"{name}.weight"].T
        return y + t[f"{name}.bias"] if f"{name}.bias" in t else y

    x = t["model.embed_tokens.weight"][ids]
    causal = torch.ones(n_t, n_t, dtype=torch.bool).tril()
    for li, layer in enumerate(vllm_layers(cfg)):
        p = f"model.layers.{li}"
        if (a := layer["attention"]) is not None:
            n, kv, r = a["n"], a["kv"], a["r"]
            inv, scale = vllm_inv_freq(rope, r, cfg["max_position_embeddings"])
            freqs = torch.einsum("i,j->ij", torch.arange(n_t, dtype=torch.float), inv)  # the float32 cache
            cos, sin = (freqs.cos() * scale).double(), (freqs.sin() * scale).double()
            cos, sin = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]

            def rot(z: torch.Tensor, cos: torch.Tensor = cos, sin: torch.Tensor = sin) -> torch.Tensor:
                half = z.shape[-1] // 2
                return z * cos + torch.cat((-z[..., half:], z[..., :half]), -1) * sin  # rotate_neox

            h = norm(x, t[f"{p}.input_layernorm.weight"])
            q = rot(lin(h, f"{p}.self_attn.q_proj").view(n_t, n, r))
            k = rot(lin(h, f"{p}.self_attn.k_proj").view(n_t, kv, r))
            v = lin(h, f"{p}.self_attn.v_proj").view(n_t, kv, r)
            group = n // kv  # query head j reads KV head j // group
            s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(group, dim=1)) * r**-0.5
            w = s.masked_fill(~causal, float("-inf")).softmax(-1)
            o = torch.einsum("hqk,khd->qhd", w, v.repeat_interleave(group, dim=1)).reshape(n_t, n * r)
            x = x + lin(o, f"{p}.self_attn.o_proj")
        if (f := layer["ffn"]) is not None:
            assert f["act"] == "silu"
            h = norm(x, t[f"{p}.post_attention_layernorm.weight"])
            x = x + lin(
                torch.nn.functional.silu(lin(h, f"{p}.mlp.gate_proj")) * lin(h, f"{p}.mlp.up_proj"),
                f"{p}.mlp.down_proj",
            )
    x = norm(x, t["model.norm.weight"])
    head = t["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else t["lm_head.weight"]
    return x @ head.T


def load_as_vllm_does(out: Path) -> object:
    """The directory's config through ``AutoConfig`` with remote code, then vLLM's RoPE patching."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    config.standardize_rope_params()
    config.validate_rope()
    return config


def check_export(model: torch.nn.Module, src: Path, out: Path) -> dict:
    from intraslice.export.vllm import export_vllm

    export_vllm(src, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert {"tokenizer.json", "tokenizer_config.json", "configuration_decilm.py"} <= {p.name for p in out.iterdir()}
    assert not (out / "modeling_intraslice.py").exists() and not (out / "intraslice.json").exists()
    tensors = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    check_loads(cfg, tensors)
    # The config object vLLM gets: the same per-layer numbers, read by attribute as vLLM reads them.
    config = load_as_vllm_does(out)
    assert type(config).__module__.startswith("transformers_modules")
    for block, layer in zip(config.block_configs, vllm_layers(cfg), strict=True):
        assert not block.attention.no_op and not block.ffn.no_op and not hasattr(block.ffn, "ffn_mult")
        assert config.num_attention_heads // block.attention.n_heads_in_group == layer["attention"]["kv"]
        assert block.ffn.intermediate_size == layer["ffn"]["m"]
    assert config.rope_parameters == cfg["rope_parameters"]
    # Against the pruned model: per layer the shapes it has, and its logits.
    for spec, layer in zip(model.config.layers, vllm_layers(cfg), strict=True):
        a, f = layer["attention"], layer["ffn"]
        assert (spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]) == (a["n"], a["kv"], a["r"])
        assert spec["intermediate_size"] == f["m"]
    ids = calib_tokens(2, 40, seed=9)
    ref = logits(model, ids)
    for b in range(ids.shape[0]):
        torch.testing.assert_close(vllm_reference_logits(out, ids[b]), ref[b], atol=1e-9, rtol=1e-9)
    return cfg


@pytest.mark.parametrize(
    ("arch", "options"), [("llama-gqa", {}), ("qwen2", {"head_width": 8}), ("llama-yarn", {"head_width": 8})]
)
def test_vllm_export_shapes_and_logits(arch: str, options: dict, tmp_path: Path) -> None:
    """``--deploy vllm``: every layer keeps its whole attention (one query-head count), the MLP
    widths differ per layer and travel exactly; a narrower common width keeps a subset of the
    RoPE pairs, which travels as longrope factors reproducing the source frequencies (and a
    yarn source's cos/sin factor as the mscale)."""
    model = pruned(arch, ratio=0.3, deploy="vllm", **options)
    layers = model.config.layers
    assert len({s["num_heads"] for s in layers}) == 1
    src = save_pruned(model, build_tokenizer(tmp_path / "tok"), tmp_path / "pruned")
    cfg = check_export(model, src, tmp_path / "vllm")
    assert len({b["ffn"]["intermediate_size"] for b in cfg["block_configs"]}) > 1  # per-layer widths kept
    assert cfg["tie_word_embeddings"] == (arch == "llama-gqa") and cfg["qkv_bias"] == (arch == "qwen2")
    if options:  # the kept pairs' source frequencies and cos/sin scale, as vLLM computes them
        r = cfg["head_dim"]
        inv, scale = vllm_inv_freq(cfg["rope_parameters"], r, cfg["max_position_embeddings"])
        source = model.model.rotary_emb
        pairs = layers[0]["rope_pairs"][0]
        assert pairs != list(range(r // 2)) and scale == source.attention_scaling
        assert (scale != 1.0) == (arch == "llama-yarn")
        torch.testing.assert_close(inv, source.inv_freq[pairs], rtol=1.2e-7, atol=0)
    assert cfg["rope_parameters"]["rope_type"] == ("longrope" if options else "default")


def test_vllm_export_per_layer_kv_heads(tmp_path: Path) -> None:
    """Per-layer KV heads (``n_heads_in_group`` differing by layer): a pruned model whose layer 1
    gives every query head its own copy of its KV head (6 KV heads, groups of 1) computes the
    same function, and vLLM's layout must carry the two layers' different KV counts."""
    from transformers import AutoModelForCausalLM

    model = pruned("llama-gqa", ratio=0.3, deploy="vllm")
    src = save_pruned(model, build_tokenizer(tmp_path / "tok"), tmp_path / "pruned")
    spec = model.config.layers[1]
    n, kv, r = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
    assert kv < n
    weights = load_file(src / "model.safetensors")
    for name in ("k_proj", "v_proj"):
        key = f"model.layers.1.self_attn.{name}.weight"
        weights[key] = weights[key].view(kv, r, -1).repeat_interleave(n // kv, dim=0).reshape(n * r, -1).contiguous()
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((src / "config.json").read_text())
    raw["layers"][1].update(num_kv_heads=n, kv_index=list(range(n)), rope_pairs=[spec["rope_pairs"][0]] * n)
    (src / "config.json").write_text(json.dumps(raw))
    expanded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64).eval()
    ids = calib_tokens(1, 24, seed=4)
    torch.testing.assert_close(logits(expanded, ids), logits(model, ids), atol=1e-10, rtol=0)
    cfg = check_export(expanded, src, tmp_path / "vllm")
    groups = [b["attention"]["n_heads_in_group"] for b in cfg["block_configs"]]
    assert groups == [n // kv, 1, n // kv]


# -- what vLLM cannot express ---------------------------------------------------------------------


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [ln for ln in err.strip().splitlines() if ln.startswith("intraslice: error:")]


def test_unequal_query_heads_are_refused_in_one_line(capsys, tmp_path: Path) -> None:
    """A llama.cpp model whose layers keep different numbers of query heads: exit 2, one line
    naming the option that fits, nothing written."""
    model = pruned("llama-gqa", layer_ratios=[(0.0, 0.3), (0.5, 0.3), (0.0, 0.3)], deploy="llamacpp")
    assert len({s["num_heads"] for s in model.config.layers}) > 1
    src = save_pruned(model, None, tmp_path / "pruned")
    out = tmp_path / "vllm"
    code = main(["export", str(src), "--format", "vllm", "--out", str(out)])
    lines = error_lines(capsys)
    assert code == 2 and len(lines) == 1 and "query heads" in lines[0] and "--deploy vllm" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".vllm*"))


def test_moving_rope_is_refused_and_existing_output_kept(capsys, tmp_path: Path) -> None:
    """Kept pairs of a RoPE whose frequencies change with the sequence length have no fixed
    factors: refused in one line; an existing output is not replaced without --overwrite."""
    model = pruned("llama-gqa", ratio=0.3, deploy="vllm", head_width=8)
    src = save_pruned(model, None, tmp_path / "pruned")
    out = tmp_path / "vllm"
    assert main(["export", str(src), "--format", "vllm", "--out", str(out)]) == 0
    capsys.readouterr()
    code = main(["export", str(src), "--format", "vllm", "--out", str(out)])
    assert code == 2 and "--overwrite" in error_lines(capsys)[0]
    raw = json.loads((src / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    (src / "config.json").write_text(json.dumps(raw))
    moved = tmp_path / "vllm2"
    code = main(["export", str(src), "--format", "vllm", "--out", str(moved)])
    lines = error_lines(capsys)
    assert code == 2 and len(lines) == 1 and "'dynamic'" in lines[0] and not moved.exists()


def test_deploy_vllm_keeps_attention_whole_or_refuses() -> None:
    cfg = PruneConfig(deploy="vllm")
    cfg.validate(2)
    assert cfg.attention_share == 0 and cfg.rope_selection == "global" and cfg.equal_kv_groups
    for bad in (dict(attention_share=0.5), dict(attention_share="auto"), dict(mlp_bias=1.0)):
        with pytest.raises(IntraSliceError, match="--uniform-layers"):
            PruneConfig(deploy="vllm", **bad).validate(2)
    with pytest.raises(IntraSliceError, match="attention of layer 1"):
        PruneConfig(deploy="vllm", layer_ratios=[(0.0, 0.3), (0.2, 0.3)]).validate(2)
    PruneConfig(deploy="vllm", layer_ratios=[(0.0, 0.3), (0.0, 0.5)]).validate(2)
    alike = PruneConfig(deploy="vllm", uniform_layers=True, attention_share=1.0)
    alike.validate(2)  # every layer alike: one query-head count whatever the attention loses
    assert alike.attention_share == 1.0


def test_cli_prune_deploy_vllm_export(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    """``prune --deploy vllm --export vllm`` writes OUT/vllm; ``--export vllm`` without the
    deploy constraints is refused before any work."""
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. Pruning makes models smaller.\n\n" * 80)
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tiny_model_dir), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32"]
    argv += ["--out", str(out), "--no-progress", "--no-eval", "--device", "cpu", "--ratio", "0.3"]
    code = main([*argv, "--deploy", "vllm", "--export", "vllm"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "intraslice.json").read_text())
    assert report["method"]["constraints"]["attention_kept_whole"]
    cfg = json.loads((out / "vllm" / "config.json").read_text())
    check_loads(cfg, {k: v for k, v in load_file(out / "vllm" / "model.safetensors").items()})
    assert load_as_vllm_does(out / "vllm").num_attention_heads == cfg["num_attention_heads"]
    code = main([*argv, "--export", "vllm", "--overwrite"])
    assert code == 2 and "--deploy vllm" in error_lines(capsys)[0]
