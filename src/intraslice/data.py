"""Calibration and evaluation text: sources, tokenized windows, and their cache.

Calibration sources (``--calib``), a small registry (:func:`register_calib_source`); the
default (:data:`DEFAULT_CALIB`, issue #38) is ``mix:c4=0.75,wikitext2=0.25``:

* ``c4``: web text. Online, the C4 ``en`` train shard 0
  through Hugging Face ``datasets`` (the SparseGPT/Wanda/GPTQ convention); offline, the
  *calibration* split of the bundled C4 sample, with a warning.
* ``c4-sample``: the calibration split of the bundled C4 sample (4 of every 5 documents;
  the 5th are ``c4-heldout``, for evaluation only).
* ``fineweb-edu``: FineWeb-Edu (sample-10BT) through ``datasets``, online only.
* ``wikitext2``: the paper's protocol, kept for the reproduction benches. Online the
  WikiText-2 *train* split; offline the bundled *validation* split (the tokenized release,
  with ``<unk>`` and `` @-@ ``), with a warning.
* ``wikitext2-valid``: the bundled validation split.
* ``mix:SRC=W,SRC=W``: windows drawn from each source in proportion to its weight
  (``mix:c4=0.5,wikitext2=0.5``).
* ``hf:NAME?config=C&split=S&column=COL``: any Hugging Face dataset with a text column
  (streamed; online only).
* a path to a ``.txt`` file (documents separated by blank lines) or a ``.jsonl`` file
  (``text``, or ``prefix`` + ``gold_completion`` fields).

Evaluation texts (:data:`EVAL_TEXTS`): ``wikitext2`` (the test split) and ``c4-heldout``
(the bundled C4 documents no calibration source contains). Test and held-out splits are
never used for calibration: a file named like a test split, and any text that contains an
evaluation document, is refused. Windows are non-overlapping runs of ``seqlen`` tokens,
``nsamples`` of them picked with a seeded permutation; each run records their hashes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import REPEAT_MODES
from .errors import IntraSliceError

#: The calibration source of ``intraslice prune`` unless told otherwise (issue #38; BENCHMARKS.md
#: "Calibration text"): three quarters web text, a quarter WikiText. Measured on SmolLM2 at 0.2
#: against WikiText alone: held-out C4 perplexity -17%, zero-shot mean +1.5 points, WikiText-2
#: test +2.9%; C4 alone gave more on held-out text but cost WikiText-2 6.4% (21% at 0.4).
DEFAULT_CALIB = "mix:c4=0.75,wikitext2=0.25"
#: Evaluation texts: never calibrated on (``check_not_evaluation``).
EVAL_TEXTS = ("wikitext2", "c4-heldout")
#: One in this many bundled C4 documents is held out for evaluation (the others calibrate).
C4_HELDOUT_EVERY = 5


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
    #: A mix's components: source, weight, windows (in the order the windows are stacked).
    parts: list[dict[str, Any]] | None = None

    def describe(self) -> dict[str, Any]:
        n, t = self.tokens.shape
        out = {
            "source": self.source,
            "nsamples": n,
            "seqlen": t,
            "seed": self.seed,
            "tokens_available": self.total_tokens,
        }
        out["tokens"] = n * t
        out["window_sha256"] = [tensor_sha256(w) for w in self.tokens]
        if self.repeat_share:
            out["repeat_share"] = self.repeat_share
            out["repeat_mode"] = self.repeat_mode
        if self.parts:
            out["parts"] = self.parts
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


def _jsonl_docs(raw: str) -> list[str]:
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
    return docs


def _jsonl_text(raw: str) -> str:
    return "\n\n".join(_jsonl_docs(raw))


@functools.lru_cache(maxsize=1)
def c4_documents() -> tuple[str, ...]:
    """The bundled C4 sample's documents, in file order."""
    return tuple(_jsonl_docs(_bundled("c4_sample.jsonl.xz").decode("utf-8")))


def c4_split(which: str) -> TextSource:
    """The bundled C4 sample split by document: ``heldout`` (every 5th) or ``calibration`` (the rest).

    Why by document: a window that straddles a held-out document would leak it; a whole
    document is either calibration text or evaluation text, never both.
    """
    docs = c4_documents()
    held = which == "heldout"
    picked = [d for i, d in enumerate(docs) if (i % C4_HELDOUT_EVERY == C4_HELDOUT_EVERY - 1) == held]
    return TextSource("\n\n".join(picked), f"bundled:c4-sample/{which}")


def evaluation_text(name: str) -> TextSource:
    """An evaluation text of :data:`EVAL_TEXTS`: WikiText-2 test, or the held-out C4 documents."""
    if name == "wikitext2":
        return wikitext2_test_text()
    if name == "c4-heldout":
        return c4_split("heldout")
    raise IntraSliceError(f"unknown evaluation text {name!r}: choose one of {', '.join(EVAL_TEXTS)}")


