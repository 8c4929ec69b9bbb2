"""Calibration with repeated spans (issue #14): what the windows hold, and bad shares refused."""

from __future__ import annotations

import json

import pytest
import torch

from intraslice.cli import main
from intraslice.data import CalibrationSet, with_repeated_spans
from intraslice.errors import IntraSliceError

from .conftest import calib_tokens, make_tiny


def calib(n: int = 6, length: int = 40, seed: int = 0) -> CalibrationSet:
    tokens = torch.arange(n * length).view(n, length) + 1000  # every token distinct
    return CalibrationSet(tokens, "test", seed, n * length)


def test_last_share_repeats_an_earlier_span_at_least_its_length_back() -> None:
    src = calib()
    out = with_repeated_spans(src, 0.25)
    m = 10
    assert torch.equal(out.tokens[:, :-m], src.tokens[:, :-m])  # the rest untouched
    starts = set()
    for row in range(6):
        tail = out.tokens[row, -m:]
        start = int(tail[0] - src.tokens[row, 0])  # distinct tokens: the copy's origin
        assert 0 <= start <= 40 - 2 * m
        assert torch.equal(tail, src.tokens[row, start : start + m])
        starts.add(start)
    assert len(starts) > 1  # drawn per window
    assert out.describe()["repeat_share"] == 0.25 and "repeat_share" not in src.describe()


def test_seeded_and_zero_share_is_identity() -> None:
    assert torch.equal(with_repeated_spans(calib(), 0.3).tokens, with_repeated_spans(calib(), 0.3).tokens)
    assert not torch.equal(with_repeated_spans(calib(seed=1), 0.3).tokens, with_repeated_spans(calib(), 0.3).tokens)
    assert torch.equal(with_repeated_spans(calib(), 0.0).tokens, calib().tokens)


def test_bad_share_is_refused(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    with pytest.raises(IntraSliceError, match="--calib-repeat"):
        with_repeated_spans(calib(), 0.6)
    code = main(["prune", "--calib-repeat", "0.7", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--calib-repeat must be between 0 and 0.5" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("estimator_too", [False, True])
def test_cli_layer_steps_see_the_repeats_and_the_estimator_the_plain_windows(
    capsys: pytest.CaptureFixture[str], tiny_model_dir, tmp_path, monkeypatch, estimator_too: bool
) -> None:
    seen = _spy_windows(monkeypatch)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"item {i} of the list." for i in range(600)), encoding="utf-8")  # no period
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tiny_model_dir), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32",
            "--calib-repeat", "0.25", "--calib-repeat-mode", "replace", "--out", str(out), "--no-progress",
            "--no-eval", "--device", "cpu"]  # fmt: skip
    code = main(argv + (["--calib-repeat-estimator"] if estimator_too else []))
    assert code == 0, capsys.readouterr().err
    layers, estimator = seen["layers"], seen["estimator"]
    assert torch.equal(layers[:, :-8], estimator[:, :-8])
    assert torch.equal(layers, estimator) == estimator_too
    assert json.loads((out / "intraslice.json").read_text())["calibration"]["repeat_share"] == 0.25


@pytest.mark.parametrize("mode", ["replace", "append"])
def test_append_mode_keeps_every_text_token_and_follows_with_an_earlier_span(mode: str) -> None:
    src = calib(length=40)
    out = with_repeated_spans(src, 0.25, mode)
    m = 10
    assert out.repeat_mode == mode and out.describe()["repeat_mode"] == mode
    if mode == "replace":
        assert out.tokens.shape == (6, 40) and torch.equal(out.tokens[:, :30], src.tokens[:, :30])
    else:
        assert out.tokens.shape == (6, 50) and torch.equal(out.tokens[:, :40], src.tokens)
    for row in range(6):
        tail = out.tokens[row, -m:]
        start = int(tail[0]) - int(src.tokens[row, 0])  # distinct tokens: the value names the position
        assert torch.equal(tail, src.tokens[row, start : start + m])
        assert out.tokens.shape[1] - m - start >= m  # copied from at least its own length back
    assert torch.equal(out.tokens, with_repeated_spans(calib(length=40), 0.25, mode).tokens)  # seeded
    with pytest.raises(IntraSliceError, match="--calib-repeat-mode"):
        with_repeated_spans(src, 0.25, "prepend")


