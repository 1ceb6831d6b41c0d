"""A latent cache as an artifact of a VAE checkpoint: what it is made of, what made it, and the
check that a stage-2 run reads the cache of its own VAE, data settings and shard set.

The cache's format and reading are ``radiodiff.data.latents``; ``radiodiff-encode`` writes it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from radiodiff.config import ConfigError, DataConfig
from radiodiff.data.latents import (
    check_cache_data,
    read_latent_manifest,
    source_identities,
)
from radiodiff.data.manifest import read_manifest
from radiodiff.models.autoencoder import AutoencoderKL
from radiodiff.runs import layout
from radiodiff.runs.artifact import FrozenVae


def posterior_moments(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 2Z, h, w) float32: q(z | x)'s mean, then its (clamped) log-variance, in fp32
    with no graph; ``DiagonalGaussian(moments)`` is then the posterior the VAE gives."""
    with torch.no_grad():
        posterior = vae.encode(images.float())
        return torch.cat([posterior.mean, posterior.logvar], dim=1).float()


def vae_record(vae: FrozenVae) -> dict:
    """The checkpoint a frozen VAE came from: run directory, folder, step, and the sha256 of its
    autoencoder weights as committed (the file ``load_frozen_vae`` verified and loaded)."""
    folder = vae.checkpoint
    weights = layout.extra_file(folder, layout.AUTOENCODER_WEIGHTS).name
    return {"run_dir": str(layout.run_dir_of(folder).resolve()), "checkpoint": str(folder.resolve()),
            "step": int(layout.read_meta(folder)["step"]), "weights_sha256": layout.committed_sha256(folder, weights)}


def _describe(record: dict) -> str:
    return f"step {record.get('step')}, autoencoder weights sha256 {str(record.get('weights_sha256'))[:16]}"


def check_cache(data: DataConfig, vae: FrozenVae, vae_where: str) -> None:
    """Stage 2 from ``data.latents``: the cache must hold the moments of this VAE checkpoint (the
    same committed weights, wherever the run lies now), made with the run's data settings from the
    shard set at ``data.shards``. Each refusal is one ConfigError naming both values and where."""
    assert data.latents is not None
    manifest = read_latent_manifest(data.latents)
    where = f"data.latents={data.latents}"
    made, mine = manifest["vae"], vae_record(vae)
    if made.get("weights_sha256") != mine["weights_sha256"]:
        resolved = "" if Path(vae_where).resolve() == Path(mine["checkpoint"]) else f" = {mine['checkpoint']}"
        raise ConfigError(f"{where} was encoded by the VAE checkpoint {made.get('checkpoint')} ({_describe(made)}) "
                          f"but vae.checkpoint={vae_where}{resolved} ({_describe(mine)}); encode a cache for it "
                          f"(radiodiff-encode vae.checkpoint={vae_where}) or train on the cache's VAE")
    check_cache_data(manifest, data)
    assert data.shards is not None
    mine_ids = source_identities(read_manifest(data.shards), data.shards)
    for split, identity in sorted(manifest["source"].get("identity", {}).items()):
        if mine_ids.get(split) != identity:
            raise ConfigError(f"{where} was encoded from the shards at {manifest['source'].get('root')} (split "
                              f"{split}: identity {identity}) but data.shards={data.shards} holds "
                              f"{'identity ' + mine_ids[split] if split in mine_ids else 'no such split'}; "
                              "validation reads data.shards: give the cache's shard set")
