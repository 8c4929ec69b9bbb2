"""The global pruning-ratio estimator (method.md section 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from intraslice import IntraSliceError, PruneConfig, prune
from intraslice.algo.allocation import (
    allocate,
    cap_and_redistribute,
    joint_attention_share,
    mlp_bias_for_share,
    param_model,
    rotate_head_gradients,
    split_budget,
    unit_importance,
)
from intraslice.arch import get_arch
from intraslice.config import DEFAULT_GRAD_SAMPLES, DEFAULT_UNITS_PER_HEAD
from intraslice.importance import causal_lm_loss, estimate_allocation, head_bases, load_ratios_file, mask_gradients

from .conftest import calib_tokens, make_tiny


def test_mask_gradient_matches_finite_differences() -> None:
    model = make_tiny("llama-gqa")
    tokens = calib_tokens(2, 16)
    mg = mask_gradients(model, tokens, group_size=2, progress=False)
    arch = get_arch(model.config)
    n_h, h = model.config.num_attention_heads, model.config.head_dim

    def loss_with(layer: int, where: str, idx: int, eps: float) -> float:
        total = 0.0
        lyr = arch.decoder_layers(model)[layer]
        target = arch.qkvo(lyr)[3] if where == "o" else arch.gate_up_down(lyr)[2]

        def hook(_m: torch.nn.Module, args: tuple) -> tuple:
            x = args[0].clone()
            x[..., idx] *= 1.0 + eps
            return (x,)

        handle = target.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                for s in range(tokens.shape[0]):
                    ids = tokens[s : s + 1]
                    total += float(causal_lm_loss(model, ids))
        finally:
            handle.remove()
        return total

    eps = 1e-6
    for layer, where, idx in [(0, "o", 3), (1, "o", 40), (0, "d", 7), (1, "d", 100)]:
        fd = (loss_with(layer, where, idx, eps) - loss_with(layer, where, idx, -eps)) / (2 * eps)
        g = mg.attention[0, layer].reshape(n_h * h)[idx] if where == "o" else mg.mlp[0, layer, idx]
        assert float(g) == pytest.approx(fd, rel=1e-5, abs=1e-9)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_rotation_projects_each_head_gradient_on_its_own_pca_basis() -> None:
    """PCA mode rotates head i's gradient block to U_i^T g_i: component c is the projection of
    g_i on head i's c-th eigenvector (by decreasing eigenvalue). U_i g_i, the wrong way round,
    or another head's basis, would put a gradient along an eigenvector anywhere but there."""
    f64 = torch.float64
    torch.manual_seed(0)
    n_h, h = 3, 8
    q = torch.linalg.qr(torch.randn(n_h, h, h, dtype=f64)).Q  # random, non-symmetric orthogonal
    vals = torch.stack([torch.randperm(h).to(f64) + 1.0 for _ in range(n_h)])  # distinct, scrambled order
    cov = q @ torch.diag_embed(vals) @ q.transpose(1, 2)
    bases = head_bases(cov[None])[0]
    for i in range(n_h):
        order = torch.argsort(vals[i], descending=True)
        # columns = eigenvectors by decreasing eigenvalue (up to sign)
        torch.testing.assert_close((bases[i].T @ q[i][:, order]).abs(), torch.eye(h, dtype=f64), rtol=0, atol=1e-10)
        assert not torch.allclose(bases[i], bases[i].T, atol=1e-3)  # U^T and U differ: the test can tell them apart

    # A gradient along eigenvector c of every head rotates to e_c (a one-hot on component c).
    grads = torch.stack([torch.stack([bases[i][:, c] for i in range(n_h)]) for c in range(h)])  # (h groups, n_h, h)
    rot = rotate_head_gradients(grads, bases)
    eye = torch.eye(h, dtype=f64)
    for i in range(n_h):
        torch.testing.assert_close(rot[:, i], eye, rtol=0, atol=1e-12)
        assert not torch.allclose(torch.stack([bases[i] @ grads[c, i] for c in range(h)]), eye, atol=1e-3)
    # With one unit per component, a gradient along eigenvector c of head i scores unit (i, c) only.
    one = torch.zeros(1, n_h, h, dtype=f64)
    one[0, 1] = bases[1][:, 5]
    imp = unit_importance(rotate_head_gradients(one, bases), h)
    expected = torch.zeros(n_h * h, dtype=f64)
    expected[1 * h + 5] = 1.0
    torch.testing.assert_close(imp, expected, rtol=0, atol=1e-12)

    # Generic gradients: U_i^T g_i per head (an independent matmul), norms kept, unit sums changed.
    grads = torch.randn(4, n_h, h, dtype=f64)
    rot = rotate_head_gradients(grads, bases)
    expected_rot = torch.stack([torch.stack([bases[i].T @ grads[g, i] for i in range(n_h)]) for g in range(4)])
    torch.testing.assert_close(rot, expected_rot, rtol=0, atol=1e-12)
    torch.testing.assert_close(rot.pow(2).sum(-1), grads.pow(2).sum(-1))
    assert not torch.allclose(unit_importance(rot, 1), unit_importance(grads, 1))
    assert not torch.allclose(unit_importance(rot, 2), unit_importance(grads, 2))
    assert unit_importance(rot, 4).shape == (12,)


