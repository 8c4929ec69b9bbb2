"""Eigenvector signs are canonical: a LAPACK build that returns other signs changes nothing.

``torch.linalg.eigh`` is replaced by one that flips a random half of the eigenvector
columns (what another BLAS/LAPACK build may legitimately return); the bases, the global
allocation and the pruned weights of IntraSlice and SliceGPT must stay bit for bit the same.
"""

from __future__ import annotations

import copy

import pytest
import torch

from intraslice import PruneConfig, prune
from intraslice.algo.linalg import canonical_signs, eigh_desc
from intraslice.importance import estimate_allocation, head_bases

from .conftest import calib_tokens, make_tiny

torch.set_num_threads(2)

_EIGH = torch.linalg.eigh


def sign_flipping_eigh(seed: int):
    """An eigh that returns the same eigenpairs with arbitrary column signs."""
    g = torch.Generator().manual_seed(seed)

    def eigh(mat: torch.Tensor, *args, **kwargs):
        vals, vecs = _EIGH(mat, *args, **kwargs)
        flips = torch.randint(0, 2, (*vecs.shape[:-2], 1, vecs.shape[-1]), generator=g).to(vecs.dtype) * 2 - 1
        return torch.return_types.linalg_eigh((vals, vecs * flips))

    return eigh


def spd(n: int, seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, 3 * n, generator=g, dtype=torch.float64)
    return x @ x.transpose(-1, -2)


def test_eigh_desc_is_invariant_to_the_signs_lapack_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    mats = [spd(7, 0), spd(5, 1, batch=(3, 2))]
    ref = [eigh_desc(m) for m in mats]
    for m, (vals, vecs) in zip(mats, ref, strict=True):
        # Still an eigendecomposition, by decreasing eigenvalue, largest component positive.
        torch.testing.assert_close(vecs @ torch.diag_embed(vals) @ vecs.transpose(-1, -2), m, atol=1e-10, rtol=1e-12)
        assert (vals[..., :-1] >= vals[..., 1:]).all()
        top = vecs.gather(-2, vecs.abs().argmax(-2, keepdim=True))
        assert (top > 0).all()
    for seed in range(3):
        monkeypatch.setattr(torch.linalg, "eigh", sign_flipping_eigh(seed))
        for m, (vals, vecs) in zip(mats, ref, strict=True):
            got_vals, got_vecs = eigh_desc(m)
            assert torch.equal(got_vals, vals) and torch.equal(got_vecs, vecs)


def test_tied_components_are_decided_by_position_not_rounding() -> None:
    """(1, -1)/sqrt(2) and its 1-ulp perturbations get the same sign: the first component decides."""
    base = torch.tensor([[1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64) / 2**0.5
    ulp = torch.finfo(torch.float64).eps
    for bump in (torch.tensor([[1 + ulp], [1.0]]), torch.tensor([[1.0], [1 + ulp]])):
        for sign in (1.0, -1.0):
            v = canonical_signs(sign * base * bump.to(torch.float64))
            assert (v[0] > 0).all(), v


def test_head_bases_use_the_canonical_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    cov = spd(6, 4, batch=(2, 3))
    ref = head_bases(cov)
    monkeypatch.setattr(torch.linalg, "eigh", sign_flipping_eigh(1))
    assert torch.equal(head_bases(cov), ref)


@pytest.mark.parametrize("method", ["intraslice", "slicegpt"])
def test_allocation_and_pruned_weights_do_not_depend_on_eigh_signs(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tiny("llama-gqa")
    tokens = calib_tokens(8, 24)

    def run() -> tuple[list, dict[str, torch.Tensor]]:
        ratios = None
        if method == "intraslice":
            alloc, _ = estimate_allocation(copy.deepcopy(src), 0.4, "global_pca", tokens, group_size=4, progress=False)
            ratios = alloc.layer_ratios
        cfg = PruneConfig(ratio=0.4, method=method, layer_ratios=ratios)
        model = prune(copy.deepcopy(src), tokens, cfg, progress=False).model
        return ratios, model.state_dict()

    ref_ratios, ref_state = run()
    monkeypatch.setattr(torch.linalg, "eigh", sign_flipping_eigh(7))
    ratios, state = run()
    assert ratios == ref_ratios
    assert ref_state.keys() == state.keys()
    for k, v in ref_state.items():
        assert torch.equal(state[k], v), k
