"""conf/study: each method's config is conf/quickstart.yaml except for the keys docs/results.md names, so the study's
cells differ in the method alone."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
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


STUDY = CONF.parent / "docs" / "study"


def test_every_file_of_the_study_is_committed_not_ignored():
    """CI runs on a clean clone: a study file that git ignores (a `runs/` pattern once swallowed docs/study/runs) is on
    the dev machine and nowhere else. Each file under docs/study must be tracked, so the rebuild below reads in CI
    what it reads here."""
    root = CONF.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    files = sorted(str(p.relative_to(root)) for p in STUDY.rglob("*") if p.is_file())
    assert any("/runs/" in f for f in files), "docs/study/runs holds no files"
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=root, capture_output=True, text=True)
    assert ignored.stdout == "", f"git ignores these study files: {ignored.stdout.split()[:5]}"
    tracked = set(subprocess.run(["git", "ls-files", "docs/study"], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.split())  # fmt: skip
    untracked = [f for f in files if f not in tracked]
    assert untracked == [], f"study files not committed: {untracked[:5]} ({len(untracked)} in all)"


REPORTS = {  # each committed report: the committed run folders (globs, as the shell expands them) it is made from
    "report": ["runs"],  # part 2: the four methods, seeds 0-4
    "part3/report-c51x10": ["runs", "part3/c51"],  # part 3: the same with C51's ten seeds
    "part3/forks-report": ["part3/forks/*/nce*"],  # part 3: stalled seeds continued with lambda_gg 0 and 1
}


@pytest.mark.parametrize("report", list(REPORTS))
def test_the_committed_study_data_rebuild_its_report_byte_for_byte(tmp_path, report):
    """docs/study holds what `report` reads of every study run; each report made from it (docs/results.md's numbers)
    comes out again byte for byte: the bootstrap is seeded, so a clean clone rebuilds every number."""
    out = tmp_path / "report"
    root = CONF.parent
    dirs = [str(p.relative_to(root)) for pattern in REPORTS[report] for p in sorted(root.glob(f"docs/study/{pattern}"))]
    assert dirs, REPORTS[report]
    done = subprocess.run([sys.executable, "-m", "driml_pl", "report", *dirs, "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("report.md", "intervals.json"):
        assert (out / name).read_text() == (STUDY / report / name).read_text(), name


def _logged(run: Path) -> list[dict[str, str]]:
    with next(run.glob("logs/version_0/metrics.csv")).open() as f:
        keys = ("train/", "rollout/episode", "rollout/env_steps")
        return [{k: v for k, v in r.items() if k.startswith(keys)} for r in csv.DictReader(f) if r.get("train/loss")]


def test_part1_the_recorded_rerun_evidence_says_what_results_md_says():
    """docs/results.md, part 1: ed691bb (the commit that ran the recorded C51 seed 1 on 2026-12-01) and 038064e logged
    the same C51 seed-1 run value for value on 2026-12-07's machine; the same code computing as an AVX2 CPU did not."""
    part1 = STUDY / "part1"
    old, new = (_logged(part1 / f"avx512-{c}" / "c51" / "fruitbot" / "seed1") for c in ("ed691bb", "038064e"))
    avx2 = _logged(part1 / "as-avx2-a0c90d2" / "c51" / "fruitbot" / "seed1")
    assert len(old) == len(new) == len(avx2) == 238
    assert old == new
    same = ("rollout/episode_return", "train/c51_loss")
    assert [[r[k] for k in same] for r in avx2[:2]] == [[r[k] for k in same] for r in old[:2]]  # the first 100 updates
    assert avx2[0]["train/q_mean"] != old[0]["train/q_mean"]  # but the floats are already apart in the last digits
    assert avx2[-1]["rollout/episode_return"] != old[-1]["rollout/episode_return"]  # and the runs end apart
