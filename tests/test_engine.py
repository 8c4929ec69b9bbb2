"""The one engine (issue #32): the API and the CLI make the same model, a run's config file
makes it again, config files are checked, and a method registered in this file alone runs
through the CLI and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import intraslice
from intraslice import resume
from intraslice.baselines.channel import ChannelMLPStep, compensation_bias
from intraslice.cli import main
from intraslice.engine import RUN_CONFIG_FILE, STAGES, RunConfig
from intraslice.methods.layerwise import MLPDone
from intraslice.methods.registry import MethodSpec, get_method, method_names, register_method, unregister_method
from intraslice.pipeline.modules import bias_of, new_linear, row_linear

from .test_errors_and_cli import assert_user_error
from .test_resume import Killed, assert_identical


def argv(model_dir: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return [
        "prune", "--model", str(model_dir), "--calib", str(calib), "--nsamples", "6", "--seqlen", "24",
        "--batch-size", "4", "--device", "cpu", "--out", str(out), "--no-progress", "--no-eval", *extra,
    ]  # fmt: skip


def run_cli(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# -- API = CLI --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["intraslice", "slicegpt", "channel"])
def test_the_api_and_the_cli_make_the_same_model(
    method: str, model_dir: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``intraslice.run(RunConfig(...))`` built in Python gives the CLI's files bit for bit."""
    code, _, err = run_cli(capsys, argv(model_dir, calib, tmp_path / "cli", "--method", method, "--ratio", "0.3"))
    assert code == 0, err
    config = RunConfig()
    config.model.model, config.model.device = str(model_dir), "cpu"
    config.goal.ratio = 0.3
    config.calibration.source, config.calibration.nsamples, config.calibration.seqlen = str(calib), 6, 24
    config.method.method, config.method.batch_size = method, 4
    config.evaluation.enabled, config.output.progress = False, False
    config.output.out = str(tmp_path / "api")
    result = intraslice.run(config)
    assert result.out == tmp_path / "api"
    assert config.output.out == str(tmp_path / "api") and config.method.allocation is None  # not modified
    assert_identical(tmp_path / "cli", tmp_path / "api")
    spec = get_method(method)
    text = (tmp_path / "api" / RUN_CONFIG_FILE).read_text()
    assert f'allocation = "{spec.default_allocation}"' in text  # the resolved default is written
    assert f"repeat = {spec.calib_repeat}" in text


