"""``fit --ckpt_path PATH``: the model settings a resume may take, and ``--fork``, which continues a checkpoint's state
under changed loss settings as a new run.

A resume continues one run: Lightning takes the model's settings from the checkpoint, so a ``--model.lambda_gg 0``
given beside it would be silently dropped. `settings_changes` finds every model setting the config gives otherwise
than the checkpoint; `fork_overrides` keeps the `RUNTIME` ones (how the run computes: compile, CUDA graphs, ...) and
refuses the others in one line, unless ``--fork true``: then the run goes on from
the checkpoint's full state (weights, Adam, replay, actors, env states, counters) with the settings of `FORKABLE`
changed, in another run directory (the checkpoint's own run is never written). A term turned off keeps its critic
heads (``model.critic_terms``), weighted 0, so the checkpoint's critic still loads and its loss is still logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from driml_pl.critic import TERMS

RUNTIME = ("probe", "compile", "compile_mode", "cuda_graphs", "matmul_precision")
"""How a run computes, not what: any resume takes the config's values (a machine without a compiler, say)."""
FORKABLE = (*(f"lambda_{t}" for t in TERMS), "target_update_interval", "max_grad_norm", "score_clip", *RUNTIME)
"""Model settings a fork may change: none of them changes a parameter's shape or Adam's restored state."""


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def checkpoint_settings(path: Path) -> dict[str, Any]:
    """The model settings a checkpoint was written with (its ``hyper_parameters``), loaded without pickle."""
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    hparams.pop("_class_path", None)
    return hparams


def settings_changes(given: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, given)}`` for every model setting both hold with different values (a key the checkpoint
    lacks, added since it was written, takes its default and is not a change; an unset ``critic_terms`` takes the
    checkpoint's, so a fork resumes as itself)."""
    changes = {k: (saved[k], given[k]) for k in saved if k in given and _plain(given[k]) != _plain(saved[k])}
    if given.get("critic_terms") is None:
        changes.pop("critic_terms", None)
    return changes


def fork_overrides(
    changes: Mapping[str, tuple[Any, Any]], saved: Mapping[str, Any], fork: bool, ckpt_path: Path, root: Path
) -> dict[str, Any]:
    """The model settings to apply over the checkpoint's: for a plain resume the `RUNTIME` ones the config changes
    (and the checkpoint's ``critic_terms``); with ``fork``, every changed one and ``critic_terms``. Raises ValueError
    (one line) for a method change without ``fork``, a change a fork cannot make, or a fork into the checkpoint's own
    run directory."""
    if not fork:
        method = {k: v for k, v in changes.items() if k not in RUNTIME}
        if method:
            key, (old, new) = next(iter(method.items()))
            more = f" (and {', '.join(f'model.{k}' for k in list(method)[1:])})" if len(method) > 1 else ""
            raise ValueError(
                f"model.{key}={new} is not allowed with --ckpt_path {ckpt_path}: its run has model.{key}={old}{more}, "
                "and a resume continues that run; add --fork true to continue its state as a new run with the changed "
                "settings (in another --trainer.default_root_dir)"
            )
        runtime = {k: new for k, (_, new) in changes.items()}  # only RUNTIME keys are left
        if saved.get("critic_terms"):
            runtime["critic_terms"] = list(saved["critic_terms"])  # `--ckpt_path last` gets no merge from Lightning
        return runtime
    if _inside(ckpt_path.resolve(), root.resolve()):
        raise ValueError(
            f"--fork true is not allowed into {root}: it is the run of the checkpoint {ckpt_path}, whose checkpoints "
            "a fork would replace; give another --trainer.default_root_dir"
        )
    fixed = sorted(k for k in changes if k not in FORKABLE)
    if fixed:
        key = fixed[0]
        old, new = changes[key]
        raise ValueError(
            f"model.{key}={new} is not allowed with --fork: the checkpoint has {old}, and a fork keeps the networks "
            f"and Adam's state as they are; a fork may change: {', '.join(f'model.{k}' for k in FORKABLE)}"
        )
    trained = [
        t for t in TERMS if float(saved.get(f"lambda_{t}", 0.0)) != 0.0 or t in (saved.get("critic_terms") or ())
    ]
    for t in TERMS:
        key = f"lambda_{t}"
        if key in changes and t not in trained and float(changes[key][1]) != 0.0:
            raise ValueError(
                f"model.{key}={changes[key][1]} is not allowed with --fork: the checkpoint has no critic heads for "
                f"the {t} term (it trained {', '.join(trained) or 'none'}); a fork may reweight or turn off those"
            )
    overrides = {k: new for k, (_, new) in changes.items()}
    if trained:
        overrides["critic_terms"] = trained
    return overrides


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
