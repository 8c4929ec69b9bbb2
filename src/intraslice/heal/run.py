"""``intraslice heal PRUNED_DIR --out DIR``: distil the dense source into a pruned model.

The order of a heal, each step checked before the next costs anything:

1. the options alone (:meth:`HealConfig.check`), the output directory;
2. the student (a pruned directory) and the teacher (``--teacher``, default the source its
   ``run_config.toml`` records), checked to belong together: the teacher's architecture,
   layer count, widths and vocabulary are those the pruned model records of its source,
   the tokenizers agree, and the embeddings (which pruning never touches) are equal;
3. the training windows: ``--data`` through the calibration-source registry, so
   evaluation text is refused in one line, packed into ``--seqlen`` windows with the
   model's own tokenizer (seeded; more epochs when the text is short);
4. the held-out check before (WikiText-2 test and held-out C4, as the prune report has them);
5. the teacher's cache (one streamed pass, :mod:`intraslice.heal.teacher`), then training
   (:mod:`intraslice.heal.train`), both resumable from ``.DIR.heal/`` next to the output;
6. LoRA merged back, the weights written in the pruned model's own shard layout and dtype,
   the validation perplexity (held-out windows of the heal text) and the held-out check after;
   a heal that made the *validation* perplexity worse keeps the pre-heal weights (and says so)
   unless ``--keep-worse``; the test splits are reported, never decided on. The output is
   renamed into place in one step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import IntraSliceError
from .config import HealConfig

HEAL_RECORD = "heal"


def _print(line: str) -> None:
    print(line, flush=True)


def state_dir_for(out: str | os.PathLike[str]) -> Path:
    path = Path(out).resolve()
    return path.parent / f".{path.name}.heal"


# -- models -----------------------------------------------------------------------------------
def recorded_source(pruned_dir: Path) -> tuple[str | None, str | None]:
    """(model, gguf_file) the pruned model's run_config.toml records (None, None: the default model)."""
    from ..engine.config import RUN_CONFIG_FILE, RunConfig

    path = pruned_dir / RUN_CONFIG_FILE
    if not path.is_file():
        raise IntraSliceError(f"{pruned_dir} records no source model (no {RUN_CONFIG_FILE}): pass --teacher")
    config = RunConfig.from_toml(path)
    return config.model.model, config.model.gguf_file


def open_student(pruned_dir: str | os.PathLike[str]) -> Any:
    from ..checkpoint import SourceCheckpoint

    directory = Path(pruned_dir)
    if not directory.is_dir():
        raise IntraSliceError(f"{directory} is not a directory (give the output of `intraslice prune`)")
    ckpt = SourceCheckpoint.from_directory(directory)
    if ckpt.model_type != "intraslice":
        raise IntraSliceError(
            f"{directory} is a {ckpt.model_type} model, not one pruned by intraslice (give the output of "
            "`intraslice prune`)"
        )
    return ckpt


def _read(ckpt: Any, name: str) -> torch.Tensor | None:
    file = ckpt.weight_map.get(name)
    if file is None:
        return None
    with safe_open(str(ckpt.directory / file), framework="pt") as f:
        return f.get_tensor(name)


def check_teacher(student: Any, teacher: Any, student_tok: Any, teacher_tok: Any) -> None:
    """Refuse, in one line, a teacher the pruned model was not pruned from."""
    from ..data import tokenizer_fingerprint

    s, t = student.config, teacher.config
    recorded = getattr(s, "source_model_type", None)
    mine = {"architecture": recorded, "layers": s.num_hidden_layers, "hidden size": s.hidden_size}
    mine["vocabulary"] = s.vocab_size
    theirs = {"architecture": t.model_type, "layers": t.num_hidden_layers, "hidden size": t.hidden_size}
    theirs["vocabulary"] = t.vocab_size
    diff = [f"{k} {theirs[k]} (the pruned model's source: {mine[k]})" for k in mine if mine[k] != theirs[k]]
    if recorded is None:
        diff = diff[1:]
    if diff:
        raise IntraSliceError(f"teacher {teacher.name} is not the pruned model's source architecture: {diff[0]}")
    if tokenizer_fingerprint(student_tok) != tokenizer_fingerprint(teacher_tok):
        raise IntraSliceError(f"teacher {teacher.name} has another tokenizer than the pruned model")
    a, b = _read(student, "model.embed_tokens.weight"), _read(teacher, "model.embed_tokens.weight")
    if a is not None and b is not None and (a.shape != b.shape or not torch.equal(a.float(), b.float())):
        raise IntraSliceError(
            f"the pruned model's embeddings differ from teacher {teacher.name}'s: it was not pruned from it "
            "(pass its source as --teacher)"
        )


