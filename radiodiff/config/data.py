"""Data schemas: which RadioMapSeer samples, synthetic data, sharding, Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from radiodiff.config.base import ConfigError, check_choice, check_positive

SIMULATIONS = ("DPM", "IRT2", "IRT4", "carsDPM", "carsIRT2", "carsIRT4")
# IRT4 was simulated only for the first two transmitters of every map.
SIMULATION_TX_LIMIT = {"IRT4": 2, "carsIRT4": 2}
BUILDINGS = ("complete", "missing1", "missing2", "missing3", "missing4")
PROTOCOLS = ("radiounet", "radiodiff", "radiodiff_disjoint")
VALUE_RANGES = ("unit", "symmetric")
SPLITS = ("train", "val", "test")
AUGMENTS = ("none", "antidiagonal")  # radiodiff/data/augment.py
COND_RESIZES = ("nearest", "area")  # radiodiff/data/schema.py: resize_cond


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
    # How a smaller image_size shrinks the buildings (and cars): nearest (one native pixel of each
    # block) or area (each block's mean: the share it covers). The transmitter is max-pooled either way.
    cond_resize: str = "nearest"
    value_range: str = "symmetric"  # unit: [0,1]; symmetric: [-1,1] (RadioDiff)
    num_workers: int = 2  # data-loader worker processes per rank
    shuffle: bool = True
    # A node-local folder (e.g. /tmp or local NVMe): shards are read through {cache_dir}/{sha256}.tar,
    # so the ranks of a node fetch each shard from data.shards once; None reads from data.shards only.
    cache_dir: Optional[str] = None
    # Stage 2: a latent cache of data.shards (radiodiff-encode; the folder or URL holding its
    # manifest.json). Training then reads the frozen VAE's posterior moments from it instead of
    # encoding every batch; validation still reads data.shards. None: encode every batch.
    latents: Optional[str] = None
    # Training streams only: none | antidiagonal (each sample reflected across the anti-diagonal with
    # probability 1/2, the one symmetry that keeps RadioMapSeer's conventions; radiodiff/data/augment.py).
    augment: str = "none"

    def __post_init__(self) -> None:
        check_choice("data.protocol", self.protocol, PROTOCOLS)
        check_choice("data.augment", self.augment, AUGMENTS)
        check_choice("data.cond_resize", self.cond_resize, COND_RESIZES)
        if self.augment != "none" and self.latents is not None:
            raise ConfigError(f"data.augment={self.augment} needs image shards: the latent cache data.latents="
                              f"{self.latents} holds the moments of the maps as stored; set data.latents=null")
        check_choice("data.simulation", self.simulation, SIMULATIONS)
        check_choice("data.buildings", self.buildings, BUILDINGS)
        check_choice("data.value_range", self.value_range, VALUE_RANGES)
        check_positive("data.num_tx", self.num_tx)
        check_positive("data.image_size", self.image_size)
        check_positive("data.num_workers", self.num_workers, allow_zero=True)
        if self.cache_dir is not None and (not self.cache_dir or "://" in self.cache_dir):
            raise ConfigError(f"data.cache_dir={self.cache_dir!r} must be a local folder path (or null)")
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
    min_shards_per_split: int = 8  # sharding parallelism (a Ray task per shard); the reader needs no minimum
    order_seed: int = 0  # samples are shuffled across shards with this seed
    on_error: str = "fail"  # fail | skip (bad files are listed in the manifest)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check_positive("samples_per_shard", self.samples_per_shard)
        check_positive("min_shards_per_split", self.min_shards_per_split)
        check_choice("on_error", self.on_error, ("fail", "skip"))
        for split in self.splits or ():
            check_choice("splits", split, SPLITS)
