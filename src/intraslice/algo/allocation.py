"""Global pruning-ratio allocation (method.md section 4), as pure functions of importances.

Inputs are per-layer importance vectors computed by :mod:`intraslice.importance` from
mask gradients: attention *units* (a head, or 1/f of a head's PCA components) and MLP
neurons. The budget keeps the top units and neurons globally so that the kept decoder
parameters equal (1 - ratio) of the total, then caps every layer's ratio and
redistributes the excess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import IntraSliceError


@dataclass(frozen=True)
class ParamModel:
    """Decoder-linear parameter accounting of one architecture (per layer).

    ``attn_per_unit``: parameters that go with one attention unit (q rows + o columns of
    h/f channels, plus the k/v rows they imply under GQA: a query head "owns" n_kv/n_h of
    a KV head; biases included). ``mlp_per_neuron``: gate row + up row + down column (+ biases).
    ``kv_per_unit``: the K and V cache values one token stores for a unit, by the same
    ownership (a query head owns n_kv/n_h of a KV head's 2h values), for serving-cost targets.
    """

    n_layers: int
    units_per_layer: int
    neurons_per_layer: int
    attn_per_unit: float
    mlp_per_neuron: float
    units_per_head: int = 1
    kv_per_unit: float = 0.0

    @property
    def total(self) -> float:
        return self.n_layers * (
            self.units_per_layer * self.attn_per_unit + self.neurons_per_layer * self.mlp_per_neuron
        )

    @property
    def kv_total(self) -> float:
        """K and V cache values per token of the dense decoder."""
        return self.n_layers * self.units_per_layer * self.kv_per_unit


def param_model(
    dims: dict[str, int], f: int = 1, qkv_bias: bool = False, mlp_bias: bool = False, mlp_matrices: int = 3
) -> ParamModel:
    """Parameters per attention unit and per MLP neuron (``mlp_matrices``: 3 gated, 2 plain)."""
    d, n_h, n_kv, h, m = dims["d"], dims["n_heads"], dims["n_kv"], dims["head_dim"], dims["m"]
    per_head = 2 * d * h + 2 * (n_kv / n_h) * d * h
    if qkv_bias:
        per_head += h + 2 * (n_kv / n_h) * h
    per_neuron = mlp_matrices * d + (mlp_matrices - 1 if mlp_bias else 0)
    kv_per_head = 2 * (n_kv / n_h) * h
    return ParamModel(dims["n_layers"], n_h * f, m, per_head / f, per_neuron, f, kv_per_head / f)


@dataclass
class Allocation:
    """Per-layer (attention_ratio, mlp_ratio) and the bookkeeping behind them."""

    layer_ratios: list[tuple[float, float]]
    kept_units: list[int]
    kept_neurons: list[int]
    target_ratio: float
    planned_ratio: float


def mlp_bias_for_share(pm: ParamModel, share: float) -> float:
    """The β at which attention loses ``share`` x the target ratio and the MLP the rest.

    Attention removes share * ratio * P_att, so the MLP removes ratio * (P_mlp + (1 - share) P_att):
    β = 1 + (1 - share) P_att / P_mlp, whatever the ratio. Why a share and not β: one β means
    different things on different models (β = 1.2 asks SmolLM2's attention, 25% of a layer,
    to lose 0.4 x the ratio, and Qwen2.5-0.5B's, 12.3% of a layer, to grow), while a share
    means the same split everywhere (share 1 is β = 1, the method as specified).
    """
    if not (share >= 0.0 and math.isfinite(share)):
        raise IntraSliceError(f"--attention-share must be a finite number >= 0, got {share}")
    att = pm.units_per_layer * pm.attn_per_unit
    mlp = pm.neurons_per_layer * pm.mlp_per_neuron
    return 1.0 + (1.0 - share) * att / mlp


def joint_attention_share(
    att_importance: list[torch.Tensor], mlp_importance: list[torch.Tensor], pm: ParamModel, ratio: float
) -> float:
    """The attention share of ``ratio`` that one ranking of every unit and neuron chooses.

    A unit's importance is the squared first-order loss change of removing it (summed over
    gradient groups), for an attention unit and an MLP neuron alike, so importance per
    parameter is what one removed parameter costs. Removing the cheapest parameters first,
    whatever module they sit in, until ``ratio`` of the decoder is gone, gives the split
    that minimises the estimator's predicted loss; that split is returned as attention's
    share A (attention ratio / ``ratio``), and :func:`allocate` then spreads each budget
    over the layers as usual.
    """
    att = torch.cat([a.flatten().to(torch.float64) for a in att_importance])
    mlp = torch.cat([m.flatten().to(torch.float64) for m in mlp_importance])
    price = torch.cat([att / pm.attn_per_unit, mlp / pm.mlp_per_neuron])
    size = torch.cat(
        [torch.full_like(att, pm.attn_per_unit), torch.full_like(mlp, pm.mlp_per_neuron)]
    )  # parameters per entry
    order = torch.argsort(price, stable=True)
    removed = torch.cumsum(size[order], 0) <= ratio * pm.total
    gone = order[removed]
    att_removed = float(size[gone][gone < att.numel()].sum())
    return att_removed / (pm.n_layers * pm.units_per_layer * pm.attn_per_unit) / ratio if ratio > 0 else 1.0


def ratio_for_cost(pm: ParamModel, remove: float, share: float, kv_weight: float) -> float:
    """The decoder ratio whose split ``share`` removes ``remove`` units of serving cost.

    Serving cost counts a weight as 1 and a KV-cache value per token as ``kv_weight``
    (context x batch: every token of every sequence stores it, in the same type as the
    weights). At ratio ρ with attention share A the decoder loses ρ P parameters, and its
    attention A ρ of its units, each owning ``kv_per_unit`` cache values, so the cost removed
    is ρ (P + w A KV): linear in ρ, hence this closed form.
    """
    denom = pm.total + kv_weight * share * pm.kv_total
    return remove / denom if denom > 0 else 0.0


def joint_split_for_cost(
    att_importance: list[torch.Tensor],
    mlp_importance: list[torch.Tensor],
    pm: ParamModel,
    remove: float,
    kv_weight: float,
) -> tuple[float, float]:
    """(ratio, attention share) of one ranking by importance per unit of *serving cost*.

    :func:`joint_attention_share` with each attention unit priced at its parameters plus
    ``kv_weight`` x its cache values: at a long context an attention unit frees more memory
    (and decode time) than its parameters say, so the ranking takes more of attention there
    and less at a short one. Entries go cheapest first until ``remove`` cost units are gone;
    the ratio is the parameters removed over the decoder's, the share attention's ratio over it.
    """
    att = torch.cat([a.flatten().to(torch.float64) for a in att_importance])
    mlp = torch.cat([m.flatten().to(torch.float64) for m in mlp_importance])
    att_cost = pm.attn_per_unit + kv_weight * pm.kv_per_unit
    price = torch.cat([att / att_cost, mlp / pm.mlp_per_neuron])
    cost = torch.cat([torch.full_like(att, att_cost), torch.full_like(mlp, pm.mlp_per_neuron)])
    params = torch.cat([torch.full_like(att, pm.attn_per_unit), torch.full_like(mlp, pm.mlp_per_neuron)])
    order = torch.argsort(price, stable=True)
    gone = order[torch.cumsum(cost[order], 0) <= remove]
    ratio = float(params[gone].sum()) / pm.total
    att_ratio = float(params[gone][gone < att.numel()].sum()) / (pm.n_layers * pm.units_per_layer * pm.attn_per_unit)
    return ratio, (att_ratio / ratio if ratio > 0 else 0.0)


def fit_cost(
    layer_ratios: list[tuple[float, float]], pm: ParamModel, remove: float, kv_weight: float, cap: float = 0.8
) -> list[tuple[float, float]]:
    """The per-layer ratios with every MLP ratio moved alike so that the plan removes ``remove``.

    An allocation keeps whole attention units and counts them in parameters; under a
    serving-cost target one unit also carries ``kv_weight`` x its cache values (at a long
    context, several percent of the model each), so the plan can miss the cost by a unit.
    The MLP, fine-grained, takes up the difference: every layer's MLP ratio moves by the
    same amount, within [0, ``cap``] (what a clamped layer cannot take goes to the others).
    """
    att_cost = pm.units_per_layer * (pm.attn_per_unit + kv_weight * pm.kv_per_unit)
    mlp_size = pm.neurons_per_layer * pm.mlp_per_neuron
    att = [float(a) for a, _ in layer_ratios]
    mlp = [float(m) for _, m in layer_ratios]
    top = [max(cap, m) for m in mlp]  # a layer already above the cap (the spec's uniform split) may stay there
    for _ in range(len(mlp) + 1):
        removed = sum(a * att_cost + m * mlp_size for a, m in zip(att, mlp, strict=True))
        free = [i for i, m in enumerate(mlp) if (removed < remove and m < top[i]) or (removed > remove and m > 0)]
        if abs(removed - remove) <= 1e-9 * remove or not free:
            break
        step = (remove - removed) / (len(free) * mlp_size)
        for i in free:
            mlp[i] = min(max(mlp[i] + step, 0.0), top[i])
    return list(zip(att, mlp, strict=True))


def split_budget(pm: ParamModel, ratio: float, mlp_bias: float = 1.0, option: str | None = None) -> tuple[int, int]:
    """(N_mlp, N_att): neurons and attention units kept globally for a target ratio.

    N_mlp = floor(L m (1 - (1 - c) beta)); N_att = floor((c P0 - N_mlp p_n) / p_h), c = 1 - ratio.
    ``option`` names what set β in the errors (default ``--mlp-bias β``).
    """
    option = option or f"--mlp-bias {mlp_bias}"
    c = 1.0 - ratio
    total_neurons = pm.n_layers * pm.neurons_per_layer
    total_units = pm.n_layers * pm.units_per_layer
    n_mlp = math.floor(total_neurons * (1.0 - (1.0 - c) * mlp_bias))
    if n_mlp < 0:
        raise IntraSliceError(f"{option} removes more than every MLP neuron at ratio {ratio}")
    n_mlp = min(n_mlp, total_neurons)
    n_att = math.floor((c * pm.total - n_mlp * pm.mlp_per_neuron) / pm.attn_per_unit)
    if n_att > total_units and (n_att - total_units) * pm.attn_per_unit < pm.mlp_per_neuron:
        n_att = total_units  # the floor of N_mlp left less than one neuron over: attention keeps all
    if n_att < pm.n_layers * pm.units_per_head:  # less than one head's worth per layer
        raise IntraSliceError(
            f"{option} leaves no room for attention at ratio {ratio}: "
            f"the MLP alone would keep {n_mlp * pm.mlp_per_neuron / pm.total:.1%} of the parameters"
        )
    if n_att > total_units:
        raise IntraSliceError(
            f"{option} cannot reach ratio {ratio}: attention would need {n_att} of {total_units} units"
        )
    return n_mlp, n_att


def top_k_per_layer(importance: list[torch.Tensor], k: int) -> list[int]:
    """How many of the globally top-k entries fall in each layer (ties broken by position)."""
    flat = torch.cat([imp.flatten().to(torch.float64) for imp in importance])
    counts = [0] * len(importance)
    if k <= 0:
        return counts
    owner = torch.cat([torch.full((imp.numel(),), i, dtype=torch.long) for i, imp in enumerate(importance)])
    top = torch.topk(flat, k, sorted=False).indices
    for i, c in enumerate(torch.bincount(owner[top], minlength=len(importance)).tolist()):
        counts[i] = c
    return counts


def cap_and_redistribute(ratios: list[float], cap: float) -> list[float]:
    """Cap each ratio at ``cap``; spread the excess over the uncapped layers in proportion to their ratios.

    Repeats until no layer exceeds the cap; the mean ratio (hence the budget with equal
    layer sizes) is preserved whenever it is feasible (mean <= cap).
    """
    r = [float(x) for x in ratios]
    if sum(r) / len(r) > cap + 1e-12:
        raise IntraSliceError(f"per-layer cap {cap} is below the mean ratio {sum(r) / len(r):.3f}: no allocation fits")
    for _ in range(len(r) + 1):
        excess = sum(max(x - cap, 0.0) for x in r)
        if excess <= 1e-12:
            break
        r = [min(x, cap) for x in r]
        free = [i for i, x in enumerate(r) if x < cap - 1e-12]
        weight = sum(r[i] for i in free)
        for i in free:
            share = r[i] / weight if weight > 0 else 1.0 / len(free)
            r[i] += excess * share
    return r


def check_cap(ratio: float, cap: float) -> None:
    """The per-layer cap must lie in (0, 0.95] and be at least the target ratio."""
    if not 0.0 < cap <= 0.95:
        raise IntraSliceError(f"--max-layer-ratio must be in (0, 0.95], got {cap}")
    if ratio > cap:
        raise IntraSliceError(f"per-layer cap {cap} is below the target ratio {ratio}: no allocation fits")


def split_fits(pm: ParamModel, ratio: float, mlp_bias: float, cap: float, option: str | None = None) -> None:
    """Raise unless β's split reaches ``ratio`` with both mean ratios under ``cap``.

    Counted on :func:`split_budget`'s rounded counts, as :func:`allocate` will (a mean above
    the cap leaves no allocation once every layer is capped).
    """
    option = option or f"--mlp-bias {mlp_bias}"
    n_mlp, n_att = split_budget(pm, ratio, mlp_bias, option)
    att = 1.0 - n_att / (pm.n_layers * pm.units_per_layer)
    mlp = 1.0 - n_mlp / (pm.n_layers * pm.neurons_per_layer)
    for what, mean in (("attention", att), ("MLP", mlp)):
        if mean > cap + 1e-12:
            raise IntraSliceError(
                f"{option} asks the {what} to lose {mean:.3f} of its parameters at ratio {ratio}, "
                f"above the per-layer cap {cap} (--max-layer-ratio)"
            )


def feasible_share(pm: ParamModel, ratio: float, share: float, cap: float = 0.8) -> float:
    """The share nearest ``share`` (steps of 0.01) whose split fits: at least one head per
    layer, no more than every MLP neuron, neither module's mean ratio above ``cap``
    (:func:`split_fits`). A default or automatic split adapts
    instead of failing the run: at ratio 0.7 on SmolLM2, share 0.25 would ask every MLP to
    lose 0.875 of its neurons, above the 0.8 cap, so the share rises until the MLP's fits."""
    check_cap(ratio, cap)
    top = max(share, 1.0 / ratio if ratio > 0 else 1.0) + 0.01
    for step in range(int(top * 100) + 2):
        for candidate in (share - step / 100, share + step / 100):
            if candidate < 0 or candidate > top:
                continue
            try:
                split_fits(pm, ratio, mlp_bias_for_share(pm, candidate), cap)
            except IntraSliceError:
                continue
            return round(candidate, 6)
    raise IntraSliceError(f"no split of attention and MLP reaches ratio {ratio} under the per-layer cap {cap}")


