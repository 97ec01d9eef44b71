"""How the InfoNCE horizon k of each sample is chosen (spec §2.6): fixed, random, or adaptive (DRIML-ada).

The adaptive mode draws k from a non-homogeneous geometric (NHG) process: starting from the pair
(a_{t-1}, a_t), every consecutive action pair "continues" with probability P[a, a'] and k counts the continuations
before the first stop (at least 1, at most the cap). P comes from a learned action-pair network (see
`driml_pl.adaptive`), indexed by *effective* actions (raw Procgen actions mapped through the game's remap matrix).
When s_t starts an episode there is no a_{t-1}: the first pair averages over it (`continuation_probs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

HORIZON_MODES = ("fixed", "random", "adaptive")


@dataclass
class Horizon:
    """The InfoNCE positive is s_{t+k}.

    Args:
        mode: ``fixed`` (every sample uses ``k``; DRIML-fix), ``random`` (k uniform in {1..k} per sample;
            DRIML-randk, paper k = 2) or ``adaptive`` (NHG process, k in {1..k}; DRIML-ada, paper cap 13).
            Unlike the released code, ``fixed`` with k = 1 means s_{t+1}.
        k: the fixed horizon, the largest one for ``random``, or the cap for ``adaptive``.
    """

    mode: str = "random"
    k: int = 2

    def __post_init__(self) -> None:
        if self.mode not in HORIZON_MODES:
            raise ValueError(f"unknown horizon.mode {self.mode!r}; valid: {', '.join(HORIZON_MODES)}")
        if self.k < 1:
            raise ValueError(f"horizon.k must be >= 1, got {self.k}")

    @property
    def max_k(self) -> int:
        return self.k

    @property
    def adaptive(self) -> bool:
        return self.mode == "adaptive"

    def sample(self, gen: torch.Generator, batch_size: int) -> Tensor:
        """k for the fixed and random modes, on the generator's device (the adaptive mode needs the actions:
        `sample_nhg`)."""
        if self.mode == "fixed":
            return torch.full((batch_size,), self.k, dtype=torch.int64, device=gen.device)
        if self.mode == "random":
            return torch.randint(1, self.k + 1, (batch_size,), generator=gen, device=gen.device)
        raise ValueError("the adaptive horizon depends on the actions; use sample_nhg")


def continuation_probs(actions: Tensor, pair_valid: Tensor, matrix: Tensor, visible: Tensor | None = None) -> Tensor:
    """Per-pair continuation probabilities of the NHG process (on the device of its inputs).

    A pair that does not exist -- ``a_{t-1}`` before the episode start, or a pair after the episode's end -- has no
    previous action: it continues into ``a'`` with the mean of ``matrix[a, a']`` over the game's effective actions
    ``a`` (the previous action marginalised out, not a free continuation). After the episode's end the value does not
    matter: the positive is truncated at the episode's last frame anyway.

    Shape:
        actions: (B, K + 1) effective actions a_{t-1} .. a_{t+K-1}; pair_valid: (B, K), False where a pair does not
        exist; matrix: (A, A); visible: (A,) bool, the game's effective actions (default: all). Returns: (B, K).
    """
    probs = matrix[actions[:, :-1], actions[:, 1:]]
    start = matrix.mean(dim=0) if visible is None else (matrix * visible[:, None]).sum(0) / visible.sum()
    return torch.where(pair_valid, probs, start[actions[:, 1:]])


def sample_nhg(gen: torch.Generator, probs: Tensor) -> Tensor:
    """k = max(1, number of continuations before the first stop), for per-pair continuation probabilities.

    Shape:
        probs: (B, K). Returns: (B,) int64 in [1, K].
    """
    return nhg_from_uniforms(torch.rand(probs.shape, generator=gen, device=probs.device), probs)


def nhg_from_uniforms(uniforms: Tensor, probs: Tensor) -> Tensor:
    """`sample_nhg` with its Uniform(0, 1) draws given: pair j continues when ``uniforms[:, j] < probs[:, j]``.

    Shape:
        uniforms, probs: (B, K). Returns: (B,) int64 in [1, K].
    """
    alive = torch.cumprod((uniforms < probs).to(torch.int64), dim=1)
    return alive.sum(dim=1).clamp(min=1)


def nhg_pmf(probs: np.ndarray) -> np.ndarray:
    """Closed-form distribution of `sample_nhg` for one row of probabilities: P(k = j) for j = 0..K (P(0) = 0).

    P(raw k >= j) = prod_{tau <= j} p_tau; raw k = 0 is folded into k = 1.
    """
    survive = np.concatenate([[1.0], np.cumprod(probs)])  # P(raw k >= j), j = 0..K
    raw = survive - np.concatenate([survive[1:], [0.0]])  # P(raw k = j)
    pmf = raw.copy()
    pmf[1] += pmf[0]
    pmf[0] = 0.0
    return pmf
