"""radiodiff-shard: a RadioMapSeer folder -> WebDataset shards, one Ray task per shard.

Plan (driver): split the maps by protocol, shuffle each split's samples with ``order_seed`` so that
every shard mixes maps, and cut them into ``max(min_shards_per_split, ceil(n / samples_per_shard))``
shards. Each Ray task reads its samples' source files, checks every PNG, builds the tar in memory
and writes it under a temporary name that is renamed when complete. ``manifest.json`` is written
last and is what makes a shard set valid: while a run changes shards, the previous manifest is
kept aside as ``manifest.json.previous`` so that no reader trusts a half-updated set.

Re-running skips shards whose plan and checksum match the previous manifest and rewrites missing
or corrupt ones. Bad source files fail the run, naming every one (``on_error=fail``), or are
skipped and listed in the manifest (``on_error=skip``); nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field

import fsspec
import numpy as np

from radiodiff.config import SPLITS, ShardConfig
from radiodiff.data.radiomapseer import RadioMapSeer
from radiodiff.data.schema import DataFormatError, SampleId, decode_png
from radiodiff.data.manifest import MANIFEST_NAME, build_manifest, manifest_summary, plan_digest
from radiodiff.data.shard_format import sha256, shard_path, write_tar

# Filesystems that live inside one process: Ray workers cannot see the driver's, so tasks hand
# their tar bytes back and the driver writes them.
PROCESS_LOCAL_PROTOCOLS = {"memory"}


class ShardingError(DataFormatError):
    """Source files were bad and ``on_error=fail``: the message lists every bad file."""


@dataclass
class ShardTask:
    split: str
    index: int
    keys: list[str]
    plan: str  # plan_digest of the settings and keys
    previous_sha256: str | None  # of the same plan in the previous manifest, if any


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


def plan_shards(source: RadioMapSeer, cfg: ShardConfig, previous: dict | None) -> list[ShardTask]:
    """Cut every split into shards of shuffled samples (deterministic for ``order_seed``)."""
    settings = source_settings(cfg)
    old = {(s["path"]): s for split in (previous or {}).get("splits", {}).values() for s in split["shards"]}
    tasks = []
    for split in cfg.splits or list(source.splits):
        if split not in source.splits:
            raise DataFormatError(f"split {split!r} is not part of protocol {cfg.data.protocol}")
        keys = [s.key for s in source.sample_ids(split)]
        order = np.random.default_rng([cfg.order_seed, SPLITS.index(split)]).permutation(len(keys))
        num_shards = min(len(keys), max(cfg.min_shards_per_split, math.ceil(len(keys) / cfg.samples_per_shard)))
        for index, chunk in enumerate(np.array_split(order, num_shards)):
            chunk_keys = [keys[i] for i in chunk]
            plan = plan_digest(settings, chunk_keys)
            prior = old.get(shard_path(split, index))
            same = prior is not None and prior.get("plan") == plan
            tasks.append(ShardTask(split, index, chunk_keys, plan, prior["sha256"] if same else None))
    return tasks


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
                members["json"] = source.record(sample, split, image)
        except (OSError, DataFormatError) as err:
            bad.append({"key": key, "path": str(path), "error": str(err)})
    return (None if bad else members), bad


def build_shard(task: ShardTask, cfg: ShardConfig, process_local: bool) -> ShardResult:
    """Body of one Ray task: keep an intact shard, or read, check, pack and write it."""
    fs, root = fsspec.core.url_to_fs(cfg.out)
    path = shard_path(task.split, task.index)
    target = f"{root.rstrip('/')}/{path}"
    result = ShardResult(task.split, task.index, path, task.plan)
    if task.previous_sha256 and not process_local and fs.exists(target):
        if sha256(fs.cat_file(target)) == task.previous_sha256:
            result.num_samples, result.bytes = len(task.keys), fs.size(target)
            result.sha256, result.status = task.previous_sha256, "kept"
            return result
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
    if process_local:
        result.data = data
    else:
        write_atomically(fs, target, data)
    return result


def write_atomically(fs: fsspec.AbstractFileSystem, target: str, data: bytes) -> None:
    """Write under a temporary name, then rename: a reader never sees a partial file."""
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    temporary = f"{target}.tmp-{time.time_ns()}"
    fs.pipe_file(temporary, data)
    fs.mv(temporary, target)


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a corrupt manifest only means nothing can be skipped


def run_tasks(tasks: list[ShardTask], cfg: ShardConfig, process_local: bool) -> list[ShardResult]:
    """One Ray task per shard, with a progress bar; results in plan order."""
    import ray
    from tqdm import tqdm

    from pipeline.ray_setup import ray_session

    with ray_session(cfg.ray):
        remote = ray.remote(build_shard)
        pending = {remote.remote(task, cfg, process_local): i for i, task in enumerate(tasks)}
        results: list[ShardResult | None] = [None] * len(tasks)
        with tqdm(total=len(tasks), desc="shards", unit="shard", file=sys.stdout) as progress:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                results[pending.pop(done[0])] = ray.get(done[0])
                progress.update(1)
    return results  # type: ignore[return-value]


def manifest_of(cfg: ShardConfig, source: RadioMapSeer, results: list[ShardResult]) -> dict:
    entries = [(r.split, {"path": r.path, "num_samples": r.num_samples, "bytes": r.bytes, "sha256": r.sha256,
                          "plan": r.plan}) for r in results]
    return build_manifest(source_settings(cfg), source_root=str(source.layout.root), order_seed=cfg.order_seed,
                          split_maps=source.splits, shards=entries, skipped=[bad for r in results for bad in r.bad])


def run_shard(cfg: ShardConfig) -> dict:
    """Plan, write and commit a shard set; returns the manifest."""
    fs, root = fsspec.core.url_to_fs(cfg.out)
    root = root.rstrip("/")
    process_local = bool(PROCESS_LOCAL_PROTOCOLS & set(np.atleast_1d(fs.protocol)))
    source = RadioMapSeer(cfg.data, validate=False)
    manifest_path, previous_path = f"{root}/{MANIFEST_NAME}", f"{root}/{MANIFEST_NAME}.previous"
    previous = _read_json(fs, manifest_path) or _read_json(fs, previous_path)
    tasks = plan_shards(source, cfg, previous)
    fs.makedirs(root, exist_ok=True)
    if fs.exists(manifest_path):
        fs.mv(manifest_path, previous_path)  # the old set is no longer valid while we change it
    results = run_tasks(tasks, cfg, process_local)
    failed = [bad for r in results if r.status == "failed" for bad in r.bad]
    if failed:
        listing = "\n  ".join(f"{b['path']}: {b['error']}" for b in failed)
        raise ShardingError(f"{len(failed)} bad source files (on_error=skip skips them):\n  {listing}")
    for r in results:
        if r.data is not None:
            write_atomically(fs, f"{root}/{r.path}", r.data)
            r.data = None
    kept = sum(r.status == "kept" for r in results)
    print(f"shards: {len(results) - kept} written, {kept} kept (checksum matched)")
    manifest = manifest_of(cfg, source, results)
    write_atomically(fs, manifest_path, json.dumps(manifest, indent=1).encode())
    if fs.exists(previous_path):
        fs.rm(previous_path)
    return manifest


def summarize(manifest: dict, seconds: float) -> str:
    return "\n".join([f"wrote the shard set in {seconds:.1f} s:", *manifest_summary(manifest)])


def shard_command(cfg: ShardConfig) -> int:
    start = time.perf_counter()
    manifest = run_shard(cfg)
    print(summarize(manifest, time.perf_counter() - start))
    return 0


def main() -> int:
    from radiodiff.cli import run_app

    return run_app("shard", shard_command)
