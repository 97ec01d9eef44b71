"""The replay stream on real Procgen: main-process only, exact budget, replay-ratio accounting."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from driml_pl.data import DRIMLDataModule
from driml_pl.data.collect import EpsilonSchedule
from driml_pl.envs import EnvConfig
from driml_pl.horizon import Horizon


class FixedActor:
    """A `types.Actor` that always picks action 0 (and a flat continuation matrix for DRIML-ada)."""

    def __init__(self, adaptive: bool) -> None:
        self.adaptive = adaptive

    def refresh(self) -> None:
        pass

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(obs), dtype=torch.int64)

    def continuation(self) -> torch.Tensor:
        return torch.full((15, 15), 0.5)


def tiny_datamodule(**overrides) -> DRIMLDataModule:
    kwargs = dict(
        env=EnvConfig(game="bigfish", num_envs=4, num_levels=20),
        total_env_steps=400,
        replay_size=800,
        batch_size=8,
        replay_ratio=2.0,
        learning_starts=40,
        n_step=3,
        updates_per_epoch=25,
        horizon=Horizon("random", 2),
    )
    kwargs.update(overrides)
    dm = DRIMLDataModule(**kwargs)
    dm.setup("fit")
    assert dm.stream is not None
    dm.stream.bind(FixedActor(dm.horizon.adaptive))
    return dm


def test_budget_is_honoured_exactly_and_updates_follow_the_replay_ratio():
    dm = tiny_datamodule()
    stream = dm.stream
    batches = []
    for _epoch in range(10):
        epoch = [b for step in stream for b in step]
        batches += epoch
        assert len(epoch) <= 25
        if stream.exhausted:
            break
    assert stream.collector.env_steps == 400
    expected = math.floor((400 - 40) * 2.0 / 8)  # 90 updates
    assert len(batches) == expected == stream.updates
    assert list(stream) == []  # nothing more once spent
    first, last = batches[0], batches[-1]
    assert first.stats.env_steps == 44  # the first update needs (44 - 40) * 2 / 8 = 1
    assert last.stats.env_steps == 400
    assert first.obs.shape == (8, 1, 64, 64, 3) and first.k.min() >= 0 and first.k.max() <= 2
    # the replay ratio holds at every batch: updates so far <= (env steps - learning starts) * ratio / batch
    for i, b in enumerate(batches):
        assert i + 1 <= (b.stats.env_steps - 40) * 2.0 / 8 < i + 1 + 4 * 2.0 / 8 + 1e-9


@pytest.mark.parametrize("start", ["fork", "forkserver"])  # forkserver: Python 3.14's default on Linux
def test_stream_refuses_to_run_in_a_dataloader_worker(start):
    """A fork worker finds itself in a worker and refuses; a forkserver (or spawn) worker would need the live envs
    pickled, and the stream refuses to be pickled with the same message."""
    dm = tiny_datamodule()
    loader = DataLoader(dm.stream, batch_size=None, num_workers=1, multiprocessing_context=start)
    with pytest.raises(RuntimeError, match=r"ReplayStream must run in the main process .*num_workers=0\)"):
        next(iter(loader))


def test_budget_must_split_into_vector_steps():
    with pytest.raises(ValueError, match="total_env_steps=402 is not a multiple"):
        tiny_datamodule(total_env_steps=402)


def test_epsilon_schedule():
    eps = EpsilonSchedule(0.1, 0.01, 100_000)
    assert eps(500, 1000) == 1.0  # warm-up is uniform random
    assert eps(1000, 1000) == pytest.approx(0.1)
    assert eps(51_000, 1000) == pytest.approx(0.055)
    assert eps(10**7, 1000) == pytest.approx(0.01)


def test_same_seed_same_batches():
    (a,) = next(iter(tiny_datamodule().stream))
    (b,) = next(iter(tiny_datamodule().stream))
    for x, y in zip(a[:7], b[:7], strict=True):
        assert (x == y).all()
    (c,) = next(iter(tiny_datamodule(seed=1).stream))
    assert not (a.obs == c.obs).all()


def test_k_minibatches_per_step_follow_the_same_schedule_as_one():
    """updates_per_batch groups the minibatches; the env steps and replay-ratio accounting stay per minibatch."""
    one = tiny_datamodule(updates_per_epoch=24)
    seven = tiny_datamodule(updates_per_epoch=24, updates_per_batch=6)
    flat_one = [b for _ in range(5) for step in one.stream for b in step]
    steps = [step for _ in range(5) for step in seven.stream]
    assert [len(step) for step in steps] == [6] * 15  # 90 updates in steps of 6
    flat_seven = [b for step in steps for b in step]
    assert len(flat_one) == len(flat_seven) == 90
    for x, y in zip(flat_one, flat_seven, strict=True):  # same policy (zeros): same data, same draws
        assert x.stats.env_steps == y.stats.env_steps
        assert (x.obs == y.obs).all() and (x.k == y.k).all()
    assert flat_seven[-1].stats.last and not flat_seven[-2].stats.last
    with pytest.raises(ValueError, match="updates_per_batch"):
        tiny_datamodule(updates_per_epoch=25, updates_per_batch=6)
