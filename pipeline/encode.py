"""radiodiff-encode: a shard set -> its latent cache (the frozen VAE's posterior moments), one Ray
task per shard. The cache's format is ``radiodiff.data.latents``; stage 2 reads it with
``data.latents``.

The driver loads the frozen VAE once (``load_frozen_vae`` verifies the checkpoint against its commit
record) and hands its weights to the tasks through Ray's object store. Each task reads one source
shard (checked against the source manifest's size and sha256), encodes its targets in fp32 (TF32
off on GPUs) exactly as the training reader would make them, and writes the cache shard at the same
relative path, staged as the sharder stages its shards (``pipeline.shard_set``): the cache changes
only when every task has succeeded, ``manifest.json`` last, and a second run on the same local
folder is refused.

A cache shard's plan digest covers what its bytes depend on: the source shard (path and sha256), the
VAE (the committed sha256 of its weights) and the data settings. A re-run keeps every shard whose
plan matches the previous manifest and whose file still has the recorded sha256, and rewrites the
others; a re-run that changes nothing leaves ``manifest.json`` untouched.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import fsspec
import torch

from pipeline.shard import check_output, run_tasks
from pipeline.shard_set import ShardSetWriter, is_intact, is_process_local, read_json
from radiodiff.config import AutoencoderConfig, ConfigError, DataConfig, EncodeConfig
from radiodiff.data.latents import (
    LATENT_MANIFEST,
    build_latent_manifest,
    cache_data,
    encode_shard,
)
from radiodiff.data.manifest import (
    MANIFEST_NAME,
    ShardInfo,
    check_manifest_options,
    join_url,
    plan_digest,
    read_manifest,
    split_shards,
)
from radiodiff.data.schema import DataFormatError
from radiodiff.data.shard_format import sha256
from radiodiff.data.shard_source import fetch_shard
from radiodiff.models.autoencoder import AutoencoderKL
from radiodiff.runs import FrozenVae, load_frozen_vae
from radiodiff.runs.latent_cache import posterior_moments, vae_record


@dataclass
class EncodeTask:
    split: str
    shard: ShardInfo  # the source shard (its path is the cache shard's too)
    plan: str  # plan_digest of the source shard, the VAE and the data settings
    previous: dict | None = None  # the previous manifest's entry of the same plan, if any


@dataclass
class EncodeResult:
    split: str
    path: str
    plan: str
    source_sha256: str
    num_samples: int = 0
    bytes: int = 0
    sha256: str = ""
    status: str = "written"  # written | kept

    def entry(self) -> dict:
        return {"path": self.path, "num_samples": self.num_samples, "bytes": self.bytes, "sha256": self.sha256,
                "plan": self.plan, "source_sha256": self.source_sha256}


def encode_data(vae: FrozenVae, source: dict, shards: str) -> DataConfig:
    """The data settings of the cache: the VAE run's value settings and the shards' simulation."""
    data = replace(vae.data, shards=shards, simulation=source.get("simulation", vae.data.simulation),
                   num_workers=0, cache_dir=None, latents=None)
    check_manifest_options(source, data)  # e.g. a VAE trained with cars on shards without them
    return data


def check_locations(cfg: EncodeConfig, fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Before any work: the cache needs a folder of its own, which Ray workers can write."""
    source_fs, source_root = fsspec.core.url_to_fs(cfg.data.shards)
    for key, value, filesystem in (("out", cfg.out, fs), ("data.shards", cfg.data.shards, source_fs)):
        if is_process_local(filesystem):
            raise ConfigError(f"{key}={value}: Ray worker processes cannot reach a memory:// filesystem; "
                              "use a folder or a shared URL")
    if type(fs) is type(source_fs) and root.rstrip("/") == source_root.rstrip("/"):
        raise ConfigError(f"out={cfg.out} is the source shard root data.shards; the cache needs a folder of its own")
    existing = read_json(fs, f"{root}/{MANIFEST_NAME}")
    if existing is not None and existing.get("format") != LATENT_MANIFEST.format:
        raise ConfigError(f"out={cfg.out} holds a {existing.get('format')!r} manifest, not a latent cache; "
                          "choose an empty folder or an existing cache")


def plan_tasks(cfg: EncodeConfig, source: dict, settings: dict, previous: dict | None) -> list[EncodeTask]:
    """One task per source shard of the chosen splits, in the source's order."""
    old = {s["path"]: s for split in (previous or {}).get("splits", {}).values() for s in split["shards"]}
    tasks = []
    for split in cfg.splits or list(source["splits"]):
        if split not in source["splits"]:
            raise DataFormatError(f"data.shards={cfg.data.shards} holds no split {split!r}")
        for shard in split_shards(source, split, cfg.data.shards):
            if not shard.sha256:
                raise DataFormatError(f"{join_url(cfg.data.shards, MANIFEST_NAME)}: shard {shard.path} has no "
                                      "sha256; re-shard with radiodiff-shard")
            plan = plan_digest({**settings, "source_sha256": shard.sha256}, [shard.path])
            prior = old.get(shard.path)
            tasks.append(EncodeTask(split, shard, plan, prior if prior is not None and prior.get("plan") == plan
                                    else None))
    return tasks