def _wikitext2() -> TextSource:
    ds = _from_hub("wikitext", "wikitext-2-raw-v1", split="train")
    if ds is not None:
        return TextSource(_wikitext_join(ds["text"]), "hf:wikitext/wikitext-2-raw-v1/train")
    warnings.warn(
        "WikiText-2 train split unavailable offline: calibrating on the bundled WikiText-2 "
        "validation split instead (recorded in the output)",
        stacklevel=3,
    )
    return _wikitext2_valid()


def _wikitext2_valid() -> TextSource:
    return TextSource(_bundled("wikitext2_valid.tokens.xz").decode("utf-8"), "bundled:wikitext-2/validation")


def _c4() -> TextSource:
    ds = _from_hub("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    if ds is not None:
        return TextSource("\n\n".join(ds["text"][:20000]), "hf:allenai/c4/en/train-00000")
    warnings.warn("C4 unavailable offline: calibrating on the bundled C4 sample's calibration split", stacklevel=3)
    return c4_split("calibration")


def _fineweb_edu() -> TextSource:
    text = _hf_text("HuggingFaceFW/fineweb-edu", {"config": "sample-10BT"})
    return TextSource(text, "hf:HuggingFaceFW/fineweb-edu/sample-10BT")


#: Rows read from a streamed hub dataset (about 10-40 M characters of web text).
HF_ROWS = 20000


def _hf_text(name: str, options: dict[str, str]) -> str:
    """The text column of a hub dataset, streamed (the first :data:`HF_ROWS` rows)."""
    import itertools

    if _offline() or not _hub_reachable():
        raise IntraSliceError(f"calibration source hf:{name} needs the Hugging Face hub, which is unreachable")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise IntraSliceError(f"calibration source hf:{name} needs datasets: pip install 'intraslice[hub]'") from None
    column = options.get("column", "text")
    try:
        ds = datasets.load_dataset(name, options.get("config"), split=options.get("split", "train"), streaming=True)
        rows = list(itertools.islice(iter(ds), HF_ROWS))
    except Exception as exc:  # the hub's many failure types: one line naming the dataset
        raise IntraSliceError(f"cannot read the dataset {name!r} from the hub: {type(exc).__name__}: {exc}") from None
    if not rows:
        raise IntraSliceError(f"the dataset {name!r} has no rows in split {options.get('split', 'train')!r}")
    if column not in rows[0]:
        raise IntraSliceError(
            f"the dataset {name!r} has no column {column!r} (columns: {', '.join(rows[0])}): pass ?column=NAME"
        )
    return "\n\n".join(str(r[column]) for r in rows if r.get(column))


def parse_hf_source(source: str) -> tuple[str, dict[str, str]]:
    """``hf:NAME?config=C&split=S&column=COL`` -> (NAME, options)."""
    from urllib.parse import parse_qsl

    name, _, query = source[len("hf:") :].partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"config", "split", "column"})
    if not name or unknown:
        what = f"unknown option {unknown[0]!r}" if unknown else "no dataset name"
        raise IntraSliceError(f"calibration source {source!r}: {what} (use hf:NAME?config=C&split=S&column=COL)")
    return name, options


#: name -> (loader, one line for --help). ``register_calib_source`` adds one.
_CALIB_SOURCES: dict[str, tuple[Callable[[], TextSource], str]] = {}


def register_calib_source(name: str, loader: Callable[[], TextSource], summary: str = "") -> None:
    """Make ``--calib NAME`` read the text ``loader()`` returns (it names what it read)."""
    _CALIB_SOURCES[name] = (loader, summary)


def calib_source_names() -> tuple[str, ...]:
    return tuple(_CALIB_SOURCES)


register_calib_source("c4", _c4, "web text: C4 en (online), the bundled sample's calibration split (offline)")
register_calib_source("c4-sample", lambda: c4_split("calibration"), "the bundled C4 sample's calibration split")
register_calib_source("fineweb-edu", _fineweb_edu, "FineWeb-Edu sample-10BT (online only)")
register_calib_source("wikitext2", _wikitext2, "WikiText-2 train (online; offline the bundled validation split)")
register_calib_source("wikitext2-valid", _wikitext2_valid, "the bundled WikiText-2 validation split")


def calibration_text(source: str) -> TextSource:
    """The text of a calibration source (see the module docstring); evaluation text is refused."""
    if source in _CALIB_SOURCES:
        text = _CALIB_SOURCES[source][0]()
        if not text.name.startswith("bundled:"):  # fetched text: it may hold an evaluation document
            check_not_evaluation(text)
        return text
    if source.startswith("hf:"):
        name, options = parse_hf_source(source)
        text = TextSource(_hf_text(name, options), source)
        check_not_evaluation(text)
        return text
    if source.startswith("mix:"):
        raise IntraSliceError("a mix is drawn window by window: use calibration_windows, not calibration_text")
    if source in EVAL_TEXTS:
        raise IntraSliceError(f"refusing to calibrate on {source!r}: it is an evaluation text")
    path = Path(source)
    if not path.is_file():
        raise IntraSliceError(
            f"unknown calibration source {source!r}: use one of {', '.join(_CALIB_SOURCES)}, "
            "mix:SRC=W,SRC=W, hf:NAME?column=COL, or a .txt/.jsonl file path"
        )
    if "test" in path.name.lower():
        raise IntraSliceError(f"refusing to calibrate on {path.name!r}: it looks like a test split")
    raw = path.read_text(encoding="utf-8")
    text = TextSource(_jsonl_text(raw) if path.suffix == ".jsonl" else raw, f"file:{path.resolve()}")
    check_not_evaluation(text)
    return text


