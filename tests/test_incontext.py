"""The in-context evaluation (eval/incontext.py): seeded inputs, exact losses, CLI, prune report line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from intraslice.checkpoint import SourceCheckpoint
from intraslice.cli import main
from intraslice.errors import IntraSliceError
from intraslice.eval import incontext as ic
from intraslice.pipeline import DevicePolicy

from .conftest import VOCAB, build_tokenizer, make_tiny


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def reference_nll(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(n, T-1) next-token NLL from the model's own full forward, log-softmax and gather."""
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[:, :-1].to(torch.float64)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return -logp.gather(-1, tokens[:, 1:, None])[..., 0]


# -- seeded inputs -------------------------------------------------------------------------------
def test_copy_sequences_are_seeded_and_repeated() -> None:
    a = ic.copy_sequences(50, vocab_size=49152)
    b = ic.copy_sequences(50, vocab_size=151936)  # another model, another vocabulary >= 20000
    assert torch.equal(a, b) and a.shape == (8, 100)
    assert torch.equal(a[:, :50], a[:, 50:])
    assert int(a.min()) >= 1000 and int(a.max()) < 20000
    assert not torch.equal(a, ic.copy_sequences(50, vocab_size=49152, seed=1))
    small = ic.copy_sequences(20, vocab_size=VOCAB, sequences=3)
    low, high = ic.copy_id_range(VOCAB)
    assert (low, high) == (160, VOCAB) and int(small.min()) >= low and int(small.max()) < high


def test_every_model_sees_the_same_inputs() -> None:
    """Two different models (weights, architecture) get the same copy sequences and pass-key prompts."""
    seen: dict[str, list[torch.Tensor]] = {}
    for name in ("llama-gqa", "qwen2"):
        model = make_tiny(name, seed=3 if name == "qwen2" else 0)
        seen[name] = []
        handle = model.model.embed_tokens.register_forward_pre_hook(lambda _m, args, s=seen[name]: s.append(args[0]))
        ic.evaluate_incontext(model, parts="copy", spans=(10, 30), sequences=2)
        handle.remove()
    assert len(seen["llama-gqa"]) == 2
    for x, y in zip(seen["llama-gqa"], seen["qwen2"], strict=True):
        assert torch.equal(x, y)


def test_passkey_prompts_are_seeded_and_placed(tmp_path: Path) -> None:
    tok = build_tokenizer(tmp_path / "tok")
    filler = torch.arange(10, 2010) % 300
    p1, lens, depths, keys = ic.passkey_prompts(tok, filler, context=240, depths=(0.0, 0.5, 1.0), per_depth=2)
    p2, *_rest, keys2 = ic.passkey_prompts(tok, filler, context=240, depths=(0.0, 0.5, 1.0), per_depth=2)
    assert torch.equal(p1, p2) and keys == keys2 and p1.shape == (6, 240)
    assert depths == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0] and len(set(keys)) == 6
    for row, n, key in zip(p1, lens, keys, strict=True):
        assert tok.decode(row[-n:]).strip() == key
        assert f"The pass key is {key}." in tok.decode(row)
    # Depth 0: the needle right after the intro; depth 1: right before the question.
    intro = len(tok(ic.PASSKEY_INTRO)["input_ids"])
    needle = tok(ic.PASSKEY_NEEDLE.format(key=keys[0]), add_special_tokens=False)["input_ids"]
    assert p1[0, intro : intro + len(needle)].tolist() == needle