def allocate(
    att_importance: list[torch.Tensor],
    mlp_importance: list[torch.Tensor],
    pm: ParamModel,
    ratio: float,
    mlp_bias: float = 1.0,
    cap: float = 0.8,
    option: str | None = None,
) -> Allocation:
    """Global top-k of units and neurons, per-layer ratios, capped and redistributed.

    ``option``: what set ``mlp_bias``, for the errors (see :func:`split_budget`).
    """
    check_cap(ratio, cap)
    n_mlp, n_att = split_budget(pm, ratio, mlp_bias, option)
    kept_units = top_k_per_layer(att_importance, n_att)
    kept_neurons = top_k_per_layer(mlp_importance, n_mlp)
    att = [1.0 - k / pm.units_per_layer for k in kept_units]
    mlp = [1.0 - k / pm.neurons_per_layer for k in kept_neurons]
    att = cap_and_redistribute(att, cap) if max(att) > cap else att
    mlp = cap_and_redistribute(mlp, cap) if max(mlp) > cap else mlp
    planned = (
        1.0
        - sum(
            (1 - a) * pm.units_per_layer * pm.attn_per_unit + (1 - m) * pm.neurons_per_layer * pm.mlp_per_neuron
            for a, m in zip(att, mlp, strict=True)
        )
        / pm.total
    )
    return Allocation(list(zip(att, mlp, strict=True)), kept_units, kept_neurons, ratio, planned)


