"""Kill-and-resume: a run killed anywhere resumes from its last finished layer and ends
bit-for-bit identical to an uninterrupted run; other settings are refused; untrusted
files stay data."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from intraslice import resume
from intraslice.cli import main
from intraslice.resume import partial_dirs

from .conftest import build_tokenizer, make_tiny
from .test_errors_and_cli import assert_user_error

#: Files whose content depends on the clock (timings, the plot of the report).
VARYING = {"intraslice.json", "allocation.png"}


class Killed(BaseException):
    """What the test hook raises: like a kill, not an error the CLI handles."""


def args(model_dir: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return [
        "prune",
        "--model",
        str(model_dir),
        "--calib",
        str(calib),
        "--nsamples",
        "6",
        "--seqlen",
        "32",
        "--batch-size",
        "4",
        "--ratio",
        "0.3",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
        "--no-eval",
        *extra,
    ]


def files(directory: Path) -> dict[str, bytes]:
    """Every file but the varying ones; the modeling code by name only (a copy of the package's
    source, which may change under a long test session)."""
    return {
        p.name: b"" if p.suffix == ".py" else p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.name not in VARYING
    }


def assert_identical(a: Path, b: Path) -> None:
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs"


def assert_no_leftovers(out: Path) -> None:
    partial, state = partial_dirs(out)
    assert not partial.exists() and not state.exists()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")) == []


def kill_at(monkeypatch: pytest.MonkeyPatch, point: str, index: int = -1) -> None:
    def hook(p: str, i: int) -> None:
        if p == point and (index == -1 or i == index):
            raise Killed(f"{p}:{i}")

    monkeypatch.setattr(resume, "TEST_HOOK", hook)


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def many_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards of ~20 KB (several per layer, flushes inside a layer and at layer ends)."""
    from intraslice import stages
    from intraslice.pipeline import streaming

    defaults = list(stages.prune.__defaults__)
    defaults[1] = 20_000  # max_shard_bytes
    monkeypatch.setattr(stages.prune, "__defaults__", tuple(defaults))
    monkeypatch.setattr(streaming.PrunedWriter.__init__, "__defaults__", ((), 30_000))


REFERENCES: dict[tuple[str, ...], Path] = {}


def reference(capsys: pytest.CaptureFixture[str], model_dir: Path, calib: Path, key: tuple[str, ...]) -> Path:
    """An uninterrupted run per (layout, extra options), shared by the tests of a session."""
    if key not in REFERENCES:
        out = model_dir.parent / ("ref-" + "-".join(k.strip("-") for k in key))
        code, _, err = run(capsys, args(model_dir, calib, out, *key[1:]))
        assert code == 0, err
        REFERENCES[key] = out
    return REFERENCES[key]


POINTS = [
    ("estimator", 3),
    ("allocation", -1),
    ("emit", 0),
    ("acts", 0),
    ("layer", 0),
    ("emit", 2),
    ("layer", 2),
    ("layer", 3),
    ("globals", -1),
    ("rename", -1),
    ("model", -1),
    ("finish", -1),
]


@pytest.mark.parametrize("layout", ["one-shard", "many-shards"])
@pytest.mark.parametrize(("point", "index"), POINTS)
def test_killed_anywhere_resumes_identical(
    point: str, index: int, layout: str, capsys, model_dir: Path, calib: Path, tmp_path: Path, monkeypatch, request
) -> None:
    if layout == "many-shards":
        request.getfixturevalue("many_shards")
    ref = reference(capsys, model_dir, calib, (layout,))
    if layout == "many-shards":
        assert len(list(ref.glob("model-*.safetensors"))) > 4
    out = tmp_path / "out"
    kill_at(monkeypatch, point, index)
    with pytest.raises(Killed):
        main(args(model_dir, calib, out))
    capsys.readouterr()
    assert not out.exists()  # never a half-written output
    partial, state = partial_dirs(out)
    assert partial.is_dir() and (state / "state.json").is_file()
    monkeypatch.setattr(resume, "TEST_HOOK", None)
    code, stdout, err = run(capsys, args(model_dir, calib, out))
    assert code == 0, err
    assert "resuming the interrupted run" in stdout
    assert_identical(ref, out)
    if point != "finish":  # killed after the report was written: it is the interrupted run's
        assert json.loads((out / "intraslice.json").read_text())["resumed"] is True
    assert_no_leftovers(out)


@pytest.mark.parametrize("method", ["slicegpt", "channel"])
def test_baselines_resume_identical(method: str, capsys, model_dir: Path, calib: Path, tmp_path, monkeypatch) -> None:
    """SliceGPT carries a residual basis from layer to layer, the channel baseline a budget."""
    extra = ("--method", method)
    ref = reference(capsys, model_dir, calib, ("one-shard", *extra))
    out = tmp_path / "out"
    for k in (0, 2):
        kill_at(monkeypatch, "layer", k)
        with pytest.raises(Killed):
            main(args(model_dir, calib, out, *extra))
    monkeypatch.setattr(resume, "TEST_HOOK", None)
    code, stdout, err = run(capsys, args(model_dir, calib, out, *extra))
    assert code == 0, err
    assert "3 layers done" in stdout
    assert_identical(ref, out)


