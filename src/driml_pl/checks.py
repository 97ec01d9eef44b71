"""Refuse bad config values before anything is built or written.

`check_config` reads the parsed LightningCLI config of a subcommand (a jsonargparse Namespace) before any class is
instantiated, so a bad value never reaches the Trainer (whose loggers and checkpoints create the run directory) nor
Procgen. Every refusal is a `ValueError` with one line, ``<key>=<value> is not allowed: <what is allowed>``; the CLI
prints it as ``driml_pl: error: ...`` and exits with code 2. `describe_parse_error` turns jsonargparse's own errors
(unknown key, wrong type, missing config file) into one line of the same form.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from driml_pl.adaptive import CONTINUATION_MAPS
from driml_pl.envs import DISTRIBUTION_MODES, GAMES
from driml_pl.horizon import HORIZON_MODES
from driml_pl.learner.graphs import GRAPH_COMPILE_MODES, GRAPH_PRECISIONS

# The model feeds float32 frames and computes its losses in float32: the `*-true` half/double modes (which cast the
# weights but not the inputs) fail with a dtype error inside conv2d, and transformer-engine needs fp8 hardware.
# 16-mixed on a CPU is run by Lightning as bf16-mixed.
ALLOWED_PRECISION = ("32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16")
LAMBDAS = ("lambda_ll", "lambda_lg", "lambda_gl", "lambda_gg")
MIN_OBS_SIDE = 36  # the Nature-DQN convs (8/4, 4/2, 3/1) need at least 36 pixels per side


class ConfigError(ValueError):
    """One bad value: ``<key>=<value> is not allowed: <allowed>``."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={_show(value)} is not allowed: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


def _show(value: Any) -> str:
    return " ".join(str(value).split())  # one line whatever the value holds


_MISSING = object()


