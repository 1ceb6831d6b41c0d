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

# --- end stage 1 ---

# --- stage 2 model and diffusion configs (condition encoder, U-Net, diffusion, sampler, EMA) ---

# --- end stage 2 ---


@dataclass
class DemoConfig:
    """radiodiff-demo: everything, small, on one machine."""

    out_dir: str = "demo_out"
    synth: SynthConfig = field(default_factory=lambda: SynthConfig(out="${out_dir}/radiomapseer"))
    shard: ShardConfig = field(default_factory=lambda: ShardConfig(out="${out_dir}/shards"))
    batch_size: int = 8


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (called by entry points, never at import)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="synth_schema", node=SynthConfig)
    store.store(name="shard_schema", node=ShardConfig)
    store.store(name="demo_schema", node=DemoConfig)
