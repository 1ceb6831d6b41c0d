"""The files of a run directory, named once, and the read-only ways to find and read them.

Layout of a run directory (``train/checkpoint.py`` writes it; everything else reads it here)::

    config.yaml                     the resolved config (schema: TrainVaeConfig | TrainLdmConfig)
    configs/step_XXXXXXXX.yaml      the config of every start (``train/run_dir.py``)
    metrics.jsonl                   one JSON object per logged step
    LOCK                            while a training owns the directory (``train/lock.py``)
    checkpoints/rejected/           checkpoints that failed verification, kept for inspection
    checkpoints/step_XXXXXXXX/
        {engine}/...                one folder per DeepSpeed engine (autoencoder, discriminator | unet)
        rank_00000.pt ...           per-rank state: RNG states, data-reader position
        {name}.pt                   rank-0 files: stage state (the EMA) and exports (the bare autoencoder)
        meta.json                   the run state (step, world size, ZeRO stage, stage, wandb id, counters)
        COMMITTED                   written last, after a barrier: only then is the checkpoint valid.
                                    JSON: the step and the size and sha256 of every file above,
                                    verified before anything of the checkpoint is deserialised
                                    (training hashes and verifies them on all its ranks, each a
                                    share: ``train/digests.py``)
    profile/rank{r}_steps{a}-{b}.json   torch.profiler traces of updates a..b (train.profile_steps)

Every ``.pt`` file is read with ``weights_only=True``: nothing in a run directory is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch

CONFIG_FILE = "config.yaml"
CONFIG_HISTORY = "configs"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "LOCK"
CHECKPOINTS = "checkpoints"
REJECTED = "rejected"  # under checkpoints/
META_FILE = "meta.json"
COMMITTED = "COMMITTED"
PROFILE_DIR = "profile"
STEP_PATTERN = re.compile(r"^step_(\d{8})$")

AUTOENCODER_WEIGHTS = "autoencoder_weights"  # the bare autoencoder (CompVis layout), with each VAE checkpoint
EMA_STATE = "ema"  # the U-Net's EMA, with each LDM checkpoint
LATENT_SCALE = "latent_scale"  # stage 2's latent scale factor, with each LDM checkpoint
UNET_ENGINE = "unet"
# DeepSpeed's model file of an engine: at ZeRO <= 2 it holds the full state dict under "module".
ENGINE_MODEL_FILE = "mp_rank_00_model_states.pt"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step_{step:08d}"


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank:05d}.pt"


def extra_file(folder: Path, name: str) -> Path:
    return folder / f"{name}.pt"


def is_committed(folder: Path) -> bool:
    return (folder / COMMITTED).is_file() and (folder / META_FILE).is_file()


def committed_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every committed checkpoint, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_PATTERN.match(p.name))]
    return sorted((step, p) for step, p in found if is_committed(p))


def _warn_skipped(folder: Path, reason: str) -> None:
    print(f"warning: skipping checkpoint {folder}: {reason}", file=sys.stderr, flush=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run directory meaning its newest committed checkpoint that
    verifies (readers skip, with a warning, newer ones that do not; only training sets them aside)."""
    path = Path(path).expanduser()
    if is_committed(path):
        return path
    if committed_steps(path):
        found = newest_verified(path, _warn_skipped)
        if found is None:
            raise CheckpointError(f"{path}: no committed checkpoint verifies (see the warnings above)")
        return found
    if (path / META_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {path} is not committed (no {COMMITTED} file): "
                                "it was not completely saved")
    raise FileNotFoundError(f"{path} is neither a committed checkpoint folder nor a run directory holding one")


class CheckpointError(ValueError):
    """A checkpoint's files do not match what was committed (corrupt, truncated, replaced, missing)."""


def file_digest(path: Path) -> list:
    """[size, sha256] of a file, the size being the bytes hashed (a file that changes while it is
    read cannot get a record whose size and digest disagree)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
            size += len(block)
    return [size, digest.hexdigest()]


def checkpoint_files(folder: Path) -> dict[str, int]:
    """{relative path: size} of every file of a checkpoint folder but COMMITTED."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMMITTED)
    return {str(p.relative_to(folder)): p.stat().st_size for p in files}


