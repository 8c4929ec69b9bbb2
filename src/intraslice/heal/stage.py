"""The ``heal`` stage of a prune run (``intraslice prune ... --heal-tokens N``).

Registered after ``evaluate_pruned`` so the summary holds the dense, pruned and healed
numbers of the same windows; the healed weights replace the pruned ones in the output
being written before ``save`` (a heal that worsened the validation perplexity leaves them, unless
``--heal-keep-worse``). The teacher is the source the run pruned. Resumable: the teacher
cache and the training state live next to the run's resume area (``.OUT.heal``); the
healed weights are staged there and moved into the output only after the stage's record
is committed, so a kill at any point neither loses training nor heals twice.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..engine.run import Run, register_stage

#: The perplexity column of a heal whose weights were discarded (the pre-heal ones kept).
DISCARDED = "healed_discarded"


@register_stage("heal_plan", "prepare", after="plan")
def plan_heal(run: Run) -> None:
    """The heal's memory in the plan (from the source's shapes: the pruned model is smaller)."""
    h = run.config.heal
    if h.tokens == 0:
        return
    from ..plan import StagePeak, model_shape
    from .plan import describe, heal_memory

    if run.cfg.method != "intraslice":
        from ..errors import IntraSliceError

        raise IntraSliceError(f"--heal-tokens heals models pruned by --method intraslice, not {run.cfg.method}")
    cfg = h.heal_config(run.config.evaluation, run.device)
    cfg.check()
    mem = heal_memory(model_shape(run.ckpt.config), cfg)
    run.log(describe(mem))
    if run.plan is not None:
        on_device = run.device.startswith("cuda")
        peak = StagePeak(device=mem["train"] if on_device else 0, host=mem["train"] if not on_device else 0)
        run.plan.stages["heal"] = peak


@register_stage("heal", "work", after="evaluate_pruned")
def heal_pruned(run: Run) -> None:
    h = run.config.heal
    if h.tokens == 0 or not run.main_rank:
        return
    from .run import state_dir_for

    cfg = h.heal_config(run.config.evaluation, run.device)
    if run.ck is not None:
        # next to the run's checkpoint, not in it (a checkpoint commit deletes what it does not name)
        state = state_dir_for(run.config.output.out)
        if not run.ck.resumed:
            shutil.rmtree(state, ignore_errors=True)  # a heal of another run, whatever it was
    else:
        state = Path(tempfile.mkdtemp(prefix="intraslice-heal-"))
    staged = state / "healed"
    record = run.ck.stage("heal") if run.ck is not None else None
    t0 = time.perf_counter()
    try:
        if record is None:
            record = _heal_and_stage(run, cfg, state, staged, t0)
            if run.ck is not None:
                run.ck.save_stage("heal", record)
        for f in record["files"]:  # idempotent: a kill here moves the rest on the resumed run
            if (staged / f).is_file():
                shutil.move(str(staged / f), run.directory / f)
    finally:
        if run.ck is None:  # a temporary directory: nothing to resume from, gone whatever happened
            shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    # the healed numbers are the model's only when its weights were kept
    label = "healed" if record["kept"] == "healed" else DISCARDED
    for text, res in record["held_out"]["after"].items():
        run.ppl.setdefault(text, {})[label] = res
        note = "" if label == "healed" else " (discarded: the pre-heal weights were kept)"
        run.log(f"healed perplexity ({text}): {res['ppl']:.3f}{note}")
    if record["worse"]:
        what = "kept anyway (--heal-keep-worse)" if record["kept"] == "healed" else "keeping the pre-heal weights"
        run.log(f"heal: the validation perplexity got worse: {what}")
    run.timings["heal"] = time.perf_counter() - t0
    run.heal_record = record  # type: ignore[attr-defined]


def _heal_and_stage(run: Run, cfg: Any, state: Path, staged: Path, t0: float) -> dict[str, Any]:
    """Distil, write the healed weights to ``staged``, check them: the stage's record."""
    from ..checkpoint import SourceCheckpoint
    from .run import (
        _fingerprint,
        distil,
        held_out,
        training_windows,
        validation_worse,
        windows_digest,
        worse,
        write_weights,
    )

    state.mkdir(parents=True, exist_ok=True)
    pruned = SourceCheckpoint.from_directory(run.directory)
    windows, val_windows, data_name = training_windows(run.tokenizer, cfg, run.log)
    # the teacher cache's key: the source (content of its config, its weight files, the dtype it was
    # loaded in) and the windows themselves, as `intraslice heal` keys it
    teacher = _fingerprint(run.ckpt)
    teacher["config"] += f" {run.ckpt.dtype}"
    settings = {"teacher": teacher, "windows": windows_digest(windows) + windows_digest(val_windows)}
    timings: dict[str, float] = {}
    model, training, cache_nbytes = distil(
        run.directory, run.ckpt, windows, cfg, state, run.device, settings, timings, run.progress, run.log,
        val_windows=val_windows,
    )  # fmt: skip
    # staged: the pruned directory's small files and the healed weights, checked there
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    for f in run.directory.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, staged / f.name)
    write_weights(model, pruned, staged)
    before = {t: v["pruned"] for t, v in run.ppl.items() if "pruned" in v}
    after = held_out(staged, run.tokenizer, cfg, run.device, run.progress)
    # the judge: the validation windows (heal text never trained on); the test splits are reported only
    got_worse = validation_worse(training["validation"])
    kept = "pre-heal" if got_worse and not cfg.keep_worse else "healed"
    return {
        "data": data_name,
        "config": cfg.to_dict(),
        "training": training,
        "teacher_cache_bytes": cache_nbytes,
        "held_out": {"before": before, "after": after, "after_discarded": kept != "healed"},
        "validation": training["validation"],
        "worse": got_worse,
        "held_out_worse": worse(before, after),
        "kept": kept,
        "files": sorted(set(pruned.weight_map.values())) if kept == "healed" else [],
        "timings_s": {**timings, "total": time.perf_counter() - t0},
    }


@register_stage("heal_report", "work", after="save")
def report_heal(run: Run) -> None:
    """The heal's record in intraslice.json (``save`` wrote the rest)."""
    record = getattr(run, "heal_record", None)
    if record is None or run.report is None:
        return
    from ..saving import write_report

    run.report["heal"] = record
    write_report(run.directory, run.report)
