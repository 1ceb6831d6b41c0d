"""Writing checkpoints: collective DeepSpeed saves, our per-rank state, and a commit marker.

The layout and every file name are defined in ``radiodiff/runs/layout.py`` (which also reads
them); this module writes a checkpoint, commits it, prunes old ones, and restores the engines.
A folder without COMMITTED (a save that was killed) is ignored and replaced.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radiodiff.dist import (
    DistInfo,
    all_reduce_max,
    barrier,
    broadcast_object,
    first_error,
    on_rank_0,
)
from radiodiff.runs.layout import (
    CHECKPOINTS,
    COMMITTED,
    META_FILE,
    REJECTED,
    STEP_PATTERN,
    commit_record,
    committed_steps,
    extra_file,
    is_committed,
    rank_file,
    read_meta,
    step_dir,
)
from radiodiff.train.digests import spread_digests, spread_verify
from radiodiff.train.safe_load import weights_only_loads


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in types that torch.load(weights_only=True) accepts."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": json.dumps(random.getstate()), "torch": torch.get_rng_state(),
             "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                       "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank (a full disk, a lost filesystem); nothing was committed."""


def _not_committed(doing: str, folder: Path, cause: object) -> CheckpointSaveError:
    return CheckpointSaveError(f"{doing} checkpoint {folder} failed ({cause}); nothing was committed, the previous "
                               "checkpoint is the newest valid one")


def parameters_finite(engines: dict[str, Any]) -> bool:
    """Whether every parameter of every engine's module is finite (one host read)."""
    flags = [torch.isfinite(p).all() for engine in engines.values() for p in engine.module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def _write_files(folder: Path, engines: dict[str, Any], rank_state: dict, extras: dict[str, Any],
                 meta: dict, dist: DistInfo, fail: bool) -> None:
    for name, engine in engines.items():
        engine.save_checkpoint(str(folder), tag=name)  # collective: every rank writes its shard
    if fail:  # fault injection (train.fail_save_steps): what a full disk does to our writer
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(rank_file(folder, dist.rank)))
    torch.save(rank_state, rank_file(folder, dist.rank))
    if dist.is_main:
        for name, value in extras.items():
            torch.save(value, extra_file(folder, name))
        _write_atomic(folder / META_FILE, json.dumps(meta, indent=1).encode())


