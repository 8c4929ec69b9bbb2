"""--target-params parsing and budgets, the CLI for the baselines, candidate shapes for
--target-speedup, and the speed benchmark's plumbing (not its timings: those live in bench/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from intraslice import IntraSliceError
from intraslice.params import param_report, parse_target_params, ratio_for_target
from intraslice.speed import benchmark_speed, candidate_model, predicted_layer_spec

from .conftest import make_tiny
from .test_errors_and_cli import assert_user_error, calib_file, run_cli, tiny_prune  # noqa: F401

BEFORE = {"decoder_linear": 1000, "whole_model": 1500}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.3", ("fraction", 0.3)), ("25%", ("fraction", 0.25)), ("90M", ("count", 9e7)), ("1.2B", ("count", 1.2e9))],
)
def test_parse_target_params(text: str, expected: tuple[str, float]) -> None:
    kind, value = parse_target_params(text)
    assert kind == expected[0] and value == pytest.approx(expected[1])


def test_ratio_for_target_scopes() -> None:
    assert ratio_for_target(("fraction", 0.3), "decoder", BEFORE) == pytest.approx(0.3)
    assert ratio_for_target(("fraction", 0.2), "model", BEFORE) == pytest.approx(0.3)  # 300 of 1000
    assert ratio_for_target(("count", 800), "decoder", BEFORE) == pytest.approx(0.2)
    assert ratio_for_target(("count", 1200), "model", BEFORE) == pytest.approx(0.3)
    with pytest.raises(IntraSliceError, match="out of reach"):
        ratio_for_target(("count", 100), "model", BEFORE)
    with pytest.raises(IntraSliceError, match="--target-params must be"):
        parse_target_params("lots")


@pytest.mark.parametrize("method", ["slicegpt", "channel"])
def test_cli_baselines_with_target_params(method: str, capsys, tiny_model_dir: Path, calib_file: Path, tmp_path: Path):  # noqa: F811
    out = tmp_path / method
    extra = ("--method", method, "--target-params", "0.25", "--no-eval", "--device", "cpu")
    code, _, err = run_cli(capsys, *tiny_prune(tiny_model_dir, calib_file, out, *extra))
    assert code == 0, err
    report = json.loads((out / "intraslice.json").read_text())
    assert report["method"]["method"] == method and report["config"]["method"] == method
    assert report["goal"]["target_params"] == "0.25"
    assert report["allocation"]["mode"] == "uniform"
    # MLP widths round to multiples of 8: a 2-layer toy lands within a couple of points.
    assert report["reduction"]["decoder_linear"] == pytest.approx(0.25, abs=0.025)


def test_cli_goal_conflicts_are_user_errors(capsys, tiny_model_dir: Path, calib_file: Path, tmp_path: Path) -> None:  # noqa: F811
    code, _, err = run_cli(
        capsys, *tiny_prune(tiny_model_dir, calib_file, tmp_path / "x", "--ratio", "0.2", "--target-params", "0.3")
    )
    assert_user_error(code, err, "one of --ratio")
    argv = tiny_prune(tiny_model_dir, calib_file, tmp_path / "y", "--method", "slicegpt", "--allocation", "global")
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, "uniform")
    code, _, err = run_cli(capsys, *tiny_prune(tiny_model_dir, calib_file, tmp_path / "z", "--target-params", "5B"))
    assert_user_error(code, err, "out of reach")
    assert not any(p.name in {"x", "y", "z"} for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    ("arch_name", "ratio"), [("llama-gqa", 0.1), ("llama-gqa", 0.3), ("llama-gqa", 0.5), ("phi", 0.3)]
)
def test_candidate_shapes_match_the_ratio(arch_name: str, ratio: float) -> None:
    src = make_tiny(arch_name, dtype=torch.float32)
    cand = candidate_model(src, ratio, mlp_multiple=1)
    before, after = param_report(src)["decoder_linear"], param_report(cand)["decoder_linear"]
    assert 1 - after / before == pytest.approx(ratio, abs=0.02)
    spec = predicted_layer_spec({"n_heads": 9, "n_kv": 3, "head_dim": 64, "d": 576, "m": 1536}, 0.5, 0.75, 8)
    assert spec["head_dim"] == 48 and spec["head_dim"] % 2 == 0 and len(spec["kv_index"]) == spec["num_heads"]


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_candidate_shapes_follow_the_split(share: float) -> None:
    """--target-speedup's candidates have the shapes of the split the run prunes with (share 0 by default:
    the attention whole, the MLP the whole ratio), not the spec's split."""
    src = make_tiny("llama-gqa", dtype=torch.float32)
    cand = candidate_model(src, 0.3, mlp_multiple=1, attention_share=share)
    att_before, mlp_before, att_after, mlp_after = 0, 0, 0, 0
    for a, b in zip(src.model.layers, cand.model.layers, strict=True):
        for mods, acc in (((a.self_attn.q_proj, a.self_attn.k_proj, a.self_attn.v_proj, a.self_attn.o_proj), 0),
                          ((a.mlp.gate_proj, a.mlp.up_proj, a.mlp.down_proj), 1),
                          ((b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj, b.self_attn.o_proj), 2),
                          ((b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj), 3)):  # fmt: skip
            n = sum(m.weight.numel() for m in mods)
            att_before, mlp_before, att_after, mlp_after = (
                x + (n if i == acc else 0) for i, x in enumerate((att_before, mlp_before, att_after, mlp_after))
            )
    assert 1 - (att_after + mlp_after) / (att_before + mlp_before) == pytest.approx(0.3, abs=0.02)
    if share == 0.0:
        assert att_after == att_before  # every head, every pair: the KV cache untouched
    else:
        assert 0.1 <= 1 - att_after / att_before <= 0.25  # 0.15 asked; the even head width rounds it (12 of 16)


