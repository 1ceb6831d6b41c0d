"""Loading a trained run for evaluation and prediction: its config, newest checkpoint and models.

A run directory holds ``config.yaml`` and ``checkpoints/step_XXXXXXXX/`` folders; only committed
ones count. ``meta.json`` names the stage. A VAE checkpoint exports the bare autoencoder
(``autoencoder_weights.pt``); an LDM checkpoint holds DeepSpeed's model file (the full U-Net state
dict at ZeRO <= 2) and the EMA, and its config names the frozen VAE run it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch

from radiodiff.config import ConfigError, DataConfig, TrainLdmConfig, TrainVaeConfig
from radiodiff.models.autoencoder import AutoencoderKL
from radiodiff.models.unet import build_unet
from radiodiff.train import checkpoint
from radiodiff.train.ema import EMA
from radiodiff.train.stages import load_frozen_vae

UNET_WEIGHTS = Path("unet") / "mp_rank_00_model_states.pt"  # DeepSpeed's model file of engine "unet"
# Data options the trained model depends on: evaluating with other values would feed it other inputs.
MODEL_DATA_KEYS = ("image_size", "value_range", "cars_input", "threshold")


@dataclass
class TrainedRun:
    run_dir: Path
    stage: str  # "vae" | "ldm"
    step: int
    checkpoint: Path  # the committed checkpoint folder used
    config: TrainVaeConfig | TrainLdmConfig


@dataclass
class LoadedModels:
    """What a predictor needs; ``unet``/``scale_factor``/``eps`` are None for a VAE run."""

    vae: AutoencoderKL
    unet: Optional[torch.nn.Module] = None
    scale_factor: Optional[float] = None
    eps: Optional[float] = None
    ema: bool = False  # whether the U-Net carries the EMA weights


def open_run(run_dir: str | Path) -> TrainedRun:
    """The newest committed checkpoint of ``run_dir`` and the run's config; errors name the path."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir={run_dir}: no such directory")
    steps = checkpoint.committed_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"run_dir={run_dir}: no committed checkpoint under {run_dir / checkpoint.CHECKPOINTS}")
    step, folder = steps[-1]
    meta = checkpoint.read_meta(folder)
    stage = meta.get("stage")
    schemas = {"vae": TrainVaeConfig, "ldm": TrainLdmConfig}
    if stage not in schemas:
        raise ValueError(f"{folder / 'meta.json'}: unknown stage {stage!r}; expected 'vae' or 'ldm'")
    if int(meta.get("zero_stage", 0)) > 2:
        raise ValueError(f"{folder}: saved at ZeRO stage {meta['zero_stage']}; evaluation reads ZeRO 0-2 checkpoints")
    return TrainedRun(run_dir, stage, step, folder, checkpoint.read_run_config(run_dir, schemas[stage]))


def merge_data(run_data: DataConfig, given: DataConfig, keys: set[str]) -> DataConfig:
    """The run's data config with the ``keys`` a user set replaced by ``given``'s values."""
    names = {f.name for f in fields(DataConfig)}
    unknown = sorted(keys - names)
    if unknown:
        raise ConfigError(f"data.{unknown[0]} is not a data option")
    for key in sorted(keys & set(MODEL_DATA_KEYS)):
        if getattr(given, key) != getattr(run_data, key):
            raise ConfigError(f"data.{key}={getattr(given, key)!r}: the run was trained with "
                              f"{getattr(run_data, key)!r}, and its model expects that")
    return replace(run_data, **{key: getattr(given, key) for key in keys})


def _load_unet(run: TrainedRun, device: torch.device, use_ema: Optional[bool]) -> tuple[torch.nn.Module, bool]:
    cfg = run.config
    path = run.checkpoint / UNET_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{run.checkpoint}: the U-Net weights {path} are missing")
    unet = build_unet(cfg.model.unet, cfg.model.condition)
    state = torch.load(path, weights_only=True, map_location="cpu")["module"]
    unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    ema_path = run.checkpoint / "ema.pt"
    if use_ema is None:
        use_ema = ema_path.is_file()
    if use_ema:
        if not ema_path.is_file():
            raise FileNotFoundError(f"use_ema=true but {ema_path} is missing")
        ema = EMA(unet, cfg.ema)
        ema.load_state_dict(checkpoint.load_extra(run.checkpoint, "ema"))
        ema.copy_to(unet)
    return unet.requires_grad_(False).eval().to(device), use_ema


def load_models(run: TrainedRun, device: torch.device, *, use_ema: Optional[bool] = None) -> LoadedModels:
    """The run's models in eval mode on ``device``: the autoencoder, plus the U-Net for an LDM run."""
    if run.stage == "vae":
        return LoadedModels(load_frozen_vae(str(run.checkpoint), device)[0])
    cfg = run.config
    vae, vae_cfg, _ = load_frozen_vae(cfg.vae.checkpoint, device)
    unet, ema = _load_unet(run, device, use_ema)
    scale = cfg.diffusion.scale_factor or vae_cfg.scaling_factor
    return LoadedModels(vae, unet, scale, cfg.diffusion.eps, ema)
