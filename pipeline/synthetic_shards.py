"""A synthetic RadioMapSeer and its shards in one call: the set-up of the benchmarks and the tests."""

from __future__ import annotations

from pathlib import Path


def shard_folder(root: Path, out: Path, *, min_shards_per_split: int = 4, num_cpus: int = 2,
                 samples_per_shard: int | None = None) -> Path:
    """Shard a RadioMapSeer folder with the real Ray sharder (default data options); returns ``out``."""
    from pipeline.shard import run_shard
    from radiodiff.config import DataConfig, RayConfig, ShardConfig

    sizes = {} if samples_per_shard is None else {"samples_per_shard": samples_per_shard}
    run_shard(ShardConfig(data=DataConfig(root=str(root)), out=str(out), min_shards_per_split=min_shards_per_split,
                          ray=RayConfig(num_cpus=num_cpus), **sizes))
    return out


def synthetic_shards(workdir: Path, *, num_maps: int, num_tx: int, seed: int = 0,
                     min_shards_per_split: int = 4, num_cpus: int = 2) -> tuple[Path, Path]:
    """A synthetic RadioMapSeer (DPM only) under ``workdir/radiomapseer`` and its shards under
    ``workdir/shards``; returns both."""
    from radiodiff.config import SynthConfig
    from radiodiff.data.synth_main import run_synth

    root, shards = workdir / "radiomapseer", workdir / "shards"
    run_synth(SynthConfig(out=str(root), num_maps=num_maps, num_tx=num_tx, seed=seed, simulations=["DPM"],
                          missing_versions=0))
    return root, shard_folder(root, shards, min_shards_per_split=min_shards_per_split, num_cpus=num_cpus)
