"""IntraSlice attention math (method.md section 2), as pure functions of statistics and weights.

Layout conventions (Hugging Face): ``W_q`` is (n_heads*h, d), head-major rows; ``W_k`` and
``W_v`` are (n_kv*h, d); ``W_o`` is (d, n_heads*h). Query head i reads KV head i // g,
g = n_heads / n_kv. RoPE is "rotate_half": dim j pairs with dim j + h/2.

Pipeline for one layer:

1. :func:`plan_attention` (steps A-D): from the o_proj input covariance H, W_o and the
   post-RoPE |q_j k_j| means, decide which query heads survive, the common width r, and
   which RoPE pairs each surviving KV group keeps.
2. The runner recomputes the attention output with the pruned Q/K (:func:`qk_row_masks`)
   and collects H~ = X~^T X~ and X~^T X (X = unpruned o_proj input).
3. :func:`compress_attention` (steps E-G): per-KV-group PCA of V/O, least-squares
   correction folded into o_proj, and the new physically smaller weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .linalg import damping, eigh_desc, solve_spd


@dataclass
class AttentionPlan:
    """Which heads, which width, which RoPE pairs (the result of steps A-D)."""

    n_heads: int
    n_kv: int
    head_dim: int
    kept_heads: list[int]
    width: int
    #: kept RoPE pair indices (ascending, each < head_dim/2) per surviving KV head
    pairs: dict[int, list[int]] = field(default_factory=dict)

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def kept_kv(self) -> list[int]:
        return sorted({i // self.group for i in self.kept_heads})

    def kv_index(self) -> list[int]:
        """For each kept query head, the position of its KV head among the kept KV heads."""
        pos = {kv: a for a, kv in enumerate(self.kept_kv)}
        return [pos[i // self.group] for i in self.kept_heads]


def channel_scores(h_diag: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """Step A: s_j = ||W_o[:, j]||^2 * H_jj (float64)."""
    return w_o.to(torch.float64).pow(2).sum(0) * h_diag.to(torch.float64)


def head_spectra(h: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Step B: per-head eigenvalues of the diagonal blocks of H, decreasing, normalised to sum 1."""
    out = torch.zeros(n_heads, head_dim, dtype=torch.float64, device=h.device)
    for i in range(n_heads):
        blk = h[i * head_dim : (i + 1) * head_dim, i * head_dim : (i + 1) * head_dim]
        vals = eigh_desc(blk)[0].clamp_min(0)
        total = vals.sum()
        out[i] = vals / total if total > 0 else torch.full_like(vals, 1.0 / head_dim)
    return out


def captured_spectrum(scores: torch.Tensor, spectra: torch.Tensor) -> torch.Tensor:
    """cum[i, r] = sum_{k <= r} S[i, k], S[i, k] = nu_ik * sum_{j in head i} s_j: (n_heads, h + 1).

    The objective of step C is J(D, r) = sum over kept heads of cum[i, r].
    """
    n_heads, head_dim = spectra.shape
    head_mass = scores.to(torch.float64).view(n_heads, head_dim).sum(1)
    s_mat = spectra.to(torch.float64) * head_mass[:, None]
    zero = torch.zeros(n_heads, 1, dtype=torch.float64, device=s_mat.device)
    return torch.cat([zero, s_mat.cumsum(1)], dim=1)


