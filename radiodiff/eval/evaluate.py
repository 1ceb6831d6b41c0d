"""radiodiff-eval: per-image metrics of a trained run on one split, written to ``out_dir``.

Every rank reads its share of the split (a finite, unshuffled pass) at the native 256x256, predicts
(``predict.make_predictor``) and computes per-image metrics on the [0, 1] gray scale; rank 0
gathers the per-sample rows and writes::

    metrics.json     means of every metric, the mean-map baseline's, model seconds per map (at
                     batch_size, and at batch 1 unless time_batch1=false), and what was evaluated
    per_sample.csv   key, map, tx, every metric and every baseline metric, per sample
    grid.png         rows of [buildings | transmitter | ground truth | prediction | |error|]

The baseline predicts, for every sample, the per-pixel mean target of the train split (its first
``baseline_max_samples`` samples in shard order): what a model that ignores its input scores.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from radiodiff.config import DataConfig, EvalConfig
from radiodiff.data.manifest import read_manifest
from radiodiff.data.schema import NATIVE_SIZE, DataFormatError
from radiodiff.data.shards import ShardLoader
from radiodiff.dist import DistInfo, broadcast_object
from radiodiff.metrics import all_metrics
from radiodiff.runs import TrainedRun, load_models
from radiodiff.runs.predict import (
    BATCH1_MAPS,
    Predict,
    inference_precision,
    make_predictor,
    predict_native,
    sampler_generator,
    seconds_per_map_batch1,
    to_unit_scale,
)

METRICS = ("psnr", "ssim", "nmse", "rmse", "rmse_db")
GRID_COLUMNS = ("buildings", "transmitter", "ground truth", "prediction", "absolute error")
TX_MARK_PX = 7  # the transmitter is one pixel; the grid shows it as a square this wide


@dataclass
class RankResult:
    rows: list[dict] = field(default_factory=list)
    grid: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (key, (5, 256, 256) uint8)
    seconds: float = 0.0  # model time (prediction only)
    # Rank 0's first maps (native cond, target), timed at batch 1 after the pass; never gathered.
    batch1_maps: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def check_split(data: DataConfig, split: str) -> dict:
    manifest = read_manifest(data.shards)
    if split not in manifest["splits"]:
        raise DataFormatError(f"data.shards={data.shards}: the manifest has no split {split!r} "
                              f"(it has {', '.join(sorted(manifest['splits']))})")
    return manifest


def mean_train_map(data: DataConfig, max_samples: int | None, batch_size: int) -> torch.Tensor:
    """(1, 256, 256) per-pixel mean target in [0, 1] over the train split's first samples."""
    check_split(data, "train")
    loader = ShardLoader(data, "train", batch_size=batch_size, epochs=1, shuffle=False, num_workers=0)
    total = torch.zeros(1, NATIVE_SIZE, NATIVE_SIZE, dtype=torch.float64)
    count = 0
    for batch in loader:
        take = batch["target"] if max_samples is None else batch["target"][: max_samples - count]
        total += to_unit_scale(take, data).double().sum(dim=0)
        count += take.shape[0]
        if max_samples is not None and count >= max_samples:
            break
    if count == 0:
        raise DataFormatError(f"data.shards={data.shards}: the train split is empty; no baseline map")
    return (total / count).float()


def rank_cap(max_samples: int | None, dist: DistInfo) -> int | None:
    """This rank's share of ``max_samples`` (the shares add up to it)."""
    if max_samples is None:
        return None
    return max_samples // dist.world_size + int(dist.rank < max_samples % dist.world_size)


