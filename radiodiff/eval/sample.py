"""radiodiff-sample: radio-map PNGs from a trained LDM run, for one map or a RadioMapSeer folder.

Inputs are RadioMapSeer PNGs (256x256 mode L: buildings 255 on buildings, the antenna 255 at the
transmitter) and go through ``schema.to_tensors``, the training transforms. Output is the dataset's
gain convention: mode L 256x256, gray = round(255 * prediction), building pixels 0 when
``mask_buildings``. The model time is printed: seconds per map at ``batch_size`` in folder mode
(then, unless ``time_batch1=false``, at batch 1 on a few of the maps), the one call's in one-map mode.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from radiodiff.cli import check_output_dir, check_output_file
from radiodiff.config import ConfigError, DataConfig, SampleConfig
from radiodiff.data.radiomapseer import Layout
from radiodiff.data.schema import NATIVE_SIZE, check_antenna, decode_png, to_tensors
from radiodiff.runs import load_models, open_run
from radiodiff.runs.predict import (
    BATCH1_MAPS,
    Predict,
    default_device,
    inference_precision,
    make_predictor,
    sampler_generator,
    seconds_per_map_batch1,
    speed_text,
    synchronize,
)

ANTENNA = re.compile(r"^(\d+)_(\d+)\.png$")


def read_map(path: str | Path) -> np.ndarray:
    """A 256x256 mode L PNG as (256, 256) uint8; errors name the file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a PNG file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return decode_png(path.read_bytes(), str(path))


def read_antenna(path: str | Path) -> np.ndarray:
    """An antenna PNG: exactly one transmitter pixel (255), as the sharder requires."""
    tx = read_map(path)
    check_antenna(tx, str(Path(path).expanduser()))
    return tx


def antenna_at(row: int, col: int) -> np.ndarray:
    """The antenna map RadioMapSeer stores for a transmitter at (row, col)."""
    tx = np.zeros((NATIVE_SIZE, NATIVE_SIZE), dtype=np.uint8)
    tx[row, col] = 255
    return tx


def condition(buildings: np.ndarray, tx: np.ndarray, cars: np.ndarray | None, data: DataConfig) -> torch.Tensor:
    """(3, s, s) model condition, through the training transforms (the gain map is a placeholder)."""
    cond, _ = to_tensors(buildings, tx, np.zeros_like(buildings), cars, data)
    return cond


def to_gray(pred: torch.Tensor, buildings: np.ndarray, mask_buildings: bool) -> np.ndarray:
    """(1, 256, 256) prediction in [0, 1] -> (256, 256) uint8 gray, buildings 0 when masked."""
    gray = torch.round(pred[0].double().clamp(0.0, 1.0) * 255.0).to(torch.uint8).cpu().numpy()
    if mask_buildings:
        gray[buildings > 0] = 0
    return gray


def _write(gray: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray, mode="L").save(path)


def _cars_for(cfg: SampleConfig, data: DataConfig) -> np.ndarray | None:
    if not data.cars_input:
        return None
    if cfg.cars is None:
        raise ConfigError(f"run {cfg.run_dir} was trained with data.cars_input=true: give cars=<png>")
    return read_map(cfg.cars)


def check_outputs(cfg: SampleConfig) -> None:
    """Before any work: ``out`` is a file name PIL can write, ``out_dir`` a folder we can write in."""
    if cfg.out_dir is not None:
        check_output_dir("out_dir", cfg.out_dir)
        return
    out = check_output_file("out", cfg.out)
    Image.init()
    image_format = Image.registered_extensions().get(out.suffix.lower())
    if image_format not in Image.SAVE:
        kind = f"{out.suffix!r} images" if out.suffix else "a file without an extension"
        raise ConfigError(f"out={cfg.out}: cannot write {kind}; give a .png file name")


def read_inputs(cfg: SampleConfig) -> tuple[np.ndarray, np.ndarray]:
    """One map's (buildings, antenna), each checked and named in errors (cars need the run's config)."""
    buildings = read_map(cfg.buildings)
    tx = read_antenna(cfg.antenna) if cfg.antenna is not None else antenna_at(cfg.tx_row, cfg.tx_col)
    return buildings, tx


def timed(predict: Predict, cond: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, float]:
    """The prediction of (B, 3, s, s) ``cond`` and its model seconds."""
    synchronize(device)
    started = time.perf_counter()
    pred = predict(cond, torch.zeros_like(cond[:, :1]))
    synchronize(device)
    return pred, time.perf_counter() - started


