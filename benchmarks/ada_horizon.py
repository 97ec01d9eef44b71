"""DRIML-ada's horizon k over a run: batch-mean k by env-step window and the k histogram of the settled phase.

Reads the ``metrics.csv`` a run writes (``horizon/k_mean``, ``horizon/k_frac_*``, ``horizon/continuation_*`` are
means over the updates since the previous log, logged every ``trainer.log_every_n_steps`` steps) and prints one
Markdown table per run directory. The runs behind the README's figures (issue 10)::

    python -m driml_pl fit --config conf/ada_cpu.yaml --data.env.game maze --model.continuation_map sigmoid \\
        --trainer.default_root_dir runs/ada_cpu/maze/sigmoid/seed0
    python benchmarks/ada_horizon.py runs/ada_cpu/*/*/seed0
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

K_MAX = 13


def read_rows(run: Path) -> list[dict[str, float]]:
    """Logged rows with a k statistic, from every ``logs/version_*/metrics.csv`` of the run, in env-step order."""
    rows = []
    for path in sorted(run.glob("logs/version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("horizon/k_mean"):
                    rows.append({k: float(v) for k, v in row.items() if v != ""})
    if not rows:
        raise SystemExit(f"{run}: no horizon/k_mean in logs/version_*/metrics.csv (not a DRIML-ada run?)")
    return sorted(rows, key=lambda r: r["rollout/env_steps"])


def mean(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return sum(values) / len(values) if values else math.nan


def summarise(run: Path, window: int, settled_from: int) -> str:
    rows = read_rows(run)
    last = int(rows[-1]["rollout/env_steps"])
    lines = [f"### {run}", "", "| env steps | batch-mean k | continuation mean | continuation of repeats | return |",
             "|---|---|---|---|---|"]  # fmt: skip
    for lo in range(0, last, window):
        part = [r for r in rows if lo < r["rollout/env_steps"] <= lo + window]
        if part:
            lines.append(
                f"| {lo // 1000}k-{(lo + window) // 1000}k | {mean(part, 'horizon/k_mean'):.2f} "
                f"| {mean(part, 'horizon/continuation_mean'):.3f} | {mean(part, 'horizon/continuation_repeat'):.3f} "
                f"| {mean(part, 'rollout/episode_return'):.2f} |"
            )
    settled = [r for r in rows if r["rollout/env_steps"] > settled_from]
    hist = [mean(settled, f"horizon/k_frac_{j}") for j in range(K_MAX + 1)]
    lines += ["", f"k histogram after {settled_from // 1000}k env steps (share of samples; k = 0 is left out of "
              "the InfoNCE loss):", "", "| k | " + " | ".join(str(j) for j in range(K_MAX + 1)) + " |",
              "|---" * (K_MAX + 2) + "|", "| share | " + " | ".join(f"{h:.3f}" for h in hist) + " |", "",
              f"batch-mean k after {settled_from // 1000}k: {mean(settled, 'horizon/k_mean'):.2f}", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (trainer.default_root_dir)")
    parser.add_argument("--window", type=int, default=50_000, help="env steps per row of the k-over-time table")
    parser.add_argument("--settled-from", type=int, default=100_000, help="env steps before the histogram's phase")
    args = parser.parse_args()
    for run in args.runs:
        print(summarise(run, args.window, args.settled_from))


if __name__ == "__main__":
    main()
