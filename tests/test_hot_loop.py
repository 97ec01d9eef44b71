"""The hot loop: the compiled update equals the eager one, metrics are logged only on logging steps and at the exact
end of the budget, and the device-side accumulators give the means of what was logged."""

from __future__ import annotations

import csv
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import paper, tiny_args
from torch.utils._python_dispatch import TorchDispatchMode

from driml_pl.cli import main
from driml_pl.data import ReplayStream
from driml_pl.learner import DRIML
from driml_pl.learner.metrics import DeviceMetrics
from driml_pl.learner.objective import compile_core, core_losses
from driml_pl.networks import Features, preprocess
from driml_pl.types import Batch, RolloutStats


def fixed_batch(b: int = 16) -> Batch:
    gen = torch.Generator().manual_seed(0)

    def frames() -> torch.Tensor:
        return torch.randint(0, 256, (b, 1, 64, 64, 3), dtype=torch.uint8, generator=gen)

    return Batch(
        frames(), torch.randint(0, 15, (b,), generator=gen), torch.randn(b, generator=gen),
        torch.full((b,), 0.99**3), frames(), frames(), torch.randint(1, 3, (b,), generator=gen),
        RolloutStats(0, 0, math.nan, math.nan, 0.1),
    )  # fmt: skip


@pytest.mark.slow
def test_compiled_loss_and_gradients_equal_eager_on_cpu():
    torch.manual_seed(0)
    model = DRIML(lambda_gg=1.0, lambda_ll=0.5, obs_size=(64, 64), feature_dim=64, rkhs_dim=32)
    b = fixed_batch()
    weight = (torch.arange(16) % 5 != 0).float()  # anchors with k = 0 are left out of the InfoNCE terms
    args = (b.obs, b.action, b.returns, b.discount, b.next_obs, b.positive_obs, weight)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(fn):
        model.zero_grad(set_to_none=True)
        out = fn(*args)
        out["loss"].backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        return {k: v.detach() for k, v in out.items()}, grads

    eager, eager_grads = run(partial(core_losses, model))
    compiled, compiled_grads = run(compile_core(model, "default"))
    assert set(eager) == set(compiled) == {"c51_loss", "nce_gg", "nce_ll", "q_mean", "loss"}
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6)
    for g_compiled, g_eager in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in eager_grads)


def test_an_anchor_whose_effective_horizon_is_0_is_left_out_of_the_infonce_terms():
    """k = 0 (the last transition of an episode: no later frame in it) drops the anchor's InfoNCE term; the mean
    still divides by the batch size, and the C51 loss keeps every sample."""
    torch.manual_seed(0)
    model = DRIML(lambda_gg=1.0, lambda_ll=0.5, obs_size=(64, 64), feature_dim=64, rkhs_dim=32)
    batch = fixed_batch(8)
    k = batch.k.clone()
    k[[2, 5]] = 0
    out = model.losses(batch._replace(k=k))
    full = model.losses(batch)
    with torch.no_grad():
        feats = model.online.encoder(preprocess(torch.cat([batch.obs, batch.positive_obs]), model.obs_size))
        anchor = Features(feats.local[:8], feats.global_[:8])
        positive = Features(feats.local[8:], feats.global_[8:])
        scores = model.critic.scores(anchor, batch.action, positive)
    keep = [i for i in range(8) if i not in (2, 5)]
    for term in ("gg", "ll"):
        per_anchor = -torch.log_softmax(scores[term], dim=-1).diagonal(dim1=-2, dim2=-1)  # (..., 8)
        torch.testing.assert_close(out[f"nce_{term}"], per_anchor[..., keep].sum(-1).mean() / 8)
        torch.testing.assert_close(full[f"nce_{term}"], per_anchor.mean())
    torch.testing.assert_close(out["c51_loss"], full["c51_loss"])


def test_device_metrics_are_means_over_the_updates_since_the_last_log():
    metrics = DeviceMetrics()
    metrics.add({"c51_loss": torch.tensor(1.0), "loss": torch.tensor(3.0)}, torch.tensor([1, 1, 2, 2]), 1)
    metrics.add({"c51_loss": torch.tensor(2.0), "loss": torch.tensor(5.0)}, torch.tensor([1, 2, 2, 15]), 2)
    out = metrics.read_and_reset()
    assert out["c51_loss"].item() == pytest.approx(1.5)
    assert out["loss"].item() == pytest.approx(4.0)
    assert out["horizon/k_mean"].item() == pytest.approx((1.5 + 5.0) / 2)  # exact k, not the capped bucket
    assert out["horizon/k_frac_1"].item() == pytest.approx(3 / 8)
    assert out["horizon/k_frac_2"].item() == pytest.approx(4 / 8)
    assert out["horizon/k_frac_over13"].item() == pytest.approx(1 / 8)
    assert metrics.read_and_reset() == {}  # reset: nothing accumulated since


