"""radiodiff-shard: a RadioMapSeer folder -> WebDataset shards, one Ray task per shard.

Plan (driver): split the maps by protocol, shuffle each split's samples with ``order_seed`` so that
every shard mixes maps, and cut them into ``max(min_shards_per_split, ceil(n / samples_per_shard))``
shards. Each Ray task reads its samples' source files, checks every PNG, builds the tar in memory
and stages it whole. Only when every task has succeeded are the staged shards swapped in and
``manifest.json``, which is what makes a shard set valid, written last; a failed run leaves the
previous set as it was, and a second run on the same local folder is refused
(``pipeline.shard_set``).

A shard's plan digest covers what shapes its bytes: the source settings, the source root, the
ordered sample keys and the identity of every source file (path relative to the root, size and
mtime_ns; no content hash, which would read the whole dataset on the driver). Re-running keeps a
shard whose plan matches the previous manifest and whose file still has the recorded sha256 (with
its recorded entry and skipped files), and rewrites the others: a changed source file rewrites
exactly the shards holding it, another source root rewrites all. A re-run that changes nothing
leaves ``manifest.json`` untouched. Bad source files fail the run, naming every one
(``on_error=fail``), or are skipped and listed in the manifest (``on_error=skip``); nothing is
dropped silently.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import fsspec
import numpy as np

from pipeline.shard_set import ShardSetWriter, is_intact, is_local
from radiodiff.config import SPLITS, ShardConfig
from radiodiff.data.radiomapseer import RadioMapSeer
from radiodiff.data.schema import DataFormatError, SampleId, check_antenna, decode_png
from radiodiff.data.manifest import build_manifest, manifest_summary, plan_digest
from radiodiff.data.shard_format import sha256, shard_path, write_tar


class ShardingError(DataFormatError):
    """Source files were bad and ``on_error=fail``: the message lists every bad file."""


@dataclass
class ShardTask:
    split: str
    index: int
    keys: list[str]
    plan: str  # plan_digest of the settings, source files and keys
    previous: dict | None = None  # the previous manifest's entry of the same plan, if any
    previous_bad: list[dict] = field(default_factory=list)  # its skipped records


@dataclass
class ShardResult:
    split: str
    index: int
    path: str
    plan: str
    num_samples: int = 0
    bytes: int = 0
    sha256: str = ""
    status: str = "written"  # written | kept | failed
    bad: list[dict] = field(default_factory=list)  # {"key", "path", "error"}
    data: bytes | None = None  # tar bytes, only for process-local filesystems


def source_settings(cfg: ShardConfig) -> dict:
    data = cfg.data
    return {"protocol": data.protocol, "split_seed": data.split_seed, "simulation": data.simulation,
            "buildings": data.buildings, "cars": data.cars_input, "num_tx": data.num_tx}


def source_files(source: RadioMapSeer, keys: list[str], stats: dict[Path, list]) -> list[list]:
    """[relative path, size, mtime_ns] of every source file of ``keys`` (None, None if missing)."""
    files = []
    for key in keys:
        for path in source.paths(SampleId.from_key(key)).values():
            if path not in stats:
                try:
                    info = path.stat()
                    stats[path] = [str(path.relative_to(source.layout.root)), info.st_size, info.st_mtime_ns]
                except OSError:
                    stats[path] = [str(path.relative_to(source.layout.root)), None, None]
            files.append(stats[path])
    return files


def plan_shards(source: RadioMapSeer, cfg: ShardConfig, previous: dict | None) -> list[ShardTask]:
    """Cut every split into shards of shuffled samples (deterministic for ``order_seed``)."""
    settings = {**source_settings(cfg), "source_root": str(source.layout.root.resolve())}
    old = {s["path"]: s for split in (previous or {}).get("splits", {}).values() for s in split["shards"]}
    old_bad = (previous or {}).get("skipped", [])
    stats: dict[Path, list] = {}
    tasks = []
    for split in cfg.splits or list(source.splits):
        if split not in source.splits:
            raise DataFormatError(f"split {split!r} is not part of protocol {cfg.data.protocol}")
        keys = [s.key for s in source.sample_ids(split)]
        order = np.random.default_rng([cfg.order_seed, SPLITS.index(split)]).permutation(len(keys))
        num_shards = min(len(keys), max(cfg.min_shards_per_split, math.ceil(len(keys) / cfg.samples_per_shard)))
        for index, chunk in enumerate(np.array_split(order, num_shards)):
            chunk_keys = [keys[i] for i in chunk]
            plan = plan_digest({**settings, "files": source_files(source, chunk_keys, stats)}, chunk_keys)
            task = ShardTask(split, index, chunk_keys, plan)
            prior = old.get(shard_path(split, index))
            if prior is not None and prior.get("plan") == plan:
                members = set(chunk_keys)
                task.previous = prior
                task.previous_bad = [bad for bad in old_bad if bad.get("key") in members]
            tasks.append(task)
    return tasks


def _bad_record(key: str, path: Path, err: Exception) -> dict:
    """A bad source file; ``error`` says what is wrong without repeating the path."""
    if isinstance(err, OSError):
        error = err.strerror or type(err).__name__
    else:
        error = str(err).removeprefix(f"{path}: ")
    return {"key": key, "path": str(path), "error": error}


def _read_sample(source: RadioMapSeer, key: str, split: str) -> tuple[dict[str, bytes] | None, list[dict]]:
    """Members of one sample (each file read and checked once), or the list of its bad files."""
    sample = SampleId.from_key(key)
    paths = source.paths(sample)
    members: dict[str, bytes] = {}
    bad = []
    for member, path in paths.items():
        try:
            members[member] = path.read_bytes()
            image = decode_png(members[member], str(path))
            if member == "tx.png":  # the record holds the transmitter position read from it
                check_antenna(image, str(path))
                members["json"] = source.record(sample, split, image)
        except (OSError, DataFormatError) as err:
            bad.append(_bad_record(key, path, err))
    return (None if bad else members), bad


def kept_shard(task: ShardTask, cfg: ShardConfig) -> ShardResult | None:
    """The previous shard of the same plan with its recorded entry, if its file is intact."""
    if task.previous is None or not is_intact(cfg.out, task.previous):
        return None
    entry = task.previous
    return ShardResult(task.split, task.index, entry["path"], task.plan, num_samples=entry["num_samples"],
                       bytes=entry["bytes"], sha256=entry["sha256"], status="kept",
                       bad=list(task.previous_bad))


def build_shard(task: ShardTask, cfg: ShardConfig, writer: ShardSetWriter | None) -> ShardResult:
    """Body of one Ray task: read, check, pack and stage one shard (``writer`` None: hand its bytes back)."""
    path = shard_path(task.split, task.index)
    result = ShardResult(task.split, task.index, path, task.plan)
    source = RadioMapSeer(cfg.data, only=[SampleId.from_key(k) for k in task.keys], validate=False)
    samples = []
    for key in task.keys:
        members, bad = _read_sample(source, key, task.split)
        result.bad.extend(bad)
        if members is not None:
            samples.append((key, members))
    if result.bad and cfg.on_error == "fail":
        result.status = "failed"
        return result
    data = write_tar(samples)
    result.num_samples, result.bytes, result.sha256 = len(samples), len(data), sha256(data)
    if writer is None:
        result.data = data
    else:
        writer.stage(path, data)
    return result


def run_tasks(function: Callable, tasks: list, cfg: object, *args: object, desc: str,
              resources: dict | None = None) -> list:
    """``function(task, cfg, *args)`` as one Ray task per shard (in a ``ray_session``; ``resources``:
    Ray's per-task options, e.g. ``num_gpus``), with a progress bar; results in plan order. A task's
    error is raised as itself: the Ray wrapper only adds the worker's traceback (chained, shown with
    RADIODIFF_TRACEBACK=1), once the other tasks have ended, so that none writes after the caller
    has cleaned up (a Ray cluster outlives its driver's error). They are waited for, not cancelled:
    ``ray.cancel`` of a task that is completing at that moment aborts the driver inside Ray 2.60
    ("Check failed: Tried to complete task that was not pending"), a crash in place of the one-line
    error. So a task's error (a full disk; for the encoder, a changed source shard) is reported when
    the run's other tasks have ended; the sharder's bad source files are results, not errors. Ctrl-C
    does not wait: the local Ray stops with the driver."""
    import ray
    from tqdm import tqdm

    if not tasks:
        return []
    remote = ray.remote(**resources)(function) if resources else ray.remote(function)
    pending = {remote.remote(task, cfg, *args): i for i, task in enumerate(tasks)}
    results: list = [None] * len(tasks)
    with tqdm(total=len(tasks), desc=desc, unit="shard", file=sys.stdout) as progress:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            try:
                results[pending.pop(done[0])] = ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                if pending:
                    ray.wait(list(pending), num_returns=len(pending))
                if isinstance(err.cause, Exception):
                    raise err.cause from err
                raise
            progress.update(1)
    return results


def manifest_of(cfg: ShardConfig, source: RadioMapSeer, results: list[ShardResult]) -> dict:
    entries = [(r.split, {"path": r.path, "num_samples": r.num_samples, "bytes": r.bytes, "sha256": r.sha256,
                          "plan": r.plan}) for r in results]
    return build_manifest(source_settings(cfg), source_root=str(source.layout.root), order_seed=cfg.order_seed,
                          split_maps=source.splits, shards=entries, skipped=[bad for r in results for bad in r.bad])


def check_output(out: str) -> None:
    """Before any work: a local ``out`` must be a folder we can write in."""
    fs, root = fsspec.core.url_to_fs(out)
    if is_local(fs):
        from radiodiff.cli import check_output_dir

        check_output_dir("out", root)


def sharding_error(failed: list[dict]) -> ShardingError:
    """Each bad file once, though every sample that reads it (a city map: all its transmitters') failed."""
    first: dict[str, str] = {}
    for bad in failed:
        first.setdefault(bad["path"], bad["error"])
    listing = "; ".join(f"{path} ({error})" for path, error in first.items())
    return ShardingError(f"{len(first)} bad source file{'s' if len(first) != 1 else ''} "
                         f"(on_error=skip leaves them out): {listing}")


def build_missing(tasks: list[ShardTask], kept: list[ShardResult | None], cfg: ShardConfig,
                  writer: ShardSetWriter) -> list[ShardResult]:
    """Build and stage every shard that was not kept (the driver stages the process-local ones);
    results in plan order."""
    todo = [task for task, result in zip(tasks, kept) if result is None]
    built = iter(run_tasks(build_shard, todo, cfg, None if writer.process_local else writer, desc="shards"))
    results = [result if result is not None else next(built) for result in kept]
    failed = [bad for r in results if r.status == "failed" for bad in r.bad]
    if failed:
        raise sharding_error(failed)
    for r in results:
        if r.data is not None:
            writer.stage(r.path, r.data)
            r.data = None
    return results


def check_kept(tasks: list[ShardTask], cfg: ShardConfig, process_local: bool) -> list[ShardResult | None]:
    """Per task, its kept previous shard or None; the files are hashed by Ray tasks."""
    checking = [task for task in tasks if task.previous is not None]
    if process_local:
        checked = [kept_shard(task, cfg) for task in checking]
    else:
        checked = run_tasks(kept_shard, checking, cfg, desc="checking shards")
    by_task = {id(task): result for task, result in zip(checking, checked)}
    return [by_task.get(id(task)) for task in tasks]


def run_shard(cfg: ShardConfig) -> dict:
    """Plan, write and commit a shard set (``pipeline.shard_set``: a failed run changes nothing);
    returns the manifest."""
    from pipeline.ray_setup import ray_session

    check_output(cfg.out)
    writer = ShardSetWriter(cfg.out)
    source = RadioMapSeer(cfg.data, validate=False)
    with writer.run("radiodiff-shard"):
        tasks = plan_shards(source, cfg, writer.previous_manifest())
        known_bad = [bad for task in tasks if task.previous is not None for bad in task.previous_bad]
        if known_bad and cfg.on_error == "fail":  # unchanged since they were skipped: fail before any work
            raise sharding_error(known_bad)
        with ray_session(cfg.ray):
            kept = check_kept(tasks, cfg, writer.process_local)
            results = build_missing(tasks, kept, cfg, writer)
        written = [r.path for r in results if r.status == "written"]
        print(f"shards: {len(written)} written, {len(results) - len(written)} kept (plan and checksum matched)")
        manifest = manifest_of(cfg, source, results)
        writer.publish(written, manifest)
    return manifest


def summarize(manifest: dict, seconds: float) -> str:
    lines = [f"wrote the shard set in {seconds:.1f} s:", *manifest_summary(manifest)]
    train = manifest["splits"].get("train")
    if train is not None:
        # The reader's rule (radiodiff.data.shard_stream): one global stream cut into micro-batches,
        # so any number of ranks x workers works; a worker reads each shard holding one of its samples.
        size = sum(s["bytes"] for s in train["shards"]) / 1e6
        lines.append(f"  serves any number of ranks x data-loader workers: each worker reads at most the "
                     f"whole train split ({size:.1f} MB) per epoch, so a rank reads up to num_workers x "
                     f"{size:.1f} MB per epoch; on nodes with many ranks set data.cache_dir (node-local "
                     f"disk) so that a node fetches each shard once")
    return "\n".join(lines)


def shard_command(cfg: ShardConfig) -> int:
    start = time.perf_counter()
    manifest = run_shard(cfg)
    print(summarize(manifest, time.perf_counter() - start))
    return 0


def main() -> int:
    from radiodiff.cli import run_app

    return run_app("shard", shard_command)