def open_teacher(cfg: HealConfig, student: Any) -> Any:
    from .. import stages

    if cfg.teacher is not None:
        model, gguf = cfg.teacher, cfg.teacher_gguf_file
    else:
        model, gguf = recorded_source(student.directory)
    return stages.load(model, gguf, "auto")


# -- data -------------------------------------------------------------------------------------
def training_windows(
    tokenizer: Any, cfg: HealConfig, log: Callable[[str], None] = _print
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The distinct training windows (seeded), the validation windows, and the name of what was read.

    Evaluation text is refused by the calibration-source registry (:func:`calibration_text`
    checks any fetched or user text against the evaluation documents). When the text holds
    fewer windows than the budget, training goes over them again (``train.window_order``).
    The validation windows (the keep-worse judge) are never trained on: the last
    ``--val-windows`` of the packed windows the seeded pick left over (the training windows
    are then those a heal without validation picks), or, in a text too short for both, its
    last windows (a quarter of them at most, at least one when it holds two).
    """
    from ..data import calibration_text, calibration_windows, tokenize

    need = cfg.steps() * cfg.batch
    if cfg.data.startswith("mix:"):
        calib = calibration_windows(tokenizer, cfg.data, need + cfg.val_windows, cfg.seqlen, cfg.seed)
        return calib.tokens[:need], calib.tokens[need:], calib.source
    text = calibration_text(cfg.data)
    ids = tokenize(tokenizer, text.text)
    n = ids.numel() // cfg.seqlen
    if n < 1:
        raise IntraSliceError(f"training text {text.name} has {ids.numel()} tokens, fewer than one window")
    packed = ids[: n * cfg.seqlen].view(n, cfg.seqlen)
    if n >= need + cfg.val_windows:  # the seeded pick; validation: the last windows of those left over
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
        pick = perm[:need].sort().values
        val_idx = perm[need:].sort().values[n - need - cfg.val_windows :]
        return packed[pick].clone(), packed[val_idx].clone(), text.name
    # a short text: its last windows (a quarter at most), the rest trained on over several epochs
    n_val = min(cfg.val_windows, max(1, n // 4)) if n >= 2 else 0
    if n_val < cfg.val_windows:
        log(f"heal: {text.name} holds {n} windows of {cfg.seqlen}: {n_val} held out for validation")
    n -= n_val
    if n < need:
        log(f"heal: {text.name} holds {n} training windows of {cfg.seqlen}: {need / n:.1f} epochs over them")
    return packed[:n].clone(), packed[n : n + n_val].clone(), text.name


@torch.no_grad()
def validation_ppl(model: torch.nn.Module, windows: torch.Tensor, chunk: int = 256) -> float | None:
    """Perplexity of ``model`` (a causal LM) on the validation windows (the LM head in chunks)."""
    if windows.shape[0] == 0:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for w in windows:
            ids = w[None].to(device)
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
            target = ids[0, 1:]
            for a in range(0, hidden.shape[0], chunk):
                logits = model.lm_head(hidden[a : a + chunk]).float()
                total += float(torch.nn.functional.cross_entropy(logits, target[a : a + chunk], reduction="sum"))
            count += target.numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)


def validation_worse(validation: dict[str, Any]) -> list[str]:
    """``["validation"]`` when the heal raised the validation perplexity (the keep-worse judge)."""
    b, a = validation.get("before"), validation.get("after")
    return ["validation"] if b is not None and a is not None and a > b else []


# -- evaluation -------------------------------------------------------------------------------
def held_out(directory: Path, tokenizer: Any, cfg: HealConfig, device: str, progress: bool) -> dict[str, Any]:
    """Perplexity of the model in ``directory`` on each held-out text (streamed)."""
    from .. import stages
    from ..checkpoint import SourceCheckpoint
    from ..pipeline import DevicePolicy

    out = {}
    if cfg.eval_windows == 0:
        return out
    ckpt = SourceCheckpoint.from_directory(directory)
    for text in cfg.texts():
        res = stages.evaluate(
            ckpt, tokenizer, DevicePolicy(device), cfg.eval_seqlen, cfg.eval_windows, progress=progress, text=text
        )
        out[text] = res
    return out


def recorded_held_out(report: dict[str, Any], cfg: HealConfig, which: str) -> dict[str, Any] | None:
    """The prune report's perplexities of ``which`` model if they are exactly the check's windows."""
    by_text = {t: ((report.get("perplexities") or {}).get(t) or {}).get(which) for t in cfg.texts()}
    return _same_windows(by_text, cfg)


def _same_windows(by_text: dict[str, Any], cfg: HealConfig) -> dict[str, Any] | None:
    out = {}
    for text in cfg.texts():
        res = by_text.get(text)
        if not res or res.get("seqlen") != cfg.eval_seqlen or res.get("windows") != cfg.eval_windows:
            return None
        out[text] = res
    return out


def recorded_before(report: dict[str, Any], cfg: HealConfig) -> dict[str, Any] | None:
    """The recorded held-out check of the weights in the directory, if there is one of these windows.

    A directory healed before holds the weights its heal record kept: the healed ones (their
    numbers are the heal's after-check, or the prune report's ``healed`` column) or the
    heal's input (its before-check, which for a directory healed twice is not the pruned
    model's); never the ``pruned`` column then. None means measure it.
    """
    record = report.get(HEAL_RECORD) or {}
    if not record:
        return recorded_held_out(report, cfg, "pruned")
    kept = record.get("kept")
    got = _same_windows(((record.get("held_out") or {}).get("after" if kept == "healed" else "before")) or {}, cfg)
    if got is None and kept == "healed":
        got = recorded_held_out(report, cfg, "healed")
    return got


def eval_settings(cfg: HealConfig) -> dict[str, Any]:
    """What a held-out check measures (its numbers are only reused for the same)."""
    return {"texts": cfg.texts(), "windows": cfg.eval_windows, "seqlen": cfg.eval_seqlen}


def cached_held_out(path: Path, cfg: HealConfig) -> dict[str, Any] | None:
    """A held-out check an interrupted heal stored, if it was of these settings (unreadable: none)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("eval") != eval_settings(cfg) or not isinstance(data.get("ppl"), dict):
        return None
    return data["ppl"]


def write_cached_held_out(path: Path, cfg: HealConfig, result: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"eval": eval_settings(cfg), "ppl": result}), encoding="utf-8")
    os.replace(tmp, path)