@pytest.mark.parametrize(("skip", "mode"), [(0, "replace"), (8, "replace"), (8, "append")])
def test_mlp_statistics_leave_out_the_repeated_tail_only_in_attention_mode(monkeypatch, skip: int, mode: str) -> None:
    """``--calib-repeat-in attention``: layer 0's down_proj-input covariance H, as the MLP step
    receives it, equals Z^T Z over each window's positions but the last ``skip`` (all of them
    with skip 0), Z computed independently from the pruned model's MLP input and the dense
    gate/up weights."""
    import copy

    from transformers.activations import ACT2FN

    from intraslice.api import prune
    from intraslice.config import PruneConfig
    from intraslice.methods import intraslice as method

    from .conftest import calib_tokens, make_tiny

    dense = make_tiny("llama-mha", n_layers=1)
    mlp = dense.model.layers[0].mlp
    w_gate, w_up = mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone()
    act = ACT2FN[dense.config.hidden_act]
    plain = CalibrationSet(calib_tokens(8, 32), "test", 0, 8 * 32)
    tokens = with_repeated_spans(plain, 0.25, mode).tokens  # the last 8 positions repeat
    seen: list[torch.Tensor] = []
    real = method.compress_mlp

    def spy(h: torch.Tensor, *a, **kw):
        seen.append(h.clone())
        return real(h, *a, **kw)

    monkeypatch.setattr(method, "compress_mlp", spy)
    cfg = PruneConfig(layer_ratios=[(0.25, 0.4)], mlp_skip_positions=skip)
    result = prune(copy.deepcopy(dense), tokens, cfg, progress=False)
    x: list[torch.Tensor] = []
    result.model.model.layers[0].mlp.register_forward_pre_hook(lambda _m, args: x.append(args[0]))
    with torch.no_grad():
        result.model(tokens)
    z = act(x[0] @ w_gate.T) * (x[0] @ w_up.T)  # (8, 32, d_ff): the dense MLP on the pruned attention
    z = z[:, : tokens.shape[1] - skip].reshape(-1, z.shape[-1])
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], z.T @ z, rtol=1e-9, atol=1e-9)


def test_cli_calib_repeat_in_attention_sets_the_mlp_skip(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from intraslice import stages

    seen: dict[str, float] = {}
    prune = stages.prune

    def spy_prune(ckpt, tokens, cfg, *a, **kw):
        seen["skip"] = cfg.mlp_skip_positions
        seen["length"] = tokens.shape[1]
        return prune(ckpt, tokens, cfg, *a, **kw)

    monkeypatch.setattr(stages, "prune", spy_prune)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"item {i} of the list." for i in range(600)), encoding="utf-8")
    argv = ["prune", "--model", str(tiny_model_dir), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32",
            "--calib-repeat", "0.25", "--calib-repeat-in", "attention", "--out", str(tmp_path / "o"),
            "--no-progress", "--no-eval", "--device", "cpu", "--allocation", "uniform"]  # fmt: skip
    assert main([*argv, "--calib-repeat-mode", "replace"]) == 0
    assert seen == {"skip": 8, "length": 32}
    assert main([*argv, "--overwrite"]) == 0  # append: the default mode
    assert seen == {"skip": 8, "length": 40}
    report = json.loads((tmp_path / "o" / "intraslice.json").read_text())["calibration"]
    assert report["repeat_mode"] == "append" and report["seqlen"] == 40


