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
    assert report["calibration"]["nsamples"] == 4 and report["calibration"]["seqlen"] == 32
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
        prune(model, calib_tokens(), PruneConfig(ratio=0.2), progress=False)


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
