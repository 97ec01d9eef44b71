"""Encoder shapes, the DIM critic's per-location scores, and the LightningModule's learning mechanics."""

from __future__ import annotations

import math

import pytest
import torch

from driml_pl.critic import DIMCritic, pairwise_scores
from driml_pl.learner import DRIML
from driml_pl.losses import infonce_loss
from driml_pl.networks import NatureEncoder, preprocess
from driml_pl.types import Batch, RolloutStats


def make_batch(b: int = 8, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)

    def frames() -> torch.Tensor:
        return torch.randint(0, 256, (b, 1, 64, 64, 3), generator=gen, dtype=torch.uint8)

    return Batch(
        obs=frames(),
        action=torch.randint(0, 15, (b,), generator=gen),
        returns=torch.randn(b, generator=gen),
        discount=torch.full((b,), 0.99**7),
        next_obs=frames(),
        positive_obs=frames(),
        k=torch.ones(b, dtype=torch.long),
        stats=RolloutStats(0, 0, float("nan"), float("nan"), 0.1),
    )


def test_encoder_shapes_match_the_paper():
    enc = NatureEncoder(3, (104, 80), 512)
    x = preprocess(torch.zeros(2, 1, 64, 64, 3, dtype=torch.uint8), (104, 80))
    assert x.shape == (2, 3, 104, 80)
    f = enc(x)
    assert f.local.shape == (2, 64, 9, 6) and f.global_.shape == (2, 512)
    assert (f.local >= 0).all()  # local = conv3 after ReLU
    assert NatureEncoder(3, (84, 84)).local_shape == (7, 7)


def test_preprocess_resizes_by_pixel_replication_and_scales():
    frames = torch.arange(64, dtype=torch.uint8).view(1, 1, 1, 64, 1).expand(1, 1, 64, 64, 3).contiguous()
    x = preprocess(frames, (104, 80))
    cols = (torch.arange(80) * 64) // 80
    torch.testing.assert_close(x[0, 0, 0], cols.float() / 255.0)
    assert preprocess(frames, (64, 64)).shape == (1, 3, 64, 64)


def test_local_terms_are_one_softmax_per_location_against_the_same_location():
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(4, 6, 3, 2, generator=gen), torch.randn(4, 6, 3, 2, generator=gen)
    s = pairwise_scores(u, v)
    assert s.shape == (6, 4, 4)
    for p in range(6):
        h, w = divmod(p, 2)
        torch.testing.assert_close(s[p], u[:, :, h, w] @ v[:, :, h, w].T)
    g = torch.randn(4, 6, generator=gen)
    torch.testing.assert_close(pairwise_scores(u, g)[5], u[:, :, 2, 1] @ g.T)  # LG: global broadcast to positions
    torch.testing.assert_close(pairwise_scores(g, v)[5], g @ v[:, :, 2, 1].T)  # GL
    # loss of a local term = mean of the per-location InfoNCE losses
    expected = sum(infonce_loss(s[p]) for p in range(6)) / 6
    torch.testing.assert_close(infonce_loss(s), expected)


def test_critic_builds_only_weighted_terms_and_scores_are_soft_clipped():
    torch.manual_seed(0)
    critic = DIMCritic(("gg", "ll"), rkhs_dim=32, clip=0.5)
    assert critic.terms == ("ll", "gg") and set(critic.anchor_heads) == {"ll", "gg"}
    enc = NatureEncoder(3, (64, 64), 512)
    f = enc(torch.rand(5, 3, 64, 64))
    scores = critic.scores(f, torch.arange(5), f)
    assert scores["gg"].shape == (5, 5) and scores["ll"].shape == (4 * 4, 5, 5)
    assert max(s.abs().max().item() for s in scores.values()) <= 0.5  # float32 tanh rounds to 1.0 past ~9
    with pytest.raises(ValueError, match="unknown DIM terms"):
        DIMCritic(("xx",))


def test_anchor_side_depends_on_the_action():
    critic = DIMCritic(("gg",), rkhs_dim=32)
    f = NatureEncoder(3, (64, 64), 512)(torch.rand(3, 3, 64, 64))
    a = critic.scores(f, torch.tensor([0, 1, 2]), f)["gg"]
    b = critic.scores(f, torch.tensor([3, 1, 2]), f)["gg"]
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])


