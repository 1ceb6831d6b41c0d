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
# auto: autocast where the device computes bf16 natively (GPUs; CPUs with AVX512-BF16 or AMX), else fp32;
# resolved once at the start of training (radiodiff.precision.resolve_precision), and recorded as resolved.
PRECISIONS = ("auto", "autocast", "bf16", "fp32")


@dataclass
class TrainConfig:
    """The optimisation loop shared by both stages (a step = one optimizer update)."""

    max_steps: int = 150000
    # Maps per optimizer update, whatever the number of ranks: the optimisation is defined by it.
    # Accumulation is derived: global_batch / (micro_batch x world_size) micro-batches per update.
    global_batch: int = 2
    micro_batch: int = 2  # maps per rank per forward pass
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
    fail_save_steps: list[int] = field(default_factory=list)  # checkpoint saves that fail with ENOSPC (drills)
    fail_commit_steps: list[int] = field(default_factory=list)  # commits whose COMMITTED write fails on rank 0
    requeue_on_preempt: bool = True  # under Slurm, rank 0 requeues the job after saving
    # A file (on the filesystem every rank sees) whose appearance stops the run as a preemption
    # signal does, without the requeue: checkpoint at the next step, exit 75. A run started while it
    # exists trains nothing and exits 75. radiodiff-tune sets it for its trials.
    stop_file: Optional[str] = None
    peak_tflops: Optional[float] = None  # the device's peak for MFU; None: from the GPU's name
    # On CUDA, TF32 and cuDNN autotuning are on; True turns both off for bitwise-reproducible work.
    deterministic: bool = False
    # Compile the networks' repeated blocks in place (radiodiff/train/acceleration.py); the first
    # updates pay the compilation (minutes per stage on a CPU the first time; inductor caches it).
    compile: bool = False
    # The step's 4-d inputs and the frozen modules' conv weights channels-last (tensor-core layout).
    channels_last: bool = False
    # The run directory's lock is taken over when its owner's heartbeat is older than this (a killed job).
    lock_stale_s: float = 300.0
    # [a, b]: a torch.profiler trace of updates a..b (1-based), one per rank, in {run_dir}/profile/.
    profile_steps: Optional[list[int]] = None

    def __post_init__(self) -> None:
        for key in ("max_steps", "global_batch", "micro_batch", "ckpt_every", "log_every", "keep_last",
                    "max_bad_steps", "val_batches"):
            check_positive(f"train.{key}", getattr(self, key))
        for key in ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "val_every", "lock_stale_s"):
            check_positive(f"train.{key}", getattr(self, key), allow_zero=True)
        check_choice("train.lr_decay", self.lr_decay, LR_DECAYS)
        check_positive("train.lr_decay_steps", self.lr_decay_steps)
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} must not exceed train.lr={self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b <= 1.0 for b in self.betas):
            raise ConfigError(f"train.betas={self.betas} must be two values in [0, 1]")
        if self.stop_file is not None and "://" in self.stop_file:
            raise ConfigError(f"train.stop_file={self.stop_file} must be a path on a filesystem the ranks "
                              "share, not a URL")
        steps = self.profile_steps
        if steps is not None and not (len(steps) == 2 and all(isinstance(s, int) for s in steps)
                                      and 1 <= steps[0] <= steps[1] <= self.max_steps):
            raise ConfigError(f"train.profile_steps={steps} must be two steps [a, b] with "
                              f"1 <= a <= b <= train.max_steps={self.max_steps}")

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per update on ``world_size`` ranks; a one-line error says what works."""
        per_pass = self.micro_batch * world_size
        if self.global_batch % per_pass == 0:
            return self.global_batch // per_pass
        where = (f"train.global_batch={self.global_batch} with train.micro_batch={self.micro_batch} "
                 f"on {world_size} rank(s)")
        fits = [m for m in range(1, self.global_batch // world_size + 1) if self.global_batch % (m * world_size) == 0]
        if fits:
            raise ConfigError(f"{where}: the global batch must be a multiple of micro_batch x world_size = "
                              f"{per_pass}; on {world_size} rank(s) use train.micro_batch in {fits}")
        raise ConfigError(f"{where}: the global batch is smaller than the number of ranks; a wider batch is your "
                          f"explicit choice: set train.global_batch to a multiple of {world_size} (and scale "
                          "train.lr with it, see the README), or use fewer ranks")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # 0-3
    # autocast: bf16 compute, fp32 master weights; bf16: bf16 weights; fp32; auto: autocast where bf16 is native
    precision: str = "auto"
    # Gradient reduction buckets (elements). DeepSpeed's 5e8 default is several GB per engine for
    # models of 55M (VAE) and 216M (LDM) parameters; 5e7 (200 MB of fp32) keeps a few buckets in
    # flight per backward, which is what overlapping needs.
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    overlap_comm: Optional[bool] = None  # reduce during the backward; None: on GPUs only
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are reduced

    def __post_init__(self) -> None:
        check_choice("deepspeed.zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_choice("deepspeed.precision", self.precision, PRECISIONS)
        check_positive("deepspeed.reduce_bucket_size", self.reduce_bucket_size)
        check_positive("deepspeed.allgather_bucket_size", self.allgather_bucket_size)


@dataclass
class DistConfig:
    """The process group."""

    # Collectives wait this long before failing: a universal-checkpoint conversion of the reference
    # model on rank 0 or a save to a slow shared filesystem keeps the other ranks in a barrier.
    timeout_minutes: float = 60.0

    def __post_init__(self) -> None:
        check_positive("dist.timeout_minutes", self.timeout_minutes)


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
    dist: DistConfig = field(default_factory=DistConfig)
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
        max_steps=50000, global_batch=128, micro_batch=16, lr=5e-5, min_lr=5e-6, lr_decay="poly",
        betas=[0.9, 0.999], weight_decay=1e-4, grad_clip=1.0))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
