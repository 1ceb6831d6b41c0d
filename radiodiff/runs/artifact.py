"""A trained run as an artifact: its config, its stage, its committed checkpoints and its models.

Every reader of a run goes through here: stage 2 (the frozen VAE), ``radiodiff-eval``,
``radiodiff-sample``, ``tools/export_checkpoint.py`` and the sweeps. A VAE checkpoint exports the
bare autoencoder (``autoencoder_weights.pt``); an LDM checkpoint holds DeepSpeed's model file (the
full U-Net state dict at ZeRO <= 2) and the EMA, and its config names the frozen VAE run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch

from radiodiff.config import (
    AutoencoderConfig,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    TrainLdmConfig,
    TrainVaeConfig,
)
from radiodiff.diffusion.latent_scale import AUTO, LatentScale
from radiodiff.models.autoencoder import AutoencoderKL
from radiodiff.models.ema import EMA
from radiodiff.models.unet import build_unet
from radiodiff.runs import layout

STAGE_SCHEMAS = {"vae": TrainVaeConfig, "ldm": TrainLdmConfig}
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
class FrozenVae:
    """The autoencoder of a VAE run, frozen, with the config and checkpoint it came from."""

    model: AutoencoderKL
    config: AutoencoderConfig
    checkpoint: Path
    data: DataConfig  # the data settings the VAE was trained with


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
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run_dir={run_dir} is a file, not a run directory")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir={run_dir}: no such directory")
    if not layout.committed_steps(run_dir):
        raise FileNotFoundError(f"run_dir={run_dir}: no committed checkpoint under {run_dir / layout.CHECKPOINTS}")
    return open_checkpoint(layout.resolve_checkpoint(run_dir))


def open_checkpoint(folder: Path) -> TrainedRun:
    """One committed checkpoint folder (verified against its commit record) and its run's config."""
    layout.verify_checkpoint(folder)
    meta = layout.read_meta(folder)
    stage = meta.get("stage")
    if stage not in STAGE_SCHEMAS:
        raise ValueError(f"{folder / layout.META_FILE}: unknown stage {stage!r}; expected 'vae' or 'ldm'")
    if int(meta.get("zero_stage", 0)) > 2:
        raise ValueError(f"{folder}: saved at ZeRO stage {meta['zero_stage']}; runs are read from ZeRO 0-2 checkpoints")
    run_dir = layout.run_dir_of(folder)
    return TrainedRun(run_dir, stage, int(meta["step"]), folder, layout.read_run_config(run_dir, STAGE_SCHEMAS[stage]))


def latent_scale(diffusion: DiffusionConfig, autoencoder: AutoencoderConfig, checkpoint: Path | None = None) -> float:
    """The latent scale factor of stage 2: the diffusion config's number, the value an ``auto`` run
    stored with ``checkpoint``, else the autoencoder's ``scaling_factor``."""
    if diffusion.scale_factor == AUTO:
        if checkpoint is None:
            raise ValueError("diffusion.scale_factor=auto is measured by training; no checkpoint to read it from")
        stored = LatentScale(0.0)
        stored.load_state_dict(layout.load_extra(checkpoint, layout.LATENT_SCALE))
        return stored.value
    return float(diffusion.scale_factor) if diffusion.scale_factor is not None else autoencoder.scaling_factor


def load_frozen_vae(path: str | Path, device: torch.device) -> FrozenVae:
    """The autoencoder of a VAE run (its newest committed checkpoint) or of one checkpoint folder."""
    run = open_checkpoint(layout.resolve_checkpoint(path))
    if run.stage != "vae":
        raise ConfigError(f"vae.checkpoint={path} is a {run.stage} run; stage 2 needs a VAE run")
    cfg = run.config.model.autoencoder
    autoencoder = AutoencoderKL(cfg)
    weights = layout.extra_file(run.checkpoint, layout.AUTOENCODER_WEIGHTS)
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: the autoencoder weights {weights} are missing")
    autoencoder.load_state_dict(layout.load_tensor_file(weights), strict=True)
    autoencoder.requires_grad_(False).eval().to(device)
    return FrozenVae(autoencoder, cfg, run.checkpoint, run.config.data)


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


def load_unet(run: TrainedRun, device: torch.device, use_ema: Optional[bool]) -> tuple[torch.nn.Module, bool]:
    """The run's U-Net in eval mode; with ``use_ema`` (None: when the checkpoint has one) the EMA weights."""
    cfg = run.config
    unet = build_unet(cfg.model.unet, cfg.model.condition)
    state = layout.load_engine_module(run.checkpoint, layout.UNET_ENGINE)
    unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    ema_path = layout.extra_file(run.checkpoint, layout.EMA_STATE)
    if use_ema is None:
        use_ema = ema_path.is_file()
    if use_ema:
        if not ema_path.is_file():
            raise FileNotFoundError(f"use_ema=true but {ema_path} is missing")
        ema = EMA(unet, cfg.ema)
        ema.load_state_dict(layout.load_tensor_file(ema_path))
        ema.copy_to(unet)
    return unet.requires_grad_(False).eval().to(device), use_ema


def load_models(run: TrainedRun, device: torch.device, *, use_ema: Optional[bool] = None) -> LoadedModels:
    """The run's models in eval mode on ``device``: the autoencoder, plus the U-Net for an LDM run."""
    if run.stage == "vae":
        return LoadedModels(load_frozen_vae(run.checkpoint, device).model)
    cfg = run.config
    try:
        vae = load_frozen_vae(cfg.vae.checkpoint, device)
    except (FileNotFoundError, layout.CheckpointError) as err:  # e.g. the VAE run moved since
        raise type(err)(f"{err} (this LDM run's VAE: vae.checkpoint in {run.run_dir / layout.CONFIG_FILE})") from None
    unet, ema = load_unet(run, device, use_ema)
    return LoadedModels(vae.model, unet, latent_scale(cfg.diffusion, vae.config, run.checkpoint), cfg.diffusion.eps,
                        ema)
