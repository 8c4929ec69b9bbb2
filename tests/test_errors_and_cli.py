"""User errors: one line, non-zero exit, no traceback, no partial output directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from intraslice import IntraSliceError, NonFiniteError, PruneConfig, prune
from intraslice.cli import main
from intraslice.saving import atomic_directory

from .conftest import calib_tokens, make_tiny

TEXT = "The quick brown fox jumps over the lazy dog. Pruning makes models smaller and faster.\n\n" * 80


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("intraslice: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def tiny_prune(model_dir: Path, calib: Path | str, out: Path, *extra: str) -> list[str]:
    """``intraslice prune`` arguments for the tiny model with a small calibration set."""
    return [
        "prune",
        "--model",
        str(model_dir),
        "--calib",
        str(calib),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


@pytest.fixture
def calib_file(tmp_path: Path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_cli_prune_end_to_end(capsys, tiny_model_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    extra = ("--ratio", "0.3", "--eval-windows", "1", "--eval-seqlen", "64", "--device", "cpu")
    code, stdout, err = run_cli(capsys, *tiny_prune(tiny_model_dir, calib_file, out, *extra))
    assert code == 0, err
    report = json.loads((out / "intraslice.json").read_text())
    assert report["params_after"]["decoder_linear"] < report["params_before"]["decoder_linear"]
    assert report["calibration"]["source"].startswith("file:")
    # the layer steps' windows: 32 text tokens and the default appended span of 16
    assert report["calibration"]["nsamples"] == 4 and report["calibration"]["seqlen"] == 48
    assert (report["calibration"]["repeat_share"], report["calibration"]["repeat_mode"]) == (0.5, "append")
    assert {"dense", "pruned"} <= set(report["perplexity"])
    assert len(report["layers"]) == 2 and "total" in report["timings_s"]
    assert "decoder linear" in stdout and "whole model" in stdout
    assert report["allocation"]["mode"] == "global_pca" and len(report["allocation"]["layer_ratios"]) == 2
    assert report["reduction"]["decoder_linear"] == pytest.approx(0.3, abs=0.03)
    assert (out / "allocation.png").stat().st_size > 1000
    # Reuse the importances at another ratio: no gradients recomputed.
    out2 = tmp_path / "pruned2"
    extra = ("--ratio", "0.2", "--ratios", str(out / "intraslice.json"), "--no-eval")
    code, stdout, err = run_cli(capsys, *tiny_prune(tiny_model_dir, calib_file, out2, *extra))
    assert code == 0, err
    rep2 = json.loads((out2 / "intraslice.json").read_text())
    assert rep2["allocation"]["reused_from_file"] and rep2["allocation"]["target_ratio"] == 0.2
    code, stdout, err = run_cli(capsys, "report", str(out2), "--out", str(tmp_path / "plot.png"))
    assert code == 0 and (tmp_path / "plot.png").is_file(), err
    # The saved model evaluates through the CLI too.
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "ppl",
        "--model",
        str(out),
        "--seqlen",
        "64",
        "--windows",
        "2",
        "--no-progress",
        "--device",
        "cpu",
        "--json",
        str(tmp_path / "ppl.json"),
    )
    assert code == 0, err
    assert json.loads((tmp_path / "ppl.json").read_text())["windows"] == 2
    # No leftovers of the atomic write.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pruned")] == []


def test_existing_output_dir_is_refused(capsys, tiny_model_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_cli(
        capsys, "prune", "--model", str(tiny_model_dir), "--calib", str(calib_file), "--out", str(out), "--no-eval"
    )
    assert_user_error(code, err, "exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("ratio", ["-0.1", "0.96", "1.5"])
def test_ratio_out_of_range(capsys, tmp_path: Path, ratio: str) -> None:
    code, _, err = run_cli(capsys, "prune", "--ratio", ratio, "--out", str(tmp_path / "o"))
    assert_user_error(code, err, "ratio", "[0, 0.95]")
    assert not (tmp_path / "o").exists()


def test_unknown_architecture(capsys, tmp_path: Path) -> None:
    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(d)
    from .conftest import build_tokenizer

    build_tokenizer(d)
    code, _, err = run_cli(
        capsys,
        "prune",
        "--model",
        str(d),
        "--calib",
        "c4-sample",
        "--nsamples",
        "2",
        "--seqlen",
        "16",
        "--out",
        str(tmp_path / "o"),
        "--no-eval",
    )
    assert_user_error(code, err, "unsupported architecture 'gpt2'", "llama", "mistral", "qwen2")
    assert not (tmp_path / "o").exists()


def test_too_few_calibration_tokens(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("only a few words here", encoding="utf-8")
    code, _, err = run_cli(capsys, *tiny_prune(tiny_model_dir, small, tmp_path / "o", "--no-eval"))
    assert_user_error(code, err, "fewer than the 4 asked for")
    assert not (tmp_path / "o").exists()


def test_unknown_calibration_source_and_test_split(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(
        capsys, "prune", "--model", str(tiny_model_dir), "--calib", "nope", "--out", str(tmp_path / "o"), "--no-eval"
    )
    assert_user_error(code, err, "unknown calibration source 'nope'")
    test_split = tmp_path / "wiki.test.raw"
    test_split.write_text(TEXT)
    code, _, err = run_cli(capsys, *tiny_prune(tiny_model_dir, test_split, tmp_path / "o", "--no-eval"))
    assert_user_error(code, err, "test split")


def test_missing_gguf_file(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(
        capsys,
        "prune",
        "--model",
        str(tmp_path),
        "--gguf-file",
        "absent.gguf",
        "--out",
        str(tmp_path / "o"),
        "--no-eval",
    )
    assert_user_error(code, err, "GGUF file missing", "absent.gguf")


def test_non_finite_activations_name_the_layer(capsys, tmp_path: Path) -> None:
    model = make_tiny("llama-mha")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="layer 1"):
        prune(model, calib_tokens(), PruneConfig(ratio=0.2, allocation="uniform"), progress=False)


def test_bad_config_values() -> None:
    model = make_tiny("llama-mha")
    with pytest.raises(IntraSliceError, match="layer_ratios has 3 entries"):
        prune(model, calib_tokens(), PruneConfig(layer_ratios=[(0.1, 0.1)] * 3), progress=False)
    with pytest.raises(IntraSliceError, match="MLP ratio of layer 0"):
        prune(model, calib_tokens(), PruneConfig(layer_ratios=[(0.1, 0.99)] * 2), progress=False)
    with pytest.raises(IntraSliceError, match="already pruned"):
        pruned = prune(make_tiny("llama-mha"), calib_tokens(), PruneConfig(ratio=0.1), progress=False).model
        prune(pruned, calib_tokens(), PruneConfig(ratio=0.1), progress=False)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    def boom(d: Path) -> None:
        (d / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_directory(tmp_path / "out", boom)
    assert list(tmp_path.iterdir()) == []
    # Overwrite keeps the old directory intact if writing the new one fails.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        atomic_directory(tmp_path / "out", boom, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "old.txt").read_text() == "old"
    atomic_directory(tmp_path / "out", lambda d: (d / "new.txt").write_text("new"), overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--max-layer-ratio", "0.2"], "cap 0.2 is below the target ratio 0.3"),
        (["--mlp-bias", "-3"], "no room for attention"),
        (["--units-per-head", "3"], "does not divide head_dim 16"),
        (["--attention-share", "0.5", "--mlp-bias", "1.2"], "not both"),
        (["--attention-share", "-1"], "--attention-share must be a finite number >= 0"),
        (["--attention-share", "inf"], "--attention-share must be a finite number >= 0"),
        (["--attention-share", "4"], "--attention-share 4 leaves no room for attention"),
        (["--attention-share", "0", "--max-layer-ratio", "0.35"], "above the per-layer cap 0.35"),
        (["--attention-share", "auto", "--allocation", "uniform"], "needs a global allocation"),
        (["--attention-share", "0", "--allocation", "uniform", "--ratio", "0.6"], "MLP to lose 0.922"),
        (["--method", "slicegpt", "--attention-share", "0"], "slicegpt slices the residual"),
        (["--mlp-multiple", "0"], "--mlp-multiple must be a positive integer"),
    ],
)
def test_allocation_errors(capsys, tiny_model_dir: Path, calib_file: Path, tmp_path: Path, extra, needle) -> None:
    code, _, err = run_cli(capsys, *tiny_prune(tiny_model_dir, calib_file, tmp_path / "o", "--no-eval", *extra))
    assert_user_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_ratios_file_for_another_model(capsys, tiny_model_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"allocation": {"layer_ratios": [[0.1, 0.1]] * 5, "dims": {"n_layers": 5}}}))
    args = tiny_prune(tiny_model_dir, calib_file, tmp_path / "o", "--no-eval", "--ratios", str(bad))
    code, _, err = run_cli(capsys, *args)
    assert_user_error(code, err, "for another model")


# -- the bad-input table of the README ("Bad input: what you get") ----------------------------
def assert_nothing_lost(out: Path) -> None:
    """The previous output is untouched and nothing else was left next to it."""
    assert (out / "keep.txt").read_text() == "previous"
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")) == []


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """An earlier output that a failed ``--overwrite`` run must leave as it was."""
    out = tmp_path / "prev"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    return out


def save_model(model: torch.nn.Module, d: Path) -> Path:
    from .conftest import build_tokenizer

    build_tokenizer(d)
    model.save_pretrained(d)
    return d


def test_qk_norm_and_sliding_window_layouts_are_refused(capsys, tmp_path: Path, calib_file: Path, previous) -> None:
    from transformers import PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from .conftest import COMMON

    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    qwen3 = save_model(Qwen3ForCausalLM(Qwen3Config(**COMMON, **small)), tmp_path / "qwen3")
    code, _, err = run_cli(capsys, *tiny_prune(qwen3, calib_file, previous, "--overwrite", "--no-eval"))
    assert_user_error(code, err, "unsupported architecture 'qwen3'")
    assert_nothing_lost(previous)
    phi_cfg = PhiConfig(**{**COMMON, "hidden_size": 64, "num_attention_heads": 4}, qk_layernorm=True)
    phi = save_model(PhiForCausalLM(phi_cfg), tmp_path / "phi-qk")
    code, _, err = run_cli(capsys, *tiny_prune(phi, calib_file, previous, "--overwrite", "--no-eval"))
    assert_user_error(code, err, "qk_layernorm")
    assert_nothing_lost(previous)
    window = Qwen2Config(**COMMON, **small, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    sliding = save_model(Qwen2ForCausalLM(window), tmp_path / "qwen2-window")
    code, _, err = run_cli(capsys, *tiny_prune(sliding, calib_file, previous, "--overwrite", "--no-eval"))
    assert_user_error(code, err, "sliding window of 8 < 32 tokens")
    assert_nothing_lost(previous)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--target-params", "1.5B"], "out of reach"),
        (["--target-params", "lots"], "--target-params must be a fraction"),
        (["--target-params", "0.97"], "the decoder ratio for --target-params must be in [0, 0.95]"),
        (["--target-speedup", "0.8"], "--target-speedup must be > 1"),
        (["--ratio", "nan"], "ratio must be in [0, 0.95]"),
    ],
)
def test_targets_out_of_range(capsys, tiny_model_dir: Path, calib_file: Path, previous, extra, needle) -> None:
    code, _, err = run_cli(
        capsys, *tiny_prune(tiny_model_dir, calib_file, previous, "--overwrite", "--no-eval", *extra)
    )
    assert_user_error(code, err, needle)
    assert_nothing_lost(previous)


def test_empty_calibration_file(capsys, tiny_model_dir: Path, tmp_path: Path, previous) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    code, _, err = run_cli(capsys, *tiny_prune(tiny_model_dir, empty, previous, "--overwrite", "--no-eval"))
    assert_user_error(code, err, "0 tokens")
    assert_nothing_lost(previous)


def test_tokenizer_model_vocabulary_mismatch(capsys, tmp_path: Path, calib_file: Path, previous) -> None:
    model = make_tiny("llama-mha", dtype=torch.float32)
    model.resize_token_embeddings(100)  # the tokenizer has 320 tokens
    d = save_model(model, tmp_path / "small-vocab")
    code, _, err = run_cli(capsys, *tiny_prune(d, calib_file, previous, "--overwrite", "--no-eval"))
    assert_user_error(code, err, "the tokenizer has", "vocabulary has 100", "do not match")
    assert_nothing_lost(previous)


@pytest.mark.parametrize("allocation", ["uniform", "global_pca"])
def test_nan_in_source_weights_names_layer_and_module(
    capsys, tmp_path: Path, calib_file: Path, previous, allocation: str
) -> None:
    model = make_tiny("llama-mha", dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    d = save_model(model, tmp_path / "nan")
    args = tiny_prune(d, calib_file, previous, "--overwrite", "--no-eval", "--allocation", allocation)
    code, _, err = run_cli(capsys, *args)
    assert_user_error(code, err, "NaN/Inf in the source weight model.layers.1.mlp.up_proj.weight")
    assert_nothing_lost(previous)


def test_nan_in_activations_names_the_layer_cli(capsys, tmp_path: Path, calib_file: Path, previous) -> None:
    """Finite weights whose activations overflow (float16): the layer is named."""
    model = make_tiny("llama-mha", dtype=torch.float16)
    with torch.no_grad():
        for lin in ("gate_proj", "up_proj", "down_proj"):
            getattr(model.model.layers[0].mlp, lin).weight.mul_(300)  # finite weights, overflowing sums
    d = save_model(model, tmp_path / "overflow")
    args = tiny_prune(d, calib_file, previous, "--overwrite", "--no-eval", "--allocation", "uniform")
    code, _, err = run_cli(capsys, *args)
    assert_user_error(code, err, "NaN/Inf in", "of layer 0")
    assert_nothing_lost(previous)


def test_truncated_safetensors_cli(capsys, tiny_model_dir: Path, calib_file: Path, previous) -> None:
    weights = tiny_model_dir / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size - 1000)
    code, _, err = run_cli(capsys, *tiny_prune(tiny_model_dir, calib_file, previous, "--overwrite", "--no-eval"))
    assert_user_error(code, err, "model.safetensors", "truncated or corrupt safetensors file")
    assert_nothing_lost(previous)
    weights.write_bytes(b"\x00" * 64)  # not even a header
    code, _, err = run_cli(capsys, *tiny_prune(tiny_model_dir, calib_file, previous, "--overwrite", "--no-eval"))
    assert_user_error(code, err, "model.safetensors", "truncated or corrupt safetensors file")
    assert_nothing_lost(previous)


def test_corrupt_gguf_cli(capsys, tmp_path: Path, previous, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTRASLICE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "src" / "model.Q8_0.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 100)  # a header cut short
    code, _, err = run_cli(capsys, "prune", "--model", str(bad), "--out", str(previous), "--overwrite", "--no-eval")
    assert_user_error(code, err, "could not convert GGUF", "model.Q8_0.gguf")
    assert_nothing_lost(previous)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == []  # no half cache entry


@pytest.mark.parametrize("where", ["shard", "checkpoint"])
def test_disk_full_during_the_write_keeps_a_resumable_run(
    capsys, tiny_model_dir: Path, calib_file: Path, previous, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """ENOSPC while a shard or a layer checkpoint is written: one line, the previous output
    untouched, the finished layers kept; after "freeing space" the same command resumes."""
    import errno

    from intraslice import resume, shards

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device", "/data/x.safetensors")

    target = (shards.ShardedWriter, "flush") if where == "shard" else (resume, "save_activations")
    calls = {"n": 0}
    original = getattr(*target)

    def fail_first(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return full() if calls["n"] == 1 or where == "shard" else original(*args, **kwargs)

    monkeypatch.setattr(*target, fail_first)
    argv = tiny_prune(tiny_model_dir, calib_file, previous, "--overwrite", "--no-eval", "--allocation", "uniform")
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, "No space left on device writing /data/x.safetensors", "free some space and rerun")
    assert (previous / "keep.txt").read_text() == "previous"
    assert (previous.parent / ".prev.partial").is_dir()  # hidden, resumable; never at --out
    monkeypatch.setattr(*target, original)
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "resuming the interrupted run" in out
    assert not (previous / "keep.txt").exists() and (previous / "model.safetensors").is_file()


def test_read_only_output_location(capsys, tiny_model_dir: Path, calib_file: Path, tmp_path: Path, monkeypatch):
    """A read-only file system (simulated: tests run as root, which chmod does not stop)."""
    import errno

    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.resolve().parent == ro.resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, _, err = run_cli(capsys, *tiny_prune(tiny_model_dir, calib_file, ro / "out", "--no-eval"))
    assert_user_error(code, err, "cannot write next to the output", "Read-only file system")
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a"\n', "line 2 is not JSON"),
        ('{"query": "q", "choices": ["a", "b"]}\n', "malformed row (needs query, choices, gold)"),
        ('{"query": "q", "choices": ["a", "b"], "gold": 5}\n', "gold index 5 out of range"),
    ],
)
def test_zeroshot_data_with_a_malformed_row(capsys, tiny_model_dir: Path, tmp_path: Path, rows: str, needle: str):
    data = tmp_path / "zs"
    data.mkdir()
    (data / "piqa.jsonl").write_text(rows, encoding="utf-8")
    out = tmp_path / "zs.json"
    code, _, err = run_cli(
        capsys,
        *("eval", "zeroshot", "--model", str(tiny_model_dir), "--tasks", "piqa", "--data-dir", str(data)),
        *("--no-progress", "--device", "cpu", "--json", str(out)),
    )
    assert_user_error(code, err, needle)
    assert not out.exists()
