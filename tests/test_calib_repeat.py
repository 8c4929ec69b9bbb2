"""Calibration with repeated spans (issue #14): what the windows hold, and bad shares refused."""

from __future__ import annotations

import pytest
import torch

from intraslice.cli import main
from intraslice.data import CalibrationSet, with_repeated_spans
from intraslice.errors import IntraSliceError


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
    assert with_repeated_spans(calib(), 0.0).tokens is calib().tokens or torch.equal(
        with_repeated_spans(calib(), 0.0).tokens, calib().tokens
    )


def test_bad_share_is_refused(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    with pytest.raises(IntraSliceError, match="--calib-repeat"):
        with_repeated_spans(calib(), 0.6)
    code = main(["prune", "--calib-repeat", "0.7", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--calib-repeat must be between 0 and 0.5" in err
    assert not (tmp_path / "o").exists()
