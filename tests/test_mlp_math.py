"""The MLP math of method.md section 3."""

from __future__ import annotations

import pytest
import torch

from intraslice.algo.mlp import compress_mlp, mlp_keep_count

f64 = torch.float64


def test_correction_is_exact_on_low_rank_activations() -> None:
    g = torch.Generator().manual_seed(0)
    m, rank, d = 48, 20, 16
    z = torch.randn(600, rank, generator=g, dtype=f64) @ torch.randn(rank, m, generator=g, dtype=f64)
    w_down = torch.randn(d, m, generator=g, dtype=f64)
    res = compress_mlp(z.T @ z, w_down, keep=24, damp=0.0)
    assert res.kept.numel() == 24 and bool((res.kept.diff() > 0).all())
    torch.testing.assert_close(z[:, res.kept] @ res.w_down.T, z @ w_down.T, atol=1e-8, rtol=0)
    assert res.rel_error is not None and res.rel_error < 1e-14


def test_ratio_zero_is_identity_even_with_damping() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(100, 32, generator=g, dtype=f64)
    w = torch.randn(8, 32, generator=g, dtype=f64)
    res = compress_mlp(z.T @ z, w, keep=32, damp=0.01)
    torch.testing.assert_close(res.w_down, w, atol=1e-12, rtol=0)


def test_correction_beats_plain_selection() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(500, 40, generator=g, dtype=f64) @ torch.randn(40, 64, generator=g, dtype=f64)
    z += 0.1 * torch.randn(500, 64, generator=g, dtype=f64)
    w = torch.randn(8, 64, generator=g, dtype=f64)
    res = compress_mlp(z.T @ z, w, keep=32)
    ref = z @ w.T
    corrected = ((z[:, res.kept] @ res.w_down.T - ref).norm() / ref.norm()).item()
    plain = ((z[:, res.kept] @ w[:, res.kept].T - ref).norm() / ref.norm()).item()
    assert corrected < 0.5 * plain
    assert res.rel_error == pytest.approx(corrected**2, rel=1e-6)


@pytest.mark.parametrize(
    ("width", "ratio", "keep"),
    [(1536, 0.0, 1536), (1536, 0.2, 1536 - 304), (1536, 0.5, 768), (160, 0.3, 112), (11008, 0.3, 11008 - 3304)],
)
def test_keep_count_drops_multiples_of_eight(width: int, ratio: float, keep: int) -> None:
    assert mlp_keep_count(width, ratio) == keep
    assert (width - mlp_keep_count(width, ratio)) % 8 == 0
