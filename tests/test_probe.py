"""model.probe: each loss term's gradient, measured apart from the update, equals what a backward of that term alone
writes; the greedy-action statistics are the histogram's; and a run with the probe trains bitwise as one without."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from test_checkpoint import assert_same_run, fit, logged
from test_graphs import _batches, _Minibatches
from torch.utils.data import DataLoader

from driml_pl.learner import DRIML
from driml_pl.learner.objective import UpdateInputs, core_losses, q_values
from driml_pl.learner.probe import probe
from driml_pl.networks import preprocess


def _model() -> DRIML:
    torch.manual_seed(0)
    return DRIML(obs_size=(64, 64), feature_dim=64, rkhs_dim=32, lambda_gg=0.5, lambda_ll=2.0)


def _alone(model: DRIML, inputs: UpdateInputs, key: str, weight: float, params: list[torch.nn.Parameter]):
    """The gradient of ``weight * key`` over ``params`` from an ordinary backward of that term alone."""
    model.zero_grad(set_to_none=True)
    x = inputs
    out = core_losses(model, x.obs, x.action, x.returns, x.discount, x.next_obs, x.positive_obs, (x.k > 0).float())
    (weight * out[key]).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    model.zero_grad(set_to_none=True)
    return torch.cat([g.reshape(-1) for g in grads])


def test_probe_gradients_are_each_terms_own_backward_and_leave_the_model_untouched():
    model = _model()
    inputs = UpdateInputs.from_batch(_batches(1, 32, "cpu")[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    values = probe(model, inputs)
    assert all(p.grad is None for p in model.parameters())  # nothing written to .grad
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

    encoder = list(model.online.encoder.parameters())
    c51 = _alone(model, inputs, "c51_loss", 1.0, encoder)
    torch.testing.assert_close(values["probe/grad_encoder_c51"], c51.norm(), rtol=1e-6, atol=0.0)
    head = _alone(model, inputs, "c51_loss", 1.0, list(model.online.head.parameters()))
    torch.testing.assert_close(values["probe/grad_head_c51"], head.norm(), rtol=1e-6, atol=0.0)
    for term, weight in (("gg", 0.5), ("ll", 2.0)):
        g = _alone(model, inputs, f"nce_{term}", weight, encoder)
        assert g.norm() > 0
        torch.testing.assert_close(values[f"probe/grad_encoder_{term}"], g.norm(), rtol=1e-6, atol=0.0)
        cos = torch.dot(c51, g) / (c51.norm() * g.norm())
        torch.testing.assert_close(values[f"probe/grad_cos_c51_{term}"], cos, rtol=1e-5, atol=1e-6)
        own = [p for n, p in model.critic.named_parameters() if f"heads.{term}." in n or n.startswith("action_")]
        critic = _alone(model, inputs, f"nce_{term}", weight, own)
        torch.testing.assert_close(values[f"probe/grad_critic_{term}"], critic.norm(), rtol=1e-6, atol=0.0)
    assert "probe/grad_encoder_lg" not in values  # only the active terms


def test_probe_action_statistics_are_the_greedy_histograms():
    model = _model()
    inputs = UpdateInputs.from_batch(_batches(1, 32, "cpu")[0])
    values = probe(model, inputs)
    with torch.no_grad():
        q = q_values(model.online(preprocess(inputs.obs, model.obs_size))[1], model.support)
    counts = torch.bincount(q.argmax(-1), minlength=15).double()
    frac = counts / 32
    assert [values[f"probe/greedy_frac_{a}"].item() for a in range(15)] == pytest.approx(frac.tolist(), abs=1e-7)
    entropy = -sum(f * math.log(f) for f in frac.tolist() if f > 0)
    assert values["probe/greedy_entropy"].item() == pytest.approx(entropy, rel=1e-6)
    assert values["probe/greedy_top_frac"].item() == pytest.approx(frac.max().item(), abs=1e-7)
    ordered = q.sort(-1, descending=True).values
    assert values["probe/action_gap"].item() == pytest.approx((ordered[:, 0] - ordered[:, 1]).mean().item(), rel=1e-5)
    assert values["probe/q_mean"].item() == pytest.approx(q.mean().item(), rel=1e-6)


def _fit(tmp_path: Path, probe_on: bool) -> DRIML:
    """Twelve updates on fixed minibatches, logged at every step (so the probe runs at every one)."""
    pl.seed_everything(0)
    model = DRIML(obs_size=(64, 64), feature_dim=64, rkhs_dim=32, lambda_gg=1.0, target_update_interval=3,
                  probe=probe_on)  # fmt: skip
    logger = CSVLogger(tmp_path, name=f"probe{probe_on}")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=12, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         log_every_n_steps=1)  # fmt: skip
    trainer.fit(model, DataLoader(_Minibatches(_batches(12, 16, "cpu")), batch_size=None, collate_fn=lambda b: b))
    logger.save()
    return model


def test_the_probe_leaves_the_updates_bitwise_as_they_were(tmp_path: Path):
    """In process: weights and Adam's state after 12 updates with the probe at every one equal those without."""
    probed, plain = _fit(tmp_path, True), _fit(tmp_path, False)
    for (name, a), b in zip(probed.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    adam_a, adam_b = probed.optimizers().optimizer.state, plain.optimizers().optimizer.state
    for p_a, p_b in zip(probed.parameters(), plain.parameters(), strict=True):
        for key, value in adam_a[p_a].items():
            assert torch.equal(value, adam_b[p_b][key]), key
    with next(tmp_path.glob("probeTrue/version_0/metrics.csv")).open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("probe/grad_encoder_gg")]
    assert len(rows) == 12


@pytest.mark.slow
@pytest.mark.full
def test_a_run_with_the_probe_trains_bitwise_as_one_without(straight, tmp_path: Path):
    """test_checkpoint.py's tiny DRIML run with ``--model.probe true``: the same weights, Adam state and every train/
    and rollout/ value as the session's straight run, and the probe's columns on every logged step."""
    run = tmp_path / "run"
    fit(run, "--model.probe", "true")
    assert_same_run(straight, run)
    assert logged(run) == logged(straight)
    with next(run.glob("logs/version_*/metrics.csv")).open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == len(logged(straight)) > 10
    for row in rows:
        assert float(row["probe/grad_encoder_c51"]) > 0 and float(row["probe/grad_encoder_gg"]) > 0
        assert -1.0 <= float(row["probe/grad_cos_c51_gg"]) <= 1.0
        assert sum(float(row[f"probe/greedy_frac_{a}"]) for a in range(15)) == pytest.approx(1.0, abs=1e-5)
