"""The table `validate` and `test` print: one evaluation next to the paper's number for the game and method."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table


def level_range(start: int, count: int) -> str:
    """``"0-499"`` for 500 levels from 0; ``"all"`` for the full distribution (``num_levels: 0``)."""
    return f"{start}-{start + count - 1}" if count > 0 else "all"


def eval_table(metrics: Mapping[str, Any], prefix: str, config: Mapping[str, Any], ckpt: str | None = None) -> Table:
    """A Rich table of one evaluation: training vs held-out levels, mean +- std (np.std, ddof 0), episodes, capped
    episodes, and the paper's number (spec §7.1, training levels after 50M env steps) for the game and method."""
    from driml_pl.tools.runs import PAPER_TABLE, classify

    data = config.get("data", {})
    env = data.get("env", {})
    game = str(env.get("game", "?"))
    try:
        method = classify(config)
    except ValueError:
        method = "?"
    paper = PAPER_TABLE.get(game, {}).get(method)
    start, count = int(env.get("start_level", 0)), int(env.get("num_levels", 0))
    held = int(data.get("eval_test_levels", 0))
    ranges = {
        "train_levels": ("training levels", level_range(start, count)),
        "test_levels": ("held-out levels", level_range(start + count, held) if held > 0 else "all"),
    }
    table = Table(title=f"{game}, {method}: {ckpt or 'current weights'}")
    for column in ("levels", "level seeds", "episodes", "capped", "return (mean +- std)", "paper (50M steps)"):
        table.add_column(column, justify="left" if column.startswith("level") else "right")
    for name, (label, seeds) in ranges.items():
        key = f"{prefix}/{name}"
        if f"{key}_episodes" not in metrics:
            continue
        mean, std = metrics.get(f"{key}_return"), metrics.get(f"{key}_return_std")
        shown = f"{float(mean):.2f} +- {float(std):.2f}" if mean is not None and std is not None else "-"
        reference = f"{paper[0]:.2f} +- {paper[1]:.2f}" if paper and name == "train_levels" else "-"
        episodes, capped = int(metrics[f"{key}_episodes"]), int(metrics[f"{key}_capped"])
        table.add_row(label, seeds, str(episodes), str(capped), shown, reference)
    return table
