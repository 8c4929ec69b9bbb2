"""Atomic saving of pruned models: a temporary directory renamed at the end.

Nothing half-written is ever left at the destination: on any error the temporary
directory is removed, and an existing destination is replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import IntraSliceError

REPORT_FILE = "intraslice.json"


def check_output_dir(out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Fail early (before hours of pruning) if the destination cannot be written."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise IntraSliceError(f"output directory {path} exists (pass --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise IntraSliceError(f"output path {path} exists and is not a directory")
    parent = path.resolve().parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    return path


def atomic_directory(out: str | os.PathLike[str], write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``out`` in one rename."""
    path = check_output_dir(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.resolve().parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a model directory is shared like any other
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.resolve().parent))
            backup.rmdir()
            os.replace(path, backup)
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_report(directory: Path, report: dict[str, Any]) -> None:
    with open(directory / REPORT_FILE, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, default=str)
        fh.write("\n")


def save_pruned(
    model: Any,
    tokenizer: Any | None,
    out: str | os.PathLike[str],
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a pruned model (safetensors + modeling code + tokenizer + intraslice.json) atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            write_report(tmp, report)

    return atomic_directory(out, write, overwrite)
