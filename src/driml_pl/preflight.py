"""What a run will hold, against what the machine has free: checked before anything is built or written (issue 26.2).

`fit` calls `check_fit` from its argument checks (`driml_pl.cli`), after the settings are parsed and before the
trainer, the model or a file exists; ``grid``'s task calls `check_packed` before it starts the runs it packs on one
machine (`driml_pl.tools.launch.run_task`). A shortfall is one line, exit 2:

    data.replay_size=3000000 does not fit in host memory: the run needs 38.0 GB (replay 36.9 GB, model and
    optimizer 0.1 GB, margin 1.1 GB), 21.3 GB are free (MemAvailable); data.replay_size=1,640,000 would fit

What a run holds (`Need`), per process (a DDP rank; a one-device run is one process):

- the replay: its share of ``data.replay_size`` (`driml_pl.data.replay.replay_bytes`: 12,295 B per transition),
  in host memory or, when ``data.replay_device`` puts it there, on the process's GPU;
- the model and its optimizer: every parameter (online, target, actor, critic) in float32, and for each trainable
  one its gradient and Adam's two moments; counted on the meta device from the run's own ``model`` settings;
- a margin (`MARGIN`): the Python process, torch, Lightning, Procgen and the learner's working memory. On the dev
  machine a quickstart fit's peak resident memory beyond its replay was 0.85-0.92 GB (docs/measurements.md), hence
  1 GiB. On a GPU the same 1 GiB stands for the CUDA context and the allocator's working set: not measured yet (no GPU
  was lent to the session that wrote this).

What the machine has free (`host_free`, `gpu_free`):

- host: the least of ``MemAvailable`` (/proc/meminfo), the cgroup's limit less its usage (cgroup v2
  ``memory.max``/``memory.current`` of this process's cgroup and its ancestors; v1 ``memory.limit_in_bytes``), and,
  per process, ``RLIMIT_AS`` less this process's address space (VmSize);
- GPU: ``torch.cuda.mem_get_info`` of each device the run's ranks use.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARGIN = 1 << 30  # bytes per process beyond its replay, model and optimizer (see the module docstring)
GB = 1e9
MEMINFO = Path("/proc/meminfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class PreflightError(ValueError):
    """A run that cannot start on this machine: one line, exit 2 (`driml_pl.cli.main`)."""


@dataclass(frozen=True)
class Free:
    """Bytes free in one place and where the figure comes from (``MemAvailable``, ``the cgroup's memory.max``,
    ``RLIMIT_AS``, ``torch.cuda.mem_get_info``); ``per_process``: a limit each process has on its own."""

    bytes: int
    source: str
    per_process: bool = False


@dataclass(frozen=True)
class Need:
    """What one process of a run holds: replay, model and optimizer, margin (bytes), and where its replay lives."""

    replay: int
    model: int
    margin: int = MARGIN
    replay_on_gpu: bool = False
    gpu: int | None = None  # the CUDA device index of the process, when the learner is on a GPU


@dataclass(frozen=True)
class Plan:
    """A run's processes on this machine, with the settings that size them.

    Attributes:
        replay_size: ``data.replay_size`` (global: split over the ranks).
        num_envs: ``data.env.num_envs`` (global).
        world: the run's processes in all (devices x nodes).
        needs: one `Need` per process on this machine (``trainer.devices`` of them).
    """

    replay_size: int
    num_envs: int
    world: int
    needs: list[Need] = field(default_factory=list)


def _capacity(replay_size: int, num_envs: int, world: int) -> int:
    """Slots per env of each rank's ring, as `driml_pl.data.datamodule.DRIMLDataModule.setup` sizes it."""
    return replay_size // world // max(1, num_envs // world)


def model_bytes(model_class: Callable[..., Any], model_args: Mapping[str, Any]) -> int:
    """Parameters in float32, plus a gradient and Adam's two moments per trainable one, of ``model_class(**args)``
    built on the meta device (no memory, no time)."""
    import torch

    with torch.device("meta"):
        model = model_class(**model_args)
    params = list(model.parameters())
    held = sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return held + 3 * trainable


