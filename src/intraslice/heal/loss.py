"""The distillation loss: forward KL(teacher || student) on every position.

**Decision (top-k with a tail bucket, not renormalised top-k):** the teacher's cache keeps
its k most likely tokens per position and the log-probability of all the others together
(the *tail*). The loss is the exact KL between the two distributions coarsened to those
k + 1 outcomes: sum_i p_i log(p_i / q_i) over the top k, plus p_tail log(p_tail / q_tail),
where q_tail is the student's probability of every token outside the teacher's top k.
Why not renormalise the top k to sum to 1 (the common shortcut): that loss cannot see the
mass the student puts outside the top k, so spreading it on junk tokens costs nothing; the
tail bucket charges for it. The coarsened KL never exceeds the full KL (data processing)
and equals it when k covers the vocabulary (``--topk 0`` keeps the whole distribution).

The student's logits are the largest tensor (positions x vocabulary); they are computed
and consumed in chunks of positions under activation checkpointing, so a window's logits
never exist whole in memory, in the forward or in the backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

#: Positions whose logits exist at once.
CHUNK = 128


def kl_from_logits(
    logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor | None, t_tail: torch.Tensor | None
) -> torch.Tensor:
    """Summed KL(teacher || student) over positions; ``logits`` (n, V), teacher (n, k) or (n, V)."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    p = t_logp.exp()
    if t_idx is None:  # the whole vocabulary
        logq = logits - log_z[:, None]
        return (p * (t_logp - logq)).sum()
    idx = t_idx.long()
    logq_k = logits.gather(-1, idx) - log_z[:, None]
    kl = (p * (t_logp - logq_k)).sum()
    # The student's tail: every token outside the teacher's top k, as one outcome.
    logq_tail = torch.logsumexp(logits.scatter(-1, idx, float("-inf")), dim=-1) - log_z
    p_tail = t_tail.exp()
    # p_tail log p_tail - p_tail log q_tail, with 0 log 0 = 0 (a tail of exactly 0 mass)
    kl = kl + (torch.xlogy(p_tail, p_tail) - torch.where(p_tail > 0, p_tail * logq_tail, 0.0)).sum()
    return kl


def distill_loss(
    hidden: torch.Tensor,
    head: Any,
    t_logp: torch.Tensor,
    t_idx: torch.Tensor | None,
    t_tail: torch.Tensor | None,
    tokens: torch.Tensor,
    ce_weight: float = 0.0,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, float, float]:
    """(loss to backpropagate, mean KL, mean CE) of one window.

    ``hidden`` (T, d): the student's final hidden states (after its last norm); ``head``:
    its LM head; the teacher's cache for the T positions; ``tokens`` (T,) the window, for
    the optional next-token cross-entropy (``ce_weight``: its share of the loss).
    """
    n = hidden.shape[0]
    kl_sum = hidden.new_zeros((), dtype=torch.float32)
    ce_sum = hidden.new_zeros((), dtype=torch.float32)

    def piece(h: torch.Tensor, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h).float()
        kl = kl_from_logits(
            logits, t_logp[a:b], None if t_idx is None else t_idx[a:b], None if t_tail is None else t_tail[a:b]
        )
        if ce_weight > 0:
            target = tokens[a + 1 : b + 1]
            ce = F.cross_entropy(logits[: target.shape[0]], target, reduction="sum")
        else:
            ce = logits.new_zeros(())
        return kl, ce

    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        if torch.is_grad_enabled() and hidden.requires_grad:
            kl, ce = checkpoint(piece, hidden[a:b], a, b, use_reentrant=False)
        else:
            kl, ce = piece(hidden[a:b], a, b)
        kl_sum = kl_sum + kl
        ce_sum = ce_sum + ce
    kl_mean = kl_sum / n
    ce_mean = ce_sum / max(n - 1, 1)
    loss = (1.0 - ce_weight) * kl_mean + ce_weight * ce_mean
    return loss, float(kl_mean.detach()), float(ce_mean.detach())
