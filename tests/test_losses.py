"""C51 projection and InfoNCE against hand-computed values and plain-loop references."""

from __future__ import annotations

import math

import pytest
import torch

from driml_pl.losses import c51_cross_entropy, categorical_projection, infonce_loss, soft_clip


def loop_projection(support, probs, returns, discounts):
    """Bellemare et al. 2017, Alg. 1, one atom at a time."""
    v_min, v_max, n = support[0].item(), support[-1].item(), len(support)
    dz = (v_max - v_min) / (n - 1)
    out = torch.zeros_like(probs, dtype=torch.float64)
    for i in range(probs.shape[0]):
        for j in range(n):
            tz = min(max(returns[i].item() + discounts[i].item() * support[j].item(), v_min), v_max)
            b = (tz - v_min) / dz
            lo, hi = math.floor(b), math.ceil(b)
            if lo == hi:
                out[i, lo] += probs[i, j].item()
            else:
                out[i, lo] += probs[i, j].item() * (hi - b)
                out[i, hi] += probs[i, j].item() * (b - lo)
    return out


SUPPORT = torch.linspace(-2.0, 2.0, 5)  # atoms -2, -1, 0, 1, 2


def test_identity_projection_keeps_distribution():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.25, 0.15]])
    out = categorical_projection(SUPPORT, probs, torch.zeros(1), torch.ones(1))
    torch.testing.assert_close(out, probs)


def test_shift_by_one_atom_moves_mass_and_clamps_top():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.25, 0.15]])
    out = categorical_projection(SUPPORT, probs, torch.ones(1), torch.ones(1))
    # every atom moves up one; the top atom's mass (clamped at 2) joins the atom already shifted onto 2
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4]]))


def test_half_atom_shift_splits_mass_evenly():
    probs = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    out = categorical_projection(SUPPORT, probs, torch.tensor([0.5]), torch.ones(1))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0]]))


def test_clamping_at_both_ends():
    probs = torch.full((2, 5), 0.2)
    out = categorical_projection(SUPPORT, probs, torch.tensor([-10.0, 10.0]), torch.ones(2))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0]]))


def test_terminal_gives_point_mass_at_return():
    probs = torch.full((3, 5), 0.2)
    out = categorical_projection(SUPPORT, probs, torch.tensor([1.0, -0.25, 7.0]), torch.zeros(3))
    expected = torch.tensor([[0, 0, 0, 1.0, 0], [0, 0.25, 0.75, 0, 0], [0, 0, 0, 0, 1.0]])
    torch.testing.assert_close(out, expected)


def test_matches_loop_reference_and_conserves_mass():
    gen = torch.Generator().manual_seed(0)
    support = torch.linspace(-10, 10, 51, dtype=torch.float64)
    probs = torch.softmax(torch.randn(64, 51, generator=gen, dtype=torch.float64), -1)
    returns = torch.randn(64, generator=gen, dtype=torch.float64) * 6
    discounts = torch.rand(64, generator=gen, dtype=torch.float64) * (torch.rand(64, generator=gen) > 0.2)
    out = categorical_projection(support, probs, returns, discounts)
    torch.testing.assert_close(out, loop_projection(support, probs, returns, discounts))
    torch.testing.assert_close(out.sum(-1), torch.ones(64, dtype=torch.float64))
    assert (out >= 0).all()


def test_c51_cross_entropy_is_kl_plus_entropy():
    logits = torch.randn(4, 5)
    target = torch.softmax(torch.randn(4, 5), -1)
    expected = -(target * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(c51_cross_entropy(logits.half(), target), expected, atol=1e-2, rtol=1e-2)
    assert c51_cross_entropy(logits.half(), target).dtype == torch.float32


def test_infonce_uniform_scores_give_log_b():
    for b in (2, 7, 256):
        assert infonce_loss(torch.zeros(b, b)).item() == pytest.approx(math.log(b), rel=1e-6)
        assert infonce_loss(torch.zeros(3, b, b)).item() == pytest.approx(math.log(b), rel=1e-6)


def test_infonce_matches_brute_force_loop():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 8, 8, generator=gen, dtype=torch.float64) * 3
    total = 0.0
    for p in range(5):
        for i in range(8):
            denom = sum(math.exp(scores[p, i, j].item()) for j in range(8))
            total += -math.log(math.exp(scores[p, i, i].item()) / denom)
    assert infonce_loss(scores).item() == pytest.approx(total / 40, rel=1e-9)


def test_infonce_perfect_critic_goes_to_zero():
    assert infonce_loss(torch.eye(16) * 100.0).item() < 1e-6


def test_soft_clip():
    x = torch.tensor([-1e6, -1.0, 0.0, 1.0, 1e6])
    y = soft_clip(x, 20.0)
    torch.testing.assert_close(y, 20.0 * torch.tanh(x / 20.0))
    assert y.abs().max() <= 20.0
    assert soft_clip(x, 0.0) is x


def test_infonce_weight_drops_anchors_and_keeps_the_batch_size_as_divisor():
    scores = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    total = 0.0
    for p in range(2):
        for i in (0, 2, 3):
            row = scores[p, i]
            total += -(row[i] - math.log(sum(math.exp(x) for x in row.tolist()))).item()
    assert infonce_loss(scores, weight=weight).item() == pytest.approx(total / 8, rel=1e-12)
    assert infonce_loss(scores, weight=torch.ones(4, dtype=torch.float64)).item() == pytest.approx(
        infonce_loss(scores).item(), rel=1e-12
    )
