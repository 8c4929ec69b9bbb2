"""Serving memory (issue #35 item 1): the KV cache per token and weights plus KV at a context and batch.

The arithmetic of :mod:`intraslice.kvcache` (read from configs) is checked against counts it
does not make: the k_proj/v_proj weight shapes of the models themselves, the K/V tensors of
the exported GGUF, and the K and V cache sizes llama.cpp's server logs when it allocates them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from intraslice import IntraSliceError, PruneConfig, prune, save_pruned
from intraslice.kvcache import (
    bytes_per_value,
    compare_serving_memory,
    count_params,
    describe,
    kv_bytes_per_token,
    kv_layer_widths,
    serving_memory,
)

from .conftest import build_tokenizer, calib_tokens, make_tiny
from .test_engine import argv, run_cli
from .test_errors_and_cli import assert_user_error

#: Attention ratios past the common width's 0.5 delete whole heads (and KV heads).
LAYER_RATIOS = [(0.5, 0.2), (0.75, 0.5), (0.875, 0.35)]


def pruned_pair(arch: str, **options: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = make_tiny(arch, n_layers=3)
    cfg = PruneConfig(ratio=0.35, layer_ratios=LAYER_RATIOS, **options)
    return dense, prune(copy.deepcopy(dense), calib_tokens(), cfg, progress=False).model


def kv_rows(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Per layer, the output rows of k_proj and v_proj: what one token writes to K and V."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    n_layers = model.config.num_hidden_layers
    return [
        (shapes[f"model.layers.{i}.self_attn.k_proj.weight"][0], shapes[f"model.layers.{i}.self_attn.v_proj.weight"][0])
        for i in range(n_layers)
    ]


@pytest.mark.parametrize("arch", ["llama-mha", "llama-gqa", "qwen2"])
@pytest.mark.parametrize("deploy", [None, "llamacpp"])
def test_kv_arithmetic_is_the_projection_shapes(arch: str, deploy: str | None) -> None:
    dense, pruned = pruned_pair(arch, deploy=deploy, head_width=8 if deploy else None)
    kv = [s["num_kv_heads"] for s in pruned.config.layers]
    assert min(kv) < dense.config.num_key_value_heads, kv  # KV heads were deleted
    for model in (dense, pruned):
        rows = kv_rows(model)
        assert kv_layer_widths(model.config) == rows
        assert kv_layer_widths(model.config.to_dict()) == rows  # config.json as read back
        params = sum(p.numel() for p in model.parameters())
        assert count_params(model.config) == params
        for dtype, size in (("f16", 2), ("bf16", 2), ("f32", 4), ("q8_0", 34 / 32)):
            per_token = sum(k + v for k, v in rows) * size
            assert kv_bytes_per_token(model.config, dtype) == per_token
            mem = serving_memory(model.config, context=300, batch=3, dtype=dtype)
            assert mem["kv_bytes"] == per_token * 300 * 3
            assert mem["weights_bytes"] == params * size
            assert mem["total_bytes"] == mem["weights_bytes"] + mem["kv_bytes"]
    rec = compare_serving_memory(dense.config, pruned.config, 300, 3, "f16")
    d, p = sum(map(sum, kv_rows(dense))), sum(map(sum, kv_rows(pruned)))
    assert rec["reduction"]["kv_per_token"] == pytest.approx(1 - p / d)
    assert rec["pruned"]["kv_bytes_per_token"] < rec["dense"]["kv_bytes_per_token"]


def test_documented_numbers_and_types() -> None:
    import gguf
    from transformers import LlamaConfig

    # q8_0 as llama.cpp stores it: its block of 32 values takes 34 bytes (gguf-py's own table)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    assert bytes_per_value("q8_0") == size / block
    # Llama-2-7B (MHA): 512 KiB of f16 K and V per token, 32 GiB at 4096 tokens x 16
    llama2 = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, intermediate_size=11008)
    mem = serving_memory(llama2, 4096, 16, "f16", params=6_738_415_616)
    assert mem["kv_bytes_per_token"] == 512 * 2**10 and mem["kv_bytes"] == 32 * 2**30
    with pytest.raises(IntraSliceError, match="serving dtype"):
        bytes_per_value("q4_k")
    with pytest.raises(IntraSliceError, match=">= 1"):
        serving_memory(llama2, 0, 1, params=1)
    line = describe(compare_serving_memory(llama2, llama2, 4096, 16, "f16", 6_738_415_616, 6_738_415_616))
    assert line == (
        "KV cache: 512 KiB/token dense -> 512 KiB/token pruned (+0%); "
        "weights + KV at 4096 tokens x batch 16 (f16): 44.6 GiB -> 44.6 GiB (+0%)"
    )


# -- llama.cpp -------------------------------------------------------------------------------------


def _llama_cpp() -> Path:
    from intraslice.export.gguf import find_llama_cpp

    try:
        return find_llama_cpp()
    except IntraSliceError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """arch -> (dense, its GGUF, pruned, its GGUF): the source by llama.cpp's converter, the pruned
    as ``deci`` (each converted once for the module: a converter child takes about 10 s)."""
    from intraslice.export.gguf import export_gguf, export_source_gguf

    done: dict[str, tuple[torch.nn.Module, Path, torch.nn.Module, Path]] = {}

    def get(arch: str) -> tuple[torch.nn.Module, Path, torch.nn.Module, Path]:
        if arch not in done:
            root = _llama_cpp()
            tmp = tmp_path_factory.mktemp(f"gguf-{arch}")
            dense, pruned = pruned_pair(arch, deploy="llamacpp", head_width=8)
            pruned.config.max_position_embeddings = dense.config.max_position_embeddings = 2**16  # server contexts
            tok = build_tokenizer(tmp / "tok")
            src = save_pruned(pruned, tok, tmp / "pruned")
            dense.save_pretrained(tmp / "dense")
            tok.save_pretrained(tmp / "dense")
            path = export_gguf(src, tmp / "pruned.gguf", "f32", llama_cpp=root, tokenizer_pre="gpt-2")
            dense_path = export_source_gguf(
                tmp / "dense", tmp / "dense.gguf", "f32", llama_cpp=root, tokenizer_pre="gpt-2"
            )
            done[arch] = (dense, dense_path, pruned, path)
        return done[arch]

    return get


@pytest.mark.parametrize("arch", ["llama-mha", "llama-gqa"])
def test_kv_arithmetic_is_the_gguf_tensors(arch: str, exported: Any) -> None:
    """llama.cpp allocates K and V per token as the output rows of blk.N.attn_k / attn_v."""
    import gguf

    dense, dense_path, pruned, path = exported(arch)
    for model, file in ((dense, dense_path), (pruned, path)):
        tensors = {t.name: t for t in gguf.GGUFReader(file).tensors}
        n = model.config.num_hidden_layers
        rows = [
            (int(tensors[f"blk.{i}.attn_k.weight"].shape[1]), int(tensors[f"blk.{i}.attn_v.weight"].shape[1]))
            for i in range(n)
        ]
        assert kv_layer_widths(json.loads(json.dumps(model.config.to_dict()))) == rows


def _kv_cache_log(path: Path, n_ctx: int, parallel: int, cache_type: str) -> tuple[float, float]:
    """(K MiB, V MiB) of llama.cpp's ``llama_kv_cache: size = ...`` line for this server setting."""
    from intraslice.serve.llamacpp import server_allocation

    got = server_allocation(path, n_ctx, parallel, cache_type)
    return got["k_mib"], got["v_mib"]


