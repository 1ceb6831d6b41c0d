"""Schemas of the other commands: evaluation, prediction, sweeps, the demo; and their registration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from radiodiff.config.base import ConfigError, check_choice, check_positive
from radiodiff.config.data import (
    SPLITS,
    DataConfig,
    RayConfig,
    ShardConfig,
    SynthConfig,
)
from radiodiff.config.models import SamplerConfig
from radiodiff.config.train import (
    ModelConfig,
    TrainLdmConfig,
    TrainVaeConfig,
    VaeRefConfig,
)

INFERENCE_PRECISIONS = ("auto", "autocast", "fp32")


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
    # Networks under bf16 autocast (autocast) or in fp32; auto: autocast on GPUs, fp32 on CPUs.
    precision: str = "auto"
    # After the pass, time a few maps one at a time (after a warm-up call): seconds_per_map_batch1.
    time_batch1: bool = True

    def __post_init__(self) -> None:
        check_choice("split", self.split, SPLITS)
        check_positive("batch_size", self.batch_size)
        check_positive("max_samples", self.max_samples)
        check_positive("baseline_max_samples", self.baseline_max_samples)
        check_positive("seed", self.seed, allow_zero=True)
        check_positive("num_grid", self.num_grid, allow_zero=True)
        check_choice("precision", self.precision, INFERENCE_PRECISIONS)
        check_choice("time_batch1", self.time_batch1, (True, False))


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
    precision: str = "auto"  # autocast | fp32 | auto (autocast on GPUs, fp32 on CPUs)
    # Folder mode: after the maps are written, time a few of them one at a time (after a warm-up call).
    time_batch1: bool = True

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, INFERENCE_PRECISIONS)
        check_choice("time_batch1", self.time_batch1, (True, False))
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


@dataclass
class EncodeDataConfig:
    """The source of radiodiff-encode. The value settings (value_range, threshold, image_size,
    cars_input) are the VAE run's and the simulation is the shards'; none is chosen here."""

    shards: str = MISSING  # the source shard root: the folder or URL holding manifest.json


@dataclass
class EncodeConfig:
    """radiodiff-encode: a shard set -> its latent cache, the frozen VAE's posterior moments (stage 2)."""

    vae: VaeRefConfig = field(default_factory=VaeRefConfig)
    data: EncodeDataConfig = field(default_factory=EncodeDataConfig)
    out: str = MISSING  # the cache's root (any fsspec URL the Ray workers can write; not the source root)
    splits: Optional[list[str]] = None  # None: every split of the source
    batch_size: int = 16  # maps per forward pass of the encoder
    gpus_per_task: float = 0.0  # per Ray task (one task per shard); > 0 encodes on a GPU
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check_positive("batch_size", self.batch_size)
        check_positive("gpus_per_task", self.gpus_per_task, allow_zero=True)
        for split in self.splits or ():
            check_choice("splits", split, SPLITS)


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
            if len(set(values)) < len(values):  # two trials would share one run directory
                raise ConfigError(f"tune.{key}={values!r} lists a value twice")
        for key in ("num_samples", "workers_per_trial", "reduction_factor", "grace_steps"):
            check_positive(f"tune.{key}", getattr(self, key))
        for key in ("cpus_per_trial", "gpus_per_trial", "max_concurrent", "max_failures"):
            check_positive(f"tune.{key}", getattr(self, key), allow_zero=True)
        if self.reduction_factor < 2:
            raise ConfigError(f"tune.reduction_factor={self.reduction_factor} must be >= 2")


@dataclass
class TuneConfig(TrainVaeConfig):
    """radiodiff-tune: Ray Tune trials of stage-1 training (every radiodiff-train-vae key applies)."""

    run_dir: str = "${out_dir}/trials"  # unused: each trial trains in out_dir/trials/ds<disc_start>_kl<kl_weight>
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
    # Tiny models learn in minutes at this rate (decaying to a tenth); the reference rates are for
    # the full-size models trained for days.
    lr: float = 1e-3
    nproc: int = 1  # training ranks (torchrun when > 1)
    # The LDM and the demo's regressor get the opt-in distance-to-transmitter channel
    # (model.unet.tx_distance, see radiodiff/models/README.md): at a demo's few hundred updates only it
    # makes the prediction follow the transmitter. false trains on the published inputs only.
    tx_distance: bool = True
    # The opt-in line-of-sight and detour channels (model.unet.tx_los, tx_detour), for both models too; off, as
    # in training.
    tx_los: bool = False
    tx_detour: bool = False

    def __post_init__(self) -> None:
        for key in ("batch_size", "vae_steps", "ldm_steps", "sampler_steps", "nproc", "lr"):
            check_positive(key, getattr(self, key))
        check_choice("model", self.model, ("tiny", "reference"))


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (called by entry points, never at import)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="synth_schema", node=SynthConfig)
    store.store(name="shard_schema", node=ShardConfig)
    store.store(name="encode_schema", node=EncodeConfig)
    store.store(name="demo_schema", node=DemoConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="sample_schema", node=SampleConfig)
    store.store(name="train_vae_schema", node=TrainVaeConfig)
    store.store(name="tune_schema", node=TuneConfig)
    store.store(name="train_ldm_schema", node=TrainLdmConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