def _pm():
    dims = {"d": 64, "n_heads": 4, "n_kv": 2, "head_dim": 16, "m": 160, "n_layers": 4}
    return param_model(dims, f=2)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("beta", [0.8, 1.0, 1.2])
def test_budget_meets_the_target(ratio: float, beta: float) -> None:
    pm = _pm()
    g = torch.Generator().manual_seed(1)
    att = [torch.rand(pm.units_per_layer, generator=g, dtype=torch.float64) for _ in range(pm.n_layers)]
    mlp = [torch.rand(pm.neurons_per_layer, generator=g, dtype=torch.float64) for _ in range(pm.n_layers)]
    alloc = allocate(att, mlp, pm, ratio, beta, cap=0.95)
    kept = sum(alloc.kept_units) * pm.attn_per_unit + sum(alloc.kept_neurons) * pm.mlp_per_neuron
    assert 1 - kept / pm.total == pytest.approx(ratio, abs=pm.attn_per_unit / pm.total + 1e-12)
    assert alloc.planned_ratio == pytest.approx(ratio, abs=pm.attn_per_unit / pm.total + 1e-12)
    n_mlp, _ = split_budget(pm, ratio, beta)
    assert sum(alloc.kept_neurons) == n_mlp


def test_cap_holds_and_excess_is_redistributed() -> None:
    r = cap_and_redistribute([0.95, 0.9, 0.1, 0.2, 0.3], cap=0.8)
    assert max(r) <= 0.8 + 1e-12
    assert sum(r) == pytest.approx(0.95 + 0.9 + 0.1 + 0.2 + 0.3)
    assert r[3] / r[2] == pytest.approx(2.0, rel=0.3)  # proportional shares (until others hit the cap)
    pm = _pm()
    att = [torch.full((pm.units_per_layer,), v, dtype=torch.float64) for v in (1.0, 1.0, 1.0, 1e-9)]
    mlp = [torch.full((pm.neurons_per_layer,), v, dtype=torch.float64) for v in (1.0, 1.0, 1.0, 1e-9)]
    alloc = allocate(att, mlp, pm, 0.3, cap=0.5)
    assert max(max(a, m) for a, m in alloc.layer_ratios) <= 0.5 + 1e-9


def test_bad_budget_inputs_are_clear_errors() -> None:
    pm = _pm()
    with pytest.raises(IntraSliceError, match="no room for attention"):
        split_budget(pm, 0.3, mlp_bias=-1.5)
    with pytest.raises(IntraSliceError, match="removes more than every MLP neuron"):
        split_budget(pm, 0.6, mlp_bias=2.0)
    att = [torch.ones(pm.units_per_layer)] * pm.n_layers
    mlp = [torch.ones(pm.neurons_per_layer)] * pm.n_layers
    with pytest.raises(IntraSliceError, match=r"cap 0\.3 is below the target ratio 0\.5"):
        allocate(att, mlp, pm, 0.5, cap=0.3)
    # "No room" means less than one head per layer whatever f: here (f = 2, 4 layers) beta 0.3
    # keeps 582 neurons and floor((0.7 * 172032 - 582 * 192) / 1536) = 5 half-head units,
    # more than one unit per layer but fewer than the 8 that make one head per layer.
    assert (pm.attn_per_unit, pm.mlp_per_neuron, pm.total) == (1536, 192, 172032)
    with pytest.raises(IntraSliceError, match="no room for attention"):
        split_budget(pm, 0.3, mlp_bias=0.3)
    assert split_budget(pm, 0.3, mlp_bias=0.4)[1] >= pm.n_layers * 2


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0, 1.5])
def test_attention_share_splits_the_budget(share: float) -> None:
    """Attention loses share x ratio of its parameters, the MLP the rest, the total the ratio.

    Counted here from the kept units and neurons, against the share asked for (floors: two
    units of slack); share 1 is exactly the spec's β = 1.
    """
    dims = {"d": 64, "n_heads": 4, "n_kv": 2, "head_dim": 16, "m": 160, "n_layers": 32}
    pm = param_model(dims, f=2)
    att_total = pm.n_layers * pm.units_per_layer  # 256 units of 1536 parameters
    mlp_total = pm.n_layers * pm.neurons_per_layer  # 5120 neurons of 192 parameters
    n_mlp, n_att = split_budget(pm, 0.3, mlp_bias_for_share(pm, share))
    att_removed = (att_total - n_att) * 1536
    mlp_removed = (mlp_total - n_mlp) * 192
    assert att_removed / (att_total * 1536) == pytest.approx(share * 0.3, abs=2 / att_total)
    assert (att_removed + mlp_removed) / (att_total * 1536 + mlp_total * 192) == pytest.approx(0.3, abs=1e-3)
    if share == 1.0:
        assert mlp_bias_for_share(pm, share) == 1.0