def test_run_config_reproduces_the_model_bit_for_bit(
    model_dir: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ("--ratio", "0.25", "--calib-repeat", "0.25", "--attention-share", "0.5", "--seed", "3")
    code, _, err = run_cli(capsys, argv(model_dir, calib, tmp_path / "a", *extra))
    assert code == 0, err
    saved = tmp_path / "a" / RUN_CONFIG_FILE
    text = saved.read_text()
    assert "out =" not in text and "[output]" not in text and "[memory]" not in text  # a rerun names its own
    code, _, err = run_cli(capsys, ["prune", "--config", str(saved), "--out", str(tmp_path / "b"), "--no-progress"])
    assert code == 0, err
    assert_identical(tmp_path / "a", tmp_path / "b")
    # a flag beside the file wins over the file
    code, _, err = run_cli(capsys, ["prune", "--config", str(saved), "--ratio", "0.4", "--out", str(tmp_path / "c")])
    assert code == 0, err
    assert "ratio = 0.4" in (tmp_path / "c" / RUN_CONFIG_FILE).read_text()
    loaded = RunConfig.from_toml(saved)
    assert loaded.goal.ratio == 0.25 and loaded.method.attention_share == 0.5 and loaded.calibration.seed == 3


def test_the_memory_options_reach_the_plan_and_the_pipeline(
    model_dir: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--activations disk --offload-dir D``: the plan and the run use the disk store in D."""
    offload = tmp_path / "offload"
    offload.mkdir()
    extra = ("--ratio", "0.3", "--activations", "disk", "--offload-dir", str(offload))
    code, _, err = run_cli(capsys, argv(model_dir, calib, tmp_path / "o", *extra))
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "intraslice.json").read_text())
    assert report["memory_plan"]["policy"]["store"] == "disk"
    assert report["method"]["devices"]["store"] == "disk"
    assert report["config"]["offload_dir"] == str(offload)  # the policy the layer steps build


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[modle]\nmodel = 'x'\n", "unknown table [modle]"),
        ("[goal]\nration = 0.3\n", "unknown key 'ration' in [goal]"),
        ("[goal]\nratio = 'much'\n", "[goal] ratio"),
        ("[calibration]\nnsamples = 1.5\n", "[calibration] nsamples"),
        ("[method]\nmethod = 'magic'\n", "'magic' is not one of"),
        ("[evaluation]\nenabled = 1\n", "must be true or false"),
        ("[goal\nratio = 0.3\n", "not valid TOML"),
        (None, "no such file"),
    ],
)
def test_bad_config_files_are_one_line(
    content: str | None, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.toml"
    if content is not None:
        path.write_text(content)
    code, _, err = run_cli(capsys, ["prune", "--config", str(path), "--out", str(tmp_path / "out")])
    assert_user_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_help_lists_the_ablations_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    short = capsys.readouterr().out
    assert "--calib-repeat-estimator" not in short and "--rope-score" not in short and "--ratio" in short
    assert "--grad-checkpointing" not in short  # a no-op option: gone
    with pytest.raises(SystemExit):
        main(["prune", "--help-all"])
    assert "--calib-repeat-estimator" in capsys.readouterr().out


def test_the_stages_run_in_their_documented_order() -> None:
    names = [s.name for s in STAGES]
    assert names == [
        "check", "load", "resolve", "plan", "heal_plan", "calibrate", "goal",
        "speed_search", "evaluate_dense", "allocate", "prune", "evaluate_pruned", "heal", "speed_check", "save",
        "heal_report", "export",
    ]  # fmt: skip


# -- a method registered here, and nowhere else -----------------------------------------------
class FirstChannelsMLP(ChannelMLPStep):
    """The toy's MLP step: keep the first ``keep`` channels, whatever they are worth."""

    def compress(self, ctx, collected, keep: int) -> MLPDone:  # type: ignore[no-untyped-def]
        stats, mids = collected
        gate, up, down = ctx.arch.gate_up_down(ctx.layer)
        kept = torch.arange(keep)
        removed = torch.ones(down.weight.shape[1], dtype=torch.bool)
        removed[kept] = False
        w_d = ctx.math(down.weight)
        d_bias = compensation_bias(w_d, ctx.math(bias_of(down)), stats.map(ctx.math), removed.to(w_d.device))
        ctx.arch.set_mlp_linears(
            ctx.layer,
            row_linear(gate, kept, ctx.dtype, ctx.device),
            row_linear(up, kept, ctx.dtype, ctx.device),
            new_linear(w_d[:, kept], d_bias, ctx.dtype, ctx.device),
        )
        return MLPDone(mids, None)


def build_toy(model, cfg):  # type: ignore[no-untyped-def]
    method, pruned, model_cls, info = get_method("channel").build(model, cfg)
    method.name, method.mlp = "toy", FirstChannelsMLP(cfg)
    return method, pruned, model_cls, {**info, "toy": True}


@pytest.fixture
def toy():
    register_method(MethodSpec(name="toy", build=build_toy, summary="first channels (a test)"))
    yield
    unregister_method("toy")


def test_a_toy_method_runs_through_the_cli_and_resume(
    toy: None, model_dir: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    assert "toy" in method_names()
    args = argv(model_dir, calib, tmp_path / "toy", "--method", "toy", "--ratio", "0.3")
    code, _, err = run_cli(capsys, args)
    assert code == 0, err
    source = load_file(str(model_dir / "model.safetensors"))
    pruned = load_file(str(tmp_path / "toy" / "model.safetensors"))
    for i in range(4):
        down = pruned[f"model.layers.{i}.mlp.down_proj.weight"]
        keep = down.shape[1]
        assert keep < source[f"model.layers.{i}.mlp.down_proj.weight"].shape[1]
        torch.testing.assert_close(down, source[f"model.layers.{i}.mlp.down_proj.weight"][:, :keep], rtol=0, atol=0)

    # killed after layer 1, the same command resumes and makes the same files
    def hook(point: str, index: int) -> None:
        if point == "layer" and index == 1:
            raise Killed(point)

    monkeypatch.setattr(resume, "TEST_HOOK", hook)
    resumed = argv(model_dir, calib, tmp_path / "resumed", "--method", "toy", "--ratio", "0.3")
    with pytest.raises(Killed):
        main(resumed)
    monkeypatch.setattr(resume, "TEST_HOOK", None)
    code, _, err = run_cli(capsys, resumed)
    assert code == 0, err
    assert_identical(tmp_path / "toy", tmp_path / "resumed")
    assert 'method = "toy"' in (tmp_path / "resumed" / RUN_CONFIG_FILE).read_text()