def _devices(devices: Any, accelerator: str) -> list[int | None]:
    """The device of each process ``trainer.devices`` starts on this machine: CUDA indices on a GPU, None on the CPU."""
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and _cuda_available())
    if not gpu:
        if isinstance(devices, list):
            return [None] * len(devices)
        return [None] * (1 if devices in ("auto", None, -1, "-1") else max(1, int(devices)))
    if isinstance(devices, list):
        return [int(d) for d in devices]
    if isinstance(devices, str) and "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()]
    count = _cuda_count() if devices in ("auto", -1, "-1") else int(devices)
    return list(range(count))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def plan_run(config: Mapping[str, Any], model_class: Callable[..., Any]) -> Plan:
    """The `Plan` of a run from its settings as nested mappings (``trainer``, ``model``, ``data``): the parsed config
    of `fit`, or the grid's merged config files (`merged_settings`)."""
    trainer, data = config.get("trainer") or {}, config.get("data") or {}
    env = data.get("env") or {}
    devices = _devices(trainer.get("devices", "auto"), str(trainer.get("accelerator", "auto")))
    world = len(devices) * int(trainer.get("num_nodes") or 1)
    replay_size, num_envs = int(data.get("replay_size", 1_000_000)), int(env.get("num_envs", 32))
    replay_device = str(data.get("replay_device", "auto"))
    from driml_pl.data.replay import replay_bytes

    per_rank = replay_bytes(_capacity(replay_size, num_envs, world), max(1, num_envs // world))
    model = model_bytes(model_class, model_settings(config))
    needs = [Need(per_rank, model, replay_on_gpu=gpu is not None and replay_device != "cpu", gpu=gpu)
             for gpu in devices]  # fmt: skip
    return Plan(replay_size, num_envs, world, needs)


# ------------------------------------------------------------------------------------------------- what is free
def _meminfo_available(meminfo: Path = MEMINFO) -> int | None:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def _cgroup_free(root: Path = CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The least of (limit - usage) over this process's memory cgroup and its ancestors (v2), or its v1 memory
    cgroup; None without a limit. v1's "no limit" is a huge number (2**63 rounded to pages), kept as a number."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    frees: list[int] = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":  # v2: one unified hierarchy
            group = root / path.lstrip("/")
            while True:
                limit, used = _read_int(group / "memory.max"), _read_int(group / "memory.current")
                if limit is not None and used is not None:
                    frees.append(limit - used)
                if group == root or root not in group.parents:
                    break
                group = group.parent
        elif "memory" in controllers.split(","):  # v1
            group = root / "memory" / path.lstrip("/")
            limit, used = _read_int(group / "memory.limit_in_bytes"), _read_int(group / "memory.usage_in_bytes")
            if limit is not None and used is not None and limit < 1 << 60:
                frees.append(limit - used)
    return min(frees) if frees else None


def _address_space_free() -> int | None:
    """``RLIMIT_AS`` less this process's address space now (VmSize), or None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return soft - int(line.split()[1]) * 1024
    return soft


def host_free() -> list[Free]:
    """Every figure of free host memory this machine gives (the check holds each one)."""
    frees = []
    available = _meminfo_available() if MEMINFO.exists() else None
    if available is not None:
        frees.append(Free(available, "MemAvailable"))
    cgroup = _cgroup_free()
    if cgroup is not None:
        frees.append(Free(cgroup, "the cgroup's memory limit less its usage"))
    address = _address_space_free()
    if address is not None:
        frees.append(Free(address, "RLIMIT_AS less this process's address space", per_process=True))
    return frees


def gpu_free(index: int) -> Free:
    """``torch.cuda.mem_get_info`` of CUDA device ``index`` (its free bytes), named with the device."""
    import torch

    free, _total = torch.cuda.mem_get_info(index)
    return Free(int(free), f"torch.cuda.mem_get_info of GPU {index} ({torch.cuda.get_device_name(index)})")


# ------------------------------------------------------------------------------------------------------ checking
def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def _in_place(plans: Sequence[Plan], gpu: int | None, per_process: bool) -> list[Need]:
    """The processes whose memory is in one place: the host (``gpu`` None) or CUDA device ``gpu``; for a limit each
    process has on its own (``per_process``), the first of them."""
    needs = [n for p in plans for n in p.needs if gpu is None or n.gpu == gpu]
    return needs[:1] if per_process else needs


def _bytes(need: Need, gpu: int | None) -> tuple[int, int, int]:
    """(replay, model and optimizer, margin) of ``need`` in the host (``gpu`` None) or on its GPU."""
    if gpu is None:
        return (0 if need.replay_on_gpu else need.replay), (0 if need.gpu is not None else need.model), need.margin
    return (need.replay if need.replay_on_gpu else 0), need.model, need.margin


def _needed(needs: Sequence[Need], gpu: int | None) -> tuple[int, int, int]:
    parts = [_bytes(n, gpu) for n in needs]
    return sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)


def _parts(needs: Sequence[Need], gpu: int | None) -> str:
    replay, model, margin = _needed(needs, gpu)
    return f"replay {_gb(replay)}, model and optimizer {_gb(model)}, margin {_gb(margin)}"


def shortfall(plans: Sequence[Plan], host: Sequence[Free], gpu: Callable[[int], Free]) -> tuple[Free, int | None, int]:
    """The first place where the plans' processes do not fit: (what is free there, the GPU index or None for the
    host, the bytes needed there); ``(Free(0, ""), None, 0)`` when everything fits."""
    for free in host:
        needed = sum(_needed(_in_place(plans, None, free.per_process), None))
        if needed > free.bytes:
            return free, None, needed
    for index in sorted({n.gpu for p in plans for n in p.needs if n.gpu is not None}):
        free = gpu(index)
        needed = sum(_needed(_in_place(plans, index, False), index))
        if needed > free.bytes:
            return free, index, needed
    return Free(0, ""), None, 0


def largest_replay(plan: Plan, free: Free, gpu: int | None) -> int:
    """The largest ``data.replay_size`` (a multiple of num_envs and of the world size) with which ``plan`` fits
    ``free``, everything else as it is; 0 if none does (or the replay is not what fills that place)."""
    needs = _in_place([plan], gpu, free.per_process)
    replay, model, margin = _needed(needs, gpu)
    room = free.bytes - model - margin
    if not replay or room <= 0:
        return 0
    size = int(room / (replay / plan.replay_size))
    step = math.lcm(plan.num_envs, plan.world)
    return size // step * step


def check_fit(plan: Plan, host: Sequence[Free] | None = None, gpu: Callable[[int], Free] | None = None) -> None:
    """Refuse a run whose processes on this machine need more memory than it has free (`PreflightError`: one line
    naming ``data.replay_size``, the bytes needed and free, and the largest replay that would fit)."""
    free, index, needed = shortfall([plan], host_free() if host is None else host, gpu or gpu_free)
    if not needed:
        return
    where = "host memory" if index is None else f"the memory of GPU {index}"
    fits = largest_replay(plan, free, index)
    advice = f"data.replay_size={fits:,} would fit" if fits else "no replay would fit: free memory first"
    needs = _in_place([plan], index, free.per_process)
    processes = "" if len(needs) == 1 else f" for its {len(needs)} processes"
    raise PreflightError(
        f"data.replay_size={plan.replay_size} does not fit in {where}: the run needs {_gb(needed)}{processes} "
        f"({_parts(needs, index)}), {_gb(free.bytes)} are free ({free.source}); {advice}"
    )


def check_packed(
    plans: Sequence[Plan], names: Sequence[str], host: Sequence[Free] | None = None,
    gpu: Callable[[int], Free] | None = None,
) -> None:  # fmt: skip
    """Refuse the runs a grid task starts together on one machine when, together, they do not fit: one line naming
    the runs that share the host or the GPU, what they need and what is free, and how many would fit."""
    free, index, needed = shortfall(plans, host_free() if host is None else host, gpu or gpu_free)
    if not needed:
        return
    sharing = [(name, p) for name, p in zip(names, plans, strict=True)
               if index is None or any(n.gpu == index for n in p.needs)]  # fmt: skip
    one = _in_place([sharing[0][1]], index, free.per_process)
    each = sum(_needed(one, index))
    fit = int(free.bytes // each)
    where = "host memory" if index is None else f"GPU {index}"
    knob = f"--runs-per-gpu {fit}" if index is not None else f"{fit} runs per task"
    advice = f"{fit} would fit ({knob})" if fit else "not even one fits: lower data.replay_size"
    raise PreflightError(
        f"{len(sharing)} runs on {where} ({', '.join(name for name, _ in sharing)}) need {_gb(needed)} "
        f"({len(sharing)} x {_gb(each)}: {_parts(one, index)} each), {_gb(free.bytes)} are free ({free.source}); "
        f"{advice}"
    )


# --------------------------------------------------------------------------------------------- the run directory
def check_compiler(config: Mapping[str, Any]) -> None:
    """``model.compile`` on the CPU needs a working C++ compiler (inductor builds C++ kernels there); without one the
    run would die in its first update with inductor's traceback, after the envs and the replay were built. On a GPU
    inductor writes Triton kernels and needs none. One line (`PreflightError`) naming the setting and the fix."""
    trainer, model = config.get("trainer") or {}, config.get("model") or {}
    if not model.get("compile"):
        return
    devices = _devices(trainer.get("devices", "auto"), str(trainer.get("accelerator", "auto")))
    if any(d is not None for d in devices):
        return
    from torch._inductor import config as inductor
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        tried = ", ".join(str(c) for c in inductor.cpp.cxx if c)
        raise PreflightError(
            "model.compile=true is not allowed on this machine's CPU: torch.compile builds C++ kernels there and no "
            f"working C++ compiler was found (tried {tried}; CXX names another); install one (Debian/Ubuntu: apt "
            "install g++) or set --model.compile false"
        ) from None


def check_writable(key: str, path: str | Path) -> None:
    """Refuse a run directory that cannot be written (a read-only mount, no permission): one line naming the path.
    The directory itself need not exist yet: its nearest existing ancestor is checked, and any of its own existing
    folders."""
    target = Path(path).absolute()
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(f"{key}={path}: {existing} is a file, not a directory; give a directory")
    folders = [existing] + ([p for p in target.iterdir() if p.is_dir()] if existing == target else [])
    for folder in folders:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            raise PreflightError(f"{key}={path} cannot be written: {folder} is on a read-only filesystem; give a "
                                 "directory on a writable one")  # fmt: skip
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PreflightError(f"{key}={path} cannot be written: no write permission on {folder}; give a "
                                 "directory you can write")  # fmt: skip


def merged_settings(args: Sequence[str]) -> dict[str, Any]:
    """The settings a ``fit`` of these arguments will parse, as nested dicts: ``--config FILE`` merged and dotted
    ``--key value`` (or ``--key=value``) overrides applied, in their order, as LightningCLI does. Enough for
    `plan_run`: the grid sizes its runs before it starts them."""
    import yaml

    merged: dict[str, Any] = {}

    def merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
        for key, value in new.items():
            if isinstance(value, Mapping) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = dict(value) if isinstance(value, Mapping) else value

    i = 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        i += 1
        if key == "--config":
            merge(merged, yaml.safe_load(Path(value).read_text()) or {})
        elif key.startswith("--") and value:
            *parents, last = key[2:].split(".")
            node = merged
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = yaml.safe_load(value)
    return merged


def model_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` settings with those the CLI links in from ``data`` (frame stack, game): what sizes the nets."""
    model = dict(settings.get("model") or {})
    data = settings.get("data") or {}
    if "frame_stack" in data:
        model["frame_stack"] = data["frame_stack"]
    horizon = data.get("horizon") or {}
    model["adaptive_horizon"] = horizon.get("mode") == "adaptive"
    return {k: v for k, v in model.items() if not k.startswith("_")}