def _get(cfg: Any, key: str) -> Any:
    """A dotted key of the config, or _MISSING when the config has no such key (checks on it are skipped)."""
    node = cfg
    for part in key.split("."):
        try:
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        except (AttributeError, KeyError, TypeError):
            return _MISSING
    return node


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_config(cfg: Any) -> None:
    """Raise `ConfigError` (a ValueError) for the first bad value of a subcommand's parsed config."""

    def get(key: str) -> Any:
        return _get(cfg, key)

    def require(key: str, ok: Any, allowed: str) -> None:
        value = get(key)
        if value is _MISSING or value is None:
            return
        if not ok(value):
            raise ConfigError(key, value, allowed)

    def positive(keys: Iterable[str], kind: str = "an integer") -> None:
        for key in keys:
            require(key, lambda v: _number(v) and v > 0, f"{kind} > 0")

    # --- choices
    require(
        "data.env.game",
        lambda v: v in GAMES,
        f"unknown game {get('data.env.game')!r}; valid games: " + ", ".join(GAMES),
    )
    require(
        "data.env.distribution_mode",
        lambda v: v in DISTRIBUTION_MODES,
        f"unknown distribution_mode {get('data.env.distribution_mode')!r}; valid: " + ", ".join(DISTRIBUTION_MODES),
    )
    require(
        "data.horizon.mode",
        lambda v: v in HORIZON_MODES,
        f"unknown horizon.mode {get('data.horizon.mode')!r}; valid: " + ", ".join(HORIZON_MODES),
    )
    require(
        "model.continuation_map",
        lambda v: v in CONTINUATION_MAPS,
        f"unknown continuation_map {get('model.continuation_map')!r}; valid: " + ", ".join(CONTINUATION_MAPS),
    )
    require(
        "trainer.precision",
        lambda v: str(v) in ALLOWED_PRECISION,
        "one of " + ", ".join(ALLOWED_PRECISION) + " (the *-true half/double modes and transformer-engine are "
        "not supported: the model feeds float32 frames and computes its losses in float32)",
    )
    if get("model.cuda_graphs") is True:
        require(
            "model.compile_mode",
            lambda v: v in GRAPH_COMPILE_MODES,
            "with model.cuda_graphs=true one of " + ", ".join(GRAPH_COMPILE_MODES) + " (the others make CUDA "
            "graphs of their own)",
        )
        require(
            "trainer.precision",
            lambda v: str(v) in GRAPH_PRECISIONS,
            "with model.cuda_graphs=true one of " + ", ".join(GRAPH_PRECISIONS) + " (16-mixed's gradient scaler "
            "reads back to the host every update)",
        )

    # --- sizes and counts
    positive(
        (
            "data.env.num_envs",
            "data.batch_size",
            "data.replay_size",
            "data.total_env_steps",
            "data.updates_per_epoch",
            "data.eval_episodes",
            "model.target_update_interval",
            "model.feature_dim",
            "model.action_dim",
            "model.rkhs_dim",
            "model.pair_hidden",
        )
    )
    for key in ("torch_threads", "data.env.num_threads"):
        require(key, lambda v: _number(v) and v >= 1, "an integer >= 1, or null for the default (docs/threads.md)")
    positive(("data.replay_ratio", "model.lr", "model.max_grad_norm", "model.score_clip"), kind="a number")
    require("data.env.num_levels", lambda v: _number(v) and v >= 0, "an integer >= 0 (0: unlimited levels)")
    require("data.env.start_level", lambda v: _number(v) and v >= 0, "an integer >= 0")
    require("data.n_step", lambda v: _number(v) and v >= 1, "an integer >= 1 (the return horizon)")
    require("data.horizon.k", lambda v: _number(v) and v >= 1, "an integer >= 1 (k = 1 is s_{t+1})")
    require("data.frame_stack", lambda v: _number(v) and v >= 1, "an integer >= 1")
    require("model.num_atoms", lambda v: _number(v) and v >= 2, "an integer >= 2 (C51 atoms)")
    require(
        "model.obs_size",
        lambda v: isinstance(v, Sequence) and len(v) == 2 and all(_number(s) and s >= MIN_OBS_SIDE for s in v),
        f"two integers [H, W], each >= {MIN_OBS_SIDE} (the Nature-DQN encoder's smallest input)",
    )

    # --- weights, probabilities, rates
    for key in (f"model.{name}" for name in LAMBDAS):
        finite = "a number >= 0 (0 switches the term off; a negative weight would maximise the InfoNCE loss)"
        require(key, lambda v: _number(v) and math.isfinite(v) and v >= 0, finite)
    require("model.adam_eps", lambda v: _number(v) and v >= 0, "a number >= 0")
    require("data.gamma", lambda v: _number(v) and 0 <= v <= 1, "a discount in [0, 1]")
    for key in ("data.epsilon.start", "data.epsilon.end", "data.eval_epsilon"):
        require(key, lambda v: _number(v) and 0 <= v <= 1, "a probability in [0, 1]")
    require("data.epsilon.decay_steps", lambda v: _number(v) and v >= 0, "an integer >= 0 (env steps)")
    require("model.horizon_decay", lambda v: _number(v) and 0 <= v <= 1, "an EMA factor in [0, 1]")
    require("model.continuation_eps", lambda v: _number(v) and 0 < v < 0.5, "a number in (0, 0.5)")
    v_min = get("model.v_min")
    require(
        "model.v_max",
        lambda v: not _number(v_min) or (_number(v) and v > v_min),
        f"a number above model.v_min={_show(v_min)}",
    )

    # --- values that must fit together
    budget = get("data.total_env_steps")
    before = f"an integer >= 0 and below data.total_env_steps={_show(budget)} (env steps before the first update)"
    require("data.learning_starts", lambda v: _number(v) and v >= 0 and (not _number(budget) or v < budget), before)
    replay_size = get("data.replay_size")
    fits = f"at most data.replay_size={_show(replay_size)} (a batch is drawn from the replay)"
    require("data.batch_size", lambda v: not _number(replay_size) or v <= replay_size, fits)
    _check_replay_window(get)
    check_hardware(get("trainer.accelerator"), get("trainer.devices"), get("data.replay_device"))

    # --- evaluation (issue 9)
    for key in ("data.eval_every_env_steps", "data.eval_test_levels", "data.eval_video_every"):
        require(key, lambda v: _number(v) and v >= 0, "an integer >= 0 (0: off)")
    positive(("data.eval_max_steps", "data.eval_video_frames"))
    every = get("data.eval_every_env_steps")
    require(
        "trainer.check_val_every_n_epoch",
        lambda v: not (_number(every) and every > 0) or v == 1,
        f"1 while data.eval_every_env_steps={_show(every)} (Lightning checks validation at every epoch end and "
        "the env-step schedule decides), or set data.eval_every_env_steps 0",
    )


