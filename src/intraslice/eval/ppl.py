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


@torch.no_grad()
def window_nll(model: Any, window: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of one (1, T) window and the number of predicted tokens."""
    logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
    target = window[0, 1:]
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    return float(nll), int(target.numel())


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
) -> dict[str, Any]:
    """Perplexity over non-overlapping ``seqlen`` windows of WikiText-2 test (or ``text``)."""
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
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    nll, count = 0.0, 0
    t0 = time.perf_counter()
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
        "seconds": time.perf_counter() - t0,
    }
