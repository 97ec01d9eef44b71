"""Horizon modes: exact positives, uniform random k (chi-square), the NHG law of the adaptive mode, DRIML-ada's
action-pair model, and the no-action critic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_replay import STEPS, as_numpy, frame_code, scripted

from driml_pl.adaptive import ActionPairModel
from driml_pl.critic import DIMCritic
from driml_pl.horizon import Horizon, continuation_probs, nhg_pmf, sample_nhg
from driml_pl.learner import DRIML
from driml_pl.learner.update import clip_driml_gradients, main_parameters
from driml_pl.losses import jsd_mi_loss
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
    valid[1, 0] = False  # s_t starts an episode: the first pair averages over the previous action
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


def test_a_pair_without_a_previous_action_averages_over_it():
    """At an episode start there is no a_{t-1}: the first pair continues into a_t with the mean of A[., a_t] over the
    game's effective actions, not for free."""
    matrix = torch.arange(25, dtype=torch.float64).view(5, 5) / 25
    visible = torch.tensor([True, False, True, True, False])
    actions = torch.tensor([[1, 3, 3], [2, 3, 0]])
    valid = torch.tensor([[False, True], [True, True]])
    probs = continuation_probs(actions, valid, matrix, visible)
    assert probs[0, 0].item() == pytest.approx((3 + 13 + 18) / 3 / 25)  # rows 0, 2, 3 of column 3
    assert probs[0, 1].item() == pytest.approx(18 / 25)
    assert probs[1].tolist() == pytest.approx([13 / 25, 15 / 25])
    all_rows = continuation_probs(actions, valid, matrix)
    assert all_rows[0, 0].item() == pytest.approx(matrix[:, 3].mean().item())