def _check_replay_window(get: Any) -> None:
    """The replay's rule (FrameReplay): slots per env must exceed max(n_step, k) + frame_stack."""
    replay_size, num_envs = get("data.replay_size"), get("data.env.num_envs")
    n_step, k, stack = get("data.n_step"), get("data.horizon.k"), get("data.frame_stack")
    if not all(_number(v) for v in (replay_size, num_envs, n_step, k, stack)):
        return
    capacity = replay_size // num_envs
    largest = capacity - stack - 1  # the largest max(n_step, k) the replay holds
    if max(n_step, k) <= largest:
        return
    holds = (
        f"the replay holds {capacity} steps per env (data.replay_size={replay_size} // "
        f"data.env.num_envs={num_envs}), which must exceed max(data.n_step, data.horizon.k) + "
        f"data.frame_stack={stack}"
    )
    if largest < 1:
        need = (stack + 2) * num_envs
        raise ConfigError("data.replay_size", replay_size, f"{holds}; at least {need} for these settings")
    key, value = ("data.n_step", n_step) if n_step >= k else ("data.horizon.k", k)
    raise ConfigError(key, value, f"{holds}; at most {largest} here, or raise data.replay_size")


# ------------------------------------------------------------------------------------ accelerator and devices
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps", "tpu")  # Lightning's names ("gpu": cuda, else mps)


def _available_accelerators() -> tuple[str, ...]:
    """The accelerator names that can run on this machine, in ACCELERATORS' order ("auto" and "cpu" always)."""
    from pytorch_lightning.accelerators import AcceleratorRegistry

    usable = {name for name in ("cuda", "mps", "tpu") if AcceleratorRegistry[name]["accelerator"].is_available()}
    if usable & {"cuda", "mps"}:
        usable.add("gpu")
    return tuple(a for a in ACCELERATORS if a in {"auto", "cpu"} | usable)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_hardware(
    accelerator: Any, devices: Any, replay_device: Any = _MISSING, available: Sequence[str] | None = None,
    cuda_count: int | None = None,
) -> None:  # fmt: skip
    """Refuse an accelerator this machine lacks, devices it cannot give, and ``data.replay_device=cuda`` without a
    CUDA learner, before Lightning's accelerator connector raises a MisconfigurationException traceback.

    ``available`` (names) and ``cuda_count`` describe the machine; unset, they are read from it.
    """
    if not isinstance(accelerator, str):
        return  # unset or an Accelerator instance: Lightning's own checks
    available = tuple(_available_accelerators() if available is None else available)
    if accelerator not in available:
        what = f"{accelerator} is not usable on this machine" if accelerator in ACCELERATORS else "unknown accelerator"
        if accelerator in ("cuda", "gpu") and "cuda" not in available:
            what = "no CUDA GPU is visible here (torch.cuda.is_available() is false)"
        raise ConfigError("trainer.accelerator", accelerator, f"{what}; usable here: {', '.join(available)}")
    cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and "cuda" in available)
    gpus = (_cuda_count() if cuda_count is None else cuda_count) if cuda else 0
    if devices is not _MISSING and devices is not None and devices != "auto":
        _check_devices(devices, gpus if cuda else None)
    if replay_device == "cuda" and not cuda:
        learner = "a CPU" if accelerator == "cpu" else f"the CPU (trainer.accelerator={accelerator}, no CUDA GPU here)"
        raise ConfigError(
            "data.replay_device", "cuda", f"cuda needs the learner on a CUDA GPU, but it runs on {learner}; "
            "valid here: auto, cpu"
        )  # fmt: skip