def test_kv_bytes_are_what_llamacpp_allocates(exported: Any, tmp_path: Path) -> None:
    """The server's own K and V cache sizes at n_ctx = context x batch over batch slots (MHA,
    KV heads deleted), in f16 and f32: to the 0.01 MiB its log prints."""
    pytest.importorskip("xllamacpp", reason="needs the serve extra: pip install 'intraslice[serve]'")
    dense, dense_path, pruned, path = exported("llama-mha")
    context, batch = 8192, 4
    for model, file in ((dense, dense_path), (pruned, path)):
        widths = kv_layer_widths(model.config)
        for dtype in ("f16", "f32"):
            k_mib, v_mib = _kv_cache_log(file, context * batch, batch, dtype)
            size = bytes_per_value(dtype) * context * batch / 2**20
            assert k_mib == pytest.approx(sum(k for k, _ in widths) * size, abs=0.006), (dtype, widths)
            assert v_mib == pytest.approx(sum(v for _, v in widths) * size, abs=0.006), (dtype, widths)
            mem = serving_memory(model.config, context, batch, dtype)
            assert mem["kv_bytes"] / 2**20 == pytest.approx(k_mib + v_mib, abs=0.012)


# -- the prune CLI ---------------------------------------------------------------------------------


def test_prune_reports_serving_memory(
    model_dir: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    extra = ("--allocation", "uniform", "--ratio", "0.6", "--context", "1024", "--batch", "4", "--serving-dtype", "f32")
    code, stdout, err = run_cli(capsys, argv(model_dir, calib, out, *extra))
    assert code == 0, err
    report = json.loads((out / "intraslice.json").read_text())
    rec = report["serving_memory"]
    assert (rec["context"], rec["batch"], rec["dtype"], rec["bytes_per_value"]) == (1024, 4, "f32", 4.0)
    # independent counts: the source's and the saved pruned weights' k_proj / v_proj rows
    source = AutoModelForCausalLM.from_pretrained(model_dir)
    dense_values = sum(map(sum, kv_rows(source)))
    pruned_values = 0
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                if name.endswith(("k_proj.weight", "v_proj.weight")):
                    pruned_values += f.get_slice(name).get_shape()[0]
    assert 0 < pruned_values < dense_values
    assert rec["dense"]["kv_bytes_per_token"] == dense_values * 4
    assert rec["pruned"]["kv_bytes_per_token"] == pruned_values * 4
    assert rec["pruned"]["kv_bytes"] == pruned_values * 4 * 1024 * 4
    assert rec["dense"]["weights_bytes"] == sum(p.numel() for p in source.parameters()) * 4
    assert rec["pruned"]["weights_bytes"] == report["params_after"]["whole_model"] * 4
    line = describe(rec)
    assert line.startswith("KV cache: ") and "weights + KV at 1024 tokens x batch 4 (f32)" in line
    assert line in stdout.splitlines()
    assert "context = 1024" in (out / "run_config.toml").read_text()
    # a bad setting is one line, before any work
    code, _, err = run_cli(capsys, argv(model_dir, calib, tmp_path / "bad", "--context", "0"))
    assert_user_error(code, err, "--context")


def test_the_plot_has_the_serving_panel(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from intraslice.report import plot_allocation

    dense, pruned = pruned_pair("llama-gqa")
    report = {
        "allocation": {"dims": {"n_heads": 6, "head_dim": 16, "m": 160}, "mode": "uniform"},
        "layers": pruned.config.layers,
        "serving_memory": compare_serving_memory(dense.config, pruned.config, 4096, 2, "f16"),
    }
    path = plot_allocation(report, tmp_path / "a.png")
    assert path.stat().st_size > 0