def _train_pair_model(mapping: str, n_visible: int, successor, steps: int = 300) -> ActionPairModel:
    torch.manual_seed(0)
    visible = torch.zeros(15, dtype=torch.bool)
    visible[:n_visible] = True
    model = ActionPairModel(hidden=32, decay=0.9, eps=0.05, visible=visible, mapping=mapping)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        actions = successor(torch.randint(0, n_visible, (128, 1), generator=gen), gen, n_visible)
        loss = model.loss(actions, torch.ones(128, actions.shape[1] - 1, dtype=torch.bool), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for _ in range(80):
        model.update_matrix()
    return model


def _independent(start, gen, n):
    return torch.randint(0, n, (start.shape[0], 6), generator=gen)


def _repeat_or_switch(start, gen, n):
    """Keep the action with probability 0.8, else switch uniformly: the pair (a, a) is 4-5x more frequent than
    chance."""
    cols = [start[:, 0]]
    for _ in range(5):
        keep = torch.rand(start.shape[0], generator=gen) < 0.8
        cols.append(torch.where(keep, cols[-1], torch.randint(0, n, (start.shape[0],), generator=gen)))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("n_visible", [3, 9])
def test_sigmoid_map_gives_chance_pairs_one_half_whatever_the_number_of_actions(n_visible):
    """With independent actions the JSD critic cannot tell real pairs from shuffled ones: sigmoid(Q) -> 1/2 for
    every pair, while the row softmax gives 1/N -- the shrinkage of issue 10."""
    block = slice(0, n_visible)
    sig = _train_pair_model("sigmoid", n_visible, _independent).matrix[block, block]
    soft = _train_pair_model("softmax", n_visible, _independent).matrix[block, block]
    assert (sig - 0.5).abs().max() < 0.08
    assert (soft - 1 / n_visible).abs().max() < 0.05


def test_sigmoid_map_continues_pairs_the_policy_chains_and_stops_the_others():
    model = _train_pair_model("sigmoid", 9, _repeat_or_switch)
    a = model.matrix[:9, :9]
    # at the JSD optimum sigmoid(Q) = p / (p + q): repeats 0.82 / (0.82 + 1/9) = 0.88, switches 0.022 / 0.133 = 0.17
    assert a.diagonal().min() > 0.8
    assert a[~torch.eye(9, dtype=torch.bool)].max() < 0.3
    assert model.matrix[:, 9:].max() < 1e-3  # nothing on actions the game does not have


def test_pair_loss_masks_invalid_pairs_like_an_explicit_compaction():
    torch.manual_seed(0)
    model = ActionPairModel(hidden=16)
    gen = torch.Generator().manual_seed(3)
    actions = torch.randint(0, 15, (6, 4), generator=gen)
    valid = torch.rand(6, 3, generator=gen) < 0.7
    loss = model.loss(actions, valid, torch.Generator().manual_seed(5))
    perm = torch.randperm(18, generator=torch.Generator().manual_seed(5))
    first, second, ok = actions[:, :-1].reshape(-1), actions[:, 1:].reshape(-1), valid.reshape(-1)
    pos = [i for i in range(18) if ok[i]]
    neg = [i for i in range(18) if ok[i] and ok[perm[i]]]
    with torch.no_grad():
        expected = jsd_mi_loss(model.score(first[pos], second[pos]), model.score(first[neg], second[perm[neg]]))
    torch.testing.assert_close(loss.detach(), expected)
    assert model.loss(actions, torch.zeros_like(valid)).item() == 0.0  # no pair at all: no signal


def test_run_seed_seeds_the_initial_matrix_and_the_negative_shuffle():
    def model(seed: int) -> DRIML:
        torch.manual_seed(0)
        return DRIML(obs_size=(64, 64), feature_dim=32, rkhs_dim=16, adaptive_horizon=True, seed=seed)

    a, b, a_again = model(0), model(1), model(0)
    assert not torch.equal(a.pair_model.matrix, b.pair_model.matrix)
    assert torch.equal(a.pair_model.matrix, a_again.pair_model.matrix)
    draws = {}
    for name, m in (("a", a), ("b", b), ("a_again", a_again)):
        draws[name] = torch.randperm(100, generator=m.shuffle_generator())
    assert torch.equal(draws["a"], draws["a_again"]) and not torch.equal(draws["a"], draws["b"])


def test_a_checkpoint_from_before_the_map_option_keeps_its_softmax():
    model = DRIML(obs_size=(64, 64), feature_dim=32, rkhs_dim=16, adaptive_horizon=True)
    assert model.pair_model.mapping == "sigmoid"  # the default
    model.on_load_checkpoint({"global_step": 7, "hyper_parameters": {"continuation_map": "sigmoid"}})
    assert model.pair_model.mapping == "sigmoid"
    with pytest.warns(UserWarning, match="predates model.continuation_map"):
        model.on_load_checkpoint({"global_step": 7, "hyper_parameters": {"adaptive_horizon": True}})
    assert model.pair_model.mapping == "softmax"


def test_jsd_loss_hand_values():
    zero = torch.zeros(4)
    assert jsd_mi_loss(zero, zero).item() == pytest.approx(0.0, abs=1e-7)
    big = torch.full((4,), 30.0)
    assert jsd_mi_loss(big, -big).item() == pytest.approx(-2 * math.log(2.0), abs=1e-6)  # the bound's maximum
    mask = torch.tensor([True, False, True, False])
    mixed = torch.tensor([30.0, -99.0, 30.0, 7.0])
    assert jsd_mi_loss(mixed, -mixed, mask, mask).item() == pytest.approx(-2 * math.log(2.0), abs=1e-6)


def test_action_pair_model_learns_a_deterministic_successor_and_smooths_the_matrix():
    torch.manual_seed(0)
    visible = torch.zeros(15, dtype=torch.bool)
    visible[:5] = True
    model = ActionPairModel(hidden=32, decay=0.9, eps=0.05, visible=visible, mapping="softmax")
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
    clip_driml_gradients(model)
    main_norm = torch.norm(torch.stack([p.grad.norm() for p in main_parameters(model, model.pair_model)]))
    assert main_norm.item() == pytest.approx(1e-3, rel=1e-3)
    assert all((p.grad == 1).all() for p in model.pair_model.parameters())