def test_attention_share_in_the_estimator() -> None:
    model = make_tiny("llama-gqa")
    c = model.config
    h, n_h, n_kv, d, m = c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.intermediate_size
    att, mlp = 2 * d * n_h * h + 2 * d * n_kv * h, 3 * d * m  # one layer's attention and MLP parameters
    # the share and β together, or a split that cannot be, fail before any gradient (tokens=None)
    with pytest.raises(IntraSliceError, match="not both"):
        estimate_allocation(model, 0.3, "global_pca", attention_share=0.5, mlp_bias=1.2)
    with pytest.raises(IntraSliceError, match="--attention-share 4 leaves no room for attention"):
        estimate_allocation(model, 0.3, "global_pca", attention_share=4.0)
    alloc, record = estimate_allocation(
        model, 0.3, "global_pca", tokens=calib_tokens(2, 16), attention_share=0.5, progress=False
    )
    assert record["attention_share"] == 0.5
    assert record["mlp_bias"] == pytest.approx(1 + 0.5 * att / mlp)
    mean_att = sum(a for a, _ in alloc.layer_ratios) / len(alloc.layer_ratios)
    assert mean_att == pytest.approx(0.15, abs=1 / n_h)  # f = 1: one head is the step
    assert alloc.planned_ratio == pytest.approx(0.3, abs=0.02)


def test_share_zero_with_small_units_keeps_every_unit() -> None:
    """f = h with one KV head for four query heads makes a unit (2.5 d = 160 parameters)
    smaller than a neuron (3 d = 192): the floor of N_mlp can leave up to one neuron's
    parameters over, 257 units' worth of 256 at these ratios (found by a scan), which is not a
    reason to refuse share 0."""
    dims = {"d": 64, "n_heads": 4, "n_kv": 1, "head_dim": 16, "m": 160, "n_layers": 4}
    pm = param_model(dims, f=16)
    assert (pm.attn_per_unit, pm.mlp_per_neuron) == (160, 192)
    for ratio in (0.02, 0.17, 0.32, 0.49):
        _, n_att = split_budget(pm, ratio, mlp_bias_for_share(pm, 0.0))
        assert n_att == pm.n_layers * pm.units_per_layer


def test_joint_share_is_the_cheapest_parameters_first() -> None:
    """The auto split against a plain greedy knapsack written out here, and two hand cases."""
    dims = {"d": 64, "n_heads": 4, "n_kv": 2, "head_dim": 16, "m": 160, "n_layers": 3}
    pm = param_model(dims, f=2)  # 8 units of 1536 parameters and 160 neurons of 192 per layer
    gen = torch.Generator().manual_seed(0)
    att = [torch.rand(8, generator=gen, dtype=torch.float64) * 1e-3 for _ in range(3)]
    mlp = [torch.rand(160, generator=gen, dtype=torch.float64) * 1e-4 for _ in range(3)]
    entries = sorted(
        [(float(v) / 1536, 1536, True) for a in att for v in a] + [(float(v) / 192, 192, False) for m in mlp for v in m]
    )
    budget, spent, att_gone = 0.3 * pm.total, 0, 0
    for _, size, is_att in entries:
        if spent + size > budget:
            break
        spent += size
        att_gone += size if is_att else 0
    assert joint_attention_share(att, mlp, pm, 0.3) == pytest.approx(att_gone / (24 * 1536) / 0.3)
    # attention far dearer than the MLP, which can pay alone: attention keeps everything
    dear = [torch.ones(8, dtype=torch.float64)] * 3
    assert joint_attention_share(dear, mlp, pm, 0.3) == 0.0
    # attention far cheaper: it goes first, all of it (24 x 1536 = 36864 of the 0.3 x 129024 = 38707 budget)
    cheap = [torch.full((8,), 1e-12, dtype=torch.float64)] * 3
    assert joint_attention_share(cheap, mlp, pm, 0.3) == pytest.approx(36864 / 36864 / 0.3)