def test_disk_activations_and_evaluation_resume(capsys, model_dir: Path, calib: Path, tmp_path, monkeypatch) -> None:
    """Activations on disk (hard-linked into the checkpoint) and the perplexity stages."""
    extra = ("--activations", "disk", "--offload-dir", str(tmp_path / "off"))
    evaluate = ("--eval-windows", "1", "--eval-seqlen", "64")
    ref_out = tmp_path / "ref"
    code, _, err = run(capsys, [a for a in args(model_dir, calib, ref_out, *evaluate) if a != "--no-eval"])
    assert code == 0, err
    out = tmp_path / "out"
    for point, index in (("dense_eval", -1), ("layer", 1), ("model", -1)):
        kill_at(monkeypatch, point, index)
        with pytest.raises(Killed):
            main([a for a in args(model_dir, calib, out, *extra, *evaluate) if a != "--no-eval"])
    monkeypatch.setattr(resume, "TEST_HOOK", None)
    code, _, err = run(capsys, [a for a in args(model_dir, calib, out, *extra, *evaluate) if a != "--no-eval"])
    assert code == 0, err
    assert_identical(ref_out, out)
    a, b = (json.loads((d / "intraslice.json").read_text())["perplexity"] for d in (ref_out, out))
    assert a["dense"]["ppl"] == b["dense"]["ppl"] and a["pruned"]["ppl"] == b["pruned"]["ppl"]
    assert not any((tmp_path / "off").rglob("*.safetensors"))


