"""Device-side sums of each update's scalars and of its histogram of k, read back only when logged, and the code
of the first non-finite loss term (what the finite-loss guard reads, `driml_pl.learner.guard`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

K_LOGGED = 13  # horizons logged one by one (the paper's cap for DRIML-ada)
NO_FAULT = torch.iinfo(torch.int64).max  # `DeviceMetrics.fault` while every loss term so far was finite


class DeviceMetrics:
    """Sums of the per-update scalars and of the k histogram, kept on the device; read back only when logged.

    Each update's scalars are copied into a row of a small device buffer (one copy, as the running sum was one add);
    `flush` folds the rows into the sums and, with a few element-wise ops and a minimum over all of them, into
    ``fault``: an int64 that encodes the first update with a non-finite scalar, its first such key (``loss`` ranked
    last, so a term is named when one is at fault) and whether it was NaN, +Inf or -Inf, as
    ``(update * len(keys) + slot) * 3 + kind``, and stays `NO_FAULT` while all are finite. Nothing is read back to
    the host: the buffer is flushed when full (every `ROWS` updates), when read (logs, `DRIML.check_finite`) and
    when saved. ``fault`` is never reset.
    """

    ROWS = 256

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.sums: Tensor | None = None
        self.k_hist: Tensor | None = None
        self.count = 0
        self.fault: Tensor | None = None
        self._slots: list[str] = []  # the keys in fault order
        self._rows: Tensor | None = None  # (ROWS, keys): the scalars of the updates not yet flushed
        self._row_code: Tensor | None = None  # (ROWS, keys): the fault code of each cell, less update and kind
        self._no_fault: Tensor | None = None
        self._held = 0  # rows in use
        self._first = 0  # the update of row 0

    def _build(self, device: torch.device) -> None:
        """The fault order and the buffers for ``keys``, on ``device`` (after the first update or a restore)."""
        n = len(self.keys)
        self._slots = [key for key in self.keys if key != "loss"] + [key for key in self.keys if key == "loss"]
        slots = torch.tensor([self._slots.index(key) for key in self.keys], dtype=torch.int64)
        self._row_code = (torch.arange(self.ROWS)[:, None] * n + slots[None, :]).mul_(3).to(device)
        self._rows = torch.zeros(self.ROWS, n, dtype=torch.float32, device=device)
        self._no_fault = torch.full((), NO_FAULT, dtype=torch.int64, device=device)
        if self.fault is None:
            self.fault = self._no_fault.clone()
        self._held = 0

    @staticmethod
    def row(out: dict[str, Tensor], k: Tensor) -> tuple[Tensor, Tensor]:
        """One update's scalars (``out``'s values, then the mean k) and its counts of k per logged bin: device ops
        only, so the captured update computes them inside its graph."""
        values = torch.stack([v.detach().float() for v in out.values()] + [k.float().mean()])
        bins = k.clamp(max=K_LOGGED + 1)  # a comparison, not bincount, which reads the maximum back on a GPU
        counts = (bins[:, None] == torch.arange(K_LOGGED + 2, device=k.device)).sum(0, dtype=torch.float32)
        return values, counts

    def add(self, out: dict[str, Tensor], k: Tensor, update: int) -> None:
        """`row` and `add_row` in one call (what tests and benchmarks use; the update computes its row itself)."""
        self.add_row([*out, "horizon/k_mean"], *self.row(out, k), update)

    def add_row(self, keys: list[str], values: Tensor, counts: Tensor, update: int) -> None:
        """Record one update's `row` (``keys`` name ``values``); two device ops, no read-back."""
        if self.sums is None or self.k_hist is None:
            self.keys = keys
            self.sums = torch.zeros_like(values)
            self.k_hist = torch.zeros(K_LOGGED + 2, dtype=torch.float32, device=values.device)
        if self._rows is None or self._rows.device != values.device:  # first update, or restored elsewhere
            self.sums, self.k_hist = self.sums.to(values.device), self.k_hist.to(values.device)
            self.fault = None if self.fault is None else self.fault.to(values.device)
            self._build(values.device)
        assert self._rows is not None
        if self._held and update != self._first + self._held:  # rows hold consecutive updates
            self.flush()
        if self._held == 0:
            self._first = update
        self._rows[self._held].copy_(values)
        self._held += 1
        if self._held == self.ROWS:
            self.flush()
        self.k_hist += counts
        self.count += 1

    def flush(self) -> None:
        """Fold the buffered rows into ``sums`` and ``fault`` (device ops only)."""
        if not self._held:
            return
        assert self._rows is not None and self._row_code is not None and self.sums is not None
        assert self.fault is not None and self._no_fault is not None
        rows = self._rows[: self._held]
        self.sums += rows.sum(0)
        kind = (rows > 0).long() + (rows < 0).long() * 2  # NaN 0, +Inf 1, -Inf 2 (where not finite)
        code = self._row_code[: self._held] + (kind + self._first * len(self.keys) * 3)
        code = torch.where(rows.isfinite(), self._no_fault, code)
        torch.minimum(self.fault, code.min(), out=self.fault)  # updates only grow: the first fault is kept
        self._held = 0

    def read_and_reset(self) -> dict[str, Tensor]:
        self.flush()
        if self.sums is None or self.k_hist is None or self.count == 0:
            return {}
        means = self.sums / self.count
        out = {key: means[i] for i, key in enumerate(self.keys)}
        hist = self.k_hist / self.k_hist.sum()
        for j in range(K_LOGGED + 1):
            out[f"horizon/k_frac_{j}"] = hist[j]
        out[f"horizon/k_frac_over{K_LOGGED}"] = hist[K_LOGGED + 1]
        self.sums.zero_()
        self.k_hist.zero_()
        self.count = 0
        return out

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        tensors = {"sums": self.sums, "k_hist": self.k_hist, "fault": self.fault}
        return {"keys": list(self.keys), "count": self.count, **{k: v for k, v in tensors.items() if v is not None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sums" not in state:
            return
        self.keys = list(state["keys"])
        self.count = int(state["count"])
        self.sums, self.k_hist, self.fault = state["sums"], state["k_hist"], state.get("fault")
        self._build(self.sums.device)

    def describe(self, code: int) -> tuple[int, str]:
        """A `fault` code as (update, "train/<key>=<nan|inf|-inf>")."""
        n = max(1, len(self._slots))
        update, rest = divmod(code, 3 * n)
        slot, kind = divmod(rest, 3)
        key = self._slots[slot] if slot < len(self._slots) else f"#{slot}"
        key = key if key.startswith("horizon/") else f"train/{key}"
        return update, f"{key}={('nan', 'inf', '-inf')[kind]}"
