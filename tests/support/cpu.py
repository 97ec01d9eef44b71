"""The kind of CPU a float result was computed on.

Float kernels (oneDNN's convolutions, MKL's matrix products, ATen's vectorised reductions) pick their code by the
CPU's vendor, model and instruction set, and round differently from kind to kind: a run is bitwise reproducible on
one kind of CPU, not across kinds. A fixture that holds floats computed elsewhere records the kinds on which a test
saw it bitwise; on any other kind the test checks what holds everywhere (exact counters, tolerances it states).
"""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_kind() -> str:
    """``<vendor> family <f> model <m> stepping <s>, <torch's CPU capability>``, e.g. ``GenuineIntel family 6 model
    207 stepping 2, AVX512``. The capability follows ``ATEN_CPU_CAPABILITY`` (a way to compute as a smaller CPU)."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first processor is enough
    names = ("vendor_id", "cpu family", "model", "stepping")
    vendor, family, model, stepping = (fields.get(name, "?") for name in names)
    return f"{vendor} family {family} model {model} stepping {stepping}, {torch.backends.cpu.get_cpu_capability()}"
