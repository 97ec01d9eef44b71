"""The recipes of docs/architecture.md, followed for real, so they cannot go stale."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_args
from support.toy_loss import ToyDRIML, toy_loss

from driml_pl.cli import main
from driml_pl.learner.objective import UpdateInputs
from driml_pl.networks import preprocess


def rows(run: Path) -> list[dict[str, str]]:
    with next(run.glob("logs/version_0/metrics.csv")).open() as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
@pytest.mark.parametrize("cuda_graphs", ["false", "true"])
def test_an_extra_loss_with_its_own_lambda_trains_and_is_logged_through_the_cli(tmp_path, cuda_graphs):
    """The toy loss of `tests/support/toy_loss.py` through a real CLI fit (its lambda a config key): it is logged as
    ``train/toy_loss``, and ``train/loss`` is the C51 loss plus each weighted term, in both update runners."""
    run = tmp_path / "run"
    main(tiny_args(run, budget=256, **{"--model.lambda_toy": "0.5", "--model.cuda_graphs": cuda_graphs}),
         model=ToyDRIML)  # fmt: skip
    logged = rows(run)
    assert logged and all(r["train/toy_loss"] for r in logged)
    for r in logged:  # means over the same updates, so the identity holds for the logged means too
        expected = float(r["train/c51_loss"]) + float(r["train/nce_gg"]) + 0.5 * float(r["train/toy_loss"])
        assert math.isclose(float(r["train/loss"]), expected, rel_tol=1e-5), r
    saved = (run / "logs" / "version_0" / "config.yaml").read_text()
    assert "lambda_toy: 0.5" in saved


def test_the_extra_term_is_what_the_recipe_computes():
    """`ToyDRIML.objective` adds exactly ``lambda * toy_loss`` to the base objective, on the same inputs."""
    torch.manual_seed(0)
    model = ToyDRIML(lambda_toy=0.25, obs_size=(64, 64), feature_dim=32, rkhs_dim=16)
    b = 6
    frames = [torch.randint(0, 256, (b, 1, 64, 64, 3), dtype=torch.uint8) for _ in range(3)]
    inputs = UpdateInputs(frames[0], torch.randint(0, 15, (b,)), torch.rand(b), torch.full((b,), 0.9), frames[1],
                          frames[2], torch.ones(b, dtype=torch.long))  # fmt: skip
    with torch.no_grad():
        out = model.objective(inputs)
        base = super(ToyDRIML, model).objective(inputs)
        features = model.online.encoder(preprocess(frames[0], (64, 64))).global_
    assert torch.equal(out["toy_loss"], toy_loss(features))
    torch.testing.assert_close(out["loss"], base["loss"] + 0.25 * out["toy_loss"], rtol=0, atol=0)
    assert set(out) == set(base) | {"toy_loss"}