def _count_calls(modules: dict[str, torch.nn.Module]) -> dict[str, int]:
    calls = dict.fromkeys(modules, 0)
    for name, module in modules.items():
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def test_noact_critic_has_one_head_per_term_and_ll_gg_heads_serve_both_sides():
    critic = DIMCritic(("gg", "ll"), rkhs_dim=128, action_conditioned=False)
    assert critic.action_encoder is None and not hasattr(critic, "anchor_heads")
    assert set(critic.noact_heads) == {"ll", "gg"}  # exactly two heads, one per term
    r, c, d = 128, 64, 512  # width, local channels, global width
    local_head = (c * r + r) + (r * r + r) + (c * r + r)  # 1x1 convs l1, l2 and a biased skip
    global_head = (d * r + r) + (r * r + r) + d * r  # linears l1, l2 and a bias-free skip
    assert sum(p.numel() for p in critic.parameters()) == local_head + global_head == 180_864
    calls = _count_calls(dict(critic.noact_heads.items()))
    f = NatureEncoder(3, (64, 64), 512)(torch.rand(3, 3, 64, 64))
    critic.scores(f, torch.arange(3), f)
    assert calls == {"ll": 2, "gg": 2}  # each head runs on s_t and on s_{t+k}


def test_noact_critic_shares_no_head_between_terms():
    critic = DIMCritic(("ll", "lg", "gl", "gg"), rkhs_dim=16, action_conditioned=False)
    assert list(critic.noact_heads) == ["ll", "lg_local", "lg_global", "gl_global", "gl_local", "gg"]
    params = [{id(p) for p in head.parameters()} for head in critic.noact_heads.values()]
    assert sum(len(p) for p in params) == len(set().union(*params))  # no parameter in two heads
    calls = _count_calls(dict(critic.noact_heads.items()))
    f = NatureEncoder(3, (64, 64), 512)(torch.rand(3, 3, 64, 64))
    critic.scores(f, torch.arange(3), f)
    assert calls == {"ll": 2, "lg_local": 1, "lg_global": 1, "gl_global": 1, "gl_local": 1, "gg": 2}
    assert set(DIMCritic(("gl",), rkhs_dim=16, action_conditioned=False).noact_heads) == {"gl_global", "gl_local"}


def test_noact_ll_and_gg_are_symmetric_critics_and_ignore_the_action():
    torch.manual_seed(0)
    critic = DIMCritic(("ll", "lg", "gg"), rkhs_dim=16, clip=5.0, action_conditioned=False)
    enc = NatureEncoder(3, (64, 64), 512)
    f1, f2 = enc(torch.rand(4, 3, 64, 64)), enc(torch.rand(4, 3, 64, 64))
    forward, swapped = critic.scores(f1, torch.arange(4), f2), critic.scores(f2, torch.tensor([7, 7, 7, 7]), f1)
    for term in ("ll", "gg"):  # s(x, y) = s(y, x): swapping anchors and candidates transposes the score matrix
        torch.testing.assert_close(swapped[term], forward[term].transpose(-1, -2))
    assert not torch.allclose(swapped["lg"], forward["lg"].transpose(-1, -2), atol=1e-3)  # two heads: asymmetric
    torch.testing.assert_close(critic.scores(f1, torch.tensor([7, 7, 7, 7]), f2)["lg"], forward["lg"])


def _check_uniform(w: torch.Tensor, bound: float, name: str) -> None:
    assert w.abs().max().item() <= bound, name
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03), name  # std of U(-b, b) is b / sqrt(3)


