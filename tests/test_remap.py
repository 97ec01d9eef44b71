"""The per-game action-remapping matrices against the spec §5.3 table, written out by hand per game."""

from __future__ import annotations

import numpy as np
import pytest

from driml_pl.envs import GAMES
from driml_pl.remap import action_remap_matrix, effective_actions, num_visible_actions

# Every raw action that is not the identity, copied game by game from the spec table (no shared helpers on purpose).
EXPECTED: dict[str, dict[int, int]] = {
    "bigfish": {9: 4, 10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "chaser": {9: 4, 10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "coinrun": {9: 4, 10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "heist": {9: 4, 10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "leaper": {9: 4, 10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "bossfight": {10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "caveflyer": {10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "dodgeball": {10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "climber": {0: 1, 3: 4, 6: 7, 9: 4, 10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "jumper": {0: 1, 3: 4, 6: 7, 9: 4, 10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "fruitbot": {0: 1, 2: 1, 3: 4, 5: 4, 6: 7, 8: 7, 10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "plunder": {0: 1, 2: 1, 3: 4, 5: 4, 6: 7, 8: 7, 10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "maze": {0: 1, 2: 1, 6: 7, 8: 7, 9: 4, 10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "miner": {0: 1, 2: 1, 6: 7, 8: 7, 9: 4, 10: 4, 11: 4, 12: 4, 13: 4, 14: 4},
    "ninja": {0: 1, 3: 4, 6: 7, 13: 4, 14: 4},
    "starpilot": {},
}


def test_expected_table_covers_all_games() -> None:
    assert set(EXPECTED) == set(GAMES)
    assert len(GAMES) == 16


@pytest.mark.parametrize("game", GAMES)
def test_matrix_matches_spec_table(game: str) -> None:
    expected = np.eye(15, dtype=np.int64)
    for raw, effective in EXPECTED[game].items():
        expected[raw] = 0
        expected[raw, effective] = 1
    matrix = action_remap_matrix(game)
    assert matrix.shape == (15, 15)
    np.testing.assert_array_equal(matrix, expected)
    assert set(np.unique(matrix).tolist()) <= {0, 1}
    np.testing.assert_array_equal(matrix.sum(axis=1), np.ones(15))


@pytest.mark.parametrize("game", GAMES)
def test_effective_actions_agree_with_matrix(game: str) -> None:
    mapping = effective_actions(game)
    assert mapping.shape == (15,)
    np.testing.assert_array_equal(mapping, action_remap_matrix(game).argmax(axis=1))
    for raw in range(15):
        assert mapping[raw] == EXPECTED[game].get(raw, raw)


@pytest.mark.parametrize(
    ("game", "n_vis"),
    [
        ("bigfish", 9),  # 0-8
        ("starpilot", 15),  # everything distinct
        ("bossfight", 10),  # 0-8 and key 9
        ("fruitbot", 4),  # LEFT 1, no-op 4, RIGHT 7, key 9
        ("plunder", 4),
        ("climber", 6),  # 1, 2, 4, 5, 7, 8
        ("maze", 5),  # 1, 3, 4, 5, 7
        ("ninja", 10),  # 1, 2, 4, 5, 7, 8, keys 9-12
    ],
)
def test_num_visible_actions(game: str, n_vis: int) -> None:
    assert num_visible_actions(game) == n_vis


def test_unknown_game_names_it_and_lists_valid_ones() -> None:
    for fn in (action_remap_matrix, effective_actions, num_visible_actions):
        with pytest.raises(ValueError, match="pong") as info:
            fn("pong")
        assert "bigfish" in str(info.value) and "starpilot" in str(info.value)
