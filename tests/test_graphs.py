"""model.cuda_graphs: the captured update and the captured acting forward compute what the op-by-op ones do.

On the CPU the same step functions run op by op (tests/test_hot_loop.py checks whole runs bitwise); the tests marked
``cuda`` capture real graphs and run only where a GPU is present (`benchmarks/bench_gpu.sh` runs them)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from driml_pl.learner import DRIML
from driml_pl.learner.graphs import StepGraph
from driml_pl.learner.update import CapturedUpdate, EagerUpdate
from driml_pl.types import Batch, RolloutStats

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_on_the_cpu_a_step_graph_runs_its_function_at_every_call():
    calls = []
    x = torch.zeros(3)

    def step() -> torch.Tensor:
        calls.append(1)
        return x.add_(1.0)

    graph = StepGraph(step, torch.device("cpu"), warmup=1)
    for _ in range(5):
        out = graph()
    assert len(calls) == 5 and not graph.captured
    assert out.tolist() == [5.0, 5.0, 5.0]


def _batches(n: int, b: int, device: str) -> list[Batch]:
    """``n`` different minibatches (a fixed seed), as the replay stream hands them out."""
    gen = torch.Generator().manual_seed(0)

    def frames() -> torch.Tensor:
        return torch.randint(0, 256, (b, 1, 64, 64, 3), dtype=torch.uint8, generator=gen).to(device)

    def one() -> Batch:
        return Batch(
            frames(), torch.randint(0, 15, (b,), generator=gen).to(device), torch.randn(b, generator=gen).to(device),
            torch.full((b,), 0.99**3, device=device), frames(), frames(),
            torch.randint(0, 3, (b,), generator=gen).to(device), RolloutStats(0, 0, math.nan, math.nan, 0.1),
        )  # fmt: skip

    return [one() for _ in range(n)]


class _Minibatches(IterableDataset):
    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[Batch, ...]]:
        for batch in self.batches:
            yield (batch,)


def _fit(device: str, cuda_graphs: bool, compile: bool, batches: list[Batch]) -> DRIML:
    pl.seed_everything(0)
    model = DRIML(obs_size=(64, 64), feature_dim=64, rkhs_dim=32, lambda_ll=1.0, target_update_interval=3,
                  compile=compile, cuda_graphs=cuda_graphs)  # fmt: skip
    trainer = pl.Trainer(accelerator=device, devices=1, max_steps=len(batches), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, log_every_n_steps=1)  # fmt: skip
    trainer.fit(model, DataLoader(_Minibatches(batches), batch_size=None, collate_fn=lambda b: b))
    return model


@pytest.mark.parametrize(
    ("device", "compile"),
    [("cpu", False), pytest.param("gpu", False, marks=cuda), pytest.param("gpu", True, marks=cuda)],
    ids=["cpu", "gpu-eager", "gpu-compiled"],
)
def test_captured_update_matches_the_op_by_op_update(device, compile):
    """Ten updates with different minibatches (on a GPU: three eager warm-ups, the capture, six replays), target
    syncs in between: the weights and Adam's state end where the op-by-op update's do; bitwise on the CPU, where the
    same ops run in the same order."""
    batches = _batches(10, 32, "cuda" if device == "gpu" else "cpu")
    graphed = _fit(device, True, compile, batches)
    reference = _fit(device, False, compile, batches)
    assert graphed.global_step == reference.global_step == 10
    assert isinstance(graphed.runner, CapturedUpdate) and isinstance(reference.runner, EagerUpdate)
    assert graphed.runner.graph is not None and graphed.runner.graph.captured == (device == "gpu")
    tol = {"rtol": 0.0, "atol": 0.0} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-5}
    for (name, a), b in zip(graphed.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, **tol, msg=name)
    adam_a, adam_b = graphed.optimizers().optimizer.state, reference.optimizers().optimizer.state
    assert len(adam_a) == len(adam_b) > 10
    for p_a, p_b in zip(graphed.parameters(), reference.parameters(), strict=True):
        assert adam_a[p_a].keys() == adam_b[p_b].keys()
        for key, value in adam_a[p_a].items():
            torch.testing.assert_close(value, adam_b[p_b][key], **tol)


@cuda
@torch.no_grad()
def test_captured_acting_follows_the_snapshot_the_learner_refreshes_on_a_gpu():
    """The acting graph reads the actors' snapshot in place: after each refresh it acts as the eager forward does."""
    torch.manual_seed(0)
    model = DRIML(obs_size=(64, 64), feature_dim=64, cuda_graphs=True).cuda()
    for i in range(8):  # 3 eager warm-ups, then the capture and replays
        for p in model.online.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.acting.refresh()
        obs = torch.randint(0, 256, (16, 1, 64, 64, 3), dtype=torch.uint8, device="cuda")
        greedy = model.acting.act(obs)
        assert torch.equal(greedy, model.acting._greedy(obs).cpu()), i
    assert model.acting._graph is not None and model.acting._graph.captured


def test_a_checkpoint_of_a_captured_run_loads_without_its_capture_flag():
    """Adam's ``capturable`` flag records how the writing run stepped (a capture sets it), not training state: a run
    resuming from its checkpoint, captured or not, starts from ``False`` (so an eager GPU run does not take the
    capturable path, and a captured one sets it again right before its capture)."""
    model = DRIML(obs_size=(64, 64), feature_dim=64)
    adam = model.configure_optimizers()
    adam.mark_capturable()
    checkpoint = {"global_step": 3, "optimizer_states": [adam.state_dict()]}
    assert all(group["capturable"] for group in checkpoint["optimizer_states"][0]["param_groups"])
    model.on_load_checkpoint(checkpoint)
    resumed = model.configure_optimizers()
    resumed.load_state_dict(checkpoint["optimizer_states"][0])
    assert [group["capturable"] for group in resumed.param_groups] == [False]
