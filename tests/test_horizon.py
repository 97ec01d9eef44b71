"""Horizon modes: exact positives, uniform random k (chi-square), the NHG law of the adaptive mode, DRIML-ada's
action-pair model, and the no-action critic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_replay import STEPS, as_numpy, frame_code, scripted

from driml_pl.adaptive import ActionPairModel, jsd_mi_loss
from driml_pl.critic import DIMCritic
from driml_pl.horizon import Horizon, continuation_probs, nhg_pmf, sample_nhg
from driml_pl.module import DRIML
from driml_pl.networks import NatureEncoder

# chi-square critical values at p = 0.001
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def all_anchors(replay):
    lo, hi = replay.valid_range()
    env = np.repeat(np.arange(replay.num_envs), hi - lo + 1)
    return env, np.tile(np.arange(lo, hi + 1), replay.num_envs)


@pytest.mark.parametrize("mode", ["fixed", "random", "adaptive"])
def test_positives_are_exactly_s_t_plus_k_and_never_cross_an_episode(mode):
    horizon = Horizon(mode, 4)
    replay, log = scripted(capacity=STEPS + 5, n_step=3, max_k=horizon.max_k)
    env, t = all_anchors(replay)
    gen = torch.Generator().manual_seed(0)
    if horizon.adaptive:
        actions, valid = replay.action_window(env, t, horizon.max_k)
        k = sample_nhg(gen, continuation_probs(actions, valid, torch.full((15, 15), 0.8))).numpy()
    else:
        k = horizon.sample(gen, len(t)).numpy()
    s = as_numpy(replay.gather(env, t, k))
    assert (frame_code(s.positive_obs[:, 0]) == t + s.k).all()
    for i in range(len(t)):
        episode_ends = np.flatnonzero(log["dones"][env[i], t[i] :])
        last = t[i] + episode_ends[0] if len(episode_ends) else STEPS
        assert s.k[i] == min(k[i], last - t[i])  # truncated exactly at the episode's last frame
    if mode == "fixed":
        assert (k == 4).all()


def test_action_window_matches_the_script():
    replay, log = scripted(capacity=STEPS + 5, n_step=3, max_k=4)
    env, t = all_anchors(replay)
    actions, valid = replay.action_window(env, t, 4)
    firsts = np.ones((replay.num_envs, STEPS + 1), dtype=bool)
    firsts[:, 1:] = log["dones"]
    for i in range(len(t)):
        for j in range(5):
            if t[i] + j - 1 >= 0:
                assert actions[i, j] == log["actions"][env[i], t[i] + j - 1]
        assert valid[i, 0] == (not firsts[env[i], t[i]])
        for j in range(1, 4):
            assert valid[i, j] == (not log["dones"][env[i], t[i] + j - 1])


def test_random_horizon_is_uniform():
    k = Horizon("random", 4).sample(torch.Generator().manual_seed(3), 40_000).numpy()
    counts = np.bincount(k, minlength=5)[1:]
    assert k.min() == 1 and k.max() == 4
    assert chi_square(counts, np.full(4, 0.25)) < CHI2_999[3]


def test_nhg_pmf_hand_computed():
    # p = 1/2 for three pairs: raw k = 0, 1, 2, 3 with 1/2, 1/4, 1/8, 1/8; k = max(1, raw)
    np.testing.assert_allclose(nhg_pmf(np.full(3, 0.5)), [0.0, 0.75, 0.125, 0.125])
    np.testing.assert_allclose(nhg_pmf(np.array([1.0, 1.0, 0.0])), [0.0, 0.0, 1.0, 0.0])


def test_adaptive_horizon_follows_the_closed_form_nhg_law():
    rng = np.random.default_rng(0)
    matrix = rng.uniform(0.05, 0.95, size=(15, 15))
    gen = torch.Generator().manual_seed(0)
    windows = np.array([[4, 4, 4, 7, 7, 1, 1], [1, 7, 1, 7, 1, 7, 1], [9, 9, 9, 9, 9, 9, 9]])
    valid = np.ones((3, 6), dtype=bool)
    valid[1, 0] = False  # s_t starts an episode: the first pair always continues
    n = 60_000
    for row in range(3):
        probs = continuation_probs(
            torch.from_numpy(np.repeat(windows[row : row + 1], n, 0)),
            torch.from_numpy(np.repeat(valid[row : row + 1], n, 0)),
            torch.from_numpy(matrix),
        )
        k = sample_nhg(gen, probs).numpy()
        pmf = nhg_pmf(probs[0].numpy())
        counts = np.bincount(k, minlength=7)
        dof = int((pmf[1:] > 0).sum()) - 1
        assert chi_square(counts[1:], pmf[1:]) < CHI2_999[dof]
        assert k.mean() == pytest.approx((np.arange(7) * pmf).sum(), abs=0.02)


def test_jsd_loss_hand_values():
    zero = torch.zeros(4)
    assert jsd_mi_loss(zero, zero).item() == pytest.approx(0.0, abs=1e-7)
    big = torch.full((4,), 30.0)
    assert jsd_mi_loss(big, -big).item() == pytest.approx(-2 * math.log(2.0), abs=1e-6)  # the bound's maximum


def test_action_pair_model_learns_a_deterministic_successor_and_smooths_the_matrix():
    torch.manual_seed(0)
    visible = torch.zeros(15, dtype=torch.bool)
    visible[:5] = True
    model = ActionPairModel(hidden=32, decay=0.9, eps=0.05, visible=visible)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        start = torch.randint(0, 5, (64, 1))
        actions = (start + torch.arange(6)) % 5  # a' = a + 1 (mod 5), always
        loss = model.loss(actions, torch.ones(64, 5, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < -0.5  # real pairs are told apart from shuffled ones
    before = model.matrix.clone()
    model.update_matrix()
    ids = torch.arange(15)
    q = model.score(ids.repeat_interleave(15), ids.repeat(15)).view(15, 15).masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(model.matrix, 0.9 * before + 0.1 * torch.softmax(q, 1))
    for _ in range(60):
        model.update_matrix()
    succ = model.matrix[:5, :5].argmax(1)
    assert succ.tolist() == [1, 2, 3, 4, 0]
    assert model.matrix[:, 5:].max() < 0.01  # no mass on actions the game does not have
    cont = model.continuation()
    assert cont.min() >= 0.05 and cont.max() <= 0.95


def test_noact_critic_has_shared_heads_and_ignores_the_action():
    critic = DIMCritic(("gg", "lg"), rkhs_dim=128, action_conditioned=False)
    assert critic.action_encoder is None and set(critic.noact_heads) == {"gg", "lg_local", "lg_global"}
    enc = NatureEncoder(3, (64, 64), 512)
    f = enc(torch.rand(4, 3, 64, 64))
    a = critic.scores(f, torch.tensor([0, 1, 2, 3]), f)
    b = critic.scores(f, torch.tensor([5, 5, 5, 5]), f)
    torch.testing.assert_close(a["gg"], b["gg"])
    torch.testing.assert_close(a["gg"], a["gg"].T)  # one head on both sides: a symmetric critic


def test_pair_network_has_its_own_group_and_is_not_clipped():
    torch.manual_seed(0)
    model = DRIML(adaptive_horizon=True, lambda_gg=1.0, obs_size=(64, 64), max_grad_norm=1e-3)
    opt = model.configure_optimizers()
    pair_ids = {id(p) for p in model.pair_model.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == pair_ids
    assert not pair_ids & {id(p) for p in opt.param_groups[0]["params"]}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.clip_driml_gradients()
    main_norm = torch.norm(torch.stack([p.grad.norm() for p in model._main_parameters()]))
    assert main_norm.item() == pytest.approx(1e-3, rel=1e-3)
    assert all((p.grad == 1).all() for p in model.pair_model.parameters())