def test_a_default_share_moves_only_as_far_as_the_cap_asks() -> None:
    """At ratio 0.7 the MLP cannot take 0.75 of the cut under the 0.8 cap: the share rises to the
    smallest one that fits, worked out by hand: β = 1 + 0.4 (1 - A) <= 0.8 / 0.7, so A >= 0.643."""
    from intraslice.algo.allocation import feasible_share

    pm = _pm()  # attention / MLP parameters = 12288 / 30720 = 0.4
    assert feasible_share(pm, 0.3, 0.25) == 0.25  # fits as it is
    assert feasible_share(pm, 0.7, 0.25, cap=0.8) == pytest.approx(0.65)
    assert 0.7 * mlp_bias_for_share(pm, 0.65) <= 0.8 < 0.7 * mlp_bias_for_share(pm, 0.64)


def test_the_default_split_leaves_attention_whole() -> None:
    """No split given: attention share 0, the MLP takes the whole ratio. β worked out by hand for
    the tiny GQA model (d 96, 6 heads of 16, 2 KV heads, MLP 160): attention 2*96*96 + 2*96*32 =
    24576, MLP 3*96*160 = 46080 parameters a layer, so β = 1 + 24576 / 46080 = 23/15; share 0.25
    gives β = 1 + 0.75 * 24576 / 46080 = 1.4."""
    from intraslice.importance import resolve_split

    model = make_tiny("llama-gqa")
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, c.head_dim, c.num_key_value_heads, c.intermediate_size) == (
        96, 6, 16, 2, 160,
    )  # fmt: skip
    _, _, beta, _, share = resolve_split(c, 0.3, "global_pca")
    assert (share, beta) == (0.0, pytest.approx(23 / 15))
    assert resolve_split(c, 0.3, "global_pca", attention_share=0.25)[2] == pytest.approx(1.4)
    assert resolve_split(c, 0.3, "global_pca", mlp_bias=1.2)[2:] == (1.2, None, None)
    assert resolve_split(c, 0.3, "uniform")[4] is None  # nothing to split
    alloc, record = estimate_allocation(model, 0.3, "global_pca", tokens=calib_tokens(2, 16), progress=False)
    assert (record["attention_share"], record["mlp_bias"]) == (0.0, pytest.approx(23 / 15))
    assert all(att == 0 for att, _ in alloc.layer_ratios)  # attention whole in every layer
    # a ratios file keeps its own split: the spec's β = 1 of an older file, or its share
    old = {**record, "attention_share": None, "mlp_bias": 1.0}
    assert resolve_split(c, 0.3, "global_pca", saved=old)[2:] == (1.0, None, None)
    assert resolve_split(c, 0.3, "global_pca", saved={**record, "attention_share": 0.5})[4] == 0.5


def test_an_explicit_share_above_the_cap_is_refused_naming_it() -> None:
    from intraslice.importance import resolve_split

    model = make_tiny("llama-gqa")
    with pytest.raises(IntraSliceError, match=r"--attention-share 0\.25 asks the MLP to lose 0\.98"):
        resolve_split(model.config, 0.7, "global_pca", attention_share=0.25)  # β 1.4 x 0.7 = 0.98 > 0.8
    assert resolve_split(model.config, 0.7, "global_pca")[4] > 0.25  # the default moves instead


