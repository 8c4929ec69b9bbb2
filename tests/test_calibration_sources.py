"""Calibration sources (issue #38): the registry, mixes, hub datasets, the held-out C4 split,
the refusal of evaluation text, the recorded window hashes, and the report's texts."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from intraslice import IntraSliceError, calibration_windows, data
from intraslice.cli import main, same_family
from intraslice.data import (
    C4_HELDOUT_EVERY,
    DEFAULT_CALIB,
    c4_documents,
    c4_split,
    calibration_text,
    check_not_evaluation,
    mix_counts,
    parse_hf_source,
    parse_mix,
)

from .conftest import build_tokenizer
from .test_errors_and_cli import TEXT, assert_user_error, tiny_prune


@pytest.fixture
def tok(tmp_path: Path):
    return build_tokenizer(tmp_path / "tok")


def test_the_c4_sample_splits_by_document_into_disjoint_parts() -> None:
    docs = c4_documents()
    calib, held = c4_split("calibration").text, c4_split("heldout").text
    held_docs = held.split("\n\n")
    assert len(held_docs) == len(docs) // C4_HELDOUT_EVERY
    assert held_docs[0] == docs[C4_HELDOUT_EVERY - 1]  # every 5th document, from the 5th
    assert len(calib) + len(held) + 2 == len("\n\n".join(docs))  # nothing lost, nothing shared
    check_not_evaluation(c4_split("calibration"))  # no held-out document hides in the calibration split
    assert DEFAULT_CALIB == "mix:c4=0.75,wikitext2=0.25"  # chosen by bench/calibration.py (BENCHMARKS.md)
    assert calibration_text("c4").name == "bundled:c4-sample/calibration"  # offline (tests never reach the hub)


def test_a_file_holding_an_evaluation_document_is_refused(tmp_path: Path, capsys, tiny_model_dir: Path) -> None:
    held = c4_split("heldout").text.split("\n\n")
    doc = max(held[:20], key=len)
    leaky = tmp_path / "my_corpus.txt"
    leaky.write_text(TEXT + "\n\n" + doc + "\n\n" + TEXT)
    code = main(tiny_prune(tiny_model_dir, leaky, tmp_path / "o", "--no-eval"))
    _, err = capsys.readouterr()
    assert_user_error(code, err, "contains text of the evaluation set c4-heldout")
    assert not (tmp_path / "o").exists()
    code = main(tiny_prune(tiny_model_dir, "c4-heldout", tmp_path / "o", "--no-eval"))
    _, err = capsys.readouterr()
    assert_user_error(code, err, "refusing to calibrate on 'c4-heldout'")
    wiki = next(p for p in data.wikitext2_test_text().text.split("\n") if len(p) > 2000)
    with pytest.raises(IntraSliceError, match="wikitext2 test"):
        check_not_evaluation(data.TextSource("intro\n" + wiki + "\noutro", "file:x.txt"))


def test_a_mix_draws_each_part_in_proportion_and_records_it(tok, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("INTRASLICE_CACHE", str(tmp_path / "cache"))
    assert mix_counts([0.5, 0.5], 16) == [8, 8]
    assert mix_counts([1, 2], 10) == [3, 7] and sum(mix_counts([1, 1, 1], 10)) == 10
    mix = calibration_windows(tok, "mix:c4-sample=0.25,wikitext2-valid=0.75", nsamples=8, seqlen=64, seed=0)
    c4 = calibration_windows(tok, "c4-sample", nsamples=2, seqlen=64, seed=0)
    wiki = calibration_windows(tok, "wikitext2-valid", nsamples=6, seqlen=64, seed=0)
    assert torch.equal(mix.tokens, torch.cat([c4.tokens, wiki.tokens]))  # each part as a plain source's windows
    assert mix.source == "mix:bundled:c4-sample/calibration=0.25,bundled:wikitext-2/validation=0.75"
    rec = mix.describe()
    assert [p["windows"] for p in rec["parts"]] == [2, 6] and rec["tokens"] == 8 * 64
    expected = hashlib.sha256(mix.tokens[3].numpy().tobytes()).hexdigest()[:16]  # an independent hash
    assert rec["window_sha256"][3] == expected and len(set(rec["window_sha256"])) == 8
    for bad, needle in [
        ("mix:c4=0", "weight > 0"),
        ("mix:c4", "SRC=WEIGHT"),
        ("mix:c4=1,c4=2", "names a source twice"),
        ("mix:mix:c4=1=1", "cannot contain a mix"),
    ]:
        with pytest.raises(IntraSliceError, match=needle):
            parse_mix(bad)


def test_hub_datasets_parse_and_refuse_a_missing_column(monkeypatch) -> None:
    assert parse_hf_source("hf:allenai/c4?config=en&split=validation&column=text") == (
        "allenai/c4",
        {"config": "en", "split": "validation", "column": "text"},
    )
    with pytest.raises(IntraSliceError, match="unknown option 'colum'"):
        parse_hf_source("hf:x?colum=text")
    with pytest.raises(IntraSliceError, match="needs the Hugging Face hub"):
        calibration_text("hf:some/dataset")  # offline here: one line, no hang
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: iter([{"content": "a b c"}, {"content": "d e"}])  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(IntraSliceError, match="has no column 'text' \\(columns: content\\)"):
        calibration_text("hf:some/dataset")
    assert calibration_text("hf:some/dataset?column=content").text == "a b c\n\nd e"


def test_bad_sources_on_the_cli_are_one_line(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    for source, needle in [("mix:c4=x", "SRC=WEIGHT"), ("hf:a/b?bad=1", "unknown option 'bad'")]:
        code = main(tiny_prune(tiny_model_dir, source, tmp_path / "o", "--no-eval"))
        _, err = capsys.readouterr()
        assert_user_error(code, err, needle)
        assert not (tmp_path / "o").exists()
    code = main(tiny_prune(tiny_model_dir, "c4-sample", tmp_path / "o", "--zeroshot-tasks", "piqa,nope"))
    _, err = capsys.readouterr()
    assert_user_error(code, err, "unknown zero-shot task 'nope'")


def test_the_report_names_its_calibration_and_scores_held_out_text(
    capsys, tiny_model_dir: Path, tmp_path: Path
) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    args = tiny_prune(tiny_model_dir, calib, tmp_path / "o", "--eval-windows", "1", "--eval-seqlen", "64")
    code = main([*args, "--no-incontext", "--no-zeroshot"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "intraslice.json").read_text())
    assert set(report["perplexities"]) == {"wikitext2", "c4-heldout"}
    held = report["perplexities"]["c4-heldout"]
    assert held["dense"]["source"] == "bundled:c4-sample/heldout" and held["pruned"]["windows"] == 1
    assert report["perplexity"] == report["perplexities"]["wikitext2"]
    assert report["calibration"]["source"].startswith("file:") and len(report["calibration"]["window_sha256"]) == 4
    c = report["calibration"]
    assert f"calibrated on {c['source']} ({c['nsamples']} x {c['seqlen']} tokens)" in out and c["nsamples"] == 4
    assert "perplexity (bundled:c4-sample/heldout" in out
    assert same_family("bundled:c4-sample/calibration", "bundled:c4-sample/heldout")
    assert same_family("hf:wikitext/wikitext-2-raw-v1/train", "bundled:wikitext-2-raw-v1/test")
    assert not same_family("bundled:c4-sample/calibration", "bundled:wikitext-2-raw-v1/test")
