"""``intraslice heal``: the loss, the teacher cache, LoRA merge, training, resume, refusals, keep-worse.

Tiny in-process models (a 4-layer Llama pruned by the engine), CPU, seconds each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import intraslice
from intraslice.cli import main
from intraslice.engine import RunConfig
from intraslice.errors import IntraSliceError
from intraslice.heal import HealConfig, heal
from intraslice.heal.loss import distill_loss, kl_from_logits
from intraslice.heal.teacher import build_cache, teacher_targets

from .conftest import VOCAB, build_tokenizer, make_tiny

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with peaked predictions (scaled weights), so that pruning opens a real KL gap."""
    d = tmp_path_factory.mktemp("heal") / "sharp"
    model = make_tiny("llama-gqa", dtype=torch.float32, n_layers=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(8.0 if "embed" in name else 4.0)
    build_tokenizer(d)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pruned_dir(sharp_dir: Path, calib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = sharp_dir
    out = tmp_path_factory.mktemp("heal") / "pruned"
    config = RunConfig()
    config.model.model, config.model.device = str(model_dir), "cpu"
    config.goal.ratio = 0.4
    config.calibration.source, config.calibration.nsamples, config.calibration.seqlen = str(calib), 6, 24
    config.method.batch_size = 4
    config.evaluation.enabled, config.output.progress = False, False
    config.output.out = str(out)
    intraslice.run(config)
    return out


def small(calib: Path, **kw) -> HealConfig:
    base = dict(
        tokens=8 * 32, data=str(calib), seqlen=32, batch=2, topk=16, eval_windows=1, eval_seqlen=64, save_every=1
    )
    base.update(kw)
    return HealConfig(**base)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# -- the loss ---------------------------------------------------------------------------------
def reference_kl(student: torch.Tensor, teacher: torch.Tensor, k: int) -> torch.Tensor:
    """Float64: both distributions coarsened to the teacher's top k tokens plus one bucket."""
    p = torch.softmax(teacher.double(), -1)
    q = torch.softmax(student.double(), -1)
    idx = p.topk(k, -1).indices
    pk, qk = p.gather(-1, idx), q.gather(-1, idx)
    pt, qt = 1 - pk.sum(-1, keepdim=True), 1 - qk.sum(-1, keepdim=True)
    P, Q = torch.cat([pk, pt], -1), torch.cat([qk, qt], -1)
    return (P * (P.log() - Q.log())).sum()


@pytest.mark.parametrize("k", [1, 8, 0])
def test_topk_kl_equals_an_independent_float64_computation(k: int) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(10, 50, generator=g) * 2, torch.randn(10, 50, generator=g) * 3
    tgt = teacher_targets(t, k)
    got = kl_from_logits(s, tgt["logp"], tgt.get("idx"), tgt.get("tail"))
    if k == 0:
        p = torch.softmax(t.double(), -1)
        ref = (p * (p.log() - torch.log_softmax(s.double(), -1))).sum()
    else:
        ref = reference_kl(s, t, k)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6), (got, ref)
    assert float(kl_from_logits(t, tgt["logp"], tgt.get("idx"), tgt.get("tail"))) == pytest.approx(0, abs=1e-5)


def test_chunked_loss_and_its_gradient_equal_the_whole_window() -> None:
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(20, 8, generator=g, requires_grad=True)
    tgt = teacher_targets(torch.randn(20, 40, generator=g), 5)
    tokens = torch.randint(0, 40, (20,), generator=g)
    loss, _, _ = distill_loss(hidden, head, tgt["logp"], tgt["idx"], tgt["tail"], tokens, 0.3, chunk=7)
    (grad,) = torch.autograd.grad(loss, hidden)
    logits = head(hidden)
    kl = kl_from_logits(logits, tgt["logp"], tgt["idx"], tgt["tail"]) / 20
    ce = torch.nn.functional.cross_entropy(logits[:-1], tokens[1:])
    ref = 0.7 * kl + 0.3 * ce
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    assert torch.allclose(loss, ref, atol=1e-6) and torch.allclose(grad, ref_grad, atol=1e-6)


# -- the teacher cache ------------------------------------------------------------------------
def test_teacher_cache_round_trip_and_reuse(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from intraslice.checkpoint import SourceCheckpoint
    from intraslice.pipeline import DevicePolicy

    ckpt = SourceCheckpoint.from_directory(model_dir)
    windows = torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(2))
    calls = []
    cache = build_cache(tmp_path / "t", ckpt, windows, 8, DevicePolicy("cpu"), "k", 2, False, on_shard=calls.append)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = teacher_targets(model(input_ids=windows).logits, 8)
    for w in range(5):
        logp, idx, tail = cache.get(w)
        assert idx.dtype == torch.int32 and torch.equal(idx.long(), ref["idx"][w].long())
        assert torch.allclose(logp, ref["logp"][w], atol=1e-5) and torch.allclose(tail, ref["tail"][w], atol=1e-5)
    assert calls == [0, 1, 2]
    # an interrupted pass: the finished shards are reused, the rest recomputed
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(manifest))
    calls.clear()
    again = build_cache(tmp_path / "t", ckpt, windows, 8, DevicePolicy("cpu"), "k", 2, False, on_shard=calls.append)
    assert calls == [1, 2]
    assert torch.equal(again.get(4)[0], cache.get(4)[0])
    # a middle shard lost: only the prefix before it is kept, the rest recomputed
    (tmp_path / "t" / "shard-00001.safetensors").unlink()
    calls.clear()
    third = build_cache(tmp_path / "t", ckpt, windows, 8, DevicePolicy("cpu"), "k", 2, False, on_shard=calls.append)
    assert calls == [1, 2] and third.manifest["shards"] == [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert all(torch.equal(third.get(w)[0], cache.get(w)[0]) for w in range(5))


# -- the heal ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "full"])
def test_heal_keeps_the_shapes_and_files_and_lowers_the_kl(
    method: str, pruned_dir: Path, calib: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "healed"
    cfg = small(calib, method=method, lr=3e-3 if method == "lora" else 1e-3, tokens=24 * 32, keep_worse=True)
    rec = heal(pruned_dir, out, cfg, progress=False, log=lambda _: None)
    files = sorted(p.name for p in pruned_dir.iterdir())
    assert sorted(p.name for p in out.iterdir()) == files
    before, after = weights(pruned_dir), weights(out)
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape and before[k].dtype == after[k].dtype for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32)
    assert [p.shape for p in m.parameters()] == [p.shape for p in ref.parameters()]
    assert type(m).__name__ == "IntraSliceForCausalLM"
    # the saved weights are the trained ones: logits of the reloaded model = the state's
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = m(input_ids=ids).logits
    sd = {k: v.float() for k, v in after.items()}
    ref.load_state_dict(sd, strict=False)
    with torch.no_grad():
        b = ref(input_ids=ids).logits
    assert torch.equal(a, b)
    train = rec["training"]
    assert train["kl_last"] < 0.8 * train["kl_first"], train
    report = json.loads((out / "intraslice.json").read_text())
    assert report["heal"]["kept"] == "healed" and report["heal"]["config"]["method"] == method
    if method == "lora":
        assert not any("lora" in k for k in after)


def test_resume_after_an_interruption_is_bit_identical(pruned_dir: Path, calib: Path, tmp_path: Path) -> None:
    cfg = small(calib, keep_worse=True, save_every=2)
    heal(pruned_dir, tmp_path / "a", cfg, progress=False, log=lambda _: None)

    def boom(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal(pruned_dir, tmp_path / "b", cfg, progress=False, log=lambda _: None, on_step=boom)
    assert not (tmp_path / "b").exists() and (tmp_path / ".b.heal" / "train" / "train.json").is_file()
    lines: list[str] = []
    heal(pruned_dir, tmp_path / "b", cfg, progress=False, log=lines.append)
    assert any("resuming at step 2" in line for line in lines), lines
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (tmp_path / ".b.heal").exists()


def test_sigkill_mid_training_resumes_bit_identically(pruned_dir: Path, calib: Path, tmp_path: Path) -> None:
    """A child process killed with SIGKILL after step 2 (state saved after step 1), then resumed."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from intraslice.heal import HealConfig, heal\n"
        "cfg = HealConfig(**{k: v for k, v in "
        + repr(small(calib, keep_worse=True, save_every=2).to_dict())
        + ".items()})\n"
        "kill = os.environ.get('KILL_AT')\n"
        "def step(s):\n"
        "    if kill and s == int(kill): os.kill(os.getpid(), signal.SIGKILL)\n"
        "heal(sys.argv[1], sys.argv[2], cfg, progress=False, on_step=step)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda out, **e: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, str(pruned_dir), str(out)], env={**env, **e}, capture_output=True, text=True
    )
    a = run(tmp_path / "a")
    assert a.returncode == 0, a.stderr[-2000:]
    killed = run(tmp_path / "b", KILL_AT="2")
    assert killed.returncode == -9
    resumed = run(tmp_path / "b")
    assert resumed.returncode == 0 and "resuming at step 2" in resumed.stdout, resumed.stdout + resumed.stderr
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_heal_made_worse_keeps_the_pre_heal_weights(pruned_dir: Path, calib: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    rec = heal(pruned_dir, tmp_path / "w", small(calib, method="full", lr=5.0, warmup=0.0), progress=False,
               log=lines.append)  # fmt: skip
    assert rec["worse"] and rec["kept"] == "pre-heal"
    assert any("keeping the pre-heal weights" in line for line in lines)
    assert rec["held_out"]["after_discarded"] and rec["held_out"]["model"] == rec["held_out"]["before"]
    assert all(line.endswith("(discarded)") for line in lines if "after, perplexity" in line)
    wp, ww = weights(pruned_dir), weights(tmp_path / "w")
    assert all(torch.equal(wp[k], ww[k]) for k in wp)
    rec = heal(pruned_dir, tmp_path / "k", small(calib, method="full", lr=5.0, warmup=0.0, keep_worse=True),
               progress=False, log=lines.append)  # fmt: skip
    assert rec["kept"] == "healed" and not torch.equal(
        weights(tmp_path / "k")["model.norm.weight"], wp["model.norm.weight"]
    )


# -- refusals ---------------------------------------------------------------------------------
def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(["heal", *argv, "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.startswith("intraslice: error:")]
    assert len(lines) == 1, err
    return lines[0]


def other_teacher(tmp_path: Path, vocab: int = VOCAB, layers: int = 4, seed: int = 0) -> Path:
    d = tmp_path / f"teacher-{vocab}-{layers}-{seed}"
    model = make_tiny("llama-gqa", dtype=torch.float32, n_layers=layers, seed=seed)
    build_tokenizer(d)
    if vocab != VOCAB:
        model.resize_token_embeddings(vocab)
    model.save_pretrained(d)
    return d


def test_refusals_are_one_line_exit_2_and_write_nothing(
    pruned_dir: Path, sharp_dir: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    base = [str(pruned_dir), "--out", str(out), "--data", str(calib), "--seqlen", "32"]
    assert "nothing to train on" in refused(capsys, *base, "--tokens", "0")
    assert "vocabulary" in refused(capsys, *base, "--teacher", str(other_teacher(tmp_path, vocab=VOCAB + 64)))
    assert "layers" in refused(capsys, *base, "--teacher", str(other_teacher(tmp_path, layers=3)))
    assert "was not pruned from it" in refused(capsys, *base, "--teacher", str(other_teacher(tmp_path, seed=7)))
    # training text that holds WikiText-2 test
    from intraslice.data import wikitext2_test_text

    leak = tmp_path / "mine.txt"
    leak.write_text(calib.read_text() + "\n" + wikitext2_test_text().text[:20000], encoding="utf-8")
    line = refused(capsys, str(pruned_dir), "--out", str(out), "--data", str(leak))
    assert "evaluation set wikitext2 test" in line
    assert "evaluation text" in refused(capsys, *base[:-4], "--data", "wikitext2")
    assert "not one pruned by intraslice" in refused(capsys, str(sharp_dir), "--out", str(out))
    assert not out.exists() and not (tmp_path / ".out.heal").exists()


# -- the engine stage -------------------------------------------------------------------------
def test_prune_heal_tokens_is_a_stage_of_the_one_engine(
    sharp_dir: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["prune", "--model", str(sharp_dir), "--ratio", "0.4", "--calib", str(calib), "--nsamples", "6",
            "--seqlen", "24", "--batch-size", "4", "--device", "cpu", "--no-progress", "--eval-windows", "1",
            "--eval-seqlen", "64", "--no-incontext", "--no-zeroshot", "--heal-data", str(calib),
            "--heal-tokens", "512", "--heal-keep-worse"]  # fmt: skip
    code = main([*argv, "--out", str(tmp_path / "h")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "-> healed" in out and "heal plan: training" in out
    report = json.loads((tmp_path / "h" / "intraslice.json").read_text())
    assert report["heal"]["kept"] == "healed" and report["perplexities"]["wikitext2"]["healed"]["ppl"] > 0
    code = main([*argv[:-5], "--out", str(tmp_path / "p")])
    capsys.readouterr()
    wh, wp = weights(tmp_path / "h"), weights(tmp_path / "p")
    assert wh.keys() == wp.keys() and all(wh[k].shape == wp[k].shape for k in wh)
    assert any(not torch.equal(wh[k], wp[k]) for k in wh)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no resume area left


def prune_and_heal(sharp_dir: Path, calib: Path, tmp_path: Path, **method: object) -> None:
    """``tmp_path/pruned`` at ratio 0.3 with the ``method`` options, healed (LoRA merged) into ``tmp_path/healed``."""
    config = RunConfig()
    config.model.model, config.model.device = str(sharp_dir), "cpu"
    config.goal.ratio = 0.3
    for key, value in method.items():
        setattr(config.method, key, value)
    config.calibration.source, config.calibration.nsamples, config.calibration.seqlen = str(calib), 6, 24
    config.evaluation.enabled, config.output.progress = False, False
    config.output.out = str(tmp_path / "pruned")
    intraslice.run(config)
    heal(tmp_path / "pruned", tmp_path / "healed", small(calib, keep_worse=True, eval_windows=0), progress=False,
         log=lambda _: None)  # fmt: skip


def test_a_healed_stock_model_still_exports_to_stock_transformers(sharp_dir: Path, calib: Path, tmp_path: Path) -> None:
    """--deploy stock, healed (LoRA merged): the stock export loads in plain transformers and
    gives the healed model's logits."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from intraslice.export.stock_hf import export_stock_hf

    prune_and_heal(sharp_dir, calib, tmp_path, deploy="stock")
    export_stock_hf(tmp_path / "healed", tmp_path / "stock")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "healed", dtype=torch.float32)
    stock = LlamaForCausalLM.from_pretrained(tmp_path / "stock", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, stock(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    wp, wh = weights(tmp_path / "pruned"), weights(tmp_path / "healed")
    assert any(not torch.equal(wp[k], wh[k]) for k in wp)  # the export carries the healed weights


def test_a_healed_llamacpp_model_serves_in_llamacpp_as_it_runs_here(
    sharp_dir: Path, calib: Path, tmp_path: Path
) -> None:
    """--deploy llamacpp with attention pruned, healed (LoRA merged): its GGUF export, in
    llama.cpp's own server (f32, exact), gives every log-probability of the healed model."""
    pytest.importorskip("xllamacpp", reason="needs the serve extra: pip install 'intraslice[serve]'")
    from transformers import AutoModelForCausalLM

    from intraslice.export.gguf import export_gguf, find_llama_cpp
    from intraslice.serve import LlamaCppServer

    try:
        root = find_llama_cpp(download=False)
    except IntraSliceError as exc:
        pytest.skip(str(exc))
    prune_and_heal(sharp_dir, calib, tmp_path, deploy="llamacpp", attention_share=1.0, head_width=8)
    wp, wh = weights(tmp_path / "pruned"), weights(tmp_path / "healed")
    assert any(not torch.equal(wp[k], wh[k]) for k in wp)  # the heal changed the weights
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "healed", dtype=torch.float64).eval()
    assert min(s["head_dim"] for s in model.config.layers) < 16  # attention was pruned
    path = export_gguf(tmp_path / "healed", tmp_path / "healed.gguf", "f32", llama_cpp=root, tokenizer_pre="gpt-2")
    ids = torch.randint(0, VOCAB, (32,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    ours = lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    with LlamaCppServer(path, n_ctx=64, threads=1, exact=True) as server:
        theirs = torch.tensor(server.token_logprobs(ids), dtype=torch.float64)
    assert (theirs - ours).abs().max().item() < 1e-4, (theirs - ours).abs().max().item()


def test_the_cli_heals(pruned_dir: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["heal", str(pruned_dir), "--out", str(tmp_path / "o"), "--data", str(calib), "--seqlen", "32",
            "--batch", "2", "--tokens", "128", "--eval-windows", "1", "--eval-seqlen", "64", "--keep-worse",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "heal plan: training" in out and "tokens/s" in out and f"wrote {tmp_path / 'o'}" in out
    assert json.loads((tmp_path / "o" / "intraslice.json").read_text())["heal"]["training"]["steps"] == 2


# -- review fixes -----------------------------------------------------------------------------
def test_the_teacher_cache_key_identifies_the_windows() -> None:
    from intraslice.heal.run import windows_digest

    a = torch.zeros(4, 8, dtype=torch.long)
    b = a.clone()
    b[3, 7] = 1
    assert windows_digest(a) == windows_digest(a.clone()) != windows_digest(b)


def test_the_cached_before_check_is_of_the_same_eval_settings(calib: Path, tmp_path: Path) -> None:
    from intraslice.heal.run import cached_held_out, write_cached_held_out

    path = tmp_path / "before.json"
    res = {"wikitext2": {"ppl": 3.0, "windows": 1, "seqlen": 64}}
    assert cached_held_out(path, small(calib)) is None  # absent
    write_cached_held_out(path, small(calib), res)
    assert cached_held_out(path, small(calib)) == res and not list(tmp_path.glob("*.tmp"))
    assert cached_held_out(path, small(calib, eval_windows=2)) is None
    assert cached_held_out(path, small(calib, eval_seqlen=128)) is None
    assert cached_held_out(path, small(calib, eval_texts="wikitext2")) is None
    path.write_text('{"wikitext2": {"pp', encoding="utf-8")  # torn by a kill
    assert cached_held_out(path, small(calib)) is None


def test_lora_without_peft_is_refused_before_any_work(
    pruned_dir: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    out = tmp_path / "out"
    line = refused(capsys, str(pruned_dir), "--out", str(out), "--data", str(calib), "--method", "lora")
    assert "needs peft" in line
    assert not out.exists() and not (tmp_path / ".out.heal").exists()


def test_a_heal_never_copies_an_export_of_the_pre_heal_weights(pruned_dir: Path, calib: Path, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "pruned"
    shutil.copytree(pruned_dir, src)
    (src / "model-f32.gguf").write_bytes(b"GGUF pre-heal")
    (src / "stock-hf").mkdir()
    heal(src, tmp_path / "o", small(calib, keep_worse=True, eval_windows=0, tokens=64), progress=False,
         log=lambda _: None)  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert "model-f32.gguf" not in names and "stock-hf" not in names
    assert names == sorted(p.name for p in pruned_dir.iterdir())


def test_the_before_check_of_a_healed_directory_is_the_healed_one(calib: Path) -> None:
    from intraslice.heal.run import recorded_before

    cfg = small(calib, eval_texts="wikitext2")
    ppl = lambda v: {"ppl": v, "windows": 1, "seqlen": 64}  # noqa: E731
    report = {"perplexities": {"wikitext2": {"dense": ppl(2.0), "pruned": ppl(5.0)}}}
    assert recorded_before(report, cfg)["wikitext2"]["ppl"] == 5.0
    healed = {**report, "heal": {"kept": "healed", "held_out": {"after": {"wikitext2": ppl(4.0)}}}}
    assert recorded_before(healed, cfg)["wikitext2"]["ppl"] == 4.0
    healed["heal"]["held_out"]["after"] = {"wikitext2": {**ppl(4.0), "windows": 3}}  # other windows: measure
    assert recorded_before(healed, cfg) is None
    kept = {**report, "heal": {"kept": "pre-heal", "held_out": {"before": {"wikitext2": ppl(4.5)},
                                                                "after": {"wikitext2": ppl(6.0)}}}}  # fmt: skip
    assert recorded_before(kept, cfg)["wikitext2"]["ppl"] == 4.5  # the heal's input (maybe healed before)


def fake_run(tmp_path: Path, **kw):
    from types import SimpleNamespace

    config = RunConfig()
    config.heal.tokens = 64
    config.output.out = str(tmp_path / "out")
    base = dict(config=config, main_rank=True, ck=None, device="cpu", ppl={}, timings={}, log=lambda _: None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_the_stage_removes_its_temporary_state_when_the_heal_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from intraslice.heal import stage

    made = tmp_path / "state"

    def mkdtemp(prefix: str) -> str:
        made.mkdir()
        return str(made)

    def boom(*args) -> None:
        (made / "teacher").mkdir()
        raise RuntimeError("distil failed")

    monkeypatch.setattr(stage.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(stage, "_heal_and_stage", boom)
    with pytest.raises(RuntimeError, match="distil failed"):
        stage.heal_pruned(fake_run(tmp_path))
    assert not made.exists()


def test_a_discarded_heal_is_never_reported_as_the_models_perplexity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from intraslice.cli import _print_summary
    from intraslice.heal import stage

    ppl = lambda v: {"ppl": v, "windows": 1, "windows_total": 9, "seqlen": 64, "source": "wikitext2"}  # noqa: E731
    record = {"held_out": {"before": {"wikitext2": ppl(5.0)}, "after": {"wikitext2": ppl(7.0)}},
              "worse": ["wikitext2"], "kept": "pre-heal", "files": []}  # fmt: skip
    monkeypatch.setattr(stage, "_heal_and_stage", lambda *a: record)
    lines: list[str] = []
    run = fake_run(tmp_path, ppl={"wikitext2": {"dense": ppl(4.0), "pruned": ppl(5.0)}}, log=lines.append)
    stage.heal_pruned(run)
    assert "healed" not in run.ppl["wikitext2"] and run.ppl["wikitext2"]["healed_discarded"]["ppl"] == 7.0
    assert any("7.000 (discarded" in line for line in lines), lines
    n = {"decoder_linear": 10, "whole_model": 20}
    report = {"params_before": n, "params_after": n, "reduction": {k: 0.0 for k in n}, "perplexities": run.ppl,
              "timings_s": {"total": 1.0}, "peak_memory": {"host_peak_rss_mb": 1.0}, "layers": []}  # fmt: skip
    _print_summary(report, tmp_path)
    out = capsys.readouterr().out
    assert "-> healed" not in out and "healed 7.000: discarded" in out


def test_the_validation_windows_are_the_packed_texts_last_never_trained_on(
    calib: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import intraslice.data
    from intraslice.heal.run import training_windows

    monkeypatch.setattr(intraslice.data, "tokenize", lambda tok, text: torch.arange(20 * 32 + 5))  # distinct windows
    train, val, _ = training_windows(None, small(calib, val_windows=3), log=lambda _: None)
    first = lambda w: {int(r[0]) // 32 for r in w}  # noqa: E731  (the window's index)
    assert train.shape == (8, 32) and val.shape == (3, 32) and not first(train) & first(val)
    assert max(first(val)) == max(set(range(20)) - first(train))  # the last of the windows left over
    assert torch.equal(train, training_windows(None, small(calib, val_windows=0), log=lambda _: None)[0])
    # a short text: a quarter of its windows at most
    monkeypatch.setattr(intraslice.data, "tokenize", lambda tok, text: torch.arange(8 * 32))
    train, val, _ = training_windows(None, small(calib), log=lambda _: None)
    assert torch.equal(val, torch.arange(6 * 32, 8 * 32).view(2, 32)) and train.shape[0] == 6


def test_keep_worse_decides_on_validation_never_on_the_test_splits(
    pruned_dir: Path, calib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from intraslice.heal import run as heal_run

    def fake_held_out(directory: Path, tokenizer, cfg, device, progress):  # the test splits: always worse
        v = 5.0 if Path(directory) == pruned_dir else 9.0
        return {t: {"ppl": v, "windows": cfg.eval_windows, "seqlen": cfg.eval_seqlen} for t in cfg.texts()}

    real, seen = heal_run.validation_ppl, []

    def fake_validation(model, windows):  # measured as it is, reported as better after
        seen.append(real(model, windows))
        return 10.0 if len(seen) == 1 else 8.0

    monkeypatch.setattr(heal_run, "held_out", fake_held_out)
    monkeypatch.setattr(heal_run, "validation_ppl", fake_validation)
    rec = heal(pruned_dir, tmp_path / "o", small(calib), progress=False, log=lambda _: None)
    assert rec["validation"] == {"windows": 4, "seqlen": 32, "before": 10.0, "after": 8.0}
    assert rec["kept"] == "healed" and rec["worse"] == [] and rec["held_out_worse"] == ["wikitext2", "c4-heldout"]
    assert len(seen) == 2 and seen[0] != seen[1]  # the pre-heal and the healed weights
    # and the other way round: validation worse, test splits better -> the pre-heal weights
    calls: list[int] = []
    monkeypatch.setattr(heal_run, "validation_ppl", lambda model, windows: 10.0 if calls.append(1) or len(calls) == 1
                        else 12.0)  # fmt: skip
    monkeypatch.setattr(heal_run, "held_out", lambda d, *a: {"wikitext2": {"ppl": 1.0 if d != pruned_dir else 5.0,
                                                                             "windows": 1, "seqlen": 64}})  # fmt: skip
    rec = heal(pruned_dir, tmp_path / "p", small(calib, eval_texts="wikitext2"), progress=False, log=lambda _: None)
    assert rec["kept"] == "pre-heal" and rec["worse"] == ["validation"] and rec["held_out_worse"] == []


def test_validation_ppl_is_the_models_perplexity_on_the_windows(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from intraslice.heal.run import validation_ppl

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    windows = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).exp()
    assert validation_ppl(model, windows, chunk=7) == pytest.approx(float(ref), rel=1e-5)
    assert validation_ppl(model, windows[:0]) is None
