"""conf/study: each method's config is conf/quickstart.yaml except for the keys docs/results.md names, so the study's
cells differ in the method alone."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from conftest import CONF

SAME_FOR_ALL = {  # what every study config changes from the quickstart
    "trainer.default_root_dir",
    "checkpoint.save_replay",
    "model.probe",
    "model.lambda_ll",
    "model.lambda_lg",
    "model.lambda_gl",  # spelled out at 0, the quickstart's default
}
METHOD = {  # what each method changes beyond that
    "c51": {"model.lambda_gg": 0.0},
    "randk": {},
    "fix": {"data.horizon": {"mode": "fixed", "k": 1}},
    "ada": {
        "data.horizon": {"mode": "adaptive", "k": 13},
        "model.pair_hidden": 64,
        "model.horizon_decay": 0.9,
        "model.continuation_map": "sigmoid",
        "model.continuation_eps": 0.05,
    },
}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ("data.horizon", "data.epsilon"):
            out |= _flat(value, f"{name}.")
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("method", list(METHOD))
def test_a_study_config_is_the_quickstart_but_for_its_method(method):
    quick = _flat(yaml.safe_load((CONF / "quickstart.yaml").read_text()))
    study = _flat(yaml.safe_load((CONF / "study" / f"{method}.yaml").read_text()))
    differs = {k for k in quick.keys() | study.keys() if quick.get(k) != study.get(k)}
    assert differs - SAME_FOR_ALL == set(METHOD[method])
    for key, value in METHOD[method].items():
        assert study[key] == value, key
    assert study["model.probe"] is True and study["checkpoint.save_replay"] is False
    assert study["trainer.default_root_dir"] == f"runs/study/{method}"
    for key in ("model.lambda_ll", "model.lambda_lg", "model.lambda_gl"):
        assert study[key] == 0.0