def test_lookup_prompts_are_seeded_and_placed(tmp_path: Path) -> None:
    tok = build_tokenizer(tmp_path / "tok")
    filler = torch.arange(10, 2010) % 300
    p1, lens, depths, values, n_lines, first = ic.lookup_prompts(
        tok, filler, context=240, depths=(0.0, 0.5, 1.0), per_depth=2
    )
    p2, *_rest = ic.lookup_prompts(tok, filler, context=240, depths=(0.0, 0.5, 1.0), per_depth=2)
    assert torch.equal(p1, p2) and p1.shape == (6, 240) and depths == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    for row, n, value, lines, depth, f in zip(p1, lens, values, n_lines, depths, first, strict=True):
        text = tok.decode(row)
        assert tok.decode(row[-n:]).strip() == value
        assert tok.decode(row[-n + f : -n + f + 1]).strip() and not tok.decode(row[-n : -n + f]).strip()
        table = text[text.index(ic.LOOKUP_INTRO.strip()) :].split("\n")[2 : 2 + lines]
        pairs = [ln.split(": ") for ln in table]
        assert len(pairs) == lines >= 4 and all(len(p) == 2 for p in pairs)
        keys = [k for k, _v in pairs]
        assert len(set(keys)) == lines  # unique keys: one right answer
        query = text.rsplit("\n", 1)[1].split(":")[0]
        q = keys.index(query)
        assert q == round(depth * (lines - 1)) and pairs[q][1] == value


# -- exact losses ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("stream", "chunk"), [(False, 512), (True, 512), (False, 7), (True, 7)])
def test_copy_loss_matches_an_independent_computation(stream: bool, chunk: int, monkeypatch) -> None:
    monkeypatch.setattr(ic, "HEAD_CHUNK", chunk)  # 7: the logits in many chunks of 2 tokens x 3 rows
    model = make_tiny("llama-gqa")
    span, n = 24, 3
    res = ic.evaluate_incontext(
        model, parts="copy", spans=(span,), sequences=n, seed=5, stream=stream, policy=DevicePolicy("cpu")
    )
    nll = reference_nll(model, ic.copy_sequences(span, VOCAB, n, seed=5))
    cell = res["copy"]["spans"][str(span)]
    # Targets: first copy tokens 1..span-1 (columns 0..span-2), second copy tokens span+1..2span-1.
    assert cell["first_copy_loss"] == pytest.approx(float(nll[:, : span - 1].mean()), rel=1e-10)
    assert cell["copy_loss"] == pytest.approx(float(nll[:, span:].mean()), rel=1e-10)
    assert cell["boundary_loss"] == pytest.approx(float(nll[:, span - 1].mean()), rel=1e-10)
    assert res["streamed"] is stream


def test_position_loss_buckets_match_an_independent_computation() -> None:
    model = make_tiny("qwen2")
    ids = torch.randint(0, VOCAB, (3 * 64 + 5,), generator=torch.Generator().manual_seed(2))
    res = ic.position_loss(ic.model_scorer(model), ids, seqlen=64, windows=2, bucket=16)
    nll = reference_nll(model, ids[:128].view(2, 64))  # column j predicts position j+1
    assert res["windows"] == 2 and res["windows_total"] == 3
    assert [b["start"] for b in res["buckets"]] == [0, 16, 32, 48]
    assert res["buckets"][0]["loss"] == pytest.approx(float(nll[:, 0:15].mean()), rel=1e-10)  # positions 1..15
    assert res["buckets"][2]["loss"] == pytest.approx(float(nll[:, 31:47].mean()), rel=1e-10)  # positions 32..47
    assert res["mean_loss"] == pytest.approx(float(nll.mean()), rel=1e-10)


def test_passkey_scores_match_an_independent_computation(tmp_path: Path) -> None:
    model = make_tiny("llama-mha")
    tok = build_tokenizer(tmp_path / "tok")
    filler = torch.arange(5, 3005) % 300
    res = ic.passkey_retrieval(ic.model_scorer(model), tok, filler, context=230, depths=(0.2, 0.8), per_depth=3)
    prompts, lens, _depths, _keys = ic.passkey_prompts(tok, filler, context=230, depths=(0.2, 0.8), per_depth=3)
    with torch.no_grad():
        logits = model(input_ids=prompts).logits.to(torch.float64)
    nll = reference_nll(model, prompts)
    hits, losses = [], []
    for i, n in enumerate(lens):
        pred = logits[i, 230 - 1 - n : 230 - 1].argmax(-1)
        hits.append(float(torch.equal(pred, prompts[i, 230 - n :])))
        losses.append(float(nll[i, 230 - 1 - n :].mean()))
    assert res["prompts"] == 6 and res["accuracy"] == pytest.approx(sum(hits) / 6)
    assert res["by_depth"]["0.2"]["answer_loss"] == pytest.approx(sum(losses[:3]) / 3, rel=1e-10)
    assert res["answer_loss"] == pytest.approx(sum(losses) / 6, rel=1e-10)


