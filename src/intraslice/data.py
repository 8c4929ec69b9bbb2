"""Calibration and evaluation text: sources, tokenized windows, and their cache.

Calibration sources (``--calib``):

* ``wikitext2``: the WikiText-2 *train* split through Hugging Face ``datasets`` when it can
  be fetched; offline, the bundled WikiText-2 *validation* split, with a warning. The
  source actually used is always recorded.
* ``wikitext2-valid``: the bundled validation split.
* ``c4``: the C4 ``en`` train shard 0 through ``datasets`` (SliceGPT/GPTQ convention); offline
  the bundled C4 sample, with a warning.
* ``c4-sample``: the bundled C4 sample.
* a path to a ``.txt`` file (documents separated by blank lines) or a ``.jsonl`` file
  (``text``, or ``prefix`` + ``gold_completion`` fields).

Test splits are never used for calibration. Windows are non-overlapping runs of
``seqlen`` tokens, ``nsamples`` of them picked with a seeded permutation.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import REPEAT_MODES
from .errors import IntraSliceError

BUILTIN_CALIB = ("wikitext2", "wikitext2-valid", "c4", "c4-sample")


@dataclass
class TextSource:
    text: str
    name: str  # what was actually read, recorded in results


@dataclass
class CalibrationSet:
    tokens: torch.Tensor  # (nsamples, seqlen) int64
    source: str
    seed: int
    total_tokens: int
    #: share of each window that repeats an earlier span of it (:func:`with_repeated_spans`)
    repeat_share: float = 0.0
    #: "replace" (the span replaces the window's tail) or "append" (it follows the window)
    repeat_mode: str = "replace"

    def describe(self) -> dict[str, Any]:
        n, t = self.tokens.shape
        out = {
            "source": self.source,
            "nsamples": n,
            "seqlen": t,
            "seed": self.seed,
            "tokens_available": self.total_tokens,
        }
        if self.repeat_share:
            out["repeat_share"] = self.repeat_share
            out["repeat_mode"] = self.repeat_mode
        return out


def _bundled(name: str) -> bytes:
    return lzma.decompress(resources.files("intraslice.resources").joinpath(name).read_bytes())


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


_HUB_REACHABLE: bool | None = None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub (or ``$HF_ENDPOINT``), remembered for the process.

    Why: offline, ``datasets`` retries with backoff for ~40 s per call before failing; a
    machine without a route to the hub should fall back to the bundled data at once.
    """
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        import socket
        from urllib.parse import urlparse

        url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
                _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


def _from_hub(*args: Any, **kwargs: Any) -> Any | None:
    """A ``datasets.load_dataset`` call, or None if datasets is missing or the hub unreachable."""
    if _offline():
        return None
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        return None
    first_probe = _HUB_REACHABLE is None
    if not _hub_reachable():
        if first_probe:  # said once per process; each fallback still says what it falls back to
            warnings.warn("the Hugging Face hub is unreachable: using bundled data", stacklevel=3)
        return None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:
        warnings.warn(
            f"could not fetch {args[0]} from the hub ({type(exc).__name__}); using the bundled copy", stacklevel=3
        )
        return None


def _wikitext_join(lines: list[str]) -> str:
    return "\n\n".join(lines)


def wikitext2_test_text() -> TextSource:
    """WikiText-2 raw test split joined with "\\n\\n" (the P1/P2 protocols)."""
    ds = _from_hub("wikitext", "wikitext-2-raw-v1", split="test")
    if ds is not None:
        return TextSource(_wikitext_join(ds["text"]), "hf:wikitext/wikitext-2-raw-v1/test")
    lines = _bundled("wikitext2_test.raw.xz").decode("utf-8").split("\n")[:-1]
    text = "\n\n".join(line + "\n" if line.strip() else "" for line in lines)
    return TextSource(text, "bundled:wikitext-2-raw-v1/test")


def _jsonl_text(raw: str) -> str:
    docs = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "text" in row:
            docs.append(str(row["text"]))
        elif "prefix" in row:
            docs.append(str(row["prefix"]) + str(row.get("gold_completion", "")))
        else:
            raise IntraSliceError("calibration .jsonl rows need a 'text' field (or 'prefix'/'gold_completion')")
    return "\n\n".join(docs)


