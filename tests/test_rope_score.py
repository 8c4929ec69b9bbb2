"""The attention pair score (issue #14): its moments against a brute-force computation."""

from __future__ import annotations

import math

import pytest
import torch

from intraslice.algo.attention import attention_pair_variance, low_frequency_scores
from intraslice.config import PruneConfig
from intraslice.errors import IntraSliceError
from intraslice.methods.intraslice import pair_statistic, scored_queries


def brute_force(q: torch.Tensor, k: torch.Tensor, queries: list[int]) -> torch.Tensor:
    """Var_{s~A}[c_p(t, s)/sqrt(h)] summed over queries, one (t, s, p) at a time."""
    _, n_h, h = q.shape
    g = n_h // k.shape[1]
    half = h // 2
    out = torch.zeros(n_h, half, dtype=torch.float64)
    for i in range(n_h):
        kv = i // g
        for t in queries:
            logits = torch.tensor([float(q[t, i] @ k[s, kv]) / math.sqrt(h) for s in range(t + 1)], dtype=torch.float64)
            a = torch.softmax(logits.double(), 0)
            for p in range(half):
                c = torch.tensor(
                    [float(q[t, i, p] * k[s, kv, p] + q[t, i, p + half] * k[s, kv, p + half]) for s in range(t + 1)],
                    dtype=torch.float64,
                ) / math.sqrt(h)
                out[i, p] += float((a * c * c).sum() - (a * c).sum() ** 2)
    return out


def test_attention_pair_variance_matches_brute_force() -> None:
    torch.manual_seed(0)
    q = torch.randn(12, 4, 8, dtype=torch.float64)
    k = torch.randn(12, 2, 8, dtype=torch.float64)
    queries = [1, 5, 11]
    got = attention_pair_variance(q, k, torch.tensor(queries))
    assert torch.allclose(got, brute_force(q, k, queries), rtol=1e-10, atol=1e-12)


def test_variance_is_twice_the_kl_of_a_small_drop() -> None:
    """KL(A || A without pair p) ~ Var/2 when the pair's contribution is small."""
    torch.manual_seed(1)
    q = torch.randn(16, 1, 8, dtype=torch.float64)
    k = torch.randn(16, 1, 8, dtype=torch.float64)
    q[..., 1] *= 1e-3  # pair 1 (dims 1 and 5) small: the second-order term dominates
    q[..., 5] *= 1e-3
    t = 15
    full = q[t, 0] @ k[: t + 1, 0].T / math.sqrt(8)
    keep = torch.ones(8, dtype=torch.bool)
    keep[[1, 5]] = False
    dropped = (q[t, 0] * keep) @ (k[: t + 1, 0] * keep).T / math.sqrt(8)
    a, b = torch.log_softmax(full, 0), torch.log_softmax(dropped, 0)
    kl = float((a.exp() * (a - b)).sum())
    var = float(attention_pair_variance(q, k, torch.tensor([t]))[0, 1])
    assert kl == pytest.approx(var / 2, rel=1e-2)


def test_constant_contribution_scores_zero() -> None:
    """A pair whose contribution is the same for every key (e.g. a sink direction) costs nothing."""
    torch.manual_seed(2)
    q = torch.randn(10, 2, 4, dtype=torch.float64)
    k = torch.randn(10, 2, 4, dtype=torch.float64)
    k[:, :, 0] = 1.5
    k[:, :, 2] = -0.5
    got = attention_pair_variance(q, k, torch.arange(1, 10))
    assert torch.allclose(got[:, 0], torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert (got[:, 1] > 0).all()


def test_pair_statistic_splits_pair_scores_over_both_dims() -> None:
    torch.manual_seed(3)
    b, t, n_h, n_kv, h = 2, 9, 4, 2, 8
    q_out = torch.randn(b, t, n_h * h, dtype=torch.float64)
    k_out = torch.randn(b, t, n_kv * h, dtype=torch.float64)
    cos, sin = torch.ones(1, t, h, dtype=torch.float64), torch.zeros(1, t, h, dtype=torch.float64)
    stat, count = pair_statistic("attention", q_out, k_out, cos, sin, n_kv)
    queries = scored_queries(t, "cpu")
    assert count == b * len(queries)
    expected = sum(
        attention_pair_variance(q_out[i].view(t, n_h, h), k_out[i].view(t, n_kv, h), queries) for i in range(b)
    )
    assert torch.allclose(stat[:, : h // 2] + stat[:, h // 2 :], expected, rtol=1e-12)
    low, n = pair_statistic("low-frequency", q_out, k_out, cos, sin, n_kv)
    assert torch.equal((low[:, :4] + low[:, 4:]) / n, low_frequency_scores(n_h, h))


def test_scored_queries_skip_position_zero_and_end_at_the_last() -> None:
    q = scored_queries(2048, "cpu")
    assert len(q) == 128 and int(q[0]) > 0 and int(q[-1]) == 2047
    assert scored_queries(5, "cpu").tolist() == [1, 2, 3, 4]


def test_unknown_rope_score_is_refused() -> None:
    with pytest.raises(IntraSliceError, match="--rope-score"):
        PruneConfig(rope_score="bogus").validate(2)
    with pytest.raises(IntraSliceError, match="--rope-score"):
        PruneConfig(method="channel", rope_score="attention").validate(2)