def test_lookup_scores_match_an_independent_computation(tmp_path: Path) -> None:
    model = make_tiny("qwen2")
    tok = build_tokenizer(tmp_path / "tok")
    filler = torch.arange(5, 3005) % 300
    res = ic.lookup_retrieval(ic.model_scorer(model), tok, filler, context=200, depths=(0.3, 0.7), per_depth=2)
    prompts, lens, _d, _v, _n, first = ic.lookup_prompts(tok, filler, context=200, depths=(0.3, 0.7), per_depth=2)
    with torch.no_grad():
        logits = model(input_ids=prompts).logits.to(torch.float64)
    nll = reference_nll(model, prompts)
    hits = [float(torch.equal(logits[i, 199 - n : 199].argmax(-1), prompts[i, 200 - n :])) for i, n in enumerate(lens)]
    losses = [float(nll[i, 199 - n :].mean()) for i, n in enumerate(lens)]
    firsts = [
        float(logits[i, 199 - n + f].argmax() == prompts[i, 200 - n + f])
        for i, (n, f) in enumerate(zip(lens, first, strict=True))
    ]
    assert res["first_token"] == pytest.approx(sum(firsts) / 4)
    assert res["prompts"] == 4 and res["accuracy"] == pytest.approx(sum(hits) / 4)
    assert res["by_depth"]["0.7"]["answer_loss"] == pytest.approx(sum(losses[2:]) / 2, rel=1e-10)
    assert res["answer_loss"] == pytest.approx(sum(losses) / 4, rel=1e-10)


def test_streamed_checkpoint_matches_the_loaded_model(tiny_model_dir: Path) -> None:
    ckpt = SourceCheckpoint.from_directory(tiny_model_dir)
    streamed = ic.evaluate_incontext(ckpt, parts="copy", spans=(16, 40), sequences=2)
    from transformers import AutoModelForCausalLM

    loaded = ic.evaluate_incontext(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), parts="copy", spans=(16, 40), sequences=2
    )
    assert streamed["streamed"] and not loaded["streamed"]
    for span in ("16", "40"):
        for key in ("copy_loss", "first_copy_loss"):
            assert streamed["copy"]["spans"][span][key] == pytest.approx(loaded["copy"]["spans"][span][key], rel=1e-5)


class PerfectCopier(nn.Module):
    """Predicts, with a wide margin, the token that followed the latest earlier occurrence of
    the current token (an ideal induction head); uniform where the token is new."""

    def __init__(self, vocab: int = 50000) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=4096)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        n, t = input_ids.shape
        logits = torch.zeros(n, t, self.config.vocab_size, dtype=torch.float64)
        for b in range(n):
            last: dict[int, int] = {}
            for j, tok in enumerate(input_ids[b].tolist()):
                if tok in last:
                    logits[b, j, input_ids[b, last[tok] + 1]] = 60.0
                last[tok] = j
        return SimpleNamespace(logits=logits)


def test_a_perfect_copier_has_zero_copy_loss() -> None:
    seqs = ic.copy_sequences(40, 50000, 4)
    assert all(len(set(row[:40].tolist())) == 40 for row in seqs)  # no repeats inside a copy
    res = ic.evaluate_incontext(PerfectCopier(), parts="copy", spans=(40,), sequences=4)["copy"]["spans"]["40"]
    assert res["copy_loss"] < 1e-20 and res["copy_top1"] == 1.0
    assert res["first_copy_loss"] == pytest.approx(math.log(50000), rel=1e-12)  # nothing to copy from
    assert res["boundary_loss"] == pytest.approx(math.log(50000), rel=1e-12)


