"""Calibration windows and the bundled data."""

from __future__ import annotations

import hashlib
import lzma
from importlib import resources
from pathlib import Path

import pytest
import torch

from intraslice import IntraSliceError, calibration_windows
from intraslice.data import calibration_text, wikitext2_test_text

from .conftest import build_tokenizer


@pytest.fixture
def tok(tmp_path: Path):
    return build_tokenizer(tmp_path / "tok")


def test_windows_are_seeded_non_overlapping_and_cached(tok, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("INTRASLICE_CACHE", str(tmp_path / "cache"))
    a = calibration_windows(tok, "c4-sample", nsamples=16, seqlen=64, seed=0)
    assert a.tokens.shape == (16, 64) and a.tokens.dtype == torch.long
    assert a.source == "bundled:c4-sample/calibration"  # the held-out documents are not in it
    assert len(list((tmp_path / "cache" / "windows").iterdir())) == 1
    b = calibration_windows(tok, "c4-sample", nsamples=16, seqlen=64, seed=0)  # from the cache
    assert torch.equal(a.tokens, b.tokens)
    c = calibration_windows(tok, "c4-sample", nsamples=16, seqlen=64, seed=1, use_cache=False)
    assert not torch.equal(a.tokens, c.tokens)
    rows = {tuple(r.tolist()) for r in a.tokens}
    assert len(rows) == 16


def test_wikitext2_offline_falls_back_to_validation(tok, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.warns(UserWarning, match="validation"):
        src = calibration_text("wikitext2")
    assert src.name == "bundled:wikitext-2/validation"
    assert " = Homarus gammarus = " in src.text[:200]


def test_bundled_test_split_is_the_official_text() -> None:
    text = wikitext2_test_text()
    assert text.name.endswith("test")
    assert text.text.startswith("\n\n = Robert Boulter = \n")
    raw = lzma.decompress(resources.files("intraslice.resources").joinpath("wikitext2_test.raw.xz").read_bytes())
    assert hashlib.sha256(raw).hexdigest().startswith("173c87a5")


def test_too_few_tokens_is_a_clear_error(tok, tmp_path: Path) -> None:
    with pytest.raises(IntraSliceError, match="fewer than the 10000 asked for"):
        calibration_windows(tok, "c4-sample", nsamples=10000, seqlen=2048, use_cache=False)
