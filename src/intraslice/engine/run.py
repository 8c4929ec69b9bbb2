"""One engine: a run is a :class:`RunConfig` and an ordered list of registered stages.

``intraslice prune`` and :func:`intraslice.run` both build a config and call :func:`run`.
The stages, in order (``STAGES``; :func:`register_stage` adds one, e.g. recovery after
``prune``):

- *prepare* (nothing written yet): ``check`` (the options alone), ``load`` (config and
  index only), ``resolve`` (the options against the model), ``plan`` (memory; ``--plan``
  stops here), ``calibrate`` (the windows), ``goal`` (a parameter target as a ratio);
- *work* (inside the output's transaction: an atomic directory, or a resumable
  checkpoint): ``speed_search``, ``evaluate_dense``, ``allocate``, ``prune``,
  ``evaluate_pruned``, ``speed_check``, ``save``;
- *finish* (after the output is in place): ``export``.

Each stage reads and writes the :class:`Run` it is given; a work stage whose result an
interrupted run already saved takes it from the checkpoint (:meth:`Run.cached`).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import PruneConfig, check_ratio
from ..errors import IntraSliceError
from ..methods.registry import get_method
from .config import RUN_CONFIG_FILE, RunConfig


def _print_line(line: str) -> None:
    print(line, flush=True)


@dataclass
class Run:
    """The state a run's stages share: the effective config and what each stage produced."""

    config: RunConfig
    plan_only: bool = False
    log: Callable[[str], None] = field(default_factory=lambda: _print_line)
    cfg: PruneConfig = field(init=False)  # the method section, resolved as the stages go
    device: str = "cpu"
    main_rank: bool = True
    progress: bool = True
    repeat_given: bool = False
    target: Any = None
    memory_target: tuple[str, float] | None = None  # --target-memory, parsed
    saved: dict[str, Any] | None = None  # a --ratios file
    ckpt: Any = None
    plan: Any = None
    policy: Any = None
    tokenizer: Any = None
    calib: Any = None
    grad_tokens: torch.Tensor | None = None
    span: int = 0
    goal: dict[str, Any] = field(default_factory=dict)
    ck: Any = None  # RunCheckpoint
    directory: Path | None = None  # the output being written (a temporary or partial directory)
    alloc_record: dict[str, Any] = field(default_factory=dict)
    result: Any = None  # StreamedPruneResult
    ppl: dict[str, dict[str, Any]] = field(default_factory=dict)  # text -> {"dense": ..., "pruned": ...}
    incontext: dict[str, Any] = field(default_factory=dict)
    zeroshot: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    out: Path | None = None
    plan_fits: bool = True
    stopped: bool = False

    def __post_init__(self) -> None:
        self.cfg = self.config.method

    @property
    def evaluating(self) -> bool:
        return self.config.evaluation.enabled and self.main_rank  # other ranks have nothing to add

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """A stage's result: saved by an interrupted run, or computed now and saved."""
        if self.ck is not None and self.ck.stage(key) is not None:
            return self.ck.stage(key)
        value = compute()
        if self.ck is not None:
            self.ck.save_stage(key, value)
        return value

    def timed(self, key: str, compute: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        value = compute()
        self.timings[key] = time.perf_counter() - t
        return value


@dataclass
class Stage:
    """A named step of a run. ``phase``: prepare, work or finish (see the module docstring)."""

    name: str
    phase: str
    fn: Callable[[Run], None]

    def __call__(self, run: Run) -> None:
        self.fn(run)


STAGES: list[Stage] = []


def register_stage(
    name: str, phase: str, after: str | None = None, before: str | None = None
) -> Callable[[Callable[[Run], None]], Callable[[Run], None]]:
    """Decorator: add a stage to every run, at the end of its phase or next to a named stage."""

    def add(fn: Callable[[Run], None]) -> Callable[[Run], None]:
        stage = Stage(name, phase, fn)
        names = [s.name for s in STAGES]
        if name in names:
            STAGES[names.index(name)] = stage
        elif after is not None:
            STAGES.insert(names.index(after) + 1, stage)
        elif before is not None:
            STAGES.insert(names.index(before), stage)
        else:
            STAGES.append(stage)
        return fn

    return add


@dataclass
class RunResult:
    """What :func:`run` wrote: the output directory and the report saved in it."""

    out: Path | None
    report: dict[str, Any] | None
    config: RunConfig
    plan_fits: bool = True


def run(config: RunConfig, plan_only: bool = False, log: Callable[[str], None] | None = None) -> RunResult:
    """Prune as ``intraslice prune`` does; ``config`` is copied, never modified.

    Resumable: each finished stage and layer is checkpointed next to ``config.output.out``,
    and the same config run again after a kill continues from there (``intraslice.resume``).
    """
    state = Run(config=copy.deepcopy(config), plan_only=plan_only)
    if log is not None:
        state.log = log
    for stage in _phase("prepare"):
        stage(state)
        if state.stopped:
            return RunResult(None, None, state.config, state.plan_fits)
    _work(state)
    for stage in _phase("finish"):
        stage(state)
    return RunResult(state.out, state.report, state.config, True)


def _phase(phase: str) -> list[Stage]:
    return [s for s in STAGES if s.phase == phase]


def _work(state: Run) -> None:
    """The work stages inside the output's transaction: kept on an interruption, gone on a user error."""
    from ..pipeline import distributed as dist
    from ..resume import RunCheckpoint, kept_line, os_error_line
    from ..saving import REPORT_FILE, atomic_directory

    out = state.config.output
    if dist.world_size() == 1:
        settings = run_settings(state.config, state.ckpt, state.calib.tokens, state.policy)
        state.ck = RunCheckpoint.open(out.out, settings, out.overwrite, not out.resume)
    ck = state.ck

    def work(directory: Path) -> None:
        state.directory = Path(directory)
        for stage in _phase("work"):
            stage(state)
            if not state.main_rank and stage.name == "prune":
                return  # rank 0 evaluates and writes

    try:
        if ck is None:
            if not state.main_rank:  # writes nothing: rank 0 writes the one output directory
                work(Path(out.out))
                dist.barrier()
                return
            state.out = atomic_directory(out.out, work, out.overwrite)
            dist.barrier()
            return
        if ck.stage("complete"):  # killed in the final rename: everything is written
            state.report = json.loads((ck.partial / REPORT_FILE).read_text(encoding="utf-8"))
        else:
            work(ck.partial)
        state.out = ck.finish()
    except IntraSliceError:
        if ck is not None:
            ck.discard()  # a user error: this run's checkpoint is worth nothing
            if state.config.heal.tokens:  # and the heal's state next to it
                import shutil

                from ..heal.run import state_dir_for

                shutil.rmtree(state_dir_for(out.out), ignore_errors=True)
        raise
    except OSError as exc:  # disk full, read-only, permissions: the finished layers are kept
        if ck is None:
            raise
        ck.release()
        raise IntraSliceError(os_error_line(exc, ck)) from None
    except BaseException as exc:
        if ck is not None:
            ck.release()  # interrupted: the same command resumes
            if isinstance(exc, KeyboardInterrupt):
                print(f"intraslice: {kept_line(ck)}", file=sys.stderr)
        raise


# -- prepare ----------------------------------------------------------------------------------
@register_stage("check", "prepare")
def check_options(run: Run) -> None:
    """Everything that needs neither the model nor the data, so a typo costs nothing."""
    from ..data import check_repeat_share
    from ..models import parse_dtype
    from ..params import parse_target_params
    from ..pipeline import distributed as dist
    from ..resume import sweep_finished
    from ..saving import check_output_dir

    c, cfg = run.config, run.cfg
    goals = [g for g in ("ratio", "target_params", "target_speedup", "target_memory") if getattr(c.goal, g) is not None]
    if len(goals) > 1:
        raise IntraSliceError("give one of --ratio, --target-params, --target-speedup, --target-memory")
    if c.goal.ratio is not None:
        check_ratio(c.goal.ratio)
    if c.goal.context < 1 or c.goal.batch < 1:
        raise IntraSliceError(f"--context and --batch must be >= 1, got {c.goal.context} and {c.goal.batch}")
    if c.goal.ratio is not None:  # else PruneConfig's default (or what an API caller set there)
        cfg.ratio = c.goal.ratio
    spec = get_method(cfg.method)
    run.repeat_given = c.calibration.repeat is not None
    if not run.repeat_given:  # copying protection is IntraSlice's; the baselines calibrate as published
        c.calibration.repeat = spec.calib_repeat
    check_repeat_share(c.calibration.repeat)
    if cfg.allocation is None:
        cfg.allocation = spec.default_allocation  # the Python API's default too
        if cfg.deploy == "stock" or cfg.uniform_layers:
            cfg.allocation = "uniform"  # every layer alike: nothing to allocate
    if c.goal.target_speedup is not None and not spec.speed_target:
        raise IntraSliceError(f"--target-speedup is implemented for --method intraslice, not {cfg.method}")
    run.target = parse_target_params(c.goal.target_params) if c.goal.target_params is not None else None
    if c.goal.target_memory is not None:
        from ..kvcache import bytes_per_value, parse_target_memory

        if not spec.memory_target:
            raise IntraSliceError(f"--target-memory is implemented for intraslice and channel, not {cfg.method}")
        bytes_per_value(c.goal.serving_dtype)
        run.memory_target = parse_target_memory(c.goal.target_memory)
    parse_dtype(c.model.dtype)
    cfg.check_options()  # the method, its allocation and split, the deploy constraints
    if not run.plan_only:
        if c.output.out is None:
            raise IntraSliceError("--out DIR is required (or --plan to print the memory plan only)")
        sweep_finished(c.output.out)  # a run killed just after its final rename left its checkpoint
        check_output_dir(c.output.out, c.output.overwrite)
    run.device = compute_device(c.model.device, planning=run.plan_only)
    if not run.plan_only:
        run.device = dist.init_from_env(run.device) or run.device  # under torchrun: one rank per GPU
    cfg.device = run.device
    run.main_rank = dist.is_main()
    if not run.main_rank:  # rank 0 speaks for the job
        sys.stdout = open(os.devnull, "w")  # for the life of the process
    if dist.world_size() > 1 and c.goal.target_speedup is not None:
        raise IntraSliceError("--target-speedup times one device: run it without torchrun")
    run.progress = c.output.progress and run.main_rank
    if c.export.format == "stock-hf" and cfg.deploy != "stock":
        raise IntraSliceError("--export stock-hf needs a model pruned with --deploy stock")
    if c.export.format == "gguf" and cfg.deploy is None:
        raise IntraSliceError("--export gguf needs a model pruned with --deploy llamacpp (or stock)")
    if c.export.format == "vllm" and cfg.deploy not in ("vllm", "stock"):
        raise IntraSliceError("--export vllm needs a model pruned with --deploy vllm (or stock)")
    if c.goal.target_speedup is not None and c.goal.speed_engine == "llamacpp":
        if cfg.deploy not in ("llamacpp", "stock"):  # the speed check exports the result to GGUF
            raise IntraSliceError("--speed-engine llamacpp needs a model pruned with --deploy llamacpp (or stock)")
        from ..serve import require_xllamacpp

        require_xllamacpp()
    if c.goal.target_speedup is not None and cfg.attention_share == "auto":
        raise IntraSliceError(
            "--target-speedup times candidate shapes before the estimator ranks anything: give --attention-share "
            "a number (or leave it out)"
        )
    if c.goal.target_speedup is not None and cfg.deploy == "vllm":
        raise IntraSliceError(
            "--target-speedup times candidates that prune attention, which --deploy vllm keeps whole: give --ratio"
        )
    if cfg.attention_share is not None and cfg.mlp_bias is not None:
        raise IntraSliceError("give --attention-share or --mlp-bias, not both (each sets the other)")
    e = c.evaluation
    if e.enabled and e.zeroshot:
        from ..eval.zeroshot import parse_tasks

        parse_tasks(e.zeroshot_tasks)  # an unknown task now, not after the pruning
        if e.zeroshot_limit < 1:
            raise IntraSliceError(f"--zeroshot-limit must be >= 1, got {e.zeroshot_limit}")
    if c.calibration.source.startswith("mix:"):
        from ..data import parse_mix

        parse_mix(c.calibration.source)


@register_stage("load", "prepare")
def load_source(run: Run) -> None:
    from .. import stages

    m = run.config.model
    run.ckpt = run.timed("load", lambda: stages.load(m.model, m.gguf_file, m.dtype))
    dtype = str(run.ckpt.dtype).replace("torch.", "")
    run.log(f"opened {run.ckpt.name} ({run.ckpt.model_type}, {dtype})")


@register_stage("resolve", "prepare")
def resolve_against_model(run: Run) -> None:
    """The options that depend on the model: the estimator's f, a --ratios file, the span length."""
    from ..algo.allocation import check_units_per_head
    from ..arch import get_arch
    from ..data import repeated_span_length
    from ..importance import load_ratios_file

    c, cfg, ckpt = run.config, run.cfg, run.ckpt
    run.saved = load_ratios_file(c.allocation.ratios, ckpt.config) if c.allocation.ratios else None
    if c.allocation.units_per_head is not None:  # a bad f is refused before the dense evaluation
        head_dim = get_arch(ckpt.config).dims(ckpt.config)["head_dim"]
        check_units_per_head(c.allocation.units_per_head, head_dim, cfg.allocation)
    seqlen, share = c.calibration.seqlen, c.calibration.repeat
    run.span = repeated_span_length(seqlen, share)  # calibration windows are exactly --seqlen long
    if c.calibration.repeat_mode == "append":
        max_pos = getattr(ckpt.config, "max_position_embeddings", None)
        if max_pos and not run.repeat_given and run.span and seqlen + run.span > max_pos:
            # the default adapts (a 2048-position model at --seqlen 2048 gets no span) instead of failing
            c.calibration.repeat = max(0, max_pos - seqlen) / seqlen
            run.span = repeated_span_length(seqlen, c.calibration.repeat)
            what = f"shortened to {run.span} tokens" if run.span else "left out (the windows fill them)"
            run.log(
                f"note: the appended calibration spans are {what} to fit the model's {max_pos} "
                "positions (lower --seqlen for longer ones)"
            )
        if max_pos and run.span and seqlen + run.span > max_pos:
            raise IntraSliceError(
                f"--calib-repeat-mode append makes windows of {seqlen + run.span} tokens, more than the model's "
                f"{max_pos} positions: lower --seqlen or --calib-repeat"
            )


def layer_seqlen(run: Run) -> int:
    """The layer steps' window length: longer than ``--seqlen`` with appended spans."""
    c = run.config.calibration
    return c.seqlen + (run.span if c.repeat_mode == "append" else 0)


@register_stage("plan", "prepare")
def plan_memory(run: Run) -> None:
    from .. import stages
    from ..plan import refuse_unless_fits

    c, cfg = run.config, run.cfg
    m = c.memory  # where things wait and where the math runs: the plan resolves "auto"
    cfg.activations, cfg.math_device, cfg.offload_dir = m.activations, m.math_device, m.offload_dir
    estimator = cfg.allocation != "uniform" and not (run.saved and run.saved.get("importance"))
    run.plan = stages.plan(
        run.ckpt,
        cfg,
        c.calibration.nsamples,
        layer_seqlen(run),
        estimator=estimator,
        evaluate=c.evaluation.enabled,
        device_capacity=parse_bytes(c.memory.device_memory),
        host_capacity=parse_bytes(c.memory.host_memory),
        estimator_seqlen=layer_seqlen(run) if c.calibration.repeat_estimator else c.calibration.seqlen,
    )
    run.log(run.plan.describe())
    if run.plan_only:
        run.plan_fits, run.stopped = run.plan.fits(), True
        return
    refuse_unless_fits(run.plan)
    cfg.activations, cfg.math_device = run.plan.policy["store"], run.plan.policy["math"]
    run.policy = cfg.policy()


@register_stage("calibrate", "prepare")
def calibrate(run: Run) -> None:
    from .. import stages
    from ..data import calibration_windows, with_repeated_spans

    c = run.config.calibration
    run.tokenizer = run.ckpt.tokenizer()
    t = time.perf_counter()
    plain = calibration_windows(run.tokenizer, c.source, c.nsamples, c.seqlen, c.seed)
    # the layer steps see the repeated spans, the estimator the plain windows (method.md 8)
    run.calib = with_repeated_spans(plain, c.repeat, c.repeat_mode)
    run.grad_tokens = run.calib.tokens if c.repeat_estimator else plain.tokens
    if c.repeat_in == "attention":  # the MLP statistics leave each window's repeated span out
        run.cfg.mlp_skip_positions = run.span
    run.timings["calibration_data"] = time.perf_counter() - t
    shape = run.calib.tokens.shape
    run.log(f"calibration: {shape[0]} x {shape[1]} tokens from {run.calib.source}")
    stages.check_vocabulary(run.ckpt, run.calib.tokens, run.tokenizer)


@register_stage("goal", "prepare")
def resolve_goal(run: Run) -> None:
    """A parameter target as a decoder ratio; an impossible split is refused now, not after minutes."""
    from .. import stages
    from ..params import ratio_for_target

    g, cfg = run.config.goal, run.cfg
    run.goal = {"ratio": cfg.ratio}
    if run.memory_target is not None:
        resolve_memory_goal(run)
    if run.target is not None:
        cfg.ratio = ratio_for_target(run.target, g.target_of, stages.source_param_report(run.ckpt.skeleton()))
        check_ratio(cfg.ratio, "the decoder ratio for --target-params")
        run.goal = {"target_params": g.target_params, "target_of": g.target_of, "ratio": cfg.ratio}
        run.log(f"--target-params {g.target_params} of the {g.target_of}: decoder ratio {cfg.ratio:.4f}")
    if g.target_speedup is not None and not g.target_speedup > 1.0:
        raise IntraSliceError(f"--target-speedup must be > 1, got {g.target_speedup}")
    if g.target_speedup is None:
        from ..importance import resolve_split

        a = run.config.allocation
        try:
            resolve_split(
                run.ckpt.config,
                cfg.ratio,
                cfg.allocation,
                a.units_per_head,
                cfg.mlp_bias,
                cfg.attention_share,
                run.saved,
                a.max_layer_ratio,
                split_uniform(cfg),
            )
        except IntraSliceError as exc:
            if cfg.deploy != "vllm" or cfg.uniform_layers:
                raise
            raise IntraSliceError(
                f"{exc} (--deploy vllm keeps the attention whole: lower --ratio, or add --uniform-layers)"
            ) from None


def split_model(config: Any) -> Any:
    """The estimator's parameter model of ``config`` (f = 1): what a split costs, before any gradient."""
    from ..algo.allocation import param_model
    from ..arch import get_arch

    arch = get_arch(config)
    return param_model(arch.dims(config), 1, arch.qkv_bias(config), arch.mlp_bias(config), arch.mlp_matrices)


def share_for_mlp_bias(pm: Any, beta: float) -> float:
    """The attention share a ``--mlp-bias`` β means (``algo.allocation.mlp_bias_for_share`` inverted)."""
    att, mlp = pm.units_per_layer * pm.attn_per_unit, pm.neurons_per_layer * pm.mlp_per_neuron
    return 1.0 - (beta - 1.0) * mlp / att


def resolve_memory_goal(run: Run) -> None:
    """``--target-memory`` as a decoder ratio and a KV weight for the layer budgets.

    A fixed split (``--attention-share A``, ``--mlp-bias``, or a uniform allocation) gives
    the ratio in closed form (:func:`~intraslice.algo.allocation.ratio_for_cost`). Otherwise
    the split is the estimator's ranking by importance per byte (``auto`` priced at this
    context and batch), which also sets the ratio, after the mask gradients; the ratio
    here is then the smallest it could be (every unit's share of attention), used only by
    the checks before them.
    """
    from .. import stages
    from ..algo.allocation import feasible_share, ratio_for_cost
    from ..config import DEFAULT_ATTENTION_SHARE, MAX_RATIO
    from ..kvcache import format_bytes, kv_values_per_token, memory_goal

    g, cfg, config = run.config.goal, run.cfg, run.ckpt.config
    before = stages.source_param_report(run.ckpt.skeleton())
    goal = memory_goal(
        run.memory_target, before["whole_model"], kv_values_per_token(config), g.context, g.batch, g.serving_dtype
    )
    pm = split_model(config)
    cap = run.config.allocation.max_layer_ratio
    share: float | str | None = cfg.attention_share
    if cfg.mlp_bias is not None:
        share = share_for_mlp_bias(pm, float(cfg.mlp_bias))
    elif share is None and cfg.allocation == "uniform" and not split_uniform(cfg):
        share = 1.0  # the spec's uniform allocation: both modules lose the ratio
    elif share is None and cfg.allocation == "uniform":
        share = DEFAULT_ATTENTION_SHARE  # a stock format's default split, moved where it must
        for _ in range(3):
            ratio = ratio_for_cost(pm, goal["remove"], float(share), goal["kv_weight"])
            check_ratio(ratio, "the decoder ratio for --target-memory")
            share = feasible_share(pm, ratio, float(share), cap)
        cfg.attention_share = share
    elif share is None:
        share = cfg.attention_share = default_memory_split(pm, goal, cap)
    cfg.kv_weight = goal["kv_weight"]
    cfg.ratio = ratio_for_cost(pm, goal["remove"], 1.0 if share == "auto" else float(share), goal["kv_weight"])
    whole = cfg.deploy == "vllm" and not cfg.uniform_layers
    why = "--deploy vllm keeps the attention whole" if whole else "let attention shrink (drop --attention-share)"
    if cfg.ratio > MAX_RATIO and share != "auto" and float(share) < 1.0:
        raise IntraSliceError(
            f"--target-memory {g.target_memory} needs a decoder ratio of {cfg.ratio:.2f} with attention share "
            f"{float(share):g} (the KV cache is {goal['kv_share']:.0%} of the dense total here): {why}, "
            "or ask for more memory"
        )
    check_ratio(cfg.ratio, "the decoder ratio for --target-memory")
    if share != "auto" and cfg.allocation != "uniform":
        from ..algo.allocation import mlp_bias_for_share, split_fits

        try:
            split_fits(pm, cfg.ratio, mlp_bias_for_share(pm, float(share)), cap)
        except IntraSliceError:
            raise IntraSliceError(
                f"--target-memory {g.target_memory} needs a decoder ratio of {cfg.ratio:.2f} with attention share "
                f"{float(share):g}, which asks a module to lose more than the per-layer cap {cap}: {why}, "
                "or ask for more memory"
            ) from None
    run.goal = {"target_memory": g.target_memory, **goal, "ratio": cfg.ratio, "attention_share": share}
    split = "the split by importance per byte" if share == "auto" else f"attention share {float(share):g}"
    split += f" (the cache is {goal['kv_share']:.0%} of the dense total)"
    run.log(
        f"--target-memory {g.target_memory}: {format_bytes(goal['target_bytes'])} of weights + KV at {g.context} "
        f"tokens x batch {g.batch} ({g.serving_dtype}; dense {format_bytes(goal['dense_bytes'])}), {split}"
        + ("" if share == "auto" else f": decoder ratio {cfg.ratio:.4f}")
    )


#: When a --target-memory without --attention-share splits by importance per byte: the KV
#: cache is at least MEMORY_SPLIT_KV_SHARE of the dense weights + KV at the target's context
#: and batch, and the target keeps at least MEMORY_SPLIT_MIN_KEEP of that total; otherwise the
#: attention stays whole (share 0) wherever the MLP alone can meet the target. **Decision
#: (measured, 2026-12-08, issue #35; BENCHMARKS.md "Attention and the KV cache at equal serving
#: cost")**, SmolLM2 at equal weights + KV (held-out C4 / WikiText-2 / copy 200 / lookup /
#: zero-shot): at 4096 tokens (cache 26% of the total) and 88% of the total kept, per byte
#: 53.16 / 28.57 / 2.76 / 92% / 49.7% against share 0's 54.59 / 28.85 / 3.59 / 92% / 50.7%;
#: at 4096 and 76.5% kept, per byte 97.23 / 50.73 / 4.28 / 25% / 48.5% against share 0's
#: 95.19 / 45.47 / 5.32 / 54% / 46.7% (perplexity and lookup lost); at 512 tokens (cache 4%)
#: share 0 won perplexity and zero-shot. Both thresholds lie between measured points (three).
MEMORY_SPLIT_KV_SHARE = 0.10
MEMORY_SPLIT_MIN_KEEP = 0.85


def default_memory_split(pm: Any, goal: dict[str, Any], cap: float) -> float | str:
    """The split of a ``--target-memory`` given no share: "auto" (by importance per byte) where the
    cache is a large part of the total and the target is mild, or where the MLP alone cannot meet
    the target; else 0 (the attention whole)."""
    from ..algo.allocation import feasible_share, ratio_for_cost
    from ..config import DEFAULT_ATTENTION_SHARE

    if (
        goal["kv_share"] >= MEMORY_SPLIT_KV_SHARE
        and goal["target_bytes"] >= MEMORY_SPLIT_MIN_KEEP * goal["dense_bytes"]
    ):
        return "auto"
    ratio = ratio_for_cost(pm, goal["remove"], DEFAULT_ATTENTION_SHARE, goal["kv_weight"])
    try:
        if ratio <= cap and feasible_share(pm, ratio, DEFAULT_ATTENTION_SHARE, cap) == DEFAULT_ATTENTION_SHARE:
            return DEFAULT_ATTENTION_SHARE
    except IntraSliceError:
        pass
    return "auto"


def split_uniform(cfg: PruneConfig) -> bool:
    """Every layer alike for a stock format, with the default split (``uniform_allocation``)."""
    return get_method(cfg.method).export_constraints and cfg.uniform_layers


# -- work -------------------------------------------------------------------------------------
def candidate_share(run: Run) -> Callable[[float], float]:
    """The attention share the run will prune with at a ratio, for ``--target-speedup``'s candidates.

    The candidates must have the shapes the run will make: the default split keeps the
    attention whole (share 0, raised where a ratio needs it), ``--attention-share A`` takes
    A, ``--mlp-bias`` β its share, and the spec's uniform allocation 1.
    """
    from ..algo.allocation import feasible_share
    from ..config import DEFAULT_ATTENTION_SHARE

    cfg, config = run.cfg, run.ckpt.config
    pm = split_model(config)
    cap = run.config.allocation.max_layer_ratio
    if cfg.mlp_bias is not None:
        fixed = share_for_mlp_bias(pm, float(cfg.mlp_bias))
        return lambda r: fixed
    if cfg.attention_share is not None:
        fixed = float(cfg.attention_share)
        return lambda r: fixed
    if cfg.allocation == "uniform" and not split_uniform(cfg):
        return lambda r: 1.0

    def default(r: float) -> float:
        try:
            return feasible_share(pm, r, DEFAULT_ATTENTION_SHARE, min(max(cap, r), 0.95))
        except IntraSliceError:
            return 1.0

    return default


@register_stage("speed_search", "work")
def speed_search(run: Run) -> None:
    g, cfg = run.config.goal, run.cfg
    if g.target_speedup is None:
        return
    if run.ck is not None and run.ck.stage("speed_search"):
        run.goal = run.ck.stage("speed_search")  # timings vary: the interrupted run's search result stands
        cfg.ratio = run.goal["ratio"]
        run.log(f"ratio {cfg.ratio} for {g.target_speedup}x from the interrupted run's search")
        return
    from ..speed import ratio_for_speedup

    where = "in llama.cpp's server" if g.speed_engine == "llamacpp" else "here"
    run.log(f"searching the ratio for a {g.target_speedup}x prefill speedup ({g.speed_seqlen} tokens, {where})")
    t = time.perf_counter()
    share = candidate_share(run)
    dense = whole_model(run.ckpt.directory, run.ckpt.dtype, run.device)  # timing needs the whole model
    if g.speed_engine == "llamacpp":
        from ..serve import require_xllamacpp
        from ..serve.speed import ratio_for_speedup_llamacpp

        require_xllamacpp()
        cfg.ratio, probes = ratio_for_speedup_llamacpp(
            dense,
            run.tokenizer,
            run.ckpt.directory,
            g.target_speedup,
            g.speed_seqlen,
            min_head_width=cfg.min_head_width,
            mlp_multiple=cfg.mlp_multiple,
            log=run.log,
            llama_cpp=run.config.export.llama_cpp,
            attention_share=share,
        )
    else:
        cfg.ratio, probes = ratio_for_speedup(
            dense,
            g.target_speedup,
            g.speed_seqlen,
            min_head_width=cfg.min_head_width,
            mlp_multiple=cfg.mlp_multiple,
            log=run.log,
            attention_share=share,
        )
    del dense
    run.timings["speed_search"] = time.perf_counter() - t
    run.goal = {
        "target_speedup": g.target_speedup,
        "speed_seqlen": g.speed_seqlen,
        "speed_engine": g.speed_engine,
        "ratio": cfg.ratio,
    }
    run.goal["probes"] = probes
    run.log(f"ratio {cfg.ratio} reaches {g.target_speedup}x on candidate shapes")
    if run.ck is not None:
        run.ck.save_stage("speed_search", run.goal)


@register_stage("evaluate_dense", "work")
def evaluate_dense(run: Run) -> None:
    if run.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    evaluate_model(run, "dense", lambda: run.ckpt, lambda: run.ckpt.directory)
    from ..resume import hook

    hook("dense_eval")


def evaluate_model(run: Run, which: str, open_ckpt: Callable[[], Any], directory: Callable[[], Any]) -> None:
    """Perplexity on every evaluation text, the copy loss and the zero-shot mean of one model.

    Why several texts: the calibration text flatters the text it resembles (issue #38), so
    the report always holds one the model was never calibrated on (the held-out C4 documents).
    """
    from .. import stages

    if not run.evaluating:
        return
    e = run.config.evaluation
    t = time.perf_counter()
    for text in e.texts.split(","):
        key = f"ppl_{which}" if text == "wikitext2" else f"ppl_{which}:{text}"

        def ppl(text: str = text) -> dict[str, Any]:
            return stages.evaluate(
                open_ckpt(), run.tokenizer, run.policy, e.seqlen, e.windows, progress=run.progress, text=text
            )

        res = run.cached(key, ppl)
        run.ppl.setdefault(text, {})[which] = res
        run.log(f"{which} perplexity ({text}): {res['ppl']:.3f} ({res['windows']} windows)")
    run.timings[f"eval_{which}"] = time.perf_counter() - t
    if e.incontext:
        from ..eval.incontext import prune_report_copy_loss

        t = time.perf_counter()
        res = run.cached(f"incontext_{which}", lambda: prune_report_copy_loss(open_ckpt(), run.policy))
        run.incontext[which] = res
        run.timings[f"incontext_{which}"] = time.perf_counter() - t
        run.log(f"{which} copy loss (span {res['span']}): {res['copy_loss']:.3f}")
    if e.zeroshot:
        t = time.perf_counter()
        run.zeroshot[which] = run.cached(f"zeroshot_{which}", lambda: zeroshot_mean(run, directory()))
        run.timings[f"zeroshot_{which}"] = time.perf_counter() - t
        zs = run.zeroshot[which]
        if "mean" in zs:
            run.log(f"{which} zero-shot mean ({', '.join(zs['tasks'])}; {zs['limit']} each): {zs['mean']:.3f}")


def zeroshot_mean(run: Run, directory: Any) -> dict[str, Any]:
    """The mean accuracy of the few zero-shot tasks the report carries, or why it was skipped."""
    e = run.config.evaluation
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return {"skipped": "lm-eval is not installed (pip install 'intraslice[eval]')"}
    whole = int(run.plan.model["params"]) * run.ckpt.dtype.itemsize
    capacity = run.plan.device_capacity if run.device.startswith("cuda") else run.plan.host_capacity
    if capacity is not None and whole > 0.5 * capacity:
        return {"skipped": f"the whole model ({whole / 2**30:.1f} GiB) would not fit beside the run"}
    from ..eval.zeroshot import evaluate as zeroshot

    try:
        res = zeroshot(
            whole_model(directory, run.ckpt.dtype, run.device),
            run.tokenizer,
            e.zeroshot_tasks,
            limit=e.zeroshot_limit,
            progress=False,
        )
    except IntraSliceError:
        raise  # bad tasks or data: the user's to fix
    except Exception as exc:  # lm-eval's own failures (e.g. prompts past a short context): the model is saved
        return {"skipped": f"lm-eval failed: {type(exc).__name__}: {exc}"[:300]}
    values = {t: r["value"] for t, r in res["tasks"].items()}
    return {
        "tasks": values,
        "mean": sum(values.values()) / len(values),
        "limit": e.zeroshot_limit,
        "seed": res["seed"],
        "lm_eval_version": res["lm_eval_version"],
    }


@register_stage("allocate", "work")
def allocate(run: Run) -> None:
    from .. import stages
    from ..algo.allocation import Allocation
    from ..resume import hook

    cfg, a = run.cfg, run.config.allocation
    t = time.perf_counter()

    def compute() -> dict[str, Any]:
        alloc, record = stages.allocate(
            run.ckpt,
            run.policy,
            run.grad_tokens,
            cfg.ratio,
            cfg.allocation,
            progress=run.progress,
            saved=run.saved,
            resident=run.plan.policy.get("estimator_weights") == "resident",
            units_per_head=a.units_per_head,
            mlp_bias=cfg.mlp_bias,
            attention_share=cfg.attention_share,
            cap=a.max_layer_ratio,
            group_size=a.group_size,
            grad_samples=a.grad_samples,
            split_uniform=split_uniform(cfg),
            serving_cost=serving_cost,
        )
        return {"allocation": asdict(alloc), "record": record}

    serving_cost = None
    if run.memory_target is not None and cfg.attention_share == "auto":
        serving_cost = (run.goal["remove"], run.goal["kv_weight"])

    allocated = run.cached("allocation", compute)
    alloc, run.alloc_record = Allocation(**allocated["allocation"]), allocated["record"]
    if serving_cost is not None:  # the ranking by importance per byte chose the ratio
        cfg.ratio = run.alloc_record["target_ratio"]
        share = run.alloc_record["attention_share_chosen"]
        run.goal.update({"ratio": cfg.ratio, "attention_share_chosen": share})
        run.log(f"--target-memory: attention share {share:.3f} by importance per byte, decoder ratio {cfg.ratio:.4f}")
    hook("allocation")
    run.timings["allocation"] = time.perf_counter() - t
    if cfg.allocation != "uniform":
        used = run.alloc_record.get("gradient_samples")
        grads = "" if used is None else f" (mask gradients from {used} of {len(run.grad_tokens)} windows)"
        seconds = run.timings["allocation"]
        print(f"allocation {cfg.allocation}: planned ratio {alloc.planned_ratio:.4f} in {seconds:.1f}s{grads}")
    if run.memory_target is not None:  # whole attention units miss the cost by up to one: the MLPs take it up
        alloc.layer_ratios = fit_memory(run, alloc.layer_ratios)
    spec_uniform = cfg.allocation == "uniform" and {tuple(r) for r in alloc.layer_ratios} == {(cfg.ratio,) * 2}
    cfg.layer_ratios = None if spec_uniform else [tuple(r) for r in alloc.layer_ratios]
    if cfg.allocation == "uniform" and not spec_uniform:
        att, mlp = alloc.layer_ratios[0]
        print(f"allocation uniform: every layer loses {att:.4f} of its attention and {mlp:.4f} of its MLP")


def fit_memory(run: Run, layer_ratios: list[Any]) -> list[tuple[float, float]]:
    """The allocation moved onto the memory target (:func:`~intraslice.algo.allocation.fit_cost`)."""
    from ..algo.allocation import fit_cost

    config = run.ckpt.config
    pm = split_model(config)
    fitted = fit_cost([tuple(r) for r in layer_ratios], pm, run.goal["remove"], run.goal["kv_weight"],
                      run.config.allocation.max_layer_ratio)  # fmt: skip
    if run.cfg.uniform_layers or run.cfg.deploy == "stock":  # every layer alike: one MLP width
        mean = sum(m for _, m in fitted) / len(fitted)
        fitted = [(a, mean) for a, _ in fitted]
    return fitted


@register_stage("prune", "work")
def prune_layers(run: Run) -> None:
    from .. import stages

    run.result = stages.prune(
        run.ckpt, run.calib.tokens, run.cfg, run.directory, progress=run.progress, checkpoint=run.ck
    )
    run.timings.update({f"prune_{k}": v for k, v in run.result.timings.items()})


@register_stage("evaluate_pruned", "work")
def evaluate_pruned(run: Run) -> None:
    from ..checkpoint import SourceCheckpoint

    evaluate_model(
        run, "pruned", lambda: SourceCheckpoint.from_directory(run.directory, name="pruned"), lambda: run.directory
    )


@register_stage("speed_check", "work")
def speed_check(run: Run) -> None:
    import warnings

    from ..speed import benchmark_speed

    g = run.config.goal
    if g.target_speedup is None:
        return
    t = time.perf_counter()
    if g.speed_engine == "llamacpp":
        from ..serve.speed import measured_speedup_llamacpp

        run.tokenizer.save_pretrained(run.directory)  # the GGUF carries the vocabulary (save writes it too)
        try:
            measured = measured_speedup_llamacpp(
                run.ckpt.directory, run.directory, g.speed_seqlen, llama_cpp=run.config.export.llama_cpp
            )
        except IntraSliceError as exc:  # a check after the work: never worth discarding the pruned model
            warnings.warn(f"the llama.cpp speed check failed ({exc}); the pruned model is kept", stacklevel=1)
            return
        key, what, where = "measured_prompt_speedup_llamacpp", "llama.cpp prompt", " in llama.cpp"
    else:
        pair = [
            ("dense", whole_model(run.ckpt.directory, run.ckpt.dtype, run.device)),
            ("pruned", whole_model(run.directory, run.ckpt.dtype, run.device)),
        ]
        speed = benchmark_speed(pair, [g.speed_seqlen], [], repeats=5, warmup=1).to_dict()
        measured = speed["models"]["pruned"]["prefill"][str(g.speed_seqlen)]["speedup"]
        key, what, where = "measured_prefill_speedup", "prefill", ""
    run.goal[key] = measured
    run.timings["speed_check"] = time.perf_counter() - t
    run.log(f"measured {what} speedup of the pruned model: {measured:.3f}x (asked {g.target_speedup}x)")
    if measured < g.target_speedup:
        warnings.warn(
            f"the pruned model reaches {measured:.2f}x{where}, below the {g.target_speedup}x target "
            "(the allocation changed the shapes the search timed)",
            stacklevel=1,
        )


@register_stage("save", "work")
def save(run: Run) -> None:
    """The tokenizer, intraslice.json, run_config.toml and allocation.png next to the weights."""
    from ..saving import write_report

    t = time.perf_counter()
    run.tokenizer.save_pretrained(run.directory)
    report = {
        "intraslice_version": versions()["intraslice"],
        "versions": versions(),
        "source_model": run.ckpt.name,
        "goal": run.goal,
        "allocation": run.alloc_record,
        "command": sys.argv,
        "calibration": run.calib.describe(),
        "config": run.cfg.to_dict(),
        "memory_plan": run.plan.to_dict(),
        **run.result.report(),
        # WikiText-2 (or the first text) where earlier reports had it; every text under "perplexities"
        "perplexity": run.ppl.get("wikitext2") or next(iter(run.ppl.values()), {}),
        "perplexities": run.ppl,
        "incontext": run.incontext,
        "zeroshot": run.zeroshot,
        "peak_memory": peak_memory_mb(run.device),
    }
    report["serving_memory"] = serving_memory(run, report)
    if run.memory_target is not None:
        met = report["serving_memory"]["pruned"]["total_bytes"]
        run.goal["met_bytes"] = met
        run.goal["met_error"] = met / run.goal["target_bytes"] - 1.0
    if run.ck is not None:
        report["resumed"] = run.ck.resumed
    report["timings_s"].update(run.timings)
    write_run_config(run)
    report["timings_s"]["save"] = time.perf_counter() - t
    write_report(run.directory, report)
    try:
        from ..report import PLOT_FILE, plot_allocation

        plot_allocation(report, run.directory / PLOT_FILE)
    except IntraSliceError as exc:  # matplotlib missing: the model is saved, only the plot is skipped
        print(f"intraslice: note: no plot ({exc})", file=sys.stderr)
    run.report = report


def serving_memory(run: Run, report: dict[str, Any]) -> dict[str, Any]:
    """Weights plus KV cache, dense and pruned, at ``--context`` x ``--batch`` in ``--serving-dtype``."""
    from ..kvcache import compare_serving_memory

    g = run.config.goal
    pruned = json.loads((run.directory / "config.json").read_text(encoding="utf-8"))
    before, after = report["params_before"]["whole_model"], report["params_after"]["whole_model"]
    return compare_serving_memory(run.ckpt.config, pruned, g.context, g.batch, g.serving_dtype, before, after)


def effective_config(run: Run) -> RunConfig:
    """The config that makes this model again bit for bit: every default as it was resolved.

    A speedup target is replaced by the ratio its search found (timings vary between runs).
    """
    config = copy.deepcopy(run.config)  # its method section is run.cfg, resolved
    config.model.device = run.device
    if config.goal.target_speedup is not None:
        config.goal.target_speedup = None
        config.goal.ratio = run.cfg.ratio
    elif config.goal.ratio is None and config.goal.target_params is None and config.goal.target_memory is None:
        config.goal.ratio = run.cfg.ratio
    return config


def write_run_config(run: Run) -> None:
    config = effective_config(run)
    header = (
        "The effective config of the run that wrote this directory (every default resolved).\n"
        f"Reproduce it: intraslice prune --config {RUN_CONFIG_FILE} --out OTHER_DIR"
    )
    if run.config.goal.target_speedup is not None:
        header += f"\n--target-speedup {run.config.goal.target_speedup} chose ratio {run.cfg.ratio}"
    (run.directory / RUN_CONFIG_FILE).write_text(config.to_toml(header), encoding="utf-8")


# -- finish -----------------------------------------------------------------------------------
@register_stage("export", "finish")
def export(run: Run) -> None:
    """``--export FORMAT``: the export of the directory just written, inside it."""
    from ..pipeline import distributed as dist

    e = run.config.export
    if e.format is None or not dist.is_main():
        return
    out = Path(run.out)
    if e.format == "gguf":
        from ..export.gguf import export_gguf

        path = export_gguf(out, out / f"model-{e.type}.gguf", e.type, llama_cpp=e.llama_cpp)
    elif e.format == "vllm":
        from ..export.vllm import export_vllm

        path = export_vllm(out, out / "vllm")
    else:
        from ..export.stock_hf import export_stock_hf

        path = export_stock_hf(out, out / "stock-hf")
    run.log(f"exported {path}")


# -- helpers ----------------------------------------------------------------------------------
def run_settings(config: RunConfig, ckpt: Any, tokens: torch.Tensor, policy: Any) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (see ``intraslice.resume``).

    Every option that can change the output, the model files, the calibration tokens, the
    resolved devices and dtype, and the versions of the code that computes. Left out: where
    things are written or kept (``--out``, ``--offload-dir``, ``--activations``), the
    memory capacities (they only choose among equal-result stores), progress bars.
    """
    from ..resume import _sha256_file, model_fingerprint, tensor_digest

    ignored = {"overwrite", "no_resume", "no_progress", "out", "offload_dir", "activations"}
    ignored |= {"device_memory", "host_memory"}
    options = {k: v for k, v in sorted(config.cli_values().items()) if k not in ignored}
    if config.allocation.ratios:
        path = config.allocation.ratios
        options["ratios"] = f"{path} ({_sha256_file(Path(path))})"
    return {
        "model": model_fingerprint(ckpt.directory, list(ckpt.weight_map.values())),
        "calibration": {"shape": list(tokens.shape), "sha256": tensor_digest(tokens)},
        "options": options,
        "devices": {**policy.describe(), "dtype": str(ckpt.dtype).replace("torch.", "")},
        "versions": versions(),
    }


def compute_device(name: str | None, planning: bool = False) -> str:
    """The compute device; ``planning`` (``--plan``) may name a GPU this machine lacks."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available() and not planning:
        raise IntraSliceError("--device cuda asked for but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise IntraSliceError(f"unknown device {name!r}: use cpu or cuda")
    return name


def parse_bytes(text: str | None) -> int | None:
    """``--device-memory 80GB`` / ``80GiB`` / ``8e10``: a capacity in bytes (None: detect)."""
    if text is None:
        return None
    s = str(text).strip().upper().replace("IB", "B")
    units = {"TB": 2**40, "GB": 2**30, "MB": 2**20, "KB": 2**10, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise IntraSliceError(f"cannot read the memory size {text!r}: use e.g. 80GB, 24GiB or a byte count") from None


def whole_model(directory: Any, dtype: torch.dtype, device: str) -> Any:
    """A whole model for the speed measurements (they time the full forward on the device)."""
    from transformers import AutoModelForCausalLM

    from .. import register_auto_classes

    register_auto_classes()
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval().to(device)


def peak_memory_mb(device: str) -> dict[str, float]:
    """The run's peaks. ``host_peak_rss_mb`` is the larger of this process's own peak RSS
    (``host_peak_rss_self_mb``, its ``VmHWM``) and its children's (``host_peak_rss_children_mb``,
    ``RUSAGE_CHILDREN``'s ``ru_maxrss``: the GGUF conversion runs in a child)."""
    from ..memory import peak_rss_bytes, peak_rss_children_bytes

    own, children = peak_rss_bytes() / 2**20, peak_rss_children_bytes() / 2**20
    out = {"host_peak_rss_mb": max(own, children), "host_peak_rss_self_mb": own, "host_peak_rss_children_mb": children}
    if device.startswith("cuda"):
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def versions() -> dict[str, str]:
    import platform

    import transformers

    from .. import __version__

    return {
        "intraslice": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


from ..heal import stage as _heal_stage  # noqa: E402, F401  (registers the heal stages)

__all__ = ["STAGES", "Run", "RunResult", "Stage", "register_stage", "run"]