def uniform_allocation(pm: ParamModel, ratio: float, mlp_bias: float = 1.0) -> Allocation:
    """Every layer alike: the MLP loses ``mlp_bias`` x ratio, attention what is left of the ratio.

    β = 1 is the spec's uniform allocation (both modules lose the ratio). Another β is the
    split of a global allocation (:func:`mlp_bias_for_share`) without the spread over layers:
    the one allocation a stock format (every layer the same shape) can take. Attention's
    ratio snaps to 0 within 1e-9, so a share of 0 keeps the attention whole (its step skipped).
    """
    if mlp_bias == 1.0:
        att_ratio = mlp_ratio = ratio
    else:
        att = pm.units_per_layer * pm.attn_per_unit
        mlp = pm.neurons_per_layer * pm.mlp_per_neuron
        mlp_ratio = mlp_bias * ratio
        att_ratio = (ratio * (att + mlp) - mlp_ratio * mlp) / att
        att_ratio = 0.0 if abs(att_ratio) < 1e-9 else att_ratio
    units = round(pm.units_per_layer * (1 - att_ratio))
    neurons = round(pm.neurons_per_layer * (1 - mlp_ratio))
    n = pm.n_layers
    return Allocation([(att_ratio, mlp_ratio)] * n, [units] * n, [neurons] * n, ratio, ratio)


