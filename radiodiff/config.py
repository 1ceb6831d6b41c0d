"""Typed configuration: the schema of every command.

The dataclasses here are the single source of truth. Hydra yaml files in ``conf/`` mirror them and
are validated against them on composition (unknown keys and wrong types fail there); enumerated
choices are checked in ``__post_init__``, which runs when an entry point converts the composed
config to these objects. Code below an entry point receives these dataclasses, never a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

SIMULATIONS = ("DPM", "IRT2", "IRT4", "carsDPM", "carsIRT2", "carsIRT4")
# IRT4 was simulated only for the first two transmitters of every map.
SIMULATION_TX_LIMIT = {"IRT4": 2, "carsIRT4": 2}
BUILDINGS = ("complete", "missing1", "missing2", "missing3", "missing4")
PROTOCOLS = ("radiounet", "radiodiff", "radiodiff_disjoint")
VALUE_RANGES = ("unit", "symmetric")
SPLITS = ("train", "val", "test")


class ConfigError(ValueError):
    """A configuration value a user set is invalid; the message names the key."""


def check_choice(key: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; expected one of {', '.join(map(str, choices))}")


def check_positive(key: str, value: int | float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class DataConfig:
    """Which RadioMapSeer samples are used and how they become tensors."""

    root: Optional[str] = None  # a RadioMapSeer folder (read by the folder reader and the sharder)
    shards: Optional[str] = None  # a shard root: the folder or URL holding manifest.json
    protocol: str = "radiounet"  # radiounet | radiodiff | radiodiff_disjoint
    split_seed: int = 42
    simulation: str = "DPM"  # the gain folder used as target
    buildings: str = "complete"  # complete | missing1..missing4 (version chosen from split_seed)
    cars_input: bool = False  # third condition channel: cars (True) or buildings again (False)
    num_tx: Optional[int] = None  # transmitters per map; None = all that the root holds
    threshold: Optional[float] = None  # RadioUNet's 0.2 threshold on the [0,1] target
    image_size: int = 256  # resize when != 256: bilinear for gain, nearest for binary maps
    value_range: str = "symmetric"  # unit: [0,1]; symmetric: [-1,1] (RadioDiff)
    num_workers: int = 2  # data-loader worker processes per rank
    shuffle: bool = True

    def __post_init__(self) -> None:
        check_choice("data.protocol", self.protocol, PROTOCOLS)
        check_choice("data.simulation", self.simulation, SIMULATIONS)
        check_choice("data.buildings", self.buildings, BUILDINGS)
        check_choice("data.value_range", self.value_range, VALUE_RANGES)
        check_positive("data.num_tx", self.num_tx)
        check_positive("data.image_size", self.image_size)
        check_positive("data.num_workers", self.num_workers, allow_zero=True)
        if self.threshold is not None and not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"data.threshold={self.threshold} must be in [0, 1)")
        limit = SIMULATION_TX_LIMIT.get(self.simulation)
        if limit is not None and self.num_tx is not None and self.num_tx > limit:
            raise ConfigError(
                f"data.num_tx={self.num_tx}: simulation {self.simulation} exists only for tx 0..{limit - 1}"
            )


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: start Ray locally; "auto": join the running cluster
    num_cpus: Optional[int] = None  # CPUs of a local Ray instance (None: all)


@dataclass
class SynthConfig:
    """radiodiff-synth: write a synthetic RadioMapSeer folder."""

    out: str = MISSING
    num_maps: int = 16
    num_tx: int = 8
    seed: int = 0
    simulations: list[str] = field(default_factory=lambda: ["DPM", "IRT2", "carsDPM", "carsIRT2"])
    missing_versions: int = 6  # versions of buildings_missing{1..4}; 0 writes none
    city_from: Optional[str] = None  # keep this RadioMapSeer root's cities and tx, simulate gain only
    map_ids: Optional[list[int]] = None  # maps to write (e.g. of city_from); None: 0..num_maps-1
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_positive("num_maps", self.num_maps)
        check_positive("num_tx", self.num_tx)
        check_positive("missing_versions", self.missing_versions, allow_zero=True)
        if self.num_tx > 80:
            raise ConfigError(f"num_tx={self.num_tx}: RadioMapSeer has at most 80 transmitters per map")
        if self.num_maps > 701:
            raise ConfigError(f"num_maps={self.num_maps}: RadioMapSeer has at most 701 maps")
        for sim in self.simulations:
            check_choice("simulations", sim, SIMULATIONS)
        if self.map_ids is not None:
            bad = [m for m in self.map_ids if not 0 <= m <= 700]
            if bad or len(set(self.map_ids)) != len(self.map_ids) or not self.map_ids:
                raise ConfigError(f"map_ids={self.map_ids}: expected distinct map ids in 0..700")


@dataclass
class ShardConfig:
    """radiodiff-shard: RadioMapSeer folder -> WebDataset shards + manifest.json."""

    data: DataConfig = field(default_factory=DataConfig)  # data.root is the source
    out: str = MISSING  # any fsspec URL
    splits: Optional[list[str]] = None  # None: every split of the protocol
    # ~50 KB per real sample, so 4000 samples make ~200 MB shards.
    samples_per_shard: int = 4000
    min_shards_per_split: int = 8  # so that small sets still split across ranks x workers
    order_seed: int = 0  # samples are shuffled across shards with this seed
    on_error: str = "fail"  # fail | skip (bad files are listed in the manifest)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check_positive("samples_per_shard", self.samples_per_shard)
        check_positive("min_shards_per_split", self.min_shards_per_split)
        check_choice("on_error", self.on_error, ("fail", "skip"))
        for split in self.splits or ():
            check_choice("splits", split, SPLITS)


# --- stage 1 model and loss configs (autoencoder, discriminator, perceptual, VAE-GAN loss) ---

DISC_LOSSES = ("hinge", "vanilla")


@dataclass
class AutoencoderConfig:
    """AutoencoderKL (CompVis latent-diffusion layout); defaults are the RadioDiff reference."""

    in_channels: int = 1
    out_channels: int = 1
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4])  # one level per entry
    num_res_blocks: int = 2  # per encoder level; the decoder has one more
    z_channels: int = 3
    embed_dim: int = 3
    attn_resolutions: list[int] = field(default_factory=list)  # empty: only the middle block attends
    resolution: int = 256  # only decides which levels attend (attn_resolutions)
    dropout: float = 0.0
    scaling_factor: float = 0.3  # latent scale used by stage 2
    grad_checkpointing: bool = False
    norm_groups: int = 32  # GroupNorm groups; every level width must be divisible by it

    def __post_init__(self) -> None:
        for key in ("in_channels", "out_channels", "ch", "num_res_blocks", "z_channels", "embed_dim"):
            check_positive(f"autoencoder.{key}", getattr(self, key))
        check_positive("autoencoder.resolution", self.resolution)
        check_positive("autoencoder.norm_groups", self.norm_groups)
        check_positive("autoencoder.scaling_factor", self.scaling_factor)
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ConfigError(f"autoencoder.ch_mult={self.ch_mult!r} must be a non-empty list of positive ints")
        for mult in self.ch_mult:
            if (self.ch * mult) % self.norm_groups:
                raise ConfigError(
                    f"autoencoder.ch_mult={self.ch_mult!r}: width {self.ch * mult} is not divisible by "
                    f"autoencoder.norm_groups={self.norm_groups}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"autoencoder.dropout={self.dropout} must be in [0, 1)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class DiscriminatorConfig:
    """PatchGAN discriminator of the VAE-GAN."""

    in_channels: int = 1
    ndf: int = 64  # width of the first layer
    num_layers: int = 3
    use_actnorm: bool = False  # ActNorm (data-dependent init) instead of BatchNorm

    def __post_init__(self) -> None:
        check_positive("discriminator.in_channels", self.in_channels)
        check_positive("discriminator.ndf", self.ndf)
        check_positive("discriminator.num_layers", self.num_layers)


@dataclass
class PerceptualConfig:
    """LPIPS (VGG16) perceptual distance; weights are never downloaded."""

    pretrained: bool = True  # False: random VGG backbone (tests, demo); linear layers always shipped ones
    vgg_weights: Optional[str] = None  # a torchvision vgg16 state dict; None: the torch hub cache


@dataclass
class VaeGanLossConfig:
    """Weights and schedule of the VAE-GAN objective."""

    kl_weight: float = 1e-6
    disc_weight: float = 0.5  # multiplies the adaptive weight
    disc_start: int = 50001  # first step at which the GAN terms are on
    disc_factor: float = 1.0
    perceptual_weight: float = 1.0
    disc_loss: str = "hinge"  # hinge | vanilla
    learn_logvar: bool = True  # the reference leaves it at its initial value; we learn it
    logvar_init: float = 0.0

    def __post_init__(self) -> None:
        check_choice("loss.disc_loss", self.disc_loss, DISC_LOSSES)
        for key in ("kl_weight", "disc_weight", "disc_start", "disc_factor", "perceptual_weight"):
            check_positive(f"loss.{key}", getattr(self, key), allow_zero=True)


# Treat these as read-only; autoencoder_preset() / discriminator_preset() hand out copies.
AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    "reference": AutoencoderConfig(),
    # Same topology (factor 4, z=3, GroupNorm(32)) at 1/4 width, one res block per level: CPU tests.
    "tiny": AutoencoderConfig(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1),
}
DISCRIMINATOR_PRESETS: dict[str, DiscriminatorConfig] = {
    "reference": DiscriminatorConfig(),
    "tiny": DiscriminatorConfig(ndf=8),
}


def _check_preset(kind: str, presets: dict[str, object], name: str) -> None:
    if name not in presets:
        raise ConfigError(f"{kind}={name!r} is not a preset; expected one of {', '.join(presets)}")


def autoencoder_preset(name: str) -> AutoencoderConfig:
    import copy

    _check_preset("autoencoder preset", AUTOENCODER_PRESETS, name)
    return copy.deepcopy(AUTOENCODER_PRESETS[name])


def discriminator_preset(name: str) -> DiscriminatorConfig:
    import copy

    _check_preset("discriminator preset", DISCRIMINATOR_PRESETS, name)
    return copy.deepcopy(DISCRIMINATOR_PRESETS[name])

# --- end stage 1 ---

# --- stage 2 model and diffusion configs (condition encoder, U-Net, diffusion, sampler, EMA) ---


@dataclass
class ConditionEncoderConfig:
    """Swin-style hierarchical condition encoder; features at strides 4, 8, 16, 32.

    window_size=8 divides the stride-4..32 feature sizes of a 256 condition (64, 32, 16, 8);
    Swin-B's ImageNet window of 7 does not.
    """

    in_channels: int = 3
    embed_dim: int = 128  # stage widths are embed_dim * (1, 2, 4, 8)
    depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    num_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    window_size: int = 8
    patch_size: int = 4
    mlp_ratio: float = 4.0
    pretrained_path: Optional[str] = None  # a local state-dict file; never downloaded

    def __post_init__(self) -> None:
        for key in ("in_channels", "embed_dim", "window_size", "patch_size", "mlp_ratio"):
            check_positive(f"condition.{key}", getattr(self, key))
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ConfigError(
                f"condition.depths={self.depths} / condition.num_heads={self.num_heads}: "
                "expected 4 stages each (strides 4, 8, 16, 32)"
            )
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            check_positive(f"condition.depths[{i}]", depth)
            check_positive(f"condition.num_heads[{i}]", heads)
            if (self.embed_dim * 2**i) % heads:
                raise ConfigError(
                    f"condition.num_heads[{i}]={heads} must divide the stage width {self.embed_dim * 2**i}"
                )


@dataclass
class UNetConfig:
    """Two-head conditional U-Net (predicts C and eps from a shared encoder)."""

    latent_channels: int = 3
    dim: int = 128
    dim_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    cond_token_grid: int = 8  # condition features are pooled to grid x grid tokens per level
    fourier_features: int = 64  # random frequencies of the time embedding
    fourier_scale: float = 16.0
    attn_heads: int = 4
    attn_dim_head: int = 32
    latent_size: int = 64  # sizes the bottleneck frequency filters
    norm_groups: int = 8  # GroupNorm groups; must divide every level width
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        for key in ("latent_channels", "dim", "cond_token_grid", "fourier_features", "fourier_scale",
                    "attn_heads", "attn_dim_head", "latent_size", "norm_groups"):
            check_positive(f"unet.{key}", getattr(self, key))
        if not self.dim_mults:
            raise ConfigError("unet.dim_mults must not be empty")
        if len(self.dim_mults) != 4:
            # Level i reads the condition feature at stride 4 * 2**i, and there are four of them.
            raise ConfigError(f"unet.dim_mults={self.dim_mults}: expected 4 levels (one per condition stride)")
        for i, mult in enumerate(self.dim_mults):
            check_positive(f"unet.dim_mults[{i}]", mult)
            if (self.dim * mult) % self.norm_groups:
                raise ConfigError(
                    f"unet.norm_groups={self.norm_groups} must divide the level width {self.dim * mult}"
                )
        downsamples = 2 ** (len(self.dim_mults) - 1)
        if self.latent_size % downsamples:
            raise ConfigError(f"unet.latent_size={self.latent_size} must be divisible by {downsamples}")


@dataclass
class DiffusionConfig:
    """Constant-SDE decoupled diffusion: z_t = (1 - t) z0 + sqrt(t) noise, t ~ U(eps, 1)."""

    eps: float = 1e-4  # smallest training / sampling time
    weighting: bool = True  # w_C = 2 exp(1 - t), w_eps = exp(sqrt(t)); both 1 when off
    # z0 = scale_factor * autoencoder latent; None: the autoencoder config's scaling_factor.
    scale_factor: Optional[float] = None

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"diffusion.eps={self.eps} must be in (0, 1)")
        if self.scale_factor is not None:
            check_positive("diffusion.scale_factor", self.scale_factor)


@dataclass
class SamplerConfig:
    steps: int = 5  # uniform steps; the sampler makes steps + 1 network calls

    def __post_init__(self) -> None:
        check_positive("sampler.steps", self.steps)


@dataclass
class EMAConfig:
    beta: float = 0.999
    start_step: int = 10000  # before this optimizer step the EMA copies the weights
    update_every: int = 10  # optimizer steps between EMA updates

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"ema.beta={self.beta} must be in [0, 1)")
        check_positive("ema.start_step", self.start_step, allow_zero=True)
        check_positive("ema.update_every", self.update_every)


CONDITION_PRESETS: dict[str, ConditionEncoderConfig] = {
    "swin_b": ConditionEncoderConfig(),
    # Shifted windows still occur: stages 0, 1 and 2 of a 64 condition have 16, 8, 4 px maps.
    "tiny": ConditionEncoderConfig(embed_dim=16, depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 4], window_size=4),
}

UNET_PRESETS: dict[str, UNetConfig] = {
    "reference": UNetConfig(),
    # A 3x16x16 latent (64 px condition) with widths 16..64.
    "tiny": UNetConfig(dim=16, dim_mults=[1, 2, 4, 4], cond_token_grid=2, fourier_features=8,
                       attn_heads=2, attn_dim_head=8, latent_size=16, norm_groups=4),
}

# --- end stage 2 ---


# --- training ---

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


@dataclass
class EvalConfig:
    """radiodiff-eval: metrics of a trained run (VAE: reconstruction; LDM: prediction) on a split."""

    run_dir: str = MISSING
    # Defaults to the run's data config; data keys given on the command line replace the run's.
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "test"
    out_dir: str = MISSING
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # LDM runs
    use_ema: Optional[bool] = None  # LDM runs; None: the EMA weights when the checkpoint has them
    batch_size: int = 8  # per rank
    max_samples: Optional[int] = None  # evaluate only the first samples of the split (all ranks together)
    baseline_max_samples: Optional[int] = 2000  # train samples averaged into the mean-map baseline
    seed: int = 0  # the sampler's noise; rank r draws from seed * 1000003 + r
    num_grid: int = 4  # rows of the PNG grid

    def __post_init__(self) -> None:
        check_choice("split", self.split, SPLITS)
        check_positive("batch_size", self.batch_size)
        check_positive("max_samples", self.max_samples)
        check_positive("baseline_max_samples", self.baseline_max_samples)
        check_positive("seed", self.seed, allow_zero=True)
        check_positive("num_grid", self.num_grid, allow_zero=True)


@dataclass
class SampleConfig:
    """radiodiff-sample: radio maps from a trained LDM run, for one map or a RadioMapSeer folder."""

    run_dir: str = MISSING
    buildings: Optional[str] = None  # one map: a 256x256 mode L buildings PNG
    antenna: Optional[str] = None  # its transmitter PNG, or tx_row and tx_col instead
    tx_row: Optional[int] = None
    tx_col: Optional[int] = None
    cars: Optional[str] = None  # needed when the run used data.cars_input
    out: Optional[str] = None  # the predicted PNG of one map
    input_dir: Optional[str] = None  # folder mode: a RadioMapSeer root (png/buildings_complete, png/antennas)
    out_dir: Optional[str] = None  # folder mode: writes {out_dir}/{map}_{tx}.png
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    use_ema: Optional[bool] = None
    mask_buildings: bool = True  # building pixels -> 0, as in the dataset's gain maps
    batch_size: int = 8  # folder mode
    seed: int = 0

    def __post_init__(self) -> None:
        single = [self.buildings, self.out]
        folder = [self.input_dir, self.out_dir]
        if any(v is not None for v in folder):
            if any(v is None for v in folder) or any(v is not None for v in single + [self.antenna]):
                raise ConfigError("folder mode needs input_dir and out_dir, and no buildings/antenna/out")
        elif any(v is None for v in single):
            raise ConfigError("give buildings=<png> out=<png> (and antenna=<png> or tx_row/tx_col), "
                              "or input_dir=<RadioMapSeer root> out_dir=<dir>")
        elif (self.antenna is None) == (self.tx_row is None or self.tx_col is None):
            raise ConfigError("give either antenna=<png> or both tx_row and tx_col")
        for key in ("tx_row", "tx_col"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < 256:
                raise ConfigError(f"{key}={value} must be in [0, 256)")
        check_positive("batch_size", self.batch_size)
        check_positive("seed", self.seed, allow_zero=True)


TUNE_SCHEDULERS = ("none", "asha")
TUNE_SEARCHES = ("grid", "optuna")


@dataclass
class TuneSweepConfig:
    """The ``tune:`` section of radiodiff-tune: what is swept over and how trials are run."""

    # loss.disc_start / loss.kl_weight values: a grid of every combination (search=grid), or the
    # ranges they span (search=optuna; kl_weight on a log scale when both ends are > 0).
    disc_start: list[int] = field(default_factory=lambda: [10001, 50001])
    kl_weight: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4])
    scheduler: str = "none"  # none | asha (stops weak trials early, judged at each report of `metric`)
    search: str = "grid"  # grid | optuna (needs the optuna package)
    num_samples: int = 8  # trials of an optuna search; a grid runs each combination once
    metric: str = "val/psnr"  # a training metric; val/* metrics are reported at each validation
    mode: str = "max"  # max | min
    grace_steps: Optional[int] = None  # ASHA: steps before a trial may be stopped; None: train.val_every
    reduction_factor: int = 2  # ASHA: keeps 1 / reduction_factor of the trials at each rung
    workers_per_trial: int = 1  # > 1: a Ray Train TorchTrainer with this many ranks per trial
    cpus_per_trial: float = 1.0  # per training process (rank) of a trial
    gpus_per_trial: float = 0.0  # per training process (rank) of a trial
    max_concurrent: int = 0  # trials running at once; 0: as many as the resources allow
    max_failures: int = 0  # retries of a failed trial (each resumes from its newest checkpoint)

    def __post_init__(self) -> None:
        check_choice("tune.scheduler", self.scheduler, TUNE_SCHEDULERS)
        check_choice("tune.search", self.search, TUNE_SEARCHES)
        check_choice("tune.mode", self.mode, ("max", "min"))
        for key in ("disc_start", "kl_weight"):
            values = getattr(self, key)
            if not values or any(v < 0 for v in values):
                raise ConfigError(f"tune.{key}={values!r} must be a non-empty list of values >= 0")
        for key in ("num_samples", "workers_per_trial", "reduction_factor", "grace_steps"):
            check_positive(f"tune.{key}", getattr(self, key))
        for key in ("cpus_per_trial", "gpus_per_trial", "max_concurrent", "max_failures"):
            check_positive(f"tune.{key}", getattr(self, key), allow_zero=True)
        if self.reduction_factor < 2:
            raise ConfigError(f"tune.reduction_factor={self.reduction_factor} must be >= 2")


@dataclass
class TuneConfig(TrainVaeConfig):
    """radiodiff-tune: Ray Tune trials of stage-1 training (every radiodiff-train-vae key applies)."""

    run_dir: str = "${out_dir}/trials"  # unused: each trial trains in out_dir/trials/<trial name>
    out_dir: str = MISSING  # results.csv, best.yaml, trials/, ray_tune/
    tune: TuneSweepConfig = field(default_factory=TuneSweepConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class DemoConfig:
    """radiodiff-demo: everything, small, on one machine."""

    out_dir: str = "demo_out"
    synth: SynthConfig = field(
        default_factory=lambda: SynthConfig(out="${out_dir}/radiomapseer", num_maps=24, num_tx=8, overwrite=True)
    )
    shard: ShardConfig = field(
        default_factory=lambda: ShardConfig(
            data=DataConfig(root="${out_dir}/radiomapseer"), out="${out_dir}/shards", min_shards_per_split=4
        )
    )
    batch_size: int = 8  # reader pass, training micro-batch, evaluation
    model: str = "tiny"  # the model preset both stages train
    vae_steps: int = 300
    disc_start: int = 150  # the VAE-GAN's discriminator joins halfway
    ldm_steps: int = 300
    sampler_steps: int = 5
    nproc: int = 1  # training ranks (torchrun when > 1)

    def __post_init__(self) -> None:
        for key in ("batch_size", "vae_steps", "ldm_steps", "sampler_steps", "nproc"):
            check_positive(key, getattr(self, key))
        check_choice("model", self.model, ("tiny", "reference"))


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (called by entry points, never at import)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="synth_schema", node=SynthConfig)
    store.store(name="shard_schema", node=ShardConfig)
    store.store(name="demo_schema", node=DemoConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="sample_schema", node=SampleConfig)
    store.store(name="train_vae_schema", node=TrainVaeConfig)
    store.store(name="tune_schema", node=TuneConfig)
    store.store(name="train_ldm_schema", node=TrainLdmConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
