"""The latent cache's format and reader (radiodiff.data.latents), on caches written here from small
image shards with a tiny random VAE: no training run, no Ray (tests/smoke/test_encode_and_train.py runs
the real radiodiff-encode and training)."""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from radiodiff.config import ConfigError, DataConfig, autoencoder_preset
from radiodiff.data.latents import (
    LATENT_MANIFEST,
    build_latent_manifest,
    cache_data,
    decode_moments,
    encode_moments,
    encode_shard,
)
from radiodiff.data.manifest import read_manifest, split_shards
from radiodiff.data.schema import LATENT_SAMPLES, MOMENTS_MEMBER, DataFormatError
from radiodiff.data.shard_format import sha256, write_tar
from radiodiff.data.shard_source import fetch_shard, iter_tar
from radiodiff.data.shards import ShardLoader
from radiodiff.models.autoencoder import AutoencoderKL
from radiodiff.runs.latent_cache import posterior_moments
from tests.pickle_probe import UNPICKLED, Payload
from tests.shard_fixtures import make_sample, make_tar, write_bytes, write_shards

SHAPE = (6, 16, 16)  # the tiny VAE's (2 x embed_dim, 64 / 4, 64 / 4)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(autoencoder_preset("tiny")).requires_grad_(False).eval()


def write_cache(images: Path, out: Path, vae: AutoencoderKL, data: DataConfig) -> dict:
    """What radiodiff-encode writes (without Ray): every shard of ``images`` encoded, plus the manifest."""
    source = read_manifest(str(images))
    entries = []
    for split in source["splits"]:
        for shard in split_shards(source, split, str(images)):
            tar, count = encode_shard(fetch_shard(str(images), shard), shard.path, data,
                                      lambda x: posterior_moments(vae, x), batch_size=3)
            write_bytes(str(out / shard.path), tar)
            entries.append((split, {"path": shard.path, "num_samples": count, "bytes": len(tar), "sha256": sha256(tar),
                                    "plan": "test", "source_sha256": shard.sha256}))
    record = {"run_dir": "r", "checkpoint": "r/checkpoints/step_00000001", "step": 1, "weights_sha256": "ab" * 32}
    manifest = build_latent_manifest(moments_shape=SHAPE, vae=record, data=cache_data(data), source_root=str(images),
                                     source=source, shards=entries)
    write_bytes(str(out / "manifest.json"), json.dumps(manifest).encode())
    return manifest


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, vae: AutoencoderKL) -> DataConfig:
    root = tmp_path_factory.mktemp("latent-cache")
    write_shards(str(root / "images"), {"train": [3, 4], "val": [2]})
    data = DataConfig(shards=str(root / "images"), latents=str(root / "cache"), image_size=64, num_workers=0)
    write_cache(root / "images", root / "cache", vae, data)
    return data


def loader(data: DataConfig, **options) -> ShardLoader:
    return ShardLoader(data, "train", **{"batch_size": 2, "seed": 3, "epochs": 1, **options})


# --- the moments member -----------------------------------------------------------------------


def test_moments_are_float32_npy_that_plain_numpy_reads_without_pickle() -> None:
    moments = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    data = encode_moments(moments)
    assert np.array_equal(np.load(io.BytesIO(data), allow_pickle=False), moments)
    decoded = decode_moments(data, "s.tar:0_0.moments.npy", SHAPE)
    assert decoded.dtype == np.float32 and np.array_equal(decoded, moments)


@pytest.mark.parametrize("array, found", [
    (np.zeros(SHAPE, np.float64), "float64"),
    (np.zeros((6, 8, 8), np.float32), "(6, 8, 8)"),
    (np.asfortranarray(np.zeros(SHAPE, np.float32)), "Fortran order"),
    (np.zeros(SHAPE, ">f4"), ">f4"),
])
def test_moments_of_another_dtype_shape_or_order_are_refused(array: np.ndarray, found: str) -> None:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    with pytest.raises(DataFormatError, match=rf"x.npy: cannot read the moments \(expected .*{found}"):
        decode_moments(buffer.getvalue(), "x.npy", SHAPE)


def test_truncated_or_foreign_moments_bytes_are_refused() -> None:
    data = encode_moments(np.zeros(SHAPE, np.float32))
    for bad in (data[: len(data) - 7], data[:20], b"PK\x03\x04 a zip", b""):
        with pytest.raises(DataFormatError, match="x.npy: cannot read the moments"):
            decode_moments(bad, "x.npy", SHAPE)


def _object_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([Payload()], dtype=object), allow_pickle=True)
    data = buffer.getvalue()
    assert np.load(io.BytesIO(data), allow_pickle=True) is not None and UNPICKLED == [1]  # the payload is live
    UNPICKLED.clear()
    return data


def test_an_object_array_in_moments_is_refused_without_unpickling() -> None:
    with pytest.raises(DataFormatError, match=r"0_0.moments.npy: cannot read the moments \(expected .*found object"):
        decode_moments(_object_npy(), "0_0.moments.npy", SHAPE)
    assert UNPICKLED == []


# --- cache shards through the reader ----------------------------------------------------------