def save(run_dir: Path, step: int, engines: dict[str, Any], *, rank_state: dict, meta: dict,
         extras: dict[str, Any], dist: DistInfo, keep_last: int, fail: bool = False,
         fail_commit: bool = False) -> Path:
    """Save a checkpoint on every rank (collective) and commit it.

    Every rank reports whether its writing succeeded (one all-reduce) before anything is committed,
    so a rank that failed (ENOSPC) cannot leave the others waiting, and a failed save commits
    nothing: the previous checkpoint stays the newest valid one. Parameters that are no longer
    finite (a diverged training) are refused the same way, before anything is written.
    """
    folder = step_dir(run_dir, step)
    if all_reduce_max(not parameters_finite(engines), dist.device) > 0:
        raise CheckpointSaveError(f"not saving checkpoint {folder}: the model's parameters are no longer finite "
                                  "(the training diverged: lower train.lr); the previous checkpoint is the newest "
                                  "valid one")
    if dist.is_main:
        if folder.exists() and not is_committed(folder):  # a save of this step that never committed
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
    barrier()
    error = None
    try:
        _write_files(folder, engines, rank_state, extras, meta, dist, fail)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        error = err
    cause = first_error(error, dist)  # also a barrier: every rank's files are complete
    if cause is not None:
        raise _not_committed("saving", folder, cause)
    try:
        files = spread_digests(folder, dist.rank)  # every file's size and sha256, each rank hashing a share
    except OSError as err:  # the same on every rank
        raise _not_committed("committing", folder, err) from err
    def commit() -> None:
        if fail_commit:  # fault injection (train.fail_commit_steps)
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(folder / COMMITTED))
        _write_atomic(folder / COMMITTED, commit_record(step, files))

    cause = on_rank_0(commit, dist)  # rank 0 alone commits: the others learn of a failure here, not by a timeout
    if cause is not None:
        raise _not_committed("committing", folder, cause)
    if dist.is_main:
        prune(run_dir, keep_last)
    barrier()
    return folder


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` committed checkpoints; drop older ones and every partial save.

    Called right after a commit, when no other save can be in progress: a folder without COMMITTED
    is then what a killed save left behind, at any step.
    """
    steps = committed_steps(run_dir)
    for _, folder in steps[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)
    for folder in (run_dir / CHECKPOINTS).iterdir():
        if STEP_PATTERN.match(folder.name) and not is_committed(folder):
            shutil.rmtree(folder, ignore_errors=True)


def set_aside(folder: Path, reason: str) -> Path:
    """Move a checkpoint that failed verification out of the way (never deleted); returns where."""
    target = folder.parent / REJECTED / f"{folder.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(target)
    print(f"checkpoint {folder} is not usable: {reason}; moved to {target}", flush=True)
    return target


def find_resume(run_dir: Path, dist: DistInfo) -> Path | None:
    """The newest committed checkpoint that verifies (collective: every rank checks a share of its
    files, and all get the same answer); each newer one that does not is reported in one line and
    set aside by rank 0."""
    candidates = broadcast_object([folder for _, folder in committed_steps(run_dir)] if dist.is_main else None)
    for folder in reversed(candidates):
        reason = spread_verify(folder, dist.rank, dist.world_size)
        if reason is None:
            return folder
        cause = on_rank_0(lambda: set_aside(folder, reason), dist)
        if cause is not None:
            raise OSError(f"checkpoint {folder} is not usable ({reason}) and setting it aside failed ({cause})")
    return None


class CheckpointLoadError(RuntimeError):
    """A committed checkpoint could not be prepared for loading (its universal conversion failed)."""


def _convert(source: Path, target: Path) -> None:
    if target.exists():  # a conversion that did not finish
        shutil.rmtree(target)
    # --inject_missing_state: our models carry no Megatron-style universal-checkpoint info.
    # Through safe_load: the conversion reads the checkpoint with weights-only loads too.
    done = subprocess.run([sys.executable, "-m", "radiodiff.train.safe_load", "--input_folder", str(source),
                           "--output_folder", str(target), "--inject_missing_state", "--num_extract_workers", "1",
                           "--num_merge_workers", "1"], capture_output=True, text=True)
    if done.returncode != 0:  # torch.save names no errno for a full disk: say how much room there was
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        free_mib = shutil.disk_usage(target.parent).free / 2**20
        shutil.rmtree(target, ignore_errors=True)
        raise RuntimeError(f"{lines[-1] if lines else f'exit code {done.returncode}'}; its filesystem had "
                           f"{free_mib:.1f} MiB free")
    (target / COMMITTED).write_text("universal\n")


def to_universal(folder: Path, name: str, dist: DistInfo) -> str:
    """Convert engine ``name``'s ZeRO checkpoint to DeepSpeed's universal format (rank 0, once; every
    rank learns of a failure, with its cause, at once); returns the tag to load. A universal checkpoint
    loads at any world size."""
    tag = f"{name}_universal"
    target = folder / tag
    def convert() -> None:
        if not (target / COMMITTED).is_file():
            _convert(folder / name, target)

    cause = on_rank_0(convert, dist, catch=(OSError, RuntimeError))
    if cause is not None:
        raise CheckpointLoadError(f"converting {folder / name} for {dist.world_size} rank(s) (DeepSpeed's universal "
                                  f"format) failed ({cause}); the checkpoint itself is unchanged")
    return tag


def load(folder: Path, engines: dict[str, Any], dist: DistInfo) -> tuple[dict, dict | None]:
    """Load every engine and this rank's state; returns (meta, rank_state or None on a new world size).

    At another world size than the one saved, the engines (built with ``load_universal``) load a
    universal conversion of the checkpoint: weights and optimizer state are exact; the ranks' RNG
    states cannot carry over and are returned as None (the data position is global, in meta.json).
    """
    meta = read_meta(folder)
    same_world = meta["world_size"] == dist.world_size
    for name, engine in engines.items():
        tag = name if same_world else to_universal(folder, name, dist)
        with weights_only_loads():  # nothing in a run directory is unpickled
            path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load engine {name!r} from {folder / tag}")
    rank_state = torch.load(rank_file(folder, dist.rank), weights_only=True) if same_world else None
    return meta, rank_state