def test_benchmark_speed_reports_every_model_and_setting() -> None:
    src = make_tiny("llama-gqa", dtype=torch.float32)
    cand = candidate_model(src, 0.4)
    res = benchmark_speed([("dense", src), ("small", cand)], [16], [8], repeats=2, warmup=1, decode_steps=2).to_dict()
    assert res["reference"] == "dense"
    dense, small = res["models"]["dense"], res["models"]["small"]
    assert dense["prefill"]["16"]["speedup"] == 1.0 and dense["decoder_linear_flops_speedup_limit"] == 1.0
    assert small["decoder_linear_flops_speedup_limit"] > 1.3
    assert small["decode"]["8"]["ms_per_token"] > 0 and small["prefill"]["16"]["tokens_per_s"] > 0
    with pytest.raises(IntraSliceError, match="unique"):
        benchmark_speed([("a", src), ("a", cand)], [8], [])


def test_speed_search_picks_the_smallest_sufficient_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bisection logic, with the timer replaced by a known speed curve (no timing in tests)."""
    import intraslice.speed as speed

    probed: list[float] = []

    class Fake:
        def __init__(self, ratio: float) -> None:
            self.ratio = ratio

    def fake_candidate(_src, ratio, *_a, **_k):
        probed.append(ratio)
        return Fake(ratio)

    def fake_benchmark(models, prefill, *_a, **_k):
        cand = models[1][1]
        res = speed.SpeedResult(names=["dense", "candidate"])
        res.prefill_s = {"dense": {prefill[0]: 1.0}, "candidate": {prefill[0]: 1.0 / (1.0 + cand.ratio)}}
        return res

    monkeypatch.setattr(speed, "candidate_model", fake_candidate)
    monkeypatch.setattr(speed, "benchmark_speed", fake_benchmark)
    ratio, probes = speed.ratio_for_speedup(object(), 1.32, seqlen=64)
    assert ratio == pytest.approx(0.35)  # speedup 1 + r: 0.30 gives 1.30 < 1.32, 0.35 gives 1.35
    assert len(probes) <= 6 and all(p["ratio"] in probed for p in probes)
    with pytest.raises(IntraSliceError, match="ask for less"):
        speed.ratio_for_speedup(object(), 3.0, seqlen=64)
    with pytest.raises(IntraSliceError, match="> 1"):
        speed.ratio_for_speedup(object(), 0.9)


def test_cli_target_speedup_records_goal_and_measurement(
    monkeypatch: pytest.MonkeyPatch,
    capsys,
    tiny_model_dir: Path,
    calib_file: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    import intraslice.speed as speed

    monkeypatch.setattr(speed, "ratio_for_speedup", lambda *a, **k: (0.25, [{"ratio": 0.25, "prefill_speedup": 1.2}]))
    out = tmp_path / "fast"
    argv = tiny_prune(tiny_model_dir, calib_file, out, "--target-speedup", "1.2", "--speed-seqlen", "16", "--no-eval")
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    goal = json.loads((out / "intraslice.json").read_text())["goal"]
    assert goal["target_speedup"] == 1.2 and goal["ratio"] == 0.25 and goal["probes"]
    assert goal["measured_prefill_speedup"] > 0 and "measured prefill speedup" in stdout
    argv = tiny_prune(tiny_model_dir, calib_file, tmp_path / "x", "--target-speedup", "1.2", "--method", "channel")
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, "--target-speedup")
