"""Benchmarks whose figures the README records. Each compares side by side in one run.

    python tools/bench.py data   [--maps 24 --tx 16 --batch 16 --repeats 3]
    python tools/bench.py synth  [--maps 4 --tx 16]
    python tools/bench.py models [--presets tiny,reference --image-size 256 --batch 4 --iters 5 ...]
    python tools/bench.py cache  [--presets tiny,reference --image-size 256 --batch 4 --precision bf16 ...]

data:  samples/s of the shard reader (radiodiff.data.shards, 2 workers) and of a per-file PNG
       folder loader written the way the RadioUNet loader works (skimage imread of each file per
       sample, /256 scaling, numpy stacking; its DataLoader with 1 worker), on the same synthetic
       data, alternating, in steady state (from the first batch on), printed as a ratio.
synth: milliseconds per simulated gain map on one core (one thread), per model.
models: ms per image of the real stage-1 (VAE-GAN) and stage-2 (LDM) training steps (forward, backward
       and optimizer step) per preset, fp32 vs bf16 autocast, channels_last off vs on, with FLOPs, and the
       LDM step with the opt-in derived channels (--stages ldm,ldm-derived); see tools/bench_models.py.
cache: ms per image of the real LDM step encoding its targets with the frozen VAE vs drawing from
       cached posterior moments (radiodiff-encode), alternating on one engine, as a ratio; see
       tools/bench_cache.py.
train: steps/s and images/s of radiodiff-train-vae/-ldm per precision and ZeRO stage (GPU memory on
       a GPU); see tools/bench_train.py.
quality: PSNR/SSIM/NMSE/RMSE of the trained VAE and LDM against a resolution ceiling, the mean map, a
       direct conv U-Net regressor and a transmitter ablation (about 26 min on 2 cores; --quick); see
       tools/bench_quality.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


class FolderLoaderDataset:
    """Per-file loading as the RadioUNet loader does it: three imread calls per sample."""

    def __init__(self, root: Path, samples: list[tuple[int, int]]) -> None:
        self.root, self.samples = root, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        import torch
        from skimage import io

        map_id, tx = self.samples[index]
        buildings = np.asarray(io.imread(self.root / "png" / "buildings_complete" / f"{map_id}.png")) / 256
        antenna = np.asarray(io.imread(self.root / "png" / "antennas" / f"{map_id}_{tx}.png")) / 256
        gain = np.expand_dims(np.asarray(io.imread(self.root / "gain" / "DPM" / f"{map_id}_{tx}.png")), 2) / 256
        inputs = np.stack([buildings, antenna], axis=2)
        return torch.from_numpy(inputs.transpose(2, 0, 1)).float(), torch.from_numpy(gain.transpose(2, 0, 1)).float()


def time_pass(make_iterable, count) -> float:
    """Steady-state samples per second of one full pass: the clock starts when the first batch
    arrives, so worker start-up (paid once by an endless training stream) is left out for both."""
    iterator = iter(make_iterable())
    next(iterator)
    start, seen = time.perf_counter(), 0
    for batch in iterator:
        seen += count(batch)
    return seen / (time.perf_counter() - start)


def bench_data(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader

    from radiodiff.config import DataConfig
    from radiodiff.data.radiomapseer import RadioMapSeer
    from pipeline.synthetic_shards import synthetic_shards
    from radiodiff.data.shards import ShardLoader

    with tempfile.TemporaryDirectory() as tmp:
        root, shards = synthetic_shards(Path(tmp), num_maps=args.maps, num_tx=args.tx)
        cfg = DataConfig(root=str(root), shards=str(shards), num_workers=2)
        samples = [(s.map, s.tx) for s in RadioMapSeer(cfg).sample_ids("train")]
        folder = FolderLoaderDataset(root, samples)

        def shard_pass():
            return ShardLoader(cfg, "train", batch_size=args.batch, epochs=1, num_workers=2)

        def folder_pass():
            return DataLoader(folder, batch_size=args.batch, shuffle=True, num_workers=1)

        time_pass(shard_pass, lambda b: len(b["key"]))  # warm the page cache and imports
        time_pass(folder_pass, lambda b: len(b[0]))
        shard_rates, folder_rates = [], []
        for _ in range(args.repeats):  # alternate, so that machine noise hits both alike
            shard_rates.append(time_pass(shard_pass, lambda b: len(b["key"])))
            folder_rates.append(time_pass(folder_pass, lambda b: len(b[0])))
        slots = slot_rows(cfg, args.batch)
    shard_rate, folder_rate = statistics.median(shard_rates), statistics.median(folder_rates)
    print(f"\ndata reader benchmark: {len(samples)} train samples, batch {args.batch}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"  shard reader (2 workers)          {shard_rate:8.1f} samples/s")
    print(f"  per-file folder loader (1 worker) {folder_rate:8.1f} samples/s")
    print(f"  ratio                             {shard_rate / folder_rate:8.2f}x")
    print(slots_table(slots))


SLOT_GEOMETRIES = ((1, 0), (2, 2), (8, 2))  # (ranks, workers per rank): 1, 4 and 16 slots


def slot_rows(cfg, batch: int) -> list[tuple]:
    """One epoch of the train split on every rank of each geometry, the ranks one after another in
    this process: samples/s per rank and MB read from the shard root per rank."""
    from radiodiff.data.manifest import read_manifest
    from radiodiff.data.shards import ShardLoader

    split_mb = sum(s["bytes"] for s in read_manifest(cfg.shards)["splits"]["train"]["shards"]) / 1e6
    rows = []
    for ranks, workers in SLOT_GEOMETRIES:
        rates, megabytes = [], []
        for rank in range(ranks):
            loader = ShardLoader(cfg, "train", batch_size=batch, rank=rank, world_size=ranks, epochs=1,
                                 num_workers=workers)
            start = time.perf_counter()
            count = sum(len(b["key"]) for b in loader)
            rates.append(count / (time.perf_counter() - start))
            megabytes.append(loader.bytes_read / 1e6)
        rows.append((ranks, workers, statistics.median(rates), max(megabytes), split_mb))
    return rows


def slots_table(rows: list[tuple]) -> str:
    lines = ["\nreader at scale (one epoch of the train split per rank; every sample once over all ranks):",
             "| slots | ranks x workers | samples/s per rank | MB read per rank | train split MB |",
             "| --- | --- | --- | --- | --- |"]
    for ranks, workers, rate, megabytes, split_mb in rows:
        lines.append(f"| {ranks * max(workers, 1)} | {ranks} x {workers} | {rate:.0f} | {megabytes:.1f} "
                     f"| {split_mb:.1f} |")
    lines.append("A rank's workers each read the shards holding their samples: at most workers x the split per epoch;")
    lines.append("with data.cache_dir a node fetches each shard from the root once, its ranks read the local copy.")
    return "\n".join(lines)


def bench_synth(args: argparse.Namespace) -> None:
    import torch

    from radiodiff.data.propagation import simulate_gain
    from radiodiff.data.synthetic import choose_transmitters, generate_city

    torch.set_num_threads(1)
    rates: dict[str, list[float]] = {}
    for map_id in range(args.maps):
        city = generate_city(seed=0, map_id=map_id)
        positions = choose_transmitters(city, args.tx, seed=0, map_id=map_id)
        for model in ("DPM", "IRT2", "carsDPM"):
            cars = city.cars if model.startswith("cars") else None
            start = time.perf_counter()
            for tx_rc in positions:
                simulate_gain(city.buildings, tx_rc, model, cars=cars)
            rates.setdefault(model, []).append((time.perf_counter() - start) / len(positions) * 1e3)
    print(f"\nsynthetic gain maps, one core: {args.maps} maps x {args.tx} tx")
    for model, values in rates.items():
        print(f"  {model:8s} {statistics.median(values):6.1f} ms per gain map")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    data = sub.add_parser("data", help="shard reader vs per-file folder loader")
    data.add_argument("--maps", type=int, default=24)
    data.add_argument("--tx", type=int, default=16)
    data.add_argument("--batch", type=int, default=16)
    data.add_argument("--repeats", type=int, default=3)
    synth = sub.add_parser("synth", help="time per simulated gain map")
    synth.add_argument("--maps", type=int, default=4)
    synth.add_argument("--tx", type=int, default=16)
    import bench_cache
    import bench_models  # siblings: a script's own folder is on its import path
    import bench_quality
    import bench_train

    models = sub.add_parser("models", help="time per image of the two real training steps")
    bench_models.add_arguments(models)
    cache = sub.add_parser("cache", help="the LDM step with and without the latent cache")
    bench_cache.add_arguments(cache)
    training = sub.add_parser("train", help="steps/s and images/s of the training commands")
    bench_train.add_arguments(training)
    quality = sub.add_parser("quality", help="model quality against references, on a synthetic set")
    bench_quality.add_arguments(quality)
    args = parser.parse_args(argv)
    commands = {"data": bench_data, "synth": bench_synth, "models": bench_models.bench_models,
                "cache": bench_cache.bench_cache,
                "train": bench_train.bench_train, "quality": bench_quality.bench_quality}
    commands[args.what](args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
