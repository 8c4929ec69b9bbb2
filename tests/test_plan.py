"""The memory plan: from the config alone (meta device), for the models users bring."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from intraslice.cli import main
from intraslice.errors import IntraSliceError
from intraslice.plan import GiB, make_plan, refuse_unless_fits

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    dtype="bfloat16",
)
LLAMA2_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=4096,
    dtype="bfloat16",
)


@pytest.mark.parametrize("dims", [LLAMA3_8B, LLAMA2_70B], ids=["llama3-8b", "llama2-70b"])
def test_default_calibration_fits_one_80gb_gpu(dims: dict) -> None:
    plan = make_plan(LlamaConfig(**dims), 128, 2048, device="cuda", device_capacity=80 * GiB, host_capacity=256 * GiB)
    assert plan.fits(), plan.describe()
    assert plan.peak_device <= 80 * GiB
    assert set(plan.stages) == {"prune", "estimator", "evaluate"}
    # the host memory it needs is stated, and is far below the model's size
    params_bytes = plan.model["params"] * 2
    assert 0 < plan.peak_host < params_bytes
    assert "host" in plan.describe() and "fits" in plan.describe()
    # every stage holds one layer at a time: the device peak is independent of the depth
    deeper = make_plan(
        LlamaConfig(**{**dims, "num_hidden_layers": 2 * dims["num_hidden_layers"]}),
        128,
        2048,
        device="cuda",
        device_capacity=80 * GiB,
        host_capacity=256 * GiB,
    )
    assert deeper.stages["prune"].device == plan.stages["prune"].device


def test_8b_keeps_the_estimator_resident_70b_streams() -> None:
    kw = dict(device="cuda", device_capacity=80 * GiB, host_capacity=256 * GiB)
    assert make_plan(LlamaConfig(**LLAMA3_8B), 128, 2048, **kw).policy["estimator_weights"] == "resident"
    assert make_plan(LlamaConfig(**LLAMA2_70B), 128, 2048, **kw).policy["estimator_weights"] == "streamed"


def test_the_estimator_is_planned_on_its_own_windows() -> None:
    """The layer steps' windows carry an appended span (3072 tokens at the default); the
    estimator's are the plain 2048: its peak is the plain run's, the layer steps' the longer."""
    cfg, kw = LlamaConfig(**LLAMA3_8B), dict(device="cuda", device_capacity=80 * GiB, host_capacity=256 * GiB)
    plain, long = make_plan(cfg, 128, 2048, **kw), make_plan(cfg, 128, 3072, **kw)
    split = make_plan(cfg, 128, 3072, estimator_seqlen=2048, **kw)
    assert split.stages["estimator"] == plain.stages["estimator"] != long.stages["estimator"]
    assert split.stages["prune"] == long.stages["prune"]


def test_fallbacks_then_refusal() -> None:
    cfg = LlamaConfig(**LLAMA2_70B)
    roomy = make_plan(cfg, 128, 2048, device="cuda", device_capacity=80 * GiB, host_capacity=256 * GiB)
    assert roomy.policy["store"] == "device" and roomy.policy["math"] == "device"
    tight = make_plan(cfg, 128, 2048, device="cuda", device_capacity=24 * GiB, host_capacity=256 * GiB)
    assert tight.fits() and tight.peak_device <= 24 * GiB
    assert (tight.policy["store"], tight.policy["math"]) != ("device", "device")  # something moved off the GPU
    small_host = make_plan(cfg, 512, 4096, device="cuda", device_capacity=48 * GiB, host_capacity=16 * GiB)
    assert small_host.fits() and small_host.policy["store"] == "disk"
    hopeless = make_plan(cfg, 128, 2048, device="cuda", device_capacity=8 * GiB, host_capacity=256 * GiB)
    assert not hopeless.fits()
    with pytest.raises(IntraSliceError, match=r"does not fit: device needs .* --batch-size"):
        refuse_unless_fits(hopeless)


def test_cli_plan_prints_and_exits_without_output(tiny_model_dir, capsys, tmp_path) -> None:
    rc = main(["prune", "--model", str(tiny_model_dir), "--plan", "--nsamples", "8", "--seqlen", "32"])
    out = capsys.readouterr().out
    assert rc == 0 and "memory plan" in out and "fits" in out
    # plan for a GPU this machine does not have
    rc = main(["prune", "--model", str(tiny_model_dir), "--plan", "--device", "cuda", "--device-memory", "80GB"])
    assert rc == 0 and "device cuda" in capsys.readouterr().out
    rc = main(["prune", "--model", str(tiny_model_dir), "--plan", "--device", "cuda", "--device-memory", "1KB"])
    assert rc == 2 and "DOES NOT FIT" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]  # no output directory appeared


def test_cli_refuses_a_run_that_does_not_fit(tiny_model_dir, capsys, tmp_path) -> None:
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(tiny_model_dir), "--out", str(out), "--host-memory", "1MB", "--no-eval"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit" in err and err.count("\n") == 1
    assert not out.exists()


def test_predicted_host_peak_within_25_percent_of_measured(tmp_path) -> None:
    """A synthetic model pruned in a child process: the plan's peak host memory against the
    child's measured peak RSS (the estimator, the pruning and both evaluations run)."""
    import json
    import os
    import subprocess
    import sys

    import torch
    from transformers import LlamaForCausalLM

    from .conftest import build_tokenizer

    src = tmp_path / "src"
    tok = build_tokenizer(src)
    cfg = LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=len(tok),
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(src, max_shard_size="20MB")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and the fox {i}" for i in range(40000)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "intraslice", "prune", "--model", str(src), "--ratio", "0.3", "--calib", str(text)]
    cmd += ["--nsamples", "16", "--seqlen", "512", "--eval-seqlen", "256", "--eval-windows", "2", "--no-progress"]
    cmd += ["--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "intraslice.json").read_text())
    measured = report["peak_memory"]["host_peak_rss_mb"] * 2**20
    predicted = report["memory_plan"]["peak_host"]
    print(f"peak host RSS measured {measured / 2**20:.0f} MiB, predicted {predicted / 2**20:.0f} MiB")
    assert abs(measured - predicted) <= 0.25 * measured, (measured / 2**20, predicted / 2**20)


def test_reported_peak_rss_is_the_process_own_not_its_parent() -> None:
    """``ru_maxrss`` starts at the parent's RSS at fork; a run started from a large process
    (pytest, a benchmark script) must still report its own peak (the plan test above and
    bench/scale.py compare against it)."""
    import subprocess
    import sys

    ballast = torch.ones(2**30 // 4)  # 1 GiB resident in this (parent) process
    code = "from intraslice.memory import peak_rss_bytes; print(peak_rss_bytes())"
    own = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del ballast
    from intraslice.memory import peak_rss_bytes

    assert own < peak_rss_bytes()  # this process holds the ballast and pytest; the child imports less
    assert own < 800 * 2**20, own / 2**20  # torch, transformers and intraslice (~400 MiB), no ballast
