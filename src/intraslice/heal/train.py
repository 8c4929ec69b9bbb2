"""The training loop of a heal: AdamW, warm-up then cosine decay, resumable bit for bit.

The student trains on whole windows, one at a time, gradients accumulated over
``batch`` windows per optimizer step. Each decoder layer runs under activation
checkpointing (only its input is kept for the backward pass; its inside is recomputed),
and the LM head under the chunked checkpoint of :mod:`intraslice.heal.loss`.

Resumable: every ``save_every`` steps the trainable tensors, the AdamW state, the step
(which is the data cursor: the window order is a function of the seed) and the torch
and Python RNG states are written to ``state-NNNNNN.safetensors`` and committed by an
atomic replace of ``train.json``. The learning rate is a pure function of the step, so
there is no scheduler state to lose. A run killed at any moment resumes from the last
commit and ends with the same bytes as an uninterrupted run (tested).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .config import HealConfig
from .loss import distill_loss

STATE = "train.json"


def lr_at(step: int, steps: int, cfg: HealConfig) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to ``min_lr`` x peak."""
    peak = cfg.peak_lr
    warm = max(1, round(cfg.warmup * steps)) if cfg.warmup > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    span = max(1, steps - warm)
    progress = min(1.0, (step - warm) / span)
    return peak * (cfg.min_lr + (1.0 - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def window_order(n_windows: int, steps: int, batch: int, seed: int) -> list[int]:
    """The training order of the windows: seeded permutations, one per epoch."""
    need = steps * batch
    order: list[int] = []
    epoch = 0
    while len(order) < need:
        gen = torch.Generator().manual_seed(seed * 1000003 + epoch + 1)
        order += torch.randperm(n_windows, generator=gen).tolist()
        epoch += 1
    return order[:need]


def checkpoint_layers(layers: Sequence[torch.nn.Module]) -> Callable[[], None]:
    """Run each layer under activation checkpointing; returns the undo."""

    def wrap(orig: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return orig(*args, **kwargs)
            return checkpoint(orig, *args, use_reentrant=False, **kwargs)

        return forward

    for layer in layers:
        layer.forward = wrap(layer.forward)

    def undo() -> None:
        for layer in layers:
            if "forward" in vars(layer):
                del layer.forward

    return undo


# -- the resumable state ----------------------------------------------------------------------
def save_state(
    directory: Path, step: int, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, extra: dict
) -> None:
    tensors = {f"param.{k}": v.detach().contiguous().cpu() for k, v in params.items()}
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.detach().contiguous().cpu() if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    name = f"state-{step:06d}.safetensors"
    tmp = directory / (name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / name)
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    pystate = random.getstate()
    meta = {
        "step": step,
        "file": name,
        "param_groups": groups,
        "python_rng": [pystate[0], list(pystate[1]), pystate[2]],
    }
    meta.update(extra)
    tmp_meta = directory / (STATE + ".tmp")
    tmp_meta.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(tmp_meta, directory / STATE)  # the commit point
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_state(directory: Path, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> dict | None:
    try:
        meta = json.loads((directory / STATE).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / meta["file"]))
    except (OSError, ValueError, KeyError):
        return None
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    v, s, g = meta["python_rng"]
    random.setstate((v, tuple(s), g))
    return meta


# -- the loop ---------------------------------------------------------------------------------
def train(
    inner: torch.nn.Module,
    head: torch.nn.Module,
    layers: Sequence[torch.nn.Module],
    params: dict[str, torch.Tensor],
    windows: torch.Tensor,
    cache: Any,
    cfg: HealConfig,
    state_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Distil into the student's trainable ``params``; returns the training record.

    ``inner`` maps input ids to the final hidden states (the student's decoder and last
    norm), ``head`` is its LM head, ``windows`` the training windows and ``cache`` their
    teacher targets (:class:`~intraslice.heal.teacher.TeacherCache`).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    steps = cfg.steps()
    order = window_order(windows.shape[0], steps, cfg.batch, cfg.seed)
    plist = list(params.values())
    opt = torch.optim.AdamW(plist, lr=cfg.peak_lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    meta = load_state(state_dir, params, opt)
    start = 0 if meta is None else int(meta["step"]) + 1
    history: list[dict[str, float]] = [] if meta is None else list(meta.get("history", []))
    seconds = 0.0 if meta is None else float(meta.get("seconds", 0.0))
    if start:
        log(f"heal: resuming at step {start} of {steps} (the interrupted run's optimizer, schedule and data position)")
    tokens_per_step = cfg.batch * cfg.seqlen
    bar = tqdm(
        total=steps * tokens_per_step, initial=start * tokens_per_step, desc="heal", unit="tok", disable=not progress
    )
    undo = checkpoint_layers(layers)
    inner.train()
    device = next(inner.parameters()).device  # the windows and the cache live on the host

    def to_device(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            lr = lr_at(step, steps, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            kls, ces = [], []
            for w in order[step * cfg.batch : (step + 1) * cfg.batch]:
                ids = windows[w : w + 1].to(device)
                t_logp, t_idx, t_tail = (to_device(t) for t in cache.get(w))
                hidden = inner(input_ids=ids, use_cache=False).last_hidden_state[0]
                loss, kl, ce = distill_loss(hidden, head, t_logp, t_idx, t_tail, ids[0], cfg.ce_weight)
                (loss / cfg.batch).backward()
                kls.append(kl)
                ces.append(ce)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(plist, cfg.grad_clip)
            opt.step()
            seconds += time.perf_counter() - t0
            row = {"step": step, "lr": lr, "kl": sum(kls) / len(kls)}
            if cfg.ce_weight > 0:
                row["ce"] = sum(ces) / len(ces)
            history.append(row)
            bar.update(tokens_per_step)
            bar.set_postfix(kl=f"{row['kl']:.4f}", lr=f"{lr:.1e}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == steps:
                save_state(state_dir, step, params, opt, {"history": history, "seconds": seconds})
            if on_step is not None:
                on_step(step)
    finally:
        undo()
        inner.eval()
        bar.close()
    done_tokens = steps * tokens_per_step
    tenth = max(1, steps // 10)  # per-step KL is noisy (a few windows): the first and last tenth
    return {
        "steps": steps,
        "tokens": done_tokens,
        "train_seconds": seconds,
        "tokens_per_s": done_tokens / seconds if seconds > 0 else None,
        "kl_first": sum(r["kl"] for r in history[:tenth]) / len(history[:tenth]) if history else None,
        "kl_last": sum(r["kl"] for r in history[-tenth:]) / len(history[-tenth:]) if history else None,
        "history": history,
        "resumed_at_step": start or None,
    }
