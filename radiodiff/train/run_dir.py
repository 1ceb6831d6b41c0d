"""Starting a training run on a run directory: compatibility with what is there, and its config.

``config.yaml`` is written only after the config was validated, the stage was built and the resume
succeeded, so a refused start changes nothing; every start also keeps the config it ran with as
``configs/step_XXXXXXXX.yaml`` (the step it started from), the history of a resumed run.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from radiodiff.config import ConfigError
from radiodiff.runs import layout

# The parts of the model config that shape the weights a stage's checkpoints hold.
MODEL_PARTS = {"vae": ("autoencoder", "discriminator"), "ldm": ("unet", "condition")}


def _first_difference(old: Any, new: Any, prefix: str) -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}.{key}")
            if found:
                return found
        return None
    return None if old == new else f"{prefix}={new!r} (the run has {old!r})"


def _meta_or_none(folder: Path) -> dict | None:
    try:
        return layout.read_meta(folder)
    except ValueError:
        return None  # set aside, with its reason, when the resume verifies the checkpoints


def check_compatible(run_dir: Path, cfg: Any, stage: str) -> None:
    """A run directory with committed checkpoints must hold a run of this stage and model shape."""
    metas = [(folder, _meta_or_none(folder)) for _, folder in reversed(layout.committed_steps(run_dir))]
    readable = [(folder, meta) for folder, meta in metas if meta is not None]
    if not readable:  # none, or none readable: resume finds nothing to check against (and says why)
        return
    newest, meta = readable[0]
    found = meta.get("stage")
    if found != stage:
        raise ConfigError(f"run_dir={run_dir} holds a {found} run (checkpoint {newest.name}); "
                          f"radiodiff-train-{stage} cannot resume it: choose another run_dir")
    old = OmegaConf.to_container(OmegaConf.load(run_dir / layout.CONFIG_FILE)) if (
        run_dir / layout.CONFIG_FILE).is_file() else {}
    new = dataclasses.asdict(cfg)
    for part in MODEL_PARTS[stage]:
        if part in old.get("model", {}):
            difference = _first_difference(old["model"][part], new["model"][part], f"model.{part}")
            if difference:
                raise ConfigError(f"run_dir={run_dir}: {difference}; a resumed run keeps its model "
                                  "(another preset or size needs another run_dir)")


def write_config(run_dir: Path, cfg: Any, step: int) -> None:
    """The resolved config as ``config.yaml`` and as this start's entry in the history."""
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    history = run_dir / layout.CONFIG_HISTORY
    history.mkdir(parents=True, exist_ok=True)
    for path in (history / f"step_{step:08d}.yaml", run_dir / layout.CONFIG_FILE):
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            temporary.write_text(text)
            temporary.replace(path)
        except OSError:
            with contextlib.suppress(OSError):  # no half-written file left (a full disk)
                temporary.unlink()
            raise