# -- errors --------------------------------------------------------------------------------------
def test_bad_input_is_refused_before_any_work() -> None:
    model = make_tiny("llama-gqa")  # 256 positions
    with pytest.raises(IntraSliceError, match=r"copy span 200 .* more than the model's 256"):
        ic.evaluate_incontext(model, parts="copy", spans=(50, 200))
    with pytest.raises(IntraSliceError, match="copy span must be >= 2"):
        ic.evaluate_incontext(model, parts="copy", spans=(1,))
    with pytest.raises(IntraSliceError, match="unknown in-context part"):
        ic.evaluate_incontext(model, parts="copy,bogus")
    with pytest.raises(IntraSliceError, match="need the model's tokenizer"):
        ic.evaluate_incontext(model, parts="retrieval", context=200)
    with pytest.raises(IntraSliceError, match="at least one copy sequence"):
        ic.copy_sequences(20, VOCAB, sequences=0)


# -- CLI -----------------------------------------------------------------------------------------
CLI_SMALL = ("--seqlen", "128", "--windows", "1", "--bucket", "32", "--context", "256", "--per-depth", "2")


def test_cli_eval_incontext_writes_json(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ic.json"
    argv = ["eval", "incontext", "--model", str(tiny_model_dir), "--device", "cpu", "--spans", "20", "60"]
    code, stdout, err = run_cli(capsys, *argv, *CLI_SMALL, "--json", str(out), "--no-progress")
    assert code == 0, err
    res = json.loads(out.read_text())
    assert set(res["copy"]["spans"]) == {"20", "60"} and res["streamed"]
    assert res["position"]["seqlen"] == 128 and len(res["position"]["buckets"]) == 4
    assert res["retrieval"]["prompts"] == 6 and set(res["retrieval"]["by_depth"]) == {"0.1", "0.5", "0.9"}
    assert res["lookup"]["prompts"] == 6 and set(res["lookup"]["by_depth"]) == {"0.1", "0.5", "0.9"}
    assert "copy loss" in stdout and "pass-key retrieval" in stdout and "loss by position" in stdout
    assert "key-value lookup" in stdout


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--spans", "50", "200"), "copy span 200"),
        (("--parts", "copy,nope"), "unknown in-context part"),
        (("--depths", "1.5"), "depths must be in [0, 1]"),
        (("--sequences", "0"), "at least one copy sequence"),
        (("--seqlen", "512"), "512-token position window"),
    ],
)
def test_cli_eval_incontext_bad_input(capsys, tiny_model_dir: Path, tmp_path: Path, extra, needle) -> None:
    out = tmp_path / "ic.json"
    argv = ["eval", "incontext", "--model", str(tiny_model_dir), "--device", "cpu", "--spans", "20"]
    code, _stdout, err = run_cli(capsys, *argv, *CLI_SMALL, *extra, "--json", str(out), "--no-progress")
    lines = [line for line in err.strip().splitlines() if line.startswith("intraslice: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_prune_reports_copy_loss(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. Pruning makes models smaller.\n\n" * 80)
    common = ["prune", "--model", str(tiny_model_dir), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32"]
    common += ["--ratio", "0.3", "--allocation", "uniform", "--eval-windows", "1", "--eval-seqlen", "64"]
    common += ["--device", "cpu", "--no-progress"]
    code, stdout, err = run_cli(capsys, *common, "--out", str(tmp_path / "a"))
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "intraslice.json").read_text())
    dense, pruned = report["incontext"]["dense"], report["incontext"]["pruned"]
    assert dense["span"] == 128 == pruned["span"]  # 200 shortened to the tiny model's 256 positions
    assert dense["copy_loss"] != pruned["copy_loss"]
    # The dense number is the one `eval incontext` gives for that span.
    alone = ic.evaluate_incontext(SourceCheckpoint.from_directory(tiny_model_dir), parts="copy", spans=(128,))
    assert dense["copy_loss"] == pytest.approx(alone["copy"]["spans"]["128"]["copy_loss"], rel=1e-6)
    assert "copy loss (span 128" in stdout
    code, stdout, err = run_cli(capsys, *common, "--out", str(tmp_path / "b"), "--no-incontext")
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "intraslice.json").read_text())["incontext"] == {}
    assert "copy loss" not in stdout