def test_sigkill_in_a_subprocess_resumes_identical(capsys, model_dir: Path, calib: Path, tmp_path: Path) -> None:
    """A real ``kill -9`` (the process kills itself after layer 1's checkpoint)."""
    ref = reference(capsys, model_dir, calib, ("one-shard",))
    out = tmp_path / "out"
    env = {**os.environ, resume.KILL_ENV: "layer:1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "intraslice", *args(model_dir, calib, out)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()
    code, stdout, err = run(capsys, args(model_dir, calib, out))
    assert code == 0, err
    assert "2 layers done" in stdout
    assert_identical(ref, out)


def test_other_settings_are_refused_then_overwrite_discards(
    capsys, model_dir: Path, calib: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "out"
    kill_at(monkeypatch, "layer", 1)
    with pytest.raises(Killed):
        main(args(model_dir, calib, out))
    monkeypatch.setattr(resume, "TEST_HOOK", None)
    capsys.readouterr()
    other = [a if a != "0.3" else "0.2" for a in args(model_dir, calib, out)]
    code, _, err = run(capsys, other)
    assert_user_error(code, err, "interrupted run with other settings", "--ratio 0.3 (now 0.2)", "--overwrite")
    code, _, err = run(capsys, [a if a != "6" else "5" for a in args(model_dir, calib, out)])
    assert_user_error(code, err, "the calibration tokens; --nsamples 6 (now 5)")
    partial, state = partial_dirs(out)
    assert partial.is_dir() and state.is_dir()  # nothing lost by a refusal
    code, stdout, err = run(capsys, [*other, "--overwrite"])
    assert code == 0, err
    assert "discarding the interrupted run" in stdout
    assert json.loads((out / "intraslice.json").read_text())["goal"]["ratio"] == 0.2
    assert_no_leftovers(out)


def test_no_resume_starts_over_and_overwrite_keeps_the_old_output_until_the_end(
    capsys, model_dir: Path, calib: Path, tmp_path: Path, monkeypatch
) -> None:
    ref = reference(capsys, model_dir, calib, ("one-shard",))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    for point in ("layer", "finish"):
        kill_at(monkeypatch, point, 1 if point == "layer" else -1)
        with pytest.raises(Killed):
            main(args(model_dir, calib, out, "--overwrite"))
        assert (out / "old.txt").read_text() == "old"  # the previous output is untouched
    monkeypatch.setattr(resume, "TEST_HOOK", None)
    capsys.readouterr()
    code, stdout, err = run(capsys, args(model_dir, calib, out, "--overwrite", "--no-resume"))
    assert code == 0, err
    assert "discarding the interrupted run" in stdout and "resuming" not in stdout
    assert_identical(ref, out)
    assert_no_leftovers(out)


def test_a_corrupt_checkpoint_is_refused_not_unpickled(capsys, model_dir: Path, calib: Path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    kill_at(monkeypatch, "layer", 1)
    with pytest.raises(Killed):
        main(args(model_dir, calib, out))
    monkeypatch.setattr(resume, "TEST_HOOK", None)
    capsys.readouterr()
    _, state = partial_dirs(out)
    acts = next(state.glob("acts-*"))
    marker = tmp_path / "pwned"
    for f in acts.iterdir():
        f.write_bytes(pickle.dumps(Payload(str(marker))))
    (acts.parent / "extra.pt").write_bytes(pickle.dumps(Payload(str(marker))))
    code, _, err = run(capsys, args(model_dir, calib, out))
    assert_user_error(code, err, "cannot read the saved activations")
    assert not marker.exists()
    assert not out.exists()


class Payload:
    """A pickle that creates a file when unpickled: it must never be."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def test_a_pickle_checkpoint_is_refused_not_unpickled(capsys, tmp_path: Path) -> None:
    """``pytorch_model.bin`` only, or a pickle named ``model.safetensors``: refused, never loaded."""
    src = tmp_path / "src"
    model = make_tiny("llama-mha", dtype=torch.float32)
    model.config.save_pretrained(src)
    build_tokenizer(src)
    marker = tmp_path / "pwned"
    torch.save({"w": Payload(str(marker))}, src / "pytorch_model.bin")
    base = ["prune", "--model", str(src), "--calib", "c4-sample", "--no-eval", "--nsamples", "2", "--seqlen", "16"]
    code, _, err = run(capsys, [*base, "--out", str(tmp_path / "o")])
    assert_user_error(code, err, "no safetensors weights", "pytorch_model.bin", "safetensors only")
    (src / "model.safetensors").write_bytes((src / "pytorch_model.bin").read_bytes())
    code, _, err = run(capsys, [*base, "--out", str(tmp_path / "o")])
    assert_user_error(code, err, "model.safetensors", "corrupt safetensors")
    assert not marker.exists()
    assert not (tmp_path / "o").exists()
    assert_no_leftovers(tmp_path / "o")


def test_no_pickle_loading_and_no_trust_remote_code_in_the_source() -> None:
    """Untrusted files stay data: no pickle loads; we never set trust_remote_code ourselves."""
    import ast

    root = Path(__file__).resolve().parents[1] / "src" / "intraslice"
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                where = f"{path.relative_to(root)}:{node.lineno}"
                assert kw.get("trust_remote_code") in (None, "False"), where
                assert not name.startswith(("pickle.", "cPickle.", "dill.", "joblib.")), where
                assert name not in ("np.load", "numpy.load") or kw.get("allow_pickle") == "False", where
                if name.endswith("torch.load") or (name == "load" and "weights_only" in kw):
                    assert kw.get("weights_only") == "True", where


def test_pruned_directory_carries_only_its_modeling_code(capsys, model_dir: Path, calib: Path) -> None:
    ref = reference(capsys, model_dir, calib, ("one-shard",))
    code = sorted(p.name for p in ref.iterdir() if p.suffix == ".py")
    assert code == ["configuration_intraslice.py", "modeling_intraslice.py"]
    config = json.loads((ref / "config.json").read_text())
    assert set(config["auto_map"].values()) <= {
        "configuration_intraslice.IntraSliceConfig",
        "modeling_intraslice.IntraSliceForCausalLM",
    }


def test_ctrl_c_says_how_to_resume(capsys, model_dir: Path, calib: Path, tmp_path: Path, monkeypatch) -> None:
    def interrupt(point: str, index: int) -> None:
        if (point, index) == ("layer", 1):
            raise KeyboardInterrupt

    monkeypatch.setattr(resume, "TEST_HOOK", interrupt)
    out = tmp_path / "out"
    code, _, err = run(capsys, args(model_dir, calib, out))
    assert code == 130 and "Traceback" not in err
    assert "the run is kept in" in err and "(2 layers done); rerun the same command to resume" in err
    monkeypatch.setattr(resume, "TEST_HOOK", None)
    code, stdout, err = run(capsys, args(model_dir, calib, out))
    assert code == 0 and "resuming the interrupted run" in stdout, err
    assert_identical(reference(capsys, model_dir, calib, ("one-shard",)), out)


def test_killed_after_the_final_rename(capsys, model_dir: Path, calib: Path, tmp_path: Path, monkeypatch) -> None:
    """The output is complete; the checkpoint left next to it goes at the next run."""
    ref = reference(capsys, model_dir, calib, ("one-shard",))
    out = tmp_path / "out"
    kill_at(monkeypatch, "renamed")
    with pytest.raises(Killed):
        main(args(model_dir, calib, out))
    monkeypatch.setattr(resume, "TEST_HOOK", None)
    assert_identical(ref, out)
    code, _, err = run(capsys, args(model_dir, calib, out))
    assert_user_error(code, err, "exists (pass --overwrite to replace it)")
    assert_identical(ref, out)
    assert_no_leftovers(out)