def sample_one(cfg: SampleConfig, inputs: tuple[np.ndarray, np.ndarray, np.ndarray | None], predict: Predict,
               data: DataConfig, device: torch.device) -> tuple[Path, float]:
    """Writes the one map; returns its path and the model seconds (a first call: warm-up included)."""
    buildings, tx, cars = inputs  # (256, 256) uint8 maps, cars None unless data.cars_input
    cond = condition(buildings, tx, cars, data)[None].to(device)
    pred, seconds = timed(predict, cond, device)
    out = Path(cfg.out).expanduser()
    _write(to_gray(pred[0], buildings, cfg.mask_buildings), out)
    return out, seconds


def folder_samples(root: Path) -> list[tuple[int, int]]:
    """(map, tx) of every antenna PNG of a RadioMapSeer root, in map then tx order."""
    folder = Layout(root).root / "png" / "antennas"
    if not folder.is_dir():
        raise FileNotFoundError(f"input_dir={root}: {folder} is missing (expected a RadioMapSeer layout)")
    found = [(int(m.group(1)), int(m.group(2))) for name in folder.iterdir() if (m := ANTENNA.match(name.name))]
    if not found:
        raise FileNotFoundError(f"input_dir={root}: no {{map}}_{{tx}}.png antenna files in {folder}")
    return sorted(found)


def sample_folder(cfg: SampleConfig, predict: Predict, data: DataConfig,
                  device: torch.device) -> tuple[int, float, float | None]:
    """Writes every map; returns their count and the model seconds per map at batch_size and at
    batch 1 (None when not timed)."""
    layout = Layout(Path(cfg.input_dir).expanduser())
    items = folder_samples(layout.root)
    out_dir = Path(cfg.out_dir).expanduser()
    seconds, first_conds = 0.0, []
    for start in range(0, len(items), cfg.batch_size):
        batch = items[start:start + cfg.batch_size]
        maps, conds = [], []
        for map_id, tx_id in batch:
            buildings = read_map(layout.buildings(map_id, "complete", 0))
            cars = read_map(layout.cars(map_id)) if data.cars_input else None
            conds.append(condition(buildings, read_antenna(layout.antenna(map_id, tx_id)), cars, data))
            maps.append(buildings)
        cond = torch.stack(conds).to(device)  # (B, 3, s, s)
        preds, batch_seconds = timed(predict, cond, device)
        seconds += batch_seconds
        if cfg.time_batch1:
            first_conds += [cond[i:i + 1] for i in range(min(len(cond), BATCH1_MAPS - len(first_conds)))]
        for (map_id, tx_id), buildings, pred in zip(batch, maps, preds):
            _write(to_gray(pred, buildings, cfg.mask_buildings), out_dir / f"{map_id}_{tx_id}.png")
    # After every map is written, so that the maps get the same sampler noise with or without this timing.
    batch1 = seconds_per_map_batch1(lambda i: timed(predict, first_conds[i], device), len(first_conds),
                                    device) if first_conds else None
    return len(items), seconds / len(items), batch1


def run_sample(cfg: SampleConfig) -> int:
    check_outputs(cfg)
    maps = read_inputs(cfg) if cfg.input_dir is None else None  # checked before the run is opened
    run = open_run(cfg.run_dir)
    if run.stage != "ldm":
        raise ConfigError(f"run_dir={cfg.run_dir} is a {run.stage} run; radiodiff-sample needs an LDM run")
    data = run.config.data
    inputs = None if maps is None else (*maps, _cars_for(cfg, data))
    device = default_device()
    models = load_models(run, device, use_ema=cfg.use_ema)
    generator = sampler_generator(cfg.seed, 0, device)
    predict = make_predictor(models, data, sampler=cfg.sampler, generator=generator,
                             precision=inference_precision(cfg.precision, device))
    if inputs is None:
        count, seconds_per_map, batch1 = sample_folder(cfg, predict, data, device)
        print(f"radiodiff-sample: {count} maps from {cfg.input_dir} -> {cfg.out_dir} (step {run.step}); "
              f"model time {speed_text(seconds_per_map, cfg.batch_size, batch1)}")
    else:
        out, seconds = sample_one(cfg, inputs, predict, data, device)
        print(f"radiodiff-sample: {out} (run {run.run_dir}, step {run.step}); model time {seconds:.4g} s "
              "(one map, a first call: warm-up included)")
    return 0


__all__ = ["antenna_at", "check_outputs", "folder_samples", "read_antenna", "read_map", "run_sample", "to_gray"]
