"""How the InfoNCE horizon k of each sample is chosen (spec §2.6)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HORIZON_MODES = ("fixed", "random")


@dataclass
class Horizon:
    """The InfoNCE positive is s_{t+k}.

    Args:
        mode: ``fixed`` (every sample uses ``k``; DRIML-fix) or ``random`` (k uniform in {1..k} per sample;
            DRIML-randk, paper k = 2). Unlike the released code, ``fixed`` with k = 1 means s_{t+1}.
        k: the fixed horizon, or the largest one for ``random``.
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

    def sample(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        if self.mode == "fixed":
            return np.full(batch_size, self.k, dtype=np.int64)
        return rng.integers(1, self.k + 1, size=batch_size)
