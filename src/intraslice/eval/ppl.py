"""Perplexity on WikiText-2 test (method.md section 5).

P1: non-overlapping 2048-token windows (SliceGPT protocol); P2: 4096-token windows
(DISP-LLM/MoDeGPT protocol). Perplexity = exp(mean token NLL) over every predicted token
of every evaluated window. ``windows`` evaluates the first N windows only (CPU budgets);
results always say how many of how many were used.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import TextSource, tokenize, wikitext2_test_text
from ..errors import IntraSliceError

PROTOCOLS = {"P1": 2048, "P2": 4096}
#: Tokens whose logits exist at once in the streamed evaluation.
HEAD_CHUNK = 512


@torch.no_grad()
def window_nll(model: Any, window: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of one (1, T) window and the number of predicted tokens."""
    logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
    target = window[0, 1:]
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    return float(nll), int(target.numel())


@torch.no_grad()
def streamed_window_nlls(
    access: Any, windows: torch.Tensor, policy: Any, batch_size: int = 1, progress: bool = False
) -> list[float]:
    """Summed next-token NLL of each window, running one decoder layer at a time.

    For models that do not fit the device: the windows' hidden states travel layer by
    layer (as calibration data does when pruning), then the final norm and the LM head
    (onloaded once) give the logits, never scored in half precision.
    """
    from ..pipeline.sequential import stream_forward

    arch = access.arch
    hidden = stream_forward(access, windows, policy, batch_size, progress, desc=f"ppl@{windows.shape[1]} layers")
    norm = access.onload_module(arch.final_norm)
    head = access.onload_module(arch.lm_head)
    out: list[float] = []
    try:
        for start, h in zip(range(0, windows.shape[0], batch_size), hidden.store, strict=True):
            target = policy.to_compute(windows[start : start + h.shape[0], 1:])
            sums = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
            # The logits (tokens x vocabulary) are the largest tensor of a small model with a
            # big vocabulary (400 MB per 2048-token window for SmolLM2): scored in token chunks.
            for a in range(0, target.shape[1], HEAD_CHUNK):
                b = min(a + HEAD_CHUNK, target.shape[1])
                logits = head(norm(h[:, a:b]))
                if logits.dtype in (torch.float16, torch.bfloat16):
                    logits = logits.float()
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target[:, a:b].reshape(-1), reduction="none"
                )
                sums += nll.view(h.shape[0], -1).sum(1).to(torch.float64)
            out.extend(float(x) for x in sums)
    finally:
        hidden.store.clear()
        access.release_module(arch.final_norm)
        access.release_module(arch.lm_head)
    return out


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    seqlen: int = 2048,
    windows: int | None = None,
    text: TextSource | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    token_ids: torch.Tensor | None = None,
    policy: Any | None = None,
    stream: bool = False,
) -> dict[str, Any]:
    """Perplexity over non-overlapping ``seqlen`` windows of WikiText-2 test (or ``text``).

    ``stream=True`` (with a :class:`~intraslice.pipeline.DevicePolicy`) runs the model one
    decoder layer at a time on ``policy.device`` while it stays in host memory, so a model
    larger than the device is evaluated; otherwise the model runs where it is.
    """
    if seqlen < 2:
        raise IntraSliceError(f"seqlen must be >= 2, got {seqlen}")
    source = "custom"
    if token_ids is None:
        text = text or wikitext2_test_text()
        source = text.name
        token_ids = tokenize(tokenizer, text.text)
    total = token_ids.numel() // seqlen
    if total < 1:
        raise IntraSliceError(f"evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    n = total if windows is None else min(int(windows), total)
    if n < 1:
        raise IntraSliceError(f"--windows must be >= 1, got {windows}")
    model.eval()
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    if stream:
        from ..pipeline import DevicePolicy, ModelLayers

        policy = policy or DevicePolicy(str(device or "cpu"))
        windows_ids = token_ids[: n * seqlen].view(n, seqlen)
        sums = streamed_window_nlls(ModelLayers(model, policy), windows_ids, policy)
        for w, s in enumerate(sums):
            if not math.isfinite(s):
                raise IntraSliceError(f"non-finite loss on evaluation window {w}: the model produces NaN/Inf")
        nll, count = sum(sums), n * (seqlen - 1)
    else:
        device = torch.device(device) if device is not None else next(model.parameters()).device
        for w in tqdm(range(n), desc=f"ppl@{seqlen}", unit="window", disable=not progress):
            window = token_ids[w * seqlen : (w + 1) * seqlen].view(1, -1).to(device)
            s, c = window_nll(model, window)
            if not math.isfinite(s):
                raise IntraSliceError(f"non-finite loss on evaluation window {w}: the model produces NaN/Inf")
            nll += s
            count += c
    return {
        "ppl": math.exp(nll / count),
        "seqlen": seqlen,
        "windows": n,
        "windows_total": total,
        "tokens_scored": count,
        "source": source,
        "streamed": stream,
        "seconds": time.perf_counter() - t0,
    }