def rotate_head_gradients(grads: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Rotate per-head gradient blocks into each head's PCA basis.

    ``grads``: (groups, n_heads, h); ``bases``: (n_heads, h, h), columns = eigenvectors of
    the head's o_proj-input covariance by decreasing eigenvalue. Returns U_i^T g_i per head.
    """
    return torch.einsum("ghk,hkc->ghc", grads.to(torch.float64), bases.to(torch.float64))


def check_units_per_head(units_per_head: int, head_dim: int, mode: str = "global_pca") -> None:
    """Refuse an f that cannot split a head (global modes) or is not positive (any mode)."""
    if units_per_head < 1 or (mode != "uniform" and head_dim % units_per_head):
        raise IntraSliceError(f"--units-per-head {units_per_head} does not divide head_dim {head_dim}")


def unit_importance(grads: torch.Tensor, units_per_head: int | None = 1) -> torch.Tensor:
    """Importance of each unit: sum over groups of (sum of the unit's gradient components)^2.

    ``grads``: (groups, n_heads, h) -> (n_heads * f,) with units of h/f consecutive components
    (``units_per_head`` f; None: f = h, every component its own unit).
    """
    g, n_h, h = grads.shape
    if units_per_head is None:
        units_per_head = h
    check_units_per_head(units_per_head, h)
    sums = grads.reshape(g, n_h, units_per_head, h // units_per_head).sum(-1)
    return sums.pow(2).sum(0).reshape(-1)