# ops that make a GPU wait for the host: a read back, or an output whose size depends on the data
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "is_nonzero", "equal", "item")


class _SyncProbe(TorchDispatchMode):
    """Records every dispatched op that would stall a CUDA stream (also seen on the CPU, where nothing stalls)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops += 1
        name = str(func)
        bool_index = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args
            if isinstance(a, list | tuple)
            for i in a
        )
        if bool_index or any(op in name for op in SYNC_OPS):
            self.seen.append(name + (" (boolean mask)" if bool_index else ""))
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
@pytest.mark.parametrize("cuda_graphs", ["false", "true"])
def test_the_hot_loop_has_no_host_device_sync(run_dir, monkeypatch, cuda_graphs):
    """Issue 7 part 5, checked on the CPU: the data path (`next_batches`) and the update (`DRIML.update`) dispatch no
    op that reads a value back or sizes an output by the data -- under DRIML-ada, whose pair loss used a boolean mask,
    op by op and as the update model.cuda_graphs captures on a GPU. (Logging steps and the CPU-only finiteness check
    run outside both and may read back.)"""
    probe = _SyncProbe()
    for owner, name in ((ReplayStream, "next_batches"), (DRIML, "update")):
        original = getattr(owner, name)

        def probed(self, *args, _original=original, **kwargs):  # noqa: ANN001, ANN202
            with probe:
                return _original(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, probed)
    main(tiny_args(run_dir, budget=256, config=paper("ada"),
                   **{"--model.compile": "false", "--model.cuda_graphs": cuda_graphs}))  # fmt: skip
    assert probe.ops > 1000  # the probe saw the hot loop
    assert probe.seen == []


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    (csv_path,) = run_dir.glob("logs/version_*/metrics.csv")
    with csv_path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_metrics_are_logged_on_logging_steps_and_at_the_exact_budget(run_dir):
    # 8 envs, batch 16, ratio 2: one update per vector step after 64 warm-up steps; 456 steps -> 49 updates
    main(tiny_args(run_dir, budget=456, **{"--trainer.log_every_n_steps": "10", "--data.updates_per_epoch": "100"}))
    rows = [r for r in read_metrics(run_dir) if r.get("train/c51_loss")]
    steps = [int(r["step"]) for r in rows]
    assert steps == [9, 19, 29, 39, 48]  # Lightning's logging steps (every 10th update) and the last update
    last = rows[-1]
    assert float(last["rollout/env_steps"]) == 456  # the metrics at the exact budget are written
    assert float(last["horizon/k_frac_1"]) + float(last["horizon/k_frac_2"]) == pytest.approx(1.0)
    assert 1.0 <= float(last["horizon/k_mean"]) <= 2.0


@pytest.mark.slow
def test_compiled_sampling_trains_exactly_like_the_eager_sampling(tmp_path):
    """data.compile_sampling changes how a minibatch is gathered, not what: the same run ends with the same weights."""
    weights = []
    for name, flag in (("eager", "false"), ("compiled", "true")):
        run = tmp_path / name
        main(tiny_args(run, budget=256, config=paper("ada"),
                       **{"--model.compile": "false", "--data.compile_sampling": flag}))  # fmt: skip
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        weights.append(ckpt["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_the_captured_update_trains_exactly_like_the_op_by_op_update(tmp_path):
    """model.cuda_graphs on the CPU runs the captured update's function (and the captured acting's) op by op: a whole
    DRIML-ada run (pair loss with its shuffle, A, target syncs, acting) ends with the same weights and Adam state."""
    ckpts = []
    for flag in ("false", "true"):
        run = tmp_path / flag
        main(tiny_args(run, budget=256, config=paper("ada"),
                       **{"--model.compile": "false", "--model.cuda_graphs": flag}))  # fmt: skip
        ckpts.append(torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True))
    a, b = ckpts
    assert a["global_step"] == b["global_step"] == 24
    assert a["hyper_parameters"]["cuda_graphs"] is False and b["hyper_parameters"]["cuda_graphs"] is True
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert state_a.keys() == state_b.keys()
    for i, moments in state_a.items():
        for key, value in moments.items():
            torch.testing.assert_close(state_b[i][key], value, rtol=0, atol=0, msg=f"{i}.{key}")
    # the metrics' row is computed inside the captured update: every logged loss, k and rollout value is the same
    logged = [[{k: v for k, v in row.items() if k.split("/")[0] in ("train", "horizon", "rollout")}
               for row in read_metrics(tmp_path / flag)] for flag in ("false", "true")]  # fmt: skip
    assert len(logged[0]) > 20 and any("train/pair_loss" in row for row in logged[0])
    assert logged[0] == logged[1]