def test_auto_share_in_the_estimator() -> None:
    model = make_tiny("llama-gqa")
    with pytest.raises(IntraSliceError, match="needs a global allocation"):
        estimate_allocation(model, 0.3, "uniform", attention_share="auto")
    alloc, record = estimate_allocation(
        model, 0.3, "global_pca", tokens=calib_tokens(2, 16), attention_share="auto", progress=False
    )
    att = [torch.tensor(x, dtype=torch.float64) for x in record["importance"]["attention"]]
    mlp = [torch.tensor(x, dtype=torch.float64) for x in record["importance"]["mlp"]]
    dims = record["dims"]
    pm = param_model(dims, record["units_per_head"])
    assert record["attention_share"] == "auto"
    joint = joint_attention_share(att, mlp, pm, 0.3)
    try:  # the ranking's own share when it fits (then it is used as it is), else the nearest that does
        split_budget(pm, 0.3, mlp_bias_for_share(pm, joint))
        fits = 0.3 * joint <= 0.8 and 0.3 * mlp_bias_for_share(pm, joint) <= 0.8
    except IntraSliceError:
        fits = False
    if fits:
        assert record["attention_share_chosen"] == pytest.approx(joint, abs=0.01)
    assert record["mlp_bias"] == pytest.approx(mlp_bias_for_share(pm, record["attention_share_chosen"]))
    mean_att = sum(a for a, _ in alloc.layer_ratios) / len(alloc.layer_ratios)
    assert mean_att == pytest.approx(record["attention_share_chosen"] * 0.3, abs=1 / dims["n_heads"])