def file_digests(folder: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file of a checkpoint folder but COMMITTED."""
    return {name: file_digest(folder / name) for name in checkpoint_files(folder)}


def commit_record(step: int, files: dict[str, list]) -> bytes:
    """The content of COMMITTED: the step and the digests of the checkpoint's files."""
    return json.dumps({"step": step, "files": dict(sorted(files.items()))}, indent=1).encode()


def committed_files(folder: Path) -> dict[str, list] | None:
    """The {relative path: [size, sha256]} a checkpoint was committed with, after its meta.json
    reads; None for a COMMITTED holding only the step number (written by an older version, which
    recorded no files). Anything else that is not a record is corrupt, and so is the checkpoint."""
    read_meta(folder)
    record_file = folder / COMMITTED
    try:
        record = json.loads(record_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{record_file}: unreadable or corrupt ({err})") from err
    if isinstance(record, int) and not isinstance(record, bool):
        return None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, list) and len(v) == 2 for v in files.values()):
        raise CheckpointError(f"{record_file}: corrupt (not a commit record of the checkpoint's files)")
    return files


def check_file(folder: Path, name: str, size: int, sha: str) -> None:
    """Raise CheckpointError unless the checkpoint's file ``name`` has the committed size and sha256."""
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint was committed with it)")
    if (actual := path.stat().st_size) != size:
        raise CheckpointError(f"{path}: {actual} bytes, committed with {size} (truncated or replaced)")
    if file_digest(path)[1] != sha:
        raise CheckpointError(f"{path}: sha256 differs from the committed one (corrupt or replaced)")


def verify_checkpoint(folder: Path) -> None:
    """Check every committed file's size and sha256 (and meta.json) before anything is loaded.

    Files added after the commit (a universal conversion) are not part of the record. A COMMITTED
    holding only the step number (written by an older version) has only its meta.json checked.
    Training checks the same on all its ranks at once, each a share (``train/digests.py``).
    """
    files = committed_files(folder)
    for name, (size, sha) in sorted((files or {}).items()):
        check_file(folder, name, size, sha)


def committed_sha256(folder: Path, name: str) -> str:
    """The sha256 of a checkpoint file as its commit recorded it (hashed now where the commit holds
    no record): with ``verify_checkpoint`` passed, the identity of the file's content."""
    try:
        record = json.loads((folder / COMMITTED).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        record = None
    entry = record.get("files", {}).get(name) if isinstance(record, dict) else None
    return entry[1] if entry else file_digest(folder / name)[1]


def newest_verified(run_dir: Path, on_rejected: Callable[[Path, str], None]) -> Path | None:
    """The newest committed checkpoint that verifies; each one that does not is reported to
    ``on_rejected(folder, reason)`` (which may move it aside) and the next older one is tried."""
    for _, folder in reversed(committed_steps(run_dir)):
        try:
            verify_checkpoint(folder)
            return folder
        except (CheckpointError, ValueError) as err:
            on_rejected(folder, str(err))
    return None


def run_dir_of(folder: Path) -> Path:
    """The run directory a checkpoint folder belongs to."""
    return folder.parent.parent


def read_meta(folder: Path) -> dict:
    path = folder / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the checkpoint's meta.json ({type(err).__name__}: {err})") from err


def read_run_config(run_dir: Path, schema: type) -> Any:
    """A run directory's resolved ``config.yaml`` as its schema dataclass (validated)."""
    from omegaconf import OmegaConf

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a training run directory")
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path)))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{where} (a damaged or hand-edited run config)") from err
    except OmegaConfBaseException as err:  # e.g. a key this version does not know
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: {first} (a config written by another radiodiff version, or edited?)") from err


def load_tensor_file(path: Path) -> Any:
    """A ``.pt`` file of tensors and plain containers; never unpickles objects."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return torch.load(path, weights_only=True, map_location="cpu")


def load_extra(folder: Path, name: str) -> Any:
    return load_tensor_file(extra_file(folder, name))


def load_engine_module(folder: Path, engine: str) -> dict[str, torch.Tensor]:
    """The full model state dict an engine saved at ZeRO <= 2."""
    return load_tensor_file(folder / engine / ENGINE_MODEL_FILE)["module"]