def test_cli_append_beyond_the_model_positions_is_refused(capsys, tiny_model_dir, tmp_path) -> None:
    from transformers import AutoConfig

    max_pos = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    out = tmp_path / "o"
    capsys.readouterr()  # the fixture's own output
    argv = ["prune", "--model", str(tiny_model_dir), "--seqlen", str(max_pos), "--calib-repeat", "0.25",
            "--calib-repeat-mode", "append", "--out", str(out), "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"more than the model's {max_pos} positions" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def _spy_windows(monkeypatch) -> dict[str, torch.Tensor]:
    """The windows the CLI hands the estimator and the layer steps."""
    from intraslice import stages

    seen: dict[str, torch.Tensor] = {}
    allocate, prune = stages.allocate, stages.prune

    def spy_allocate(ckpt, policy, tokens, *a, **kw):
        seen["estimator"] = tokens.clone()
        return allocate(ckpt, policy, tokens, *a, **kw)

    def spy_prune(ckpt, tokens, *a, **kw):
        seen["layers"] = tokens.clone()
        return prune(ckpt, tokens, *a, **kw)

    monkeypatch.setattr(stages, "allocate", spy_allocate)
    monkeypatch.setattr(stages, "prune", spy_prune)
    return seen


@pytest.mark.parametrize("method", ["intraslice", "slicegpt"])
def test_cli_default_appends_half_a_window_for_intraslice_only(tiny_model_dir, tmp_path, monkeypatch, method) -> None:
    """The default (issue #14): IntraSlice's layer steps see each 32-token window followed by a
    16-token repeat of an earlier span of it, the estimator the plain windows; the baselines
    calibrate on the plain windows, as published."""
    from intraslice.config import DEFAULT_CALIB_REPEAT, DEFAULT_CALIB_REPEAT_MODE

    assert (DEFAULT_CALIB_REPEAT, DEFAULT_CALIB_REPEAT_MODE) == (0.5, "append")
    seen = _spy_windows(monkeypatch)
    out = tmp_path / "o"
    argv = ["prune", "--model", str(tiny_model_dir), "--nsamples", "4", "--seqlen", "32", "--method", method,
            "--allocation", "uniform" if method == "slicegpt" else "global_pca", "--out", str(out),
            "--no-progress", "--no-eval", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    layers = seen["layers"]
    report = json.loads((out / "intraslice.json").read_text())["calibration"]
    if method == "slicegpt":
        assert layers.shape == (4, 32) and "repeat_share" not in report
        return
    estimator = seen["estimator"]
    assert estimator.shape == (4, 32) and layers.shape == (4, 48)
    assert torch.equal(layers[:, :32], estimator)  # every text token kept
    for row in range(4):  # the appended 16 tokens are a span of the same window
        spans = estimator[row].unfold(0, 16, 1)
        assert (spans == layers[row, 32:]).all(dim=1).any()
    assert (report["repeat_share"], report["repeat_mode"], report["seqlen"]) == (0.5, "append", 48)


def test_cli_default_span_shrinks_to_the_model_positions(capsys, tiny_model_dir, tmp_path, monkeypatch) -> None:
    """Windows near the model's positions: the default span is shortened with one note, not refused
    (an explicit share is refused: test_cli_append_beyond_the_model_positions_is_refused)."""
    from transformers import AutoConfig

    max_pos = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    seen = _spy_windows(monkeypatch)
    capsys.readouterr()
    argv = ["prune", "--model", str(tiny_model_dir), "--nsamples", "2", "--seqlen", str(max_pos - 8),
            "--out", str(tmp_path / "o"), "--no-progress", "--no-eval", "--device", "cpu",
            "--allocation", "uniform"]  # fmt: skip
    assert main(argv) == 0
    assert seen["layers"].shape[1] == max_pos
    assert f"shortened to 8 tokens to fit the model's {max_pos} positions" in capsys.readouterr().out


def test_api_estimator_calibration_feeds_the_estimator_and_the_windows_the_layers(monkeypatch) -> None:
    """``prune(..., estimator_calibration=plain)``: the CLI's default split of windows from Python."""
    from intraslice import importance, prune
    from intraslice.config import PruneConfig

    seen: dict[str, torch.Tensor] = {}
    estimate = importance.estimate_allocation

    def spy(model, ratio, mode, tokens=None, **kw):
        seen["estimator"] = tokens
        return estimate(model, ratio, mode, tokens=tokens, **kw)

    monkeypatch.setattr(importance, "estimate_allocation", spy)
    plain = CalibrationSet(calib_tokens(2, 16), "test", 0, 32)
    spans = with_repeated_spans(plain, 0.5, "append")
    result = prune(make_tiny("llama-gqa"), spans.tokens, PruneConfig(ratio=0.3), False, plain.tokens)
    assert seen["estimator"] is plain.tokens and result.method["allocation"]["attention_share"] == 0.0
    with pytest.raises(IntraSliceError, match="estimator_calibration must be"):
        prune(make_tiny("llama-gqa"), spans.tokens, PruneConfig(ratio=0.3), False, plain.tokens[0])