def select_heads(
    scores: torch.Tensor,
    spectra: torch.Tensor,
    keep: int,
    min_width_frac: float = 0.75,
) -> tuple[list[int], int]:
    """Step C: delete whole heads, return (kept heads ascending, common even width r).

    ``keep`` is the channel budget K of the o_proj input. Heads that win few of the top-K
    channels are deleted first; then heads are deleted greedily while the captured
    spectrum J(D, r) = sum_{i not in D} sum_{k <= r} S[i, k] (r = K / #remaining) grows;
    finally heads are deleted until r >= min_width_frac * h.
    """
    n_heads, head_dim = spectra.shape
    total = n_heads * head_dim
    if not 0 < keep <= total:
        raise ValueError(f"channel budget {keep} outside (0, {total}]")
    if keep == total:
        return list(range(n_heads)), head_dim
    per_head_channels = torch.zeros(n_heads, dtype=torch.long, device=scores.device)
    top = torch.topk(scores, keep).indices
    per_head_channels.index_add_(0, top // head_dim, torch.ones_like(top))
    head_mass = scores.view(n_heads, head_dim).sum(1)
    cum = captured_spectrum(scores, spectra)

    def width(n_rem: int) -> int:
        return min(head_dim, keep // n_rem)

    def objective(rem: list[int]) -> float:
        return float(cum[rem, width(len(rem))].sum())

    min_needed = math.ceil(keep / head_dim)  # r <= h
    threshold = keep // n_heads // 4
    remaining = [i for i in range(n_heads) if per_head_channels[i] >= threshold]
    if len(remaining) < min_needed:  # never delete so many that r would exceed h
        order = torch.argsort(head_mass, descending=True).tolist()
        remaining = sorted(order[:min_needed])

    def least_important(rem: list[int]) -> int:
        r = width(len(rem))
        return min(rem, key=lambda i: (float(cum[i, r]), i))

    while len(remaining) - 1 >= max(min_needed, 1):
        victim = least_important(remaining)
        candidate = [i for i in remaining if i != victim]
        if objective(candidate) > objective(remaining):
            remaining = candidate
        else:
            break
    while len(remaining) > 1 and keep / len(remaining) < min_width_frac * head_dim:
        remaining.remove(least_important(remaining))

    r = keep / len(remaining)
    r_even = round(r / 2.0) * 2
    r_even = max(2, min(head_dim, r_even))
    return sorted(remaining), r_even


def select_rope_pairs(
    qk_mean: torch.Tensor,
    kept_heads: list[int],
    n_kv: int,
    width: int,
) -> dict[int, list[int]]:
    """Step D: per surviving KV group, keep the r/2 RoPE pairs with the largest sigma.

    ``qk_mean`` is (n_heads, h): mu[i, j] = mean_t |q_ij(t) k_g(i)j(t)| after RoPE. Pairs
    (j, j + h/2) are scored together and summed over the group's surviving query heads, so
    one pair set serves the whole group and the selection commutes with RoPE.
    """
    n_heads, head_dim = qk_mean.shape
    half = head_dim // 2
    g = n_heads // n_kv
    sigma_head = qk_mean[:, :half] + qk_mean[:, half:]
    pairs: dict[int, list[int]] = {}
    for kv in sorted({i // g for i in kept_heads}):
        members = [i for i in kept_heads if i // g == kv]
        sigma = sigma_head[members].sum(0)
        top = torch.topk(sigma.to(torch.float64), width // 2).indices
        pairs[kv] = sorted(int(p) for p in top)
    return pairs


# -- what a RoPE pair is worth (issue #14) ----------------------------------------------------
#
# Step D as specified scores a pair by sigma = mean_t |q_j k_j| + |q_j' k_j'| at the same
# position: the pair's *magnitude*, whatever it does to the attention pattern. The
# alternatives below are measured in BENCHMARKS.md ("What perplexity hides").

#: "qk": method.md 2.D (mean |q k| per pair); "attention": the pair's second-order effect on
#: the attention rows (:func:`attention_pair_variance`); "low-frequency": keep the slowest
#: pairs (an ablation: the pairs that carry position-independent content matching).
ROPE_SCORES = ("qk", "attention", "low-frequency")


def attention_pair_variance(q: torch.Tensor, k: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Sum over the sampled queries t of Var_{s ~ A(t, .)}[c_p(t, s) / sqrt(h)], (n_heads, h/2).

    ``q`` (T, n_heads, h) and ``k`` (T, n_kv, h) are one sequence after RoPE; ``queries`` the
    positions scored. c_p(t, s) = q_p(t) k_p(s) + q_p'(t) k_p'(s) is pair p's part of the
    logit of key s (dims p and p' = p + h/2, already rotated, so it holds the relative
    position), and A(t, .) the causal attention row of the unpruned head.

    Why this score: dropping pair p shifts row t's logits by delta_s = -c_p(t, s)/sqrt(h),
    and KL(A || A') = Var_{s~A}(delta) / 2 + O(delta^3). A pair matters by how much it
    *reorders* the keys the head attends to, not by its magnitude: a large, constant
    contribution (an attention sink, a pair that is the same for every key) costs nothing,
    and a small one that singles out the copied token costs a lot. Pairs are scored one at a
    time (the cross terms of dropping several are left out, as step D's sum leaves them out).
    The moments come from products with A (never the (Q, T, h/2) tensor of contributions):
    E[c] = q_p (A k_p) + q_p' (A k_p'), E[c^2] = q_p^2 A(k_p^2) + 2 q_p q_p' A(k_p k_p') +
    q_p'^2 A(k_p'^2).
    """
    t_len, n_h, h = q.shape
    g = n_h // k.shape[1]
    half = h // 2
    qs = q[queries].transpose(0, 1)  # (n_h, Q, h)
    kk = k.transpose(0, 1).repeat_interleave(g, 0)  # (n_h, T, h)
    logits = qs @ kk.transpose(1, 2) / math.sqrt(h)
    future = torch.arange(t_len, device=q.device)[None, :] > queries[:, None]
    attn = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    ka, kb = kk[..., :half], kk[..., half:]
    qa, qb = qs[..., :half].double(), qs[..., half:].double()
    mean = qa * (attn @ ka).double() + qb * (attn @ kb).double()
    second = qa * qa * (attn @ (ka * ka)).double() + qb * qb * (attn @ (kb * kb)).double()
    second = second + 2 * qa * qb * (attn @ (ka * kb)).double()
    return ((second - mean * mean).clamp_min(0) / h).sum(1)


def low_frequency_scores(n_heads: int, head_dim: int) -> torch.Tensor:
    """A pair score that keeps the slowest pairs: pair p rotates at base^(-2p/h), so p + 1."""
    half = head_dim // 2
    return torch.arange(1, half + 1, dtype=torch.float64).repeat(n_heads, 1)


# -- export-compatible constraints (issue #11) ------------------------------------------------
#
# Stock engines cannot run what steps C-D produce in general: llama.cpp's ``deci`` architecture
# takes per-layer head counts but one head width (key = value = RoPE length), one RoPE
# frequency set for the whole model and equal query groups per KV head; the stock Llama/Qwen2
# classes also need every layer alike. The functions below restrict steps C-D to such shapes;
# with no constraint, ``plan_attention`` is exactly the method as specified.

ROPE_SELECTIONS = ("per-kv-group", "per-layer", "global")


@dataclass
class AttentionConstraints:
    """Restrictions on one layer's plan (all off by default: the method as specified)."""

    #: "per-kv-group" (method.md 2.D), "per-layer" (one pair set for all heads of a layer) or
    #: "global" (the set ``pairs``, chosen for the whole model beforehand).
    rope_selection: str = "per-kv-group"
    #: A fixed common head width (even) instead of step C's r = K / #remaining.
    width: int | None = None
    #: Every kept KV head keeps the same number of query heads (llama.cpp, stock GQA).
    equal_groups: bool = False
    #: The global RoPE pair set (``width // 2`` pairs), for ``rope_selection == "global"``.
    pairs: list[int] | None = None
    #: A fixed (kept KV heads, query heads per KV head), for every layer alike.
    group_shape: tuple[int, int] | None = None


@dataclass(frozen=True)
class CachePrice:
    """What the KV cache adds to a layer's attention cost under a memory target.

    ``kv_weight`` w = context x batch: one K or V value per token costs w parameters (both
    in the serving type). A layer keeping ``n_q`` query heads on ``n_kv`` KV heads at width r
    costs 2 d r (n_q + n_kv) parameters (q, o and k, v) plus w x 2 r n_kv cache values, so
    deleting a query head frees only its q/o share, while a KV group or a narrower width
    also frees cache: with w large the cheap heads to lose are not the same ones.
    """

    kv_weight: float
    hidden: int

    def cost(self, n_q: int, n_kv: int, width: int) -> float:
        return 2.0 * self.hidden * width * (n_q + n_kv) + self.kv_weight * 2.0 * width * n_kv


def heads_for_cost(
    cum: torch.Tensor,
    n_kv: int,
    budget: float,
    price: CachePrice,
    widths: list[int],
    equal_groups: bool,
) -> tuple[list[int], int, float]:
    """Step C under a memory target: the kept heads and width maximising J within ``budget``.

    Every width in ``widths`` and every head count within every set of KV groups (or
    KV-group shape (a, b) under ``equal_groups``) is tried; at a fixed width J is additive
    over heads, so each keeps its best heads (:func:`best_groups` for groups), and its cost
    counts the KV heads it touches (:class:`CachePrice`). The choice with the largest J whose cost fits wins (ties:
    the larger cost, i.e. the fuller use of the budget); if none fits, the cheapest one.
    Returns (kept heads ascending, width, J).
    """
    n_heads = cum.shape[0]
    g = n_heads // n_kv
    best: tuple[float, float, list[int], int] | None = None
    cheapest: tuple[float, list[int], int, float] | None = None
    for r in widths:
        value = cum[:, r]
        options: list[tuple[list[int], float, float]] = []
        if equal_groups:
            for a in range(1, n_kv + 1):
                for b in range(1, g + 1):
                    kept, j = best_groups(value, n_kv, a, b)
                    options.append((kept, j, price.cost(a * b, a, r)))
        else:
            # The best n heads inside each set of KV groups (every set while there are at most 8
            # groups, 255 sets; beyond, the best n overall: exact for MHA, where a group is a head).
            subsets = (
                [[kv for kv in range(n_kv) if mask >> kv & 1] for mask in range(1, 2**n_kv)]
                if n_kv <= 8
                else [list(range(n_kv))]
            )
            for groups in subsets:
                members = [i for i in range(n_heads) if i // g in groups]
                order = sorted(members, key=lambda i: (-float(value[i]), i))
                for n in range(1, len(order) + 1):
                    kept = sorted(order[:n])
                    options.append((kept, float(value[kept].sum()), price.cost(n, len({i // g for i in kept}), r)))
        for kept, j, cost in options:
            if cheapest is None or cost < cheapest[0]:
                cheapest = (cost, kept, r, j)
            if cost <= budget * (1 + 1e-12) and (best is None or (j, cost) > (best[0], best[1])):
                best = (j, cost, kept, r)
    if best is None:
        assert cheapest is not None
        return cheapest[1], cheapest[2], cheapest[3]
    return best[2], best[3], best[0]


def best_groups(value: torch.Tensor, n_kv: int, a: int, b: int) -> tuple[list[int], float]:
    """The ``a`` KV groups with the largest sum of their ``b`` best query heads (by ``value``).

    Returns (kept query heads ascending, captured value). ``value[i]`` is head i's captured
    spectrum at the layer's width, so the sum is step C's objective J for this choice.
    """
    n_heads = value.shape[0]
    g = n_heads // n_kv
    per_group = value.view(n_kv, g)
    top = torch.topk(per_group, b, dim=1)
    totals = top.values.sum(1)
    groups = torch.topk(totals, a).indices.tolist()
    kept = sorted(int(kv * g + j) for kv in groups for j in top.indices[kv].tolist())
    return kept, float(totals[groups].sum())


def group_shape_candidates(n_kv: int, g: int, target: float, divides: int | None = None) -> list[tuple[int, int]]:
    """(kept KV heads a, query heads per KV head b), closest a*b to ``target`` first.

    Among equally close shapes the caller breaks the tie by its objective. ``divides``: only
    head counts a*b that divide it (transformers' ``LlamaConfig`` requires the hidden size to
    be a multiple of the head count, whatever ``head_dim`` says).
    """
    shapes = [(a, b) for a in range(1, n_kv + 1) for b in range(1, g + 1) if not divides or divides % (a * b) == 0]
    best = min(abs(a * b - target) for a, b in shapes)
    return [(a, b) for a, b in shapes if abs(a * b - target) <= best + 1e-9]


def heads_at_width(
    cum: torch.Tensor, keep: int, width: int, n_kv: int, equal_groups: bool, group_shape: tuple[int, int] | None
) -> tuple[list[int], float]:
    """Step C at a fixed width r: the heads maximising J with about K / r heads kept.

    With r fixed, J is additive over heads, so the best n heads are the n largest cum[i, r];
    under ``equal_groups`` the shape (a, b) with a*b closest to K / r wins (ties: larger J),
    and a ``group_shape`` is taken as given (every layer alike).
    """
    n_heads = cum.shape[0]
    value = cum[:, width]
    if group_shape is not None:
        return best_groups(value, n_kv, *group_shape)
    target = keep / width
    if equal_groups:
        g = n_heads // n_kv
        choices = [best_groups(value, n_kv, a, b) for a, b in group_shape_candidates(n_kv, g, target)]
        return max(choices, key=lambda c: (c[1], -len(c[0])))
    n = max(1, min(n_heads, round(target)))
    order = sorted(range(n_heads), key=lambda i: (-float(value[i]), i))
    kept = sorted(order[:n])
    return kept, float(value[kept].sum())


def equalize_groups(cum: torch.Tensor, kept: list[int], keep: int, n_kv: int) -> tuple[list[int], int]:
    """Step C's heads made into equal KV groups, at the width K / #heads (even, <= h).

    The shape with a*b closest to step C's head count wins, ties by J at its own width.
    """
    n_heads, head_dim = cum.shape[0], cum.shape[1] - 1
    g = n_heads // n_kv

    def width(n: int) -> int:
        return max(2, min(head_dim, round(keep / n / 2.0) * 2))

    choices = []
    for a, b in group_shape_candidates(n_kv, g, len(kept)):
        heads, value = best_groups(cum[:, width(a * b)], n_kv, a, b)
        choices.append((value, -a * b, heads, width(a * b)))
    best = max(choices, key=lambda c: (c[0], c[1]))
    return best[2], best[3]


def select_layer_pairs(qk_mean: torch.Tensor, kept_heads: list[int], n_kv: int, width: int) -> dict[int, list[int]]:
    """Step D with one pair set for the whole layer: sigma summed over every kept query head."""
    half = qk_mean.shape[1] // 2
    g = qk_mean.shape[0] // n_kv
    sigma = (qk_mean[:, :half] + qk_mean[:, half:])[kept_heads].sum(0)
    pairs = sorted(int(p) for p in torch.topk(sigma.to(torch.float64), width // 2).indices)
    return {kv: list(pairs) for kv in sorted({i // g for i in kept_heads})}


def global_rope_pairs(sigmas: list[torch.Tensor], width: int) -> list[int]:
    """One pair set for the model: the top r/2 pairs of sigma summed over every head of every layer.

    ``sigmas[l]`` is (n_heads, h/2): sigma[i, p] = mu[i, p] + mu[i, p + h/2] of layer l. The
    sum runs on the raw scale, as step D sums a group's heads: a pair's score is its total
    contribution |q_j k_j| to the attention logits of the model.
    """
    total = torch.stack([s.to(torch.float64).sum(0) for s in sigmas]).sum(0)
    return sorted(int(p) for p in torch.topk(total, width // 2).indices)


def width_candidates(head_dim: int, min_width_frac: float, multiple: int = 8) -> list[int]:
    """Common widths worth trying: multiples of ``multiple`` from the spec's minimum to h."""
    floor = math.ceil(min_width_frac * head_dim / multiple) * multiple
    widths = [w for w in range(multiple, head_dim + 1, multiple) if w >= floor]
    return widths or [head_dim - head_dim % 2]


def choose_common_width(
    cums: list[torch.Tensor],
    keeps: list[int],
    n_kv: int,
    min_width_frac: float,
    equal_groups: bool,
    uniform: bool = False,
    multiple: int = 8,
    divides: int | None = None,
    widths: list[int] | None = None,
) -> tuple[int, tuple[int, int] | None]:
    """The model-wide head width maximising step C's objective summed over layers.

    **Decision**: a common width r (a multiple of 8, at least the spec's minimum width) is
    chosen as argmax_r sum_l J_l(r), each layer keeping its best ~K_l / r heads at that
    width, on the dense model's statistics. This is step C's own criterion with one r for
    all layers. With ``uniform`` the head/group shape is shared too: the (a, b) with a*b
    closest to K / r and the largest summed J (head counts dividing ``divides`` only).
    ``widths`` restricts the candidates (a global RoPE set: h only, see ``methods.deploy``).
    Returns (width, group shape or None).
    """
    n_heads, head_dim = cums[0].shape[0], cums[0].shape[1] - 1
    g = n_heads // n_kv
    best: tuple[float, int, tuple[int, int] | None] | None = None
    for r in widths or width_candidates(head_dim, min_width_frac, multiple):
        if uniform:
            shapes = group_shape_candidates(n_kv, g, keeps[0] / r, divides)
            scored = [(sum(best_groups(c[:, r], n_kv, a, b)[1] for c in cums), (a, b)) for a, b in shapes]
            total, shape = max(scored, key=lambda t: (t[0], -t[1][0] * t[1][1]))
        else:
            total = sum(heads_at_width(c, k, r, n_kv, equal_groups, None)[1] for c, k in zip(cums, keeps, strict=True))
            shape = None
        if best is None or total > best[0] + 1e-12 * abs(best[0]):
            best = (total, r, shape)
    assert best is not None
    return best[1], best[2]


def plan_attention(
    h: torch.Tensor,
    qk_mean: torch.Tensor,
    w_o: torch.Tensor,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    keep: int,
    min_width_frac: float = 0.75,
    constraints: AttentionConstraints | None = None,
    price: CachePrice | None = None,
    budget: float | None = None,
) -> AttentionPlan:
    """Steps A-D for one layer, within the export ``constraints`` if any.

    ``price`` and ``budget`` (a memory target): at step C's width, the heads (and KV groups)
    with the largest J whose parameters plus priced cache fit ``budget`` (:func:`heads_for_cost`),
    instead of a channel budget ``keep`` that cannot see the cache.
    """
    c = constraints or AttentionConstraints()
    scores = channel_scores(torch.diagonal(h), w_o)
    spectra = head_spectra(h, n_heads, head_dim)
    if price is not None and budget is not None and c.group_shape is None:
        # The width stays step C's (or the export's common width); the price chooses which heads
        # and KV groups fit at it. Measured (2026-12-08, BENCHMARKS.md issue #35): on SmolLM2 at
        # equal weights + KV, share 1, the priced choice deletes whole KV groups (cache -24% at 512
        # tokens) and scored held-out C4 66.40 at 512 against 56.70 unpriced (cache -6%): at 512
        # the cache is not worth its heads, and the default there keeps the attention whole; at
        # 4096 the priced choice (cache -22%) beat share 0. The unpriced choice at 4096 was not scored.
        if c.width is not None:
            r = int(c.width)
        else:
            kept, r = select_heads(scores, spectra, keep, min_width_frac)
            if c.equal_groups:
                kept, r = equalize_groups(captured_spectrum(scores, spectra), kept, keep, n_kv)
        kept, r, _ = heads_for_cost(captured_spectrum(scores, spectra), n_kv, budget, price, [r], c.equal_groups)
    elif c.width is not None:
        r = int(c.width)
        kept, _ = heads_at_width(captured_spectrum(scores, spectra), keep, r, n_kv, c.equal_groups, c.group_shape)
    else:
        kept, r = select_heads(scores, spectra, keep, min_width_frac)
        if c.equal_groups:
            kept, r = equalize_groups(captured_spectrum(scores, spectra), kept, keep, n_kv)
    if c.rope_selection == "global":
        if c.pairs is None or len(c.pairs) != r // 2:
            raise ValueError(f"global RoPE selection needs {r // 2} pairs, got {c.pairs}")
        g = n_heads // n_kv
        pairs = {kv: list(c.pairs) for kv in sorted({i // g for i in kept})}
    elif c.rope_selection == "per-layer":
        pairs = select_layer_pairs(qk_mean, kept, n_kv, r)
    else:
        pairs = select_rope_pairs(qk_mean, kept, n_kv, r)
    return AttentionPlan(n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, kept_heads=kept, width=r, pairs=pairs)


def pair_dims(pairs: list[int], head_dim: int) -> list[int]:
    """Head-local dims kept for a pair set, in the pruned rotate_half order."""
    half = head_dim // 2
    return list(pairs) + [p + half for p in pairs]


def qk_row_masks(plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean row masks of W_q and W_k that keep exactly the planned dims (deleted heads: none).

    Zeroing the other rows reproduces the pruned Q/K scores at the source scale
    1/sqrt(h): the runner uses this to compute X~ on the unmodified module.
    """
    h, g = plan.head_dim, plan.group
    q_mask = torch.zeros(plan.n_heads * h, dtype=torch.bool)
    k_mask = torch.zeros(plan.n_kv * h, dtype=torch.bool)
    for kv, pairs in plan.pairs.items():
        dims = torch.tensor(pair_dims(pairs, h))
        k_mask[kv * h + dims] = True
    for i in plan.kept_heads:
        dims = torch.tensor(pair_dims(plan.pairs[i // g], h))
        q_mask[i * h + dims] = True
    return q_mask, k_mask


def head_channel_mask(plan: AttentionPlan) -> torch.Tensor:
    """Boolean mask of the o_proj input channels belonging to kept heads."""
    mask = torch.zeros(plan.n_heads * plan.head_dim, dtype=torch.bool)
    for i in plan.kept_heads:
        mask[i * plan.head_dim : (i + 1) * plan.head_dim] = True
    return mask


@dataclass
class CompressedAttention:
    """New weights (float64) of a pruned attention, plus diagnostics."""

    w_q: torch.Tensor
    b_q: torch.Tensor | None
    w_k: torch.Tensor
    b_k: torch.Tensor | None
    w_v: torch.Tensor
    b_v: torch.Tensor | None
    w_o: torch.Tensor
    rel_error: float | None = None
    #: per kept KV head, the (h, r) PCA basis U_g fused into v_proj
    bases: dict[int, torch.Tensor] = field(default_factory=dict)


def compress_attention(
    plan: AttentionPlan,
    h_tilde: torch.Tensor,
    cross: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_o: torch.Tensor,
    b_q: torch.Tensor | None = None,
    b_k: torch.Tensor | None = None,
    b_v: torch.Tensor | None = None,
    damp: float = 0.01,
    h_dense: torch.Tensor | None = None,
) -> CompressedAttention:
    """Steps E-G: V/O PCA per KV group, least-squares correction, scale folding.

    ``h_tilde`` = X~^T X~ and ``cross`` = X~^T X (float64, n_heads*h square), where X~ is
    the o_proj input with the planned Q/K and the deleted heads zeroed and X the unpruned
    o_proj input on the same tokens.

    The correction is solved in the compressed space Y = X~ C:
    B = argmin ||X - Y B||^2 + λ||B - C^T||^2 = (Y^T Y + λI)^{-1}(Y^T X + λ C^T).
    **Decision**: the ridge pulls towards the uncorrected projection C^T rather than
    towards 0, so at ratio 0 (C square orthogonal, X~ = X) B = C^T exactly and pruning is
    lossless; the spec's X^ = X~ C C^T formulation gives the same W_o up to this ridge.
    ``W_o <- W_o B^T``. If ``h_dense`` (X^T X) is given, the relative output error
    ||X W_o^T - Y B W_o^T||^2 / ||X W_o^T||^2 is returned as a diagnostic.
    """
    f64 = torch.float64
    h, g, r = plan.head_dim, plan.group, plan.width
    kept, kept_kv = plan.kept_heads, plan.kept_kv
    n_keep = len(kept)

    # E. per-KV-group PCA basis of the pruned attention output.
    bases: dict[int, torch.Tensor] = {}
    for kv in kept_kv:
        blk = torch.zeros(h, h, dtype=f64, device=h_tilde.device)
        for i in kept:
            if i // g == kv:
                blk += h_tilde[i * h : (i + 1) * h, i * h : (i + 1) * h]
        bases[kv] = eigh_desc(blk)[1][:, :r]
    c = torch.zeros(plan.n_heads * h, n_keep * r, dtype=f64, device=h_tilde.device)
    for a, i in enumerate(kept):
        c[i * h : (i + 1) * h, a * r : (a + 1) * r] = bases[i // g]

    # F. least-squares correction folded into o_proj.
    yty = c.T @ h_tilde.to(f64) @ c
    ytx = c.T @ cross.to(f64)
    lam = damping(yty, damp)
    eye = torch.eye(n_keep * r, dtype=f64, device=h_tilde.device)
    b = solve_spd(yty + lam * eye, ytx + lam * c.T)
    w_o64 = w_o.to(f64)
    new_o = w_o64 @ b.T

    rel_error = None
    if h_dense is not None:
        hd = h_dense.to(f64)
        wtw = w_o64.T @ w_o64
        ref = float((wtw * hd).sum())
        # ||X W^T - Y B W^T||^2 = tr(W H W^T) - 2 tr(W B^T Y^T X W^T) + tr(W B^T Y^T Y B W^T)
        term_cross = float(((b.T @ ytx) * wtw).sum())
        term_quad = float(((b.T @ yty @ b) * wtw).sum())
        err = ref - 2.0 * term_cross + term_quad
        rel_error = max(err, 0.0) / ref if ref > 0 else 0.0

    # V: U_g^T W_v,g per kept KV head.
    new_v = torch.cat([bases[kv].T @ w_v.to(f64)[kv * h : (kv + 1) * h] for kv in kept_kv])
    new_bv = None
    if b_v is not None:
        new_bv = torch.cat([bases[kv].T @ b_v.to(f64)[kv * h : (kv + 1) * h] for kv in kept_kv])

    # D/G. Q/K keep whole RoPE pairs; q rows absorb sqrt(r/h) so 1/sqrt(r) acts as 1/sqrt(h).
    scale = math.sqrt(r / h)
    q_rows = torch.cat([torch.tensor(pair_dims(plan.pairs[i // g], h)) + i * h for i in kept])
    k_rows = torch.cat([torch.tensor(pair_dims(plan.pairs[kv], h)) + kv * h for kv in kept_kv])
    new_q = w_q.to(f64)[q_rows] * scale
    new_bq = b_q.to(f64)[q_rows] * scale if b_q is not None else None
    new_k = w_k.to(f64)[k_rows]
    new_bk = b_k.to(f64)[k_rows] if b_k is not None else None
    return CompressedAttention(new_q, new_bq, new_k, new_bk, new_v, new_bv, new_o, rel_error, bases)


def output_map(plan: AttentionPlan, comp: CompressedAttention) -> torch.Tensor:
    """W_o' C^T (d, n_heads*h): the compressed o_proj as a map on the *unpruned-width* input X~.

    The compressed attention feeds o_proj with X~ C (X~: the planned Q/K's attention output
    over the dense V, deleted heads zeroed; C: the per-KV-group bases placed per kept head),
    and V is linear, so its output is X~ C W_o'^T = X~ (W_o' C^T)^T. A method that kept X~
    from its statistics pass gets the pruned attention's output from this map with one
    matrix product, instead of running the layer's attention a third time.
    """
    h, g, r = plan.head_dim, plan.group, plan.width
    out = torch.zeros(comp.w_o.shape[0], plan.n_heads * h, dtype=comp.w_o.dtype, device=comp.w_o.device)
    for a, i in enumerate(plan.kept_heads):
        out[:, i * h : (i + 1) * h] = comp.w_o[:, a * r : (a + 1) * r] @ comp.bases[i // g].T.to(comp.w_o.dtype)
    return out