def calibration_text(source: str) -> TextSource:
    """The text of a calibration source (see the module docstring)."""
    if source == "wikitext2":
        ds = _from_hub("wikitext", "wikitext-2-raw-v1", split="train")
        if ds is not None:
            return TextSource(_wikitext_join(ds["text"]), "hf:wikitext/wikitext-2-raw-v1/train")
        warnings.warn(
            "WikiText-2 train split unavailable offline: calibrating on the bundled WikiText-2 "
            "validation split instead (recorded in the output)",
            stacklevel=2,
        )
        source = "wikitext2-valid"
    if source == "wikitext2-valid":
        return TextSource(_bundled("wikitext2_valid.tokens.xz").decode("utf-8"), "bundled:wikitext-2/validation")
    if source == "c4":
        ds = _from_hub("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        if ds is not None:
            return TextSource("\n\n".join(ds["text"][:20000]), "hf:allenai/c4/en/train-00000")
        warnings.warn("C4 unavailable offline: calibrating on the bundled C4 sample", stacklevel=2)
        source = "c4-sample"
    if source == "c4-sample":
        return TextSource(_jsonl_text(_bundled("c4_sample.jsonl.xz").decode("utf-8")), "bundled:c4-sample")
    path = Path(source)
    if not path.is_file():
        raise IntraSliceError(
            f"unknown calibration source {source!r}: use one of {', '.join(BUILTIN_CALIB)} or a .txt/.jsonl file path"
        )
    if "test" in path.name.lower():
        raise IntraSliceError(f"refusing to calibrate on {path.name!r}: it looks like a test split")
    raw = path.read_text(encoding="utf-8")
    text = _jsonl_text(raw) if path.suffix == ".jsonl" else raw
    return TextSource(text, f"file:{path.resolve()}")


def cache_dir() -> Path:
    root = os.environ.get("INTRASLICE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "intraslice")
    return Path(root)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    probe = "IntraSlice fingerprint: Hello, world! 12345 \n\n naïve café"
    ids = tokenizer(probe)["input_ids"]
    return hashlib.sha256(f"{len(tokenizer)}|{ids}".encode()).hexdigest()[:16]


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of a long text as a 1-D int64 tensor (no length warning, no truncation)."""
    old = getattr(tokenizer, "model_max_length", None)
    try:
        tokenizer.model_max_length = int(1e12)
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    finally:
        if old is not None:
            tokenizer.model_max_length = old
    return ids.to(torch.long)


def calibration_windows(
    tokenizer: Any,
    source: str = "wikitext2",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    use_cache: bool = True,
) -> CalibrationSet:
    """``nsamples`` non-overlapping windows of ``seqlen`` tokens, seeded; cached on disk."""
    if nsamples < 1 or seqlen < 2:
        raise IntraSliceError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    text = calibration_text(source)
    digest = hashlib.sha256(text.text.encode("utf-8")).hexdigest()[:16]
    key = f"{text.name}|{digest}|{tokenizer_fingerprint(tokenizer)}|{nsamples}|{seqlen}|{seed}"
    # safetensors, never pickle: the cache is data (a damaged or foreign file is a cache miss)
    cache_file = cache_dir() / "windows" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".safetensors")
    if use_cache and cache_file.is_file():
        try:
            blob = load_file(str(cache_file))
            return CalibrationSet(blob["tokens"], text.name, seed, int(blob["total_tokens"]))
        except Exception:  # any unreadable cache entry is recomputed and rewritten
            pass
    ids = tokenize(tokenizer, text.text)
    n_windows = ids.numel() // seqlen
    if n_windows < nsamples:
        raise IntraSliceError(
            f"calibration source {text.name} has {ids.numel()} tokens: {n_windows} windows of {seqlen}, "
            f"fewer than the {nsamples} asked for (use fewer --nsamples, a shorter --seqlen or more text)"
        )
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=gen)[:nsamples].sort().values
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)[pick].clone()
    if use_cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            save_file({"tokens": windows.contiguous(), "total_tokens": torch.tensor(ids.numel())}, str(tmp))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache is not an error
    return CalibrationSet(windows, text.name, seed, int(ids.numel()))


def check_repeat_share(share: float) -> None:
    """Refuse a ``--calib-repeat`` share outside [0, 0.5] (the copy must fit before the tail)."""
    if not 0.0 <= share <= 0.5:
        raise IntraSliceError(f"--calib-repeat must be between 0 and 0.5, got {share}")


def repeated_span_length(seqlen: int, share: float) -> int:
    """Tokens in each window's repeated span: ``round(share * seqlen)`` of the plain window."""
    return round(share * seqlen)


def with_repeated_spans(calib: CalibrationSet, share: float, mode: str = "replace") -> CalibrationSet:
    """Each window followed by, or ending in, a copy of an earlier span of the same window.

    Why (issue #14): WikiText windows hold little verbatim repetition, so the heads that copy
    from the context (induction heads) are nearly idle on them, and every statistic the
    method prunes by (the o_proj input energy of step C, the pair scores of step D, the
    mask gradients) calls them unimportant. A repeated span makes them work on the
    calibration text itself. The span has m = round(share * L) tokens and starts at least
    m tokens before the position it is copied to: retrieval at long range, not the
    previous sentence. Start drawn uniformly, seeded by the window selection's seed.

    ``mode``: "replace" overwrites the window's last m tokens (start in [0, L - 2m]; the
    windows keep their length and lose m tokens of text); "append" adds the span after
    the window (start in [0, L - m]; windows of L + m tokens, every text token kept).
    **Decision (2026-12-05):** measured on Qwen2.5-Coder-0.5B at 0.3, the perplexity cost
    of "replace" comes from the text it removes, not from fitting the repeated tokens: the
    MLP statistics without the span (``--calib-repeat-in attention``, the same text tokens)
    gave 39.35 against 38.58 with it. "append" keeps every text token (BENCHMARKS.md).
    """
    check_repeat_share(share)
    if mode not in REPEAT_MODES:
        raise IntraSliceError(f"unknown --calib-repeat-mode {mode!r}: choose one of {', '.join(REPEAT_MODES)}")
    n, length = calib.tokens.shape
    m = repeated_span_length(length, share)
    if m == 0:
        return calib
    gen = torch.Generator().manual_seed(calib.seed + 1)
    if mode == "append":
        starts = torch.randint(0, length - m + 1, (n,), generator=gen)
        spans = torch.stack([calib.tokens[row, start : start + m] for row, start in enumerate(starts.tolist())])
        tokens = torch.cat([calib.tokens, spans], dim=1)
    else:
        tokens = calib.tokens.clone()
        starts = torch.randint(0, length - 2 * m + 1, (n,), generator=gen)
        for row, start in enumerate(starts.tolist()):
            tokens[row, length - m :] = tokens[row, start : start + m]
    return CalibrationSet(tokens, calib.source, calib.seed, calib.total_tokens, share, mode)