def kept_shard(task: EncodeTask, cfg: EncodeConfig) -> EncodeResult | None:
    """The previous cache shard of the same plan, if its file is intact."""
    if task.previous is None or not is_intact(cfg.out, task.previous):
        return None
    entry = task.previous
    return EncodeResult(task.split, entry["path"], task.plan, str(task.shard.sha256), entry["num_samples"],
                        entry["bytes"], entry["sha256"], status="kept")


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls on CUDA (TF32 off) for the duration: the moments are stored once."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def encode_task(task: EncodeTask, cfg: EncodeConfig, data: DataConfig, vae_cfg: AutoencoderConfig,
                weights: dict[str, torch.Tensor], writer: ShardSetWriter) -> EncodeResult:
    """Body of one Ray task: read, encode and stage one cache shard."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a GPU when the task asked for one
    vae = AutoencoderKL(vae_cfg)
    vae.load_state_dict(weights, strict=True)
    vae.requires_grad_(False).eval().to(device)
    url = join_url(cfg.data.shards, task.shard.path)
    with full_fp32():
        data_bytes, count = encode_shard(fetch_shard(cfg.data.shards, task.shard), url, data,
                                         lambda x: posterior_moments(vae, x.to(device)), batch_size=cfg.batch_size)
    if count != task.shard.num_samples:
        raise DataFormatError(f"{url}: shard holds {count} samples, the manifest says {task.shard.num_samples}")
    writer.stage(task.shard.path, data_bytes)
    return EncodeResult(task.split, task.shard.path, task.plan, str(task.shard.sha256), count, len(data_bytes),
                        sha256(data_bytes))


def build_cache(tasks: list[EncodeTask], cfg: EncodeConfig, data: DataConfig, vae: FrozenVae,
                writer: ShardSetWriter) -> list[EncodeResult]:
    """Keep the intact shards, encode and stage the others (in a ``ray_session``); results in plan order."""
    import ray

    checking = [task for task in tasks if task.previous is not None]
    checked = dict(zip(map(id, checking), run_tasks(kept_shard, checking, cfg, desc="checking latent shards")))
    kept = [checked.get(id(task)) for task in tasks]
    todo = [task for task, result in zip(tasks, kept) if result is None]
    if todo:
        weights = ray.put({k: v.detach().cpu() for k, v in vae.model.state_dict().items()})
        resources = {"num_gpus": cfg.gpus_per_task} if cfg.gpus_per_task else None
        built = iter(run_tasks(encode_task, todo, cfg, data, vae.config, weights, writer, desc="latent shards",
                               resources=resources))
        kept = [result if result is not None else next(built) for result in kept]
    return [result for result in kept if result is not None]


def run_encode(cfg: EncodeConfig) -> dict:
    """Plan, write and commit a latent cache (``pipeline.shard_set``: a failed run changes nothing);
    returns its manifest."""
    from pipeline.ray_setup import ray_session

    check_output(cfg.out)
    writer = ShardSetWriter(cfg.out)
    check_locations(cfg, writer.fs, writer.root)
    vae = load_frozen_vae(cfg.vae.checkpoint, torch.device("cpu"))
    source = read_manifest(cfg.data.shards)
    data = encode_data(vae, source, cfg.data.shards)
    record = vae_record(vae)
    settings = {"format": LATENT_MANIFEST.format, "version": LATENT_MANIFEST.version,
                "vae": record["weights_sha256"], "data": cache_data(data)}
    with writer.run("radiodiff-encode"):
        tasks = plan_tasks(cfg, source, settings, writer.previous_manifest())
        with ray_session(cfg.ray):
            results = build_cache(tasks, cfg, data, vae, writer)
        written = [r.path for r in results if r.status == "written"]
        print(f"latent shards: {len(written)} written, {len(results) - len(written)} kept "
              "(plan and checksum matched)")
        channels, height, width = vae.model.latent_shape(data.image_size)
        manifest = build_latent_manifest(moments_shape=(2 * channels, height, width), vae=record,
                                         data=cache_data(data), source_root=cfg.data.shards, source=source,
                                         shards=[(r.split, r.entry()) for r in results])
        writer.publish(written, manifest)
    return manifest


def summarize(manifest: dict, seconds: float) -> str:
    vae, moments = manifest["vae"], manifest["moments"]
    head = (f"wrote the latent cache in {seconds:.1f} s: moments {tuple(moments['shape'])} {moments['dtype']} "
            f"per map, of VAE checkpoint {vae['checkpoint']} (step {vae['step']}), data {manifest['data']}")
    lines = [head]
    for split, entry in manifest["splits"].items():
        size = sum(s["bytes"] for s in entry["shards"]) / 1e6
        lines.append(f"  {split:5s} {entry['num_samples']:7d} samples {len(entry['shards']):4d} shards {size:10.1f} MB")
    lines.append("train stage 2 from it with radiodiff-train-ldm data.latents=<this folder> (the same "
                 "vae.checkpoint and data.shards)")
    return "\n".join(lines)


def encode_command(cfg: EncodeConfig) -> int:
    start = time.perf_counter()
    manifest = run_encode(cfg)
    print(summarize(manifest, time.perf_counter() - start))
    return 0


def main() -> int:
    from radiodiff.cli import run_app

    return run_app("encode", encode_command)