def test_the_cache_serves_the_image_stream_with_the_moments_of_its_targets(cache: DataConfig, vae) -> None:
    images, cached = loader(cache), loader(cache, latents=True)
    assert cached.identity == images.identity  # one stream: a state of either restores the other
    pairs = list(zip(images, cached, strict=True))
    assert sum(len(a["key"]) for a, _ in pairs) == 7
    for a, b in pairs:
        assert a["key"] == b["key"] and torch.equal(a["pos"], b["pos"]) and torch.equal(a["cond"], b["cond"])
        assert "target" not in b and b["moments"].dtype == torch.float32 and b["moments"].shape[1:] == SHAPE
        # The reference: the VAE's posterior of the target the image reader serves, one map at a time.
        for i, target in enumerate(a["target"]):
            posterior = vae.encode(target[None])
            expected = torch.cat([posterior.mean, posterior.logvar], dim=1)[0]
            torch.testing.assert_close(b["moments"][i], expected, rtol=0, atol=1e-5)


def test_data_loader_workers_serve_the_same_cache_batches(cache: DataConfig) -> None:
    alone, workers = list(loader(cache, latents=True)), list(loader(cache, latents=True, num_workers=2))
    assert [b["key"] for b in workers] == [b["key"] for b in alone]
    assert all(torch.equal(a["moments"], b["moments"]) for a, b in zip(alone, workers, strict=True))


def test_a_cache_state_restores_an_image_loader_at_the_same_position(cache: DataConfig) -> None:
    cached = loader(cache, latents=True, epochs=None)
    batches = iter(cached)
    next(batches)
    images = loader(cache, epochs=None)
    images.load_state_dict(cached.state_dict())
    assert next(iter(images))["key"] == next(batches)["key"]


def test_other_data_settings_than_the_cache_s_are_refused(cache: DataConfig) -> None:
    with pytest.raises(ConfigError, match=r"data.image_size=128 but data.latents=.* was encoded with image_size=64"):
        loader(replace(cache, image_size=128), latents=True)
    with pytest.raises(ConfigError, match="data.threshold=0.2 but .* threshold=None"):
        loader(replace(cache, threshold=0.2), latents=True)
    with pytest.raises(DataFormatError, match="not a radiodiff latent cache manifest .*'radiodiff-shards'"):
        loader(replace(cache, latents=cache.shards), latents=True)
    with pytest.raises(ConfigError, match="data.latents is not set"):
        loader(replace(cache, latents=None), latents=True)


def _copy_cache(cache: DataConfig, tmp_path: Path) -> tuple[DataConfig, Path]:
    import shutil

    root = Path(shutil.copytree(str(cache.latents), tmp_path / "cache"))
    return replace(cache, latents=str(root)), root / "train" / "train-000000.tar"


def test_a_corrupt_or_truncated_cache_shard_fails_as_an_image_shard_does(cache: DataConfig, tmp_path: Path) -> None:
    copy, shard = _copy_cache(cache, tmp_path)
    data = shard.read_bytes()
    shard.write_bytes(data[:700] + bytes([data[700] ^ 0xFF]) + data[701:])  # same size, one byte off
    with pytest.raises(DataFormatError, match=f"{shard}: shard sha256 does not match the manifest"):
        list(loader(copy, latents=True))
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=f"{shard}: shard has {len(data) // 2} bytes, the manifest says"):
        list(loader(copy, latents=True))
    with pytest.raises(DataFormatError, match=str(shard)):
        list(loader(copy, latents=True, verify=False))


def _cache_samples(cache: DataConfig) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of the cache's first train shard: (key, members)."""
    root = str(cache.latents)
    shard = split_shards(read_manifest(root, LATENT_MANIFEST), "train", root)[0]
    return list(iter_tar(fetch_shard(root, shard), "cache.tar", LATENT_SAMPLES))


@pytest.mark.parametrize("member", ["pickle", "pyd", "pth", "npz", "gain.png", "target.npy"])
def test_foreign_members_in_a_cache_shard_are_refused_and_never_unpickled(cache: DataConfig, tmp_path: Path,
                                                                          member: str) -> None:
    payload = pickle.dumps(Payload())
    samples = _cache_samples(cache)
    key = samples[-1][0]
    copy, shard = _copy_cache(cache, tmp_path)
    shard.write_bytes(make_tar(samples, extra=[(f"{key}.{member}", payload)]))
    with pytest.raises(DataFormatError, match=f"{shard}: member '{key}.{member}' is not an accepted member type"):
        list(loader(copy, latents=True, verify=False))
    assert UNPICKLED == []


def test_a_pickled_moments_member_in_a_cache_shard_is_refused_by_the_loader(cache: DataConfig, tmp_path: Path) -> None:
    (key, members), *others = _cache_samples(cache)
    copy, shard = _copy_cache(cache, tmp_path)
    shard.write_bytes(write_tar([(key, {**members, MOMENTS_MEMBER: _object_npy()}), *others], LATENT_SAMPLES))
    with pytest.raises(DataFormatError, match=f"{shard}:{key}.moments.npy: cannot read the moments"):
        list(loader(copy, latents=True, verify=False))
    assert UNPICKLED == []


def test_image_shards_still_refuse_a_moments_member() -> None:
    key, members = make_sample(0, np.random.default_rng(0))
    data = make_tar([(key, members)], extra=[(f"{key}.{MOMENTS_MEMBER}", encode_moments(np.zeros(SHAPE)))])
    with pytest.raises(DataFormatError, match="member '0_0.moments.npy' is not an accepted member type"):
        list(iter_tar(data, "s.tar"))