def test_noact_heads_are_kaiming_uniform_with_zero_biases_where_the_released_code_says():
    torch.manual_seed(0)
    heads = DIMCritic(("ll", "gg"), rkhs_dim=128, action_conditioned=False).noact_heads
    # ResBlock_conv: every layer kaiming_uniform_(a=0, fan_in, relu), i.e. U(-b, b) with b = sqrt(6 / fan_in), bias 0
    for layer, fan_in in (("l1", 64), ("l2", 128), ("skip", 64)):
        conv = getattr(heads["ll"], layer)
        _check_uniform(conv.weight, math.sqrt(6 / fan_in), f"ll.{layer}")
        assert torch.count_nonzero(conv.bias) == 0, f"ll.{layer}"
    # ResBlock_fc: only the bias-free skip goes through the init; its inner linears keep PyTorch's default,
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases: sqrt(6) = 2.45x narrower than the kaiming skip
    _check_uniform(heads["gg"].skip.weight, math.sqrt(6 / 512), "gg.skip")
    assert heads["gg"].skip.bias is None
    for layer, fan_in in (("l1", 512), ("l2", 128)):
        linear = getattr(heads["gg"], layer)
        _check_uniform(linear.weight, 1 / math.sqrt(fan_in), f"gg.{layer}")
        assert linear.bias.abs().max().item() <= 1 / math.sqrt(fan_in) and torch.count_nonzero(linear.bias) > 0


def test_initial_infonce_is_close_to_log_batch():
    torch.manual_seed(0)
    model = DRIML(lambda_gg=1.0, lambda_ll=1.0, obs_size=(64, 64))
    out = model.losses(make_batch(32))
    assert out["nce_gg"].item() == pytest.approx(math.log(32), abs=0.5)
    assert out["nce_ll"].item() == pytest.approx(math.log(32), abs=0.5)
    assert out["c51_loss"].item() == pytest.approx(math.log(51), abs=0.5)
    lam = model.lambdas
    total = out["c51_loss"] + lam["gg"] * out["nce_gg"] + lam["ll"] * out["nce_ll"]
    torch.testing.assert_close(out["loss"], total)


def test_gradients_reach_encoder_head_and_critic_but_not_target():
    model = DRIML(lambda_gg=1.0, lambda_lg=0.5, obs_size=(64, 64))
    model.losses(make_batch())["loss"].backward()
    for name in ("online.encoder.convs.0.weight", "online.encoder.fc.weight", "online.head.out.weight",
                 "critic.anchor_heads.gg.l1.weight", "critic.candidate_heads.lg.skip.weight",
                 "critic.action_encoder.net.skip.weight"):  # fmt: skip
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())
    opt_params = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert not opt_params & {id(p) for p in model.target.parameters()}


def test_c51_baseline_has_no_critic_and_ignores_positives():
    model = DRIML(lambda_gg=0.0, obs_size=(64, 64))
    assert model.critic.terms == () and not list(model.critic.parameters())
    batch = make_batch()
    a = model.losses(batch)["loss"]
    b = model.losses(batch._replace(positive_obs=torch.zeros_like(batch.positive_obs)))["loss"]
    torch.testing.assert_close(a, b)


def test_target_frozen_between_syncs_and_equal_after_sync():
    torch.manual_seed(0)
    model = DRIML(lambda_gg=1.0, obs_size=(64, 64), target_update_interval=3)
    opt = model.configure_optimizers()
    before = {k: v.clone() for k, v in model.target.state_dict().items()}
    for _ in range(2):
        opt.zero_grad()
        model.losses(make_batch())["loss"].backward()
        opt.step()
    for k, v in model.target.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert any(not torch.equal(v, before[k]) for k, v in model.online.state_dict().items())
    model.sync_target()
    for k, v in model.target.state_dict().items():
        torch.testing.assert_close(v, model.online.state_dict()[k])


def test_terminal_target_is_independent_of_bootstrap_frame():
    torch.manual_seed(0)
    model = DRIML(lambda_gg=0.0, obs_size=(64, 64))
    batch = make_batch()._replace(discount=torch.zeros(8))
    a = model.losses(batch)["c51_loss"]
    b = model.losses(batch._replace(next_obs=torch.zeros_like(batch.next_obs)))["c51_loss"]
    torch.testing.assert_close(a, b)


def test_act_returns_greedy_actions_of_expected_q():
    model = DRIML(lambda_gg=0.0, obs_size=(64, 64))
    obs = make_batch(6).obs
    actions = model.act(obs)
    _, logits = model.online(preprocess(obs, (64, 64)))
    expected = (torch.softmax(logits, -1) * model.support).sum(-1).argmax(-1)
    assert actions.shape == (6,) and (actions == expected).all()