def _check_devices(devices: Any, gpus: int | None) -> None:
    """``trainer.devices`` for CPU processes (``gpus`` None: "auto" or a count >= 1) or for ``gpus`` CUDA devices."""
    value = devices
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if gpus is None:
        if not (_number(value) and value == int(value) and value >= 1):
            raise ConfigError(
                "trainer.devices", devices, "on the CPU, auto or a number of processes >= 1 (device indices "
                "are for GPUs)"
            )  # fmt: skip
        return
    here = f"this machine has {gpus} CUDA GPU(s)"
    if _number(value):
        if value == -1 or (value == int(value) and 1 <= value <= gpus):
            return
        raise ConfigError("trainer.devices", devices, f"{here}: auto, -1 (all), 1..{gpus} or a list of indices")
    indices = value.split(",") if isinstance(value, str) else value
    try:
        wanted = [int(i) for i in indices if str(i).strip()]
    except (TypeError, ValueError):
        wanted = []
    if not wanted or any(not 0 <= i < gpus for i in wanted):
        raise ConfigError("trainer.devices", devices, f"{here}: auto, -1 (all), 1..{gpus} or indices in 0..{gpus - 1}")


# ------------------------------------------------------------------------------------ jsonargparse's own errors
def _config_value(argv: Sequence[str], key: str) -> Any:
    """The value of a dotted key in the --config files of argv (the last one that sets it), else _MISSING."""
    found: Any = _MISSING
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is None:
            continue
        try:
            value = _get(yaml.safe_load(Path(path).read_text()), key)
        except (OSError, yaml.YAMLError):
            continue
        if value is not _MISSING:
            found = value
    return found


def _siblings(key: str, known: Iterable[str]) -> str:
    """The valid keys next to an unknown one: 'valid keys under model: ...' or the top-level sections."""
    parent = key.rpartition(".")[0]
    depth = parent.count(".") + 1 if parent else 0
    names = sorted(
        {k.split(".")[depth] for k in known if (k.startswith(parent + ".") or not parent) and k.count(".") >= depth}
    )
    where = f"under {parent}" if parent else "at the top level"
    return f"unknown key; valid keys {where}: {', '.join(names)} (--print_config shows them all)"


def describe_parse_error(message: str, argv: Sequence[str], known: Iterable[str] = ()) -> str:
    """One line ``<key>=<value> is not allowed: <allowed>`` for a jsonargparse/argparse error message."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    first = lines[0] if lines else message
    if m := re.match(r"unrecognized arguments: (.*)", first):
        words = m.group(1).split()
        flag = next((w for w in words if w.startswith("-")), words[0] if words else "?")
        key, _, value = flag.lstrip("-").partition("=")
        if not value and len(words) > 1 and words.index(flag) + 1 < len(words):
            value = words[words.index(flag) + 1]
        return str(ConfigError(key, value or "?", _siblings(key, known)))
    if m := re.match(r"Subcommand '\w+' does not accept option '([^']+)'", first):
        key = m.group(1)
        value = _config_value(argv, key)
        return str(ConfigError(key, "?" if value is _MISSING else value, _siblings(key, known)))
    if m := re.match(r'Parser key "config": (File does not exist|Path is not a file): (.*)', first):
        what = "no such file" if m.group(1).startswith("File") else "not a file"
        return str(
            ConfigError(
                "--config",
                m.group(2).strip("'\""),
                f"{what}; give the path of a YAML config file (e.g. conf/quickstart.yaml)",
            )
        )
    if m := re.match(r'Parser key "([^"]+)":\s*(.*)', first):
        key, rest = m.group(1), [m.group(2), *lines[1:]]
        text = " ".join(x for x in rest if x)
        given = re.search(r"(?:Given value|Got value): (.*?)$", text)
        value = given.group(1).strip() if given else "?"
        if key == "trainer.precision":
            return str(ConfigError(key, value, "one of " + ", ".join(ALLOWED_PRECISION)))
        expected = re.findall(r"Expected an? (?:<class '(\w+)'>|([^.\n]+))", text)
        allowed = " or ".join(a or b.strip() for a, b in expected) if expected else re.sub(r"\s+", " ", text)
        allowed = re.sub(r"[.]? ?(?:Got value|Given value type|Given value).*$", "", allowed) or "see --help"
        return str(ConfigError(key, value, allowed if allowed.startswith("a") else f"a value of type {allowed}"))
    if m := re.match(r"Call to compute_fn of link .* failed: (.*)", first):
        return " ".join([m.group(1), *lines[1:]])
    return " ".join(lines)
