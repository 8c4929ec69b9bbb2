"""The attention pair score (issue #14): its moments against a brute-force computation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from intraslice import prune
from intraslice.algo.attention import attention_pair_variance, low_frequency_scores
from intraslice.config import PruneConfig
from intraslice.errors import IntraSliceError
from intraslice.methods.intraslice import pair_statistic, scored_queries

from .conftest import calib_tokens, dense_rotated_qk, make_tiny


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


def test_the_default_score_is_recorded_and_only_for_intraslice() -> None:
    cfg = PruneConfig()
    cfg.validate(2)
    assert cfg.rope_score == "attention" and cfg.to_dict()["rope_score"] == "attention"
    for method in ("channel", "slicegpt"):  # the baselines have no pair score: nothing to refuse or record
        other = PruneConfig(method=method)
        other.validate(2)
        assert other.rope_score is None


def test_unknown_rope_score_is_refused() -> None:
    with pytest.raises(IntraSliceError, match="--rope-score"):
        PruneConfig(rope_score="bogus").validate(2)
    with pytest.raises(IntraSliceError, match="--rope-score"):
        PruneConfig(method="channel", rope_score="attention").validate(2)


def dense_attention_pair_scores(dense: torch.nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per dense layer, sum over windows and scored queries of Var_{s~A}[c_p / sqrt(h)], (n_heads, h/2).

    Independent of the pruning code: the hooked dense q/k (``dense_rotated_qk``), the explicit
    (Q, T, h/2) tensor of contributions, a masked softmax, the variance from its definition.
    """
    h = dense.config.head_dim
    half = h // 2
    scores = []
    for q, k in dense_rotated_qk(dense, tokens):
        t = q.shape[1]
        queries = scored_queries(t, "cpu")
        prod = q[:, queries][:, :, None] * k[:, None]  # (b, Q, T, n_h, h)
        contrib = (prod[..., :half] + prod[..., half:]) / math.sqrt(h)  # (b, Q, T, n_h, h/2)
        future = torch.arange(t)[None, :] > queries[:, None]
        a = torch.softmax(contrib.sum(-1).masked_fill(future[None, :, :, None], float("-inf")), dim=2)[..., None]
        mean = (a * contrib).sum(2)
        var = (a * (contrib - mean[:, :, None]) ** 2).sum(2)  # (b, Q, n_h, h/2)
        scores.append(var.sum((0, 1)))
    return scores


def test_global_attention_score_selects_the_independently_computed_top_pairs() -> None:
    dense = make_tiny("llama-gqa", seed=2, n_layers=3)
    tokens = calib_tokens()
    scores = dense_attention_pair_scores(dense, tokens)
    cfg = PruneConfig(ratio=0.3, rope_selection="global", head_width=8, rope_score="attention")
    result = prune(copy.deepcopy(dense), tokens, cfg, progress=False)
    expected = sorted(torch.topk(torch.stack(scores).sum((0, 1)), 4).indices.tolist())
    assert result.method["constraints"]["global_rope_pairs"] == expected
    spec_pairs = prune(copy.deepcopy(dense), tokens, PruneConfig(ratio=0.3, rope_selection="global", head_width=8,
                       rope_score="qk"), progress=False).method["constraints"]["global_rope_pairs"]  # fmt: skip
    assert spec_pairs != expected  # the two scores disagree here, so the test can tell them apart


@pytest.mark.parametrize("score", ["attention", "low-frequency"])
def test_per_kv_group_pairs_follow_the_score(score: str) -> None:
    """Layer 0 sees the dense embeddings, so its pairs are the top r/2 of the dense layer-0 score
    summed over each KV group's query heads (width 8 at half the attention: every head kept)."""
    dense = make_tiny("llama-gqa", n_layers=2)
    tokens = calib_tokens()
    cfg = PruneConfig(layer_ratios=[(0.5, 0.0)] * 2, head_width=8, rope_score=score)
    spec = prune(copy.deepcopy(dense), tokens, cfg, progress=False).model.config.layers[0]
    assert spec["num_heads"] == 6 and spec["kv_index"] == [0, 0, 0, 1, 1, 1] and spec["head_dim"] == 8
    sigma = dense_attention_pair_scores(dense, tokens)[0] if score == "attention" else low_frequency_scores(6, 16)
    for kv, pairs in enumerate(spec["rope_pairs"]):
        top = torch.topk(sigma[3 * kv : 3 * kv + 3].sum(0), 4).indices
        assert sorted(pairs) == sorted(int(p) for p in top)
    if score == "low-frequency":
        assert spec["rope_pairs"] == [[4, 5, 6, 7], [4, 5, 6, 7]]