def test_uniform_reproduces_the_core_exactly() -> None:
    a, b = make_tiny("llama-gqa"), make_tiny("llama-gqa")
    alloc, record = estimate_allocation(a, 0.3, "uniform")
    assert record["layer_ratios"] == [[0.3, 0.3]] * 2
    core = prune(a, calib_tokens(), PruneConfig(ratio=0.3, allocation="uniform"), progress=False)
    uni = prune(b, calib_tokens(), PruneConfig(ratio=0.3, layer_ratios=alloc.layer_ratios), progress=False)
    assert core.model.config.layers == uni.model.config.layers
    for (k1, v1), (k2, v2) in zip(core.model.state_dict().items(), uni.model.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_uniform_with_a_split_gives_every_layer_the_same_pair() -> None:
    """A share asked of the uniform allocation (or the default share for layers that must be
    alike) splits each layer as the estimator splits the whole model. By hand for the tiny GQA
    model (attention 24576, MLP 46080 parameters a layer): share 0 at 0.3 leaves attention
    whole and takes 0.3 * 70656 / 46080 = 0.46 of every MLP; share 0.5 takes 0.15 of attention
    and 0.3 * (46080 + 0.5 * 24576) / 46080 = 0.38 of the MLP."""
    from intraslice.importance import resolve_split

    model = make_tiny("llama-gqa")
    for share, att, mlp in ((0.0, 0.0, 0.46), (0.5, 0.15, 0.38)):
        alloc, record = estimate_allocation(model, 0.3, "uniform", attention_share=share)
        assert record["attention_share"] == share and len(set(alloc.layer_ratios)) == 1
        a, m = alloc.layer_ratios[0]
        assert (a, m) == (pytest.approx(att, abs=1e-12), pytest.approx(mlp, abs=1e-12))
        assert a * 24576 + m * 46080 == pytest.approx(0.3 * 70656)
    assert estimate_allocation(model, 0.3, "uniform", attention_share=0.0)[0].layer_ratios[0][0] == 0.0  # exactly
    assert resolve_split(model.config, 0.3, "uniform", split_uniform=True)[4] == 0.0  # the default share
    assert resolve_split(model.config, 0.3, "uniform")[2:] == (1.0, None, None)  # the spec's uniform
    # through prune(): the same shape in every layer, attention kept whole, the real target met
    result = prune(model, calib_tokens(), PruneConfig(ratio=0.3, allocation="uniform", attention_share=0.0),
                   progress=False)  # fmt: skip
    layers = result.model.config.layers
    assert all(spec == layers[0] for spec in layers) and layers[0]["num_heads"] == 6
    assert layers[0]["head_dim"] == 16 and layers[0]["intermediate_size"] == 88  # 160 * 0.54 = 86.4 -> 88
    with pytest.raises(IntraSliceError, match=r"the MLP to lose 0\.92"):  # share 0 at 0.6 would take 0.92 of it
        estimate_allocation(model, 0.6, "uniform", attention_share=0.0)


@pytest.mark.parametrize("mode", ["global", "global_pca"])
def test_global_modes_hit_the_real_target(mode: str, tmp_path: Path) -> None:
    model = make_tiny("llama-gqa")
    tokens = calib_tokens(8, 24)
    alloc, record = estimate_allocation(model, 0.4, mode, tokens, group_size=4, progress=False)
    assert len(record["importance"]["attention"]) == 2 and record["gradient_samples"] == 8
    result = prune(model, tokens, PruneConfig(ratio=0.4, layer_ratios=alloc.layer_ratios), progress=False)
    assert result.reduction()["decoder_linear"] == pytest.approx(0.4, abs=0.02)
    # The record reloads and re-budgets without gradients; a mismatched model is refused.
    path = tmp_path / "intraslice.json"
    path.write_text(json.dumps({"allocation": record}))
    fresh = make_tiny("llama-gqa")
    saved = load_ratios_file(str(path), fresh.config)
    again, rec2 = estimate_allocation(fresh, 0.4, mode, saved=saved)
    assert again.layer_ratios == alloc.layer_ratios and rec2["reused_from_file"]
    other, _ = estimate_allocation(fresh, 0.2, mode, saved=saved)
    assert other.planned_ratio == pytest.approx(0.2, abs=0.02)
    with pytest.raises(IntraSliceError, match="another model"):
        load_ratios_file(str(path), make_tiny("llama-mha").config)


def test_gradients_use_the_first_default_windows_and_zero_means_all() -> None:
    model = make_tiny("llama-gqa")
    tokens = calib_tokens(12, 24)
    _, default = estimate_allocation(model, 0.3, "global_pca", tokens, group_size=4, progress=False)
    _, first8 = estimate_allocation(model, 0.3, "global_pca", tokens[:8], group_size=4, progress=False, grad_samples=0)
    _, every = estimate_allocation(model, 0.3, "global_pca", tokens, group_size=4, progress=False, grad_samples=0)
    assert DEFAULT_GRAD_SAMPLES == 8
    assert default["gradient_samples"] == first8["gradient_samples"] == 8 and every["gradient_samples"] == 12
    assert default["importance"] == first8["importance"] and default["importance"] != every["importance"]


def test_units_per_head_default_and_a_ratios_file_keeps_its_f(tmp_path: Path) -> None:
    """f = h makes every (rotated) dimension its own unit, so an importance does not depend on
    the sign of an eigenvector (with f < h a unit sums components, and a flipped sign changes
    the sum). The default is the spec's f = 1; a ratios file summed with another f is
    re-budgeted with that f unless the caller asks for one, which must then match."""
    g = torch.randn(3, 2, 8, dtype=torch.float64)
    flip = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    assert torch.allclose(unit_importance(g * flip, None), unit_importance(g, None))
    assert torch.allclose(unit_importance(g, None), g.pow(2).sum(0).reshape(-1))
    assert torch.allclose(unit_importance(g), g.sum(-1).pow(2).sum(0).reshape(-1))  # default: f = 1
    assert not torch.allclose(unit_importance(g * flip, 1), unit_importance(g, 1))

    model = make_tiny("llama-gqa")
    h = model.config.hidden_size // model.config.num_attention_heads
    tokens = calib_tokens(8, 24)
    _, default = estimate_allocation(model, 0.3, "global_pca", tokens, group_size=4, progress=False)
    _, one = estimate_allocation(model, 0.3, "global_pca", tokens, group_size=4, progress=False, units_per_head=1)
    assert DEFAULT_UNITS_PER_HEAD == 1 and default["units_per_head"] == 1 and default["importance"] == one["importance"]
    assert len(default["importance"]["attention"][0]) == model.config.num_attention_heads

    _, fh = estimate_allocation(model, 0.3, "global_pca", tokens, group_size=4, progress=False, units_per_head=h)
    assert len(fh["importance"]["attention"][0]) == model.config.num_attention_heads * h
    path = tmp_path / "intraslice.json"
    path.write_text(json.dumps({"allocation": fh}))
    saved = load_ratios_file(str(path), model.config)
    again, rec = estimate_allocation(model, 0.3, "global_pca", saved=saved)
    assert rec["units_per_head"] == h and [list(r) for r in again.layer_ratios] == fh["layer_ratios"]
    with pytest.raises(IntraSliceError, match=f"units_per_head {h}; asked for global_pca with 1"):
        estimate_allocation(model, 0.3, "global_pca", saved=saved, units_per_head=1)
    # refused before the gradients: without tokens the estimator would fail for want of them
    with pytest.raises(IntraSliceError, match="--units-per-head 0 does not divide"):
        estimate_allocation(model, 0.3, "global_pca", None, units_per_head=0, progress=False)
    with pytest.raises(IntraSliceError, match=f"--units-per-head 3 does not divide head_dim {h}"):
        estimate_allocation(model, 0.3, "global_pca", None, units_per_head=3, progress=False)
    with pytest.raises(IntraSliceError, match="--units-per-head 0"):
        estimate_allocation(model, 0.3, "uniform", units_per_head=0)
