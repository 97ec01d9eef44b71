"""Per-game action-remapping matrices for Procgen (spec §5.3).

Procgen always exposes 15 raw actions (the nine stick directions, 0-8, then the keys D, A, W, S, Q, E, 9-14), but in
most games several of them behave identically. The remapping matrix sends every raw action to the "effective" action
it is equivalent to: entry ``M[raw, effective]`` is 1 and all other entries of that row are 0. Only DRIML-ada uses it,
to build hybrid action ids for its action-transition matrix and horizon sampler; Q-learning, the NCE action encoder
and action selection all work on the raw 15 actions.
"""

from __future__ import annotations

import numpy as np

from driml_pl.envs import GAMES, NUM_ACTIONS

_KEYS = range(9, 15)  # D, A, W, S, Q, E
_KEYS_BUT_FIRST = range(10, 15)  # A, W, S, Q, E (key 9 = D is the game's special move)


def _to_noop(raws: range | tuple[int, ...]) -> dict[int, int]:
    return dict.fromkeys(raws, 4)


# Raw -> effective overrides of the identity, grouped as in the spec's table.
_NO_KEYS = _to_noop(_KEYS)
_ONE_KEY = _to_noop(_KEYS_BUT_FIRST)
_NO_DOWN = {0: 1, 3: 4, 6: 7, **_to_noop(_KEYS)}
_HORIZONTAL_ONLY = {0: 1, 2: 1, 3: 4, 5: 4, 6: 7, 8: 7, **_to_noop(_KEYS_BUT_FIRST)}
_NO_DIAGONALS = {0: 1, 2: 1, 6: 7, 8: 7, **_to_noop(_KEYS)}
_NINJA = {0: 1, 3: 4, 6: 7, 13: 4, 14: 4}

_OVERRIDES: dict[str, dict[int, int]] = {
    "bigfish": _NO_KEYS,
    "chaser": _NO_KEYS,
    "coinrun": _NO_KEYS,
    "heist": _NO_KEYS,
    "leaper": _NO_KEYS,
    "bossfight": _ONE_KEY,
    "caveflyer": _ONE_KEY,
    "dodgeball": _ONE_KEY,
    "climber": _NO_DOWN,
    "jumper": _NO_DOWN,
    "fruitbot": _HORIZONTAL_ONLY,
    "plunder": _HORIZONTAL_ONLY,
    "maze": _NO_DIAGONALS,
    "miner": _NO_DIAGONALS,
    "ninja": _NINJA,
    "starpilot": {},
}
assert set(_OVERRIDES) == set(GAMES), "every Procgen game needs a remapping entry"


def _check_game(game: str) -> None:
    if game not in _OVERRIDES:
        raise ValueError(f"unknown game {game!r}; valid games: {', '.join(GAMES)}")


def effective_actions(game: str) -> np.ndarray:
    """Map every raw Procgen action to the effective action it behaves like.

    Args:
        game: one of the 16 Procgen games.

    Returns:
        An int64 array of shape (15,) whose entry ``raw`` is the effective action index (itself an index in 0-14).

    Raises:
        ValueError: if ``game`` is not a Procgen game.
    """
    _check_game(game)
    mapping = np.arange(NUM_ACTIONS, dtype=np.int64)
    for raw, effective in _OVERRIDES[game].items():
        mapping[raw] = effective
    return mapping


def action_remap_matrix(game: str) -> np.ndarray:
    """The 15x15 0/1 remapping matrix of spec §5.3 (``make_procgen_action_matrix`` in the released code).

    Args:
        game: one of the 16 Procgen games.

    Returns:
        An int64 array ``M`` of shape (15, 15) with ``M[raw, effective] = 1`` and zeros elsewhere; every row holds
        exactly one 1. It is the identity except for the game's redundant raw actions.

    Raises:
        ValueError: if ``game`` is not a Procgen game.
    """
    mapping = effective_actions(game)
    matrix = np.zeros((NUM_ACTIONS, NUM_ACTIONS), dtype=np.int64)
    matrix[np.arange(NUM_ACTIONS), mapping] = 1
    return matrix


def visible_mask(effective: np.ndarray) -> np.ndarray:
    """(15,) bool: which action ids are effective ones, for a raw -> effective map such as `effective_actions`."""
    mask = np.zeros(NUM_ACTIONS, dtype=bool)
    mask[np.asarray(effective)] = True
    return mask


def num_visible_actions(game: str) -> int:
    """Number of distinct effective actions N_vis: the count of non-empty columns of the remapping matrix.

    Args:
        game: one of the 16 Procgen games.

    Returns:
        N_vis, e.g. 9 for bigfish and 15 for starpilot.

    Raises:
        ValueError: if ``game`` is not a Procgen game.
    """
    return int(visible_mask(effective_actions(game)).sum())