def grid_row(cond: torch.Tensor, gt: torch.Tensor, pred: torch.Tensor, data: DataConfig) -> np.ndarray:
    """(5, 256, 256) uint8 images of one sample for the grid."""
    cond = to_unit_scale(cond, data)  # (3, 256, 256)
    tx = F.max_pool2d(cond[1:2][None], TX_MARK_PX, stride=1, padding=TX_MARK_PX // 2)[0]
    images = torch.cat([cond[0:1], tx, gt, pred, (pred - gt).abs()])  # (5, 256, 256)
    return torch.round(images.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()


def sample_rows(batch: dict, values: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    for i, key in enumerate(batch["key"]):
        row = {"key": key, "map": int(batch["map"][i]), "tx": int(batch["tx"][i])}
        row.update({name: float(values[name][i]) for name in METRICS})
        row.update({f"baseline_{name}": float(baseline[name][i]) for name in METRICS})
        rows.append(row)
    return rows


def evaluate_rank(cfg: EvalConfig, predict: Predict, baseline_map: torch.Tensor, dist: DistInfo) -> RankResult:
    """This rank's share of the split: per-sample rows, grid images and model time."""
    data = replace(cfg.data, image_size=NATIVE_SIZE)  # metrics at the native size; models get resized inputs
    loader = ShardLoader(data, cfg.split, batch_size=cfg.batch_size, rank=dist.rank, world_size=dist.world_size,
                         epochs=1, shuffle=False, num_workers=0)
    cap, result = rank_cap(cfg.max_samples, dist), RankResult()
    bar = tqdm(total=len(loader), desc=f"radiodiff-eval {cfg.split}", unit="batch", disable=not dist.is_main)
    for batch in loader:
        if cap is not None:
            batch = {k: v[: cap - len(result.rows)] for k, v in batch.items()}
        cond, target = batch["cond"], batch["target"]  # (B, 3, 256, 256), (B, 1, 256, 256)
        started = time.perf_counter()
        pred, gt = predict_native(predict, cond, target, cfg.data, dist.device)
        result.seconds += time.perf_counter() - started  # .cpu() waits for the device
        base = baseline_map.expand_as(gt)
        result.rows += sample_rows(batch, all_metrics(pred, gt), all_metrics(base, gt))
        for i in range(min(len(batch["key"]), cfg.num_grid - len(result.grid))):
            result.grid.append((batch["key"][i], grid_row(cond[i], gt[i], pred[i], cfg.data)))
        if cfg.time_batch1 and dist.is_main:
            result.batch1_maps += [(cond[i:i + 1].clone(), target[i:i + 1].clone())
                                   for i in range(min(len(cond), BATCH1_MAPS - len(result.batch1_maps)))]
        bar.update(1)
        if cap is not None and len(result.rows) >= cap:
            break
    bar.close()
    return result


def time_batch1(predict: Predict, maps: list[tuple[torch.Tensor, torch.Tensor]], data: DataConfig,
                device: torch.device) -> float | None:
    """Model seconds per map at batch 1 over ``maps`` (None without maps), timed like the pass."""
    if not maps:
        return None
    return seconds_per_map_batch1(lambda i: predict_native(predict, *maps[i], data, device), len(maps), device)


def gather(result: RankResult, dist: DistInfo) -> list[RankResult] | None:
    """Every rank's result on rank 0 (None elsewhere)."""
    if dist.world_size == 1 or not torch_dist.is_initialized():
        return [result]
    gathered = [None] * dist.world_size if dist.is_main else None
    torch_dist.gather_object(result, gathered, dst=0)
    return gathered


def summary(rows: list[dict], prefix: str = "") -> dict[str, float]:
    """Means over samples (per image, then over images), in a fixed row order."""
    return {name: math.fsum(row[prefix + name] for row in rows) / len(rows) for name in METRICS}


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})


def write_grid(grid: list[tuple[str, np.ndarray]], path: Path) -> None:
    """Rows of 5 images of 256x256, no spacing: (rows * 256, 5 * 256) mode L."""
    rows = [np.concatenate(list(images), axis=1) for _, images in grid]
    Image.fromarray(np.concatenate(rows, axis=0), mode="L").save(path)


def write_outputs(cfg: EvalConfig, run: TrainedRun, results: list[RankResult], info: dict) -> dict:
    rows = sorted((row for r in results for row in r.rows), key=lambda row: (row["map"], row["tx"]))
    if not rows:
        raise DataFormatError(f"split {cfg.split!r} of {cfg.data.shards} has no samples to evaluate")
    grid = sorted((g for r in results for g in r.grid), key=lambda g: tuple(map(int, g[0].split("_"))))
    out_dir = Path(cfg.out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {**summary(rows), "num_samples": len(rows), "split": cfg.split, "stage": run.stage,
               "checkpoint_step": run.step, "checkpoint": str(run.checkpoint), "run_dir": str(run.run_dir),
               # Model seconds per map on one device: all ranks' model time over all maps.
               "seconds_per_map": sum(r.seconds for r in results) / len(rows), "batch_size": cfg.batch_size,
               "baseline": {"name": "mean_train_map", **summary(rows, "baseline_"),
                            "num_train_samples": info.pop("num_train_samples")}, **info}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_csv(rows, out_dir / "per_sample.csv")
    if grid and cfg.num_grid > 0:
        write_grid(grid[: cfg.num_grid], out_dir / "grid.png")
    return metrics


def train_count(data: DataConfig, cap: int | None) -> int:
    total = sum(s["num_samples"] for s in read_manifest(data.shards)["splits"]["train"]["shards"])
    return total if cap is None else min(cap, total)


def evaluate(cfg: EvalConfig, run: TrainedRun, dist: DistInfo) -> dict | None:
    """Evaluate ``run`` on ``cfg.split`` on every rank; rank 0 writes the outputs and returns metrics."""
    manifest = check_split(cfg.data, cfg.split)
    native = replace(cfg.data, image_size=NATIVE_SIZE)
    # Rank 0 averages the train maps once; the others receive the map (the same on every rank).
    baseline = mean_train_map(native, cfg.baseline_max_samples, cfg.batch_size) if dist.is_main else None
    baseline = broadcast_object(baseline)
    models = load_models(run, dist.device, use_ema=cfg.use_ema)
    generator = sampler_generator(cfg.seed, dist.rank, dist.device)
    precision = inference_precision(cfg.precision, dist.device)
    predict = make_predictor(models, cfg.data, sampler=cfg.sampler, generator=generator, precision=precision)
    result = evaluate_rank(cfg, predict, baseline, dist)
    # After the pass, so that the pass draws the same sampler noise with or without this timing.
    batch1 = time_batch1(predict, result.batch1_maps, cfg.data, dist.device)
    result.batch1_maps = []
    results = gather(result, dist)
    if not dist.is_main:
        return None
    ldm = run.stage == "ldm"
    info = {"protocol": manifest.get("protocol"), "simulation": manifest.get("simulation"),
            "shards": cfg.data.shards, "image_size": cfg.data.image_size, "world_size": dist.world_size,
            "sampler_steps": cfg.sampler.steps if ldm else None, "sampler_draws": cfg.sampler.draws if ldm else None,
            "sampler_estimate": cfg.sampler.estimate if ldm else None, "use_ema": models.ema if ldm else None,
            "seed": cfg.seed, "precision": precision, "seconds_per_map_batch1": batch1,
            "num_train_samples": train_count(cfg.data, cfg.baseline_max_samples)}
    return write_outputs(cfg, run, results, info)