#: Lines at least this long of an evaluation text are looked for in calibration text.
_PROBE_CHARS = 120


@functools.lru_cache(maxsize=1)
def _evaluation_lines() -> dict[str, str]:
    """Every long line of the evaluation texts (stripped) -> the text's name.

    Why whole lines: a line of 120 characters or more found verbatim means that document
    (a WikiText paragraph, a C4 paragraph) is there, and a set lookup per calibration line
    keeps the check linear in the calibration text (tens of MB online).
    """
    lines: dict[str, str] = {}
    for name, text in (("c4-heldout", c4_split("heldout").text), ("wikitext2 test", wikitext2_test_text().text)):
        for line in text.split("\n"):
            line = line.strip()
            if len(line) >= _PROBE_CHARS:
                lines.setdefault(line, name)
    return lines


def check_not_evaluation(text: TextSource) -> None:
    """Refuse calibration text that contains an evaluation document (held-out C4, WikiText-2 test).

    Why: a model calibrated on the text it is then scored on looks better than it is, and
    users' files (or a hub dataset) may be built from the same corpora.
    """
    known = _evaluation_lines()
    for line in text.text.split("\n"):
        where = known.get(line.strip())
        if where is not None:
            raise IntraSliceError(
                f"calibration source {text.name} contains text of the evaluation set {where}: "
                "calibrating on it would hide what pruning costs"
            )


def parse_mix(source: str) -> list[tuple[str, float]]:
    """``mix:c4=0.5,wikitext2=0.5`` -> [("c4", 0.5), ("wikitext2", 0.5)], checked."""
    parts = []
    for item in source[len("mix:") :].split(","):
        name, eq, weight = item.strip().rpartition("=")
        try:
            w = float(weight) if eq else float("nan")
        except ValueError:
            w = float("nan")
        if not name or not (w > 0 and math.isfinite(w)):
            raise IntraSliceError(f"calibration mix {source!r}: each part is SRC=WEIGHT with a weight > 0")
        if name.startswith("mix:"):
            raise IntraSliceError(f"calibration mix {source!r}: a mix cannot contain a mix")
        parts.append((name, w))
    if len({n for n, _ in parts}) != len(parts):
        raise IntraSliceError(f"calibration mix {source!r} names a source twice")
    return parts


def mix_counts(weights: list[float], nsamples: int) -> list[int]:
    """Windows per part: proportional to the weights, rounded by largest remainder (sums to nsamples)."""
    total = sum(weights)
    exact = [w / total * nsamples for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda k: counts[k] - exact[k])[: nsamples - sum(counts)]:
        counts[i] += 1
    return counts


def cache_dir() -> Path:
    root = os.environ.get("INTRASLICE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "intraslice")
    return Path(root)


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 (16 hex digits) of a window's token ids: the record of exactly what calibrated."""
    return hashlib.sha256(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


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
    source: str = DEFAULT_CALIB,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    use_cache: bool = True,
) -> CalibrationSet:
    """``nsamples`` non-overlapping windows of ``seqlen`` tokens, seeded; cached on disk."""
    if nsamples < 1 or seqlen < 2:
        raise IntraSliceError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    if source.startswith("mix:"):
        return _mixed_windows(tokenizer, source, nsamples, seqlen, seed, use_cache)
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


def _mixed_windows(
    tokenizer: Any, source: str, nsamples: int, seqlen: int, seed: int, use_cache: bool
) -> CalibrationSet:
    """A mix: each part's share of the windows, drawn from that source as a plain source's are."""
    parts = parse_mix(source)
    counts = mix_counts([w for _, w in parts], nsamples)
    sets, record = [], []
    for (name, weight), n in zip(parts, counts, strict=True):
        if n == 0:
            record.append({"source": name, "weight": weight, "windows": 0})
            continue
        part = calibration_windows(tokenizer, name, n, seqlen, seed, use_cache)
        sets.append(part)
        record.append({"source": part.source, "weight": weight, "windows": n})
    tokens = torch.cat([c.tokens for c in sets])
    label = "mix:" + ",".join(f"{r['source']}={r['weight']:g}" for r in record)
    return CalibrationSet(tokens, label, seed, sum(c.total_tokens for c in sets), parts=record)


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
    return CalibrationSet(tokens, calib.source, calib.seed, calib.total_tokens, share, mode, calib.parts)
