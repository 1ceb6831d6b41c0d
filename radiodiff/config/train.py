"""Training schemas: the loop, DeepSpeed, logging, and the two training commands."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from radiodiff.config.base import ConfigError, check_choice, check_positive
from radiodiff.config.data import DataConfig
from radiodiff.config.models import (
    AutoencoderConfig,
    ConditionEncoderConfig,
    DiffusionConfig,
    DiscriminatorConfig,
    EMAConfig,
    PerceptualConfig,
    SamplerConfig,
    UNetConfig,
    VaeGanLossConfig,
)

LR_DECAYS = ("cosine", "linear", "poly", "constant")
PRECISIONS = ("autocast", "bf16", "fp32")


@dataclass
class TrainConfig:
    """The optimisation loop shared by both stages (a step = one optimizer update)."""

    max_steps: int = 150000
    micro_batch: int = 2  # per rank
    grad_accum: int = 1  # micro-batches per update
    lr: float = 5e-6
    min_lr: float = 5e-7  # absolute floor the schedule decays to
    warmup_steps: int = 0
    lr_decay: str = "cosine"  # cosine | linear | poly | constant
    lr_power: float = 0.96  # for poly
    # Length of the decay; None: max_steps. Set it to stop early (train.max_steps) or extend a run
    # without changing the learning rates of the steps in between.
    lr_decay_steps: Optional[int] = None
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    ckpt_every: int = 5000
    log_every: int = 100
    val_every: int = 0  # 0 = no periodic validation
    val_batches: int = 2
    keep_last: int = 3  # committed checkpoints kept
    max_bad_steps: int = 5  # consecutive non-finite steps before the run aborts
    # Fault injection for tests and drills: the loss is made NaN at these steps (on all ranks, or
    # only on nan_rank when it is >= 0).
    nan_steps: list[int] = field(default_factory=list)
    nan_rank: int = -1
    requeue_on_preempt: bool = True  # under Slurm, rank 0 requeues the job after saving

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch", "grad_accum", "ckpt_every", "log_every", "keep_last",
                    "max_bad_steps", "val_batches"):
            check_positive(f"train.{key}", getattr(self, key))
        for key in ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "val_every"):
            check_positive(f"train.{key}", getattr(self, key), allow_zero=True)
        check_choice("train.lr_decay", self.lr_decay, LR_DECAYS)
        check_positive("train.lr_decay_steps", self.lr_decay_steps)
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} must not exceed train.lr={self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b <= 1.0 for b in self.betas):
            raise ConfigError(f"train.betas={self.betas} must be two values in [0, 1]")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # 0-3
    precision: str = "autocast"  # autocast: bf16 compute, fp32 master weights; bf16: bf16 weights; fp32

    def __post_init__(self) -> None:
        check_choice("deepspeed.zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_choice("deepspeed.precision", self.precision, PRECISIONS)


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"  # offline | online | disabled; `wandb sync <run_dir>/wandb` uploads later
    project: str = "radiodiff"
    entity: Optional[str] = None

    def __post_init__(self) -> None:
        check_choice("wandb.mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class ModelConfig:
    """A size preset (``model=tiny|reference``) for both stages."""

    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    condition: ConditionEncoderConfig = field(default_factory=ConditionEncoderConfig)


@dataclass
class TrainVaeConfig:
    """radiodiff-train-vae: stage 1, the VAE-GAN."""

    run_dir: str = MISSING
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: VaeGanLossConfig = field(default_factory=VaeGanLossConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class VaeRefConfig:
    checkpoint: str = MISSING  # a VAE run directory (its newest committed checkpoint) or a checkpoint folder


@dataclass
class TrainLdmConfig:
    """radiodiff-train-ldm: stage 2, the conditional latent diffusion model on the frozen VAE."""

    run_dir: str = MISSING
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VaeRefConfig = field(default_factory=VaeRefConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=50000, lr=5e-5, min_lr=5e-6, lr_decay="poly", betas=[0.9, 0.999], weight_decay=1e-4,
        grad_clip=1.0))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