def worse(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The held-out texts whose perplexity the heal raised."""
    return [t for t in before if t in after and after[t]["ppl"] > before[t]["ppl"]]


#: What the healed directory takes over from the pruned one besides the weights (written anew):
#: config, tokenizer, modeling code, the weights' index, the run config and report plot. Never
#: an export (``--export gguf``'s ``model-TYPE.gguf``, ``stock-hf/``, ``vllm/``): it holds the
#: pre-heal weights.
CARRIED_SUFFIXES = (".json", ".py", ".txt", ".model", ".toml", ".png", ".md", ".jinja", ".tiktoken")


def carried(name: str) -> bool:
    return name.endswith(CARRIED_SUFFIXES)


# -- the student ------------------------------------------------------------------------------
def load_student(directory: Path, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    from .. import register_auto_classes

    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.to(device)


def linear_names(model: torch.nn.Module) -> list[str]:
    """The leaf names of every linear projection in the decoder layers (LoRA's targets)."""
    names = set()
    for layer in model.model.layers:
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def trainable(model: torch.nn.Module, cfg: HealConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model to train (LoRA-wrapped or not) and its trainable tensors by name.

    Full fine-tuning trains the decoder layers and the final norm; the embeddings and the
    LM head (which pruning never touched, and which hold a third of a small model) stay.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise IntraSliceError("--method lora needs peft: pip install 'intraslice[heal]'") from None
        torch.manual_seed(cfg.seed)  # LoRA's A matrices: seeded
        lcfg = LoraConfig(
            r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0, target_modules=linear_names(model)
        )
        wrapped = get_peft_model(model, lcfg)
        params = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
        return wrapped, params
    for p in model.model.layers.parameters():
        p.requires_grad_(True)
    for p in model.model.norm.parameters():
        p.requires_grad_(True)
    return model, {n: p for n, p in model.named_parameters() if p.requires_grad}


def write_weights(model: torch.nn.Module, source: Any, directory: Path) -> None:
    """The model's tensors in ``source``'s shard files, names and dtypes (one atomic rename each)."""
    state = model.state_dict()
    by_file: dict[str, list[str]] = {}
    for name, file in source.weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(source.directory / file), framework="pt") as f:
            meta = f.metadata()
            dtypes = {n: f.get_slice(n).get_dtype() for n in names}
        tensors = {}
        for n in names:
            if n not in state:
                raise IntraSliceError(f"the healed model has no tensor {n}: not the pruned model's layout")
            dtype = getattr(torch, _TORCH_DTYPES.get(dtypes[n], "float32"))
            tensors[n] = state[n].detach().to("cpu", dtype).contiguous().clone()
        tmp = directory / (file + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, directory / file)


_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


# -- FLOPs ------------------------------------------------------------------------------------
def step_flops(model: torch.nn.Module, cfg: HealConfig) -> float:
    """FLOPs one optimizer step must do: 2 per weight per token forward, again for the
    checkpointed recomputation, and 2 (input gradients) + 2 (weight gradients, full
    fine-tuning only) backward; attention scores 4 T d_attn per token per pass."""
    cfg_m = model.config
    decoder = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    head = cfg_m.vocab_size * cfg_m.hidden_size
    per_token_passes = 2 + 2 + 2 + (2 if cfg.method == "full" else 0)  # fwd, recompute, input grads, weight grads
    linear = (decoder * per_token_passes + head * 8) * cfg.seqlen
    attn = 0
    for spec in cfg_m.layers:
        attn += 2 * spec["num_heads"] * spec["head_dim"] * cfg.seqlen * cfg.seqlen  # QK^T and PV, causal ~half of 4
    return float(cfg.batch * (linear + attn * 4))


def matmul_gflops(seconds: float = 0.5) -> float:
    """This machine's float32 matmul rate with the current threads (the ceiling of a step)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0) / 1e9


# -- the whole heal ---------------------------------------------------------------------------
def heal(
    pruned_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: HealConfig,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = _print,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Heal ``pruned_dir`` into ``out`` (see the module docstring); returns the heal record."""
    from ..engine.run import compute_device
    from ..saving import REPORT_FILE, atomic_directory, check_output_dir, write_report

    t_start = time.perf_counter()
    cfg.check()
    device = compute_device(cfg.device)
    check_output_dir(out, overwrite)
    student_ckpt = open_student(pruned_dir)
    if Path(out).resolve() == student_ckpt.directory.resolve():
        raise IntraSliceError("--out must be a new directory, not the pruned model itself")
    teacher = open_teacher(cfg, student_ckpt)
    tokenizer = student_ckpt.tokenizer()
    check_teacher(student_ckpt, teacher, tokenizer, teacher.tokenizer())
    from ..plan import model_shape
    from .plan import describe, heal_memory

    layers = student_ckpt.config.layers
    decoder = sum(_layer_params(spec, student_ckpt.config) for spec in layers)
    log(describe(heal_memory(model_shape(teacher.config), cfg, decoder_params=decoder)))
    windows, val_windows, data_name = training_windows(tokenizer, cfg, log)
    from .. import stages

    stages.check_vocabulary(student_ckpt, torch.cat([windows, val_windows]), tokenizer)
    report_path = student_ckpt.directory / REPORT_FILE
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    log(
        f"heal: {cfg.method} on {cfg.steps() * cfg.batch} windows of {cfg.seqlen} tokens from {data_name} "
        f"({windows.shape[0]} distinct), teacher {teacher.name}, top-{cfg.topk or 'all'} forward KL, "
        f"lr {cfg.peak_lr:g}"
    )

    # the resume area: settings that change the result; another run's state is discarded
    settings = {
        "pruned": _fingerprint(student_ckpt),
        "teacher": _fingerprint(teacher),
        "windows": windows_digest(windows) + windows_digest(val_windows),
        "config": {k: v for k, v in cfg.to_dict().items() if k not in _NOT_SETTINGS},
    }
    state = state_dir_for(out)
    try:
        old = json.loads((state / "settings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if old != json.loads(json.dumps(settings)):
        if old is not None:
            log(f"heal: discarding an interrupted heal of other settings in {state}")
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        (state / "settings.json").write_text(json.dumps(settings, indent=1), encoding="utf-8")
    elif (state / "train").is_dir():
        log(f"heal: resuming the interrupted heal in {state}")

    timings: dict[str, float] = {}
    t = time.perf_counter()
    before = recorded_before(report, cfg)  # healed before: the healed numbers, not the pruned
    dense = recorded_held_out(report, cfg, "dense")
    if dense is None and (report.get(HEAL_RECORD) or {}).get("kept") == "healed":
        dense = _same_windows((report[HEAL_RECORD].get("held_out") or {}).get("dense") or {}, cfg)
    if before is None:
        before = cached_held_out(state / "before.json", cfg)
        if before is None:
            before = held_out(student_ckpt.directory, tokenizer, cfg, device, progress)
            write_cached_held_out(state / "before.json", cfg, before)
    timings["check_before"] = time.perf_counter() - t
    for text, res in before.items():
        log(f"heal: before, perplexity ({text}): {res['ppl']:.3f}")

    model, record, cache_nbytes = distil(
        student_ckpt.directory, teacher, windows, cfg, state, device, settings, timings, progress, log, on_step,
        val_windows=val_windows,
    )  # fmt: skip
    del teacher

    result: dict[str, Any] = {}
    teacher_name = settings["teacher"]["name"]

    def write(tmp: Path) -> None:
        for f in student_ckpt.directory.iterdir():
            if f.is_file() and f.name != REPORT_FILE and carried(f.name):
                shutil.copy2(f, tmp / f.name)
        write_weights(model, student_ckpt, tmp)
        t = time.perf_counter()
        after = held_out(tmp, tokenizer, cfg, device, progress)
        timings["check_after"] = time.perf_counter() - t
        # the judge is the validation windows (heal text never trained on); the held-out (test)
        # texts are reported, never decided on
        got_worse = validation_worse(record["validation"])
        kept = "pre-heal" if got_worse and not cfg.keep_worse else "healed"
        note = "" if kept == "healed" else " (discarded)"
        for text, res in after.items():
            log(f"heal: after, perplexity ({text}): {before[text]['ppl']:.3f} -> {res['ppl']:.3f}{note}")
        if kept == "pre-heal":
            for file in set(student_ckpt.weight_map.values()):
                shutil.copy2(student_ckpt.directory / file, tmp / file)
            log(
                "heal: the validation perplexity got worse: keeping the pre-heal weights "
                "(--keep-worse keeps the healed ones)"
            )
        elif got_worse:
            log("heal: the validation perplexity got worse; kept anyway (--keep-worse)")
        timings["total"] = time.perf_counter() - t_start
        result.update(
            {
                "pruned_model": str(student_ckpt.directory),
                "teacher": teacher_name,
                "data": data_name,
                "config": cfg.to_dict(),
                "windows": {"distinct": int(windows.shape[0]), "trained": cfg.steps() * cfg.batch},
                "teacher_cache_bytes": cache_nbytes,
                "training": record,
                # "after" is the trained weights' check; "model" the numbers of the weights written
                "held_out": {
                    "dense": dense,
                    "before": before,
                    "after": after,
                    "after_discarded": kept != "healed",
                    "model": after if kept == "healed" else before,
                },
                "gap_closed": gap_closed(dense, before, after),
                "validation": record["validation"],
                "worse": got_worse,
                "held_out_worse": worse(before, after),  # reported only: the test splits decide nothing
                "kept": kept,
                "timings_s": timings,
                "command": sys.argv,
            }
        )
        new_report = dict(report)
        new_report[HEAL_RECORD] = result
        write_report(tmp, new_report)

    atomic_directory(out, write, overwrite)
    shutil.rmtree(state, ignore_errors=True)
    discarded = "" if result["kept"] == "healed" else " by the discarded healed weights"
    for text, g in (result["gap_closed"] or {}).items():
        log(f"heal: {text}: {g:.1%} of the pruning gap closed{discarded}")
    log(f"heal: wrote {out} ({result['kept']} weights) in {timings['total']:.0f}s")
    return result


def distil(
    student_dir: Path,
    teacher: Any,
    windows: torch.Tensor,
    cfg: HealConfig,
    state: Path,
    device: str,
    settings: dict[str, Any],
    timings: dict[str, float],
    progress: bool = True,
    log: Callable[[str], None] = _print,
    on_step: Callable[[int], None] | None = None,
    val_windows: torch.Tensor | None = None,
) -> tuple[torch.nn.Module, dict[str, Any], int]:
    """The teacher's cache, then the training: (the healed model, LoRA merged; the training
    record; the cache's bytes). Resumable from ``state``."""
    from ..pipeline import DevicePolicy
    from .teacher import build_cache

    t = time.perf_counter()
    cache = build_cache(
        state / "teacher",
        teacher,
        windows,
        cfg.topk,
        DevicePolicy(device),
        key=settings["teacher"]["config"] + settings["windows"],
        progress=progress,
        log=log,
    )
    timings["teacher"] = time.perf_counter() - t
    log(f"heal: teacher cache {cache.nbytes() / 2**20:.1f} MiB in {timings['teacher']:.1f}s")

    from .train import train

    model = load_student(student_dir, device)
    if val_windows is None:
        val_windows = torch.zeros(0, cfg.seqlen, dtype=torch.long)
    val_before = validation_ppl(model, val_windows)  # the pre-heal weights, even on a resume
    wrapped, params = trainable(model, cfg)
    n_train = sum(p.numel() for p in params.values())
    t = time.perf_counter()
    record = train(
        model.model, model.lm_head, model.model.layers, params, windows, cache, cfg, state / "train",
        progress=progress, log=log, on_step=on_step,
    )  # fmt: skip
    timings["train"] = time.perf_counter() - t
    if cfg.method == "lora":
        model = wrapped.merge_and_unload()
    validation = {
        "windows": int(val_windows.shape[0]),
        "seqlen": cfg.seqlen,
        "before": val_before,
        "after": validation_ppl(model, val_windows),
    }
    if validation["before"] is not None:
        log(f"heal: validation perplexity ({validation['windows']} held-out windows of the heal text): "
            f"{validation['before']:.3f} -> {validation['after']:.3f}")  # fmt: skip
    else:
        log("heal: no validation windows: the healed weights are kept unjudged")
    flops = step_flops(model, cfg)
    step_s = record["train_seconds"] / max(1, record["steps"])
    record.update(
        {
            "trainable_params": n_train,
            "step_tflops": flops / 1e12,
            "step_seconds": step_s,
            "achieved_gflops_per_s": flops / step_s / 1e9 if step_s > 0 else None,
            "matmul_gflops_per_s": matmul_gflops(),
            "threads": torch.get_num_threads(),
            "validation": validation,
        }
    )
    log(
        f"heal: {record['tokens']} tokens in {record['train_seconds']:.0f}s ({record['tokens_per_s']:.0f} tokens/s), "
        f"KL {record['kl_first']:.4f} -> {record['kl_last']:.4f}; a step does {record['step_tflops']:.3f} TFLOP in "
        f"{step_s:.2f}s ({record['achieved_gflops_per_s']:.1f} GFLOP/s; this machine's matmul: "
        f"{record['matmul_gflops_per_s']:.1f})"
    )
    return model, record, cache.nbytes()


def _layer_params(spec: dict[str, Any], config: Any) -> int:
    """Linear parameters of one pruned layer (the plan's student size)."""
    d, h, m = config.hidden_size, spec["head_dim"], spec["intermediate_size"]
    q, kv = spec["num_heads"] * h, spec["num_kv_heads"] * h
    return d * q * 2 + d * kv * 2 + (3 if getattr(config, "mlp_gated", True) else 2) * d * m


_NOT_SETTINGS = {"save_every", "eval_windows", "eval_seqlen", "eval_texts", "keep_worse", "device"}


def gap_closed(dense: dict | None, before: dict, after: dict) -> dict[str, float] | None:
    """(pruned - healed) / (pruned - dense) perplexity per text (the issue's measure of recovery)."""
    if not dense:
        return None
    out = {}
    for text in before:
        if text in after and text in dense and before[text]["ppl"] != dense[text]["ppl"]:
            out[text] = (before[text]["ppl"] - after[text]["ppl"]) / (before[text]["ppl"] - dense[text]["ppl"])
    return out


def windows_digest(windows: torch.Tensor) -> str:
    """What identifies the training windows (the teacher cache's and the resume area's key)."""
    h = hashlib.sha256(f"{tuple(windows.shape)} {windows.dtype}".encode())
    h.update(windows.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _fingerprint(ckpt: Any) -> dict[str, Any]:
    from ..resume import model_fingerprint

    fp = model_fingerprint(ckpt.directory, sorted(set(ckpt.weight_map.values())))
    return {"name": ckpt.name, "config": hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]}


__all__ = ["HealConfig", "heal"]
