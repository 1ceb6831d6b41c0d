"""radiodiff-encode and stage 2 from its latent cache: a tiny VAE run trained once per module with
the real training command (2 steps, a checkpoint each), its cache written by the real Ray encoder,
then the LDM step and radiodiff-train-ldm with and without the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from pipeline.encode import encode_command, run_encode
from radiodiff.cli import compose, run_app
from radiodiff.config import (
    ConfigError,
    DataConfig,
    EncodeConfig,
    EncodeDataConfig,
    RayConfig,
    VaeRefConfig,
)
from radiodiff.data.schema import DataFormatError
from radiodiff.data.shards import ShardLoader
from radiodiff.diffusion.latent_scale import LatentScale
from radiodiff.launch import console_command
from radiodiff.models.unet import build_unet
from radiodiff.runs import FrozenVae, load_frozen_vae
from radiodiff.runs.latent_cache import check_cache, posterior_moments
from radiodiff.train.engines import build_engine
from radiodiff.train.steps import LdmModels, StepContext, ldm_step
from tests.dist.conftest import environment, train

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Made:
    vae: Path  # the VAE run (checkpoints at steps 1 and 2)
    shards: Path
    cache: Path  # encoded by the VAE's newest checkpoint (step 2)


def encode_cfg(made_vae: Path, shards: Path, out: Path) -> EncodeConfig:
    return EncodeConfig(vae=VaeRefConfig(checkpoint=str(made_vae)), data=EncodeDataConfig(shards=str(shards)),
                        out=str(out), batch_size=5, ray=RayConfig(num_cpus=2))


@pytest.fixture(scope="module")
def made(train_shards: Path, tmp_path_factory: pytest.TempPathFactory, ray_local) -> Made:
    root = tmp_path_factory.mktemp("latent-cache")
    vae = train("vae", root / "vae", train_shards, "train.max_steps=2", "train.ckpt_every=1", nproc=1)
    assert vae.returncode == 0, vae.output[-3000:]
    run_encode(encode_cfg(root / "vae", train_shards, root / "cache"))
    return Made(root / "vae", train_shards, root / "cache")


def ldm_data(made: Made, vae: FrozenVae) -> DataConfig:
    return replace(vae.data, shards=str(made.shards), latents=str(made.cache), num_workers=0)


def step_config(made: Made):
    return compose("train_ldm", ["run_dir=/unused", f"data.shards={made.shards}", f"vae.checkpoint={made.vae}",
                                 "model=tiny", "deepspeed.precision=fp32", "train.global_batch=2",
                                 "train.micro_batch=2"])


def one_step(batch: dict, vae: FrozenVae, made: Made) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One fp32 ldm_step of a fresh tiny U-Net engine (seed 0): the loss and the updated weights."""
    cfg = step_config(made)
    torch.manual_seed(0)
    engine = build_engine(build_unet(cfg.model.unet, cfg.model.condition), cfg.train, cfg.deepspeed, world_size=1)
    models = LdmModels(engine, vae.model, LatentScale(0.3), cfg.diffusion)
    loss = ldm_step(models, batch, StepContext(step=0, device=CPU, precision="fp32", seed=7))["loss"]
    weights = [p.detach().clone() for p in engine.module.parameters()]
    engine.destroy()
    return loss, weights


def test_one_ldm_step_from_the_cache_equals_one_encoding_the_target(made: Made, world_of_one) -> None:
    """The same samples, positions and keyed noise: from moments of the same micro-batch the step is
    bitwise the one that encodes the target; from the cache radiodiff-encode wrote (other batch
    sizes and thread counts in the Ray workers) the loss agrees to 1e-6 and the weights to a small
    fraction of one update."""
    vae = load_frozen_vae(made.vae, CPU)
    data = ldm_data(made, vae)
    images = next(iter(ShardLoader(data, "train", batch_size=2, seed=3)))
    cached = next(iter(ShardLoader(data, "train", batch_size=2, seed=3, latents=True)))
    assert images["key"] == cached["key"] and torch.equal(images["pos"], cached["pos"])
    assert torch.equal(images["cond"], cached["cond"])
    same_batch = {**cached, "moments": posterior_moments(vae.model, images["target"])}
    loss, weights = one_step(images, vae, made)
    same_loss, same_weights = one_step(same_batch, vae, made)
    assert torch.equal(same_loss, loss) and all(torch.equal(a, b) for a, b in zip(same_weights, weights))
    cache_loss, cache_weights = one_step(cached, vae, made)
    torch.testing.assert_close(cached["moments"], same_batch["moments"], rtol=0, atol=1e-5)
    assert abs(cache_loss.item() - loss.item()) <= 1e-6 * abs(loss.item())
    # Adam's first update moves each weight by lr * g / (|g| + 1e-8) <= lr: where |g| is near 1e-8 a
    # 1e-5 change of the latents moves that weight by a visible fraction of lr, so the bound is
    # relative to one step: each weight within 10% of lr, all of them together within 1e-3 of a
    # full step's norm (measured: 3.4% of lr on the worst weight, 2.4e-5 of the step's norm).
    lr = step_config(made).train.lr
    diffs = [(a - b).flatten() for a, b in zip(cache_weights, weights)]
    assert max(d.abs().max().item() for d in diffs) <= 0.1 * lr
    step_norm = lr * sum(d.numel() for d in diffs) ** 0.5
    assert torch.cat(diffs).norm().item() <= 1e-3 * step_norm


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_unchanged_rerun_skips_every_shard_and_leaves_the_manifest_untouched(made: Made, tmp_path: Path,
                                                                                 capsys) -> None:
    cache = Path(shutil.copytree(made.cache, tmp_path / "cache"))
    manifest = cache / "manifest.json"
    before = manifest.read_bytes()
    os.utime(manifest, ns=(1_000_000_000, 1_000_000_000))  # a rewrite would move it, even within a tick
    files = mtimes(cache)
    assert encode_command(encode_cfg(made.vae, made.shards, cache)) == 0
    assert "latent shards: 0 written" in capsys.readouterr().out
    assert manifest.read_bytes() == before and mtimes(cache) == files  # nothing written, moved aside or left
    damaged = cache / "train" / "train-000001.tar"
    damaged.write_bytes(b"corrupt")
    run_encode(encode_cfg(made.vae, made.shards, cache))
    assert "latent shards: 1 written, " in capsys.readouterr().out
    # Only the damaged shard was written again, with the same bytes: the manifest (set aside while
    # shards changed, then committed again) holds the same content.
    assert manifest.read_bytes() == before and damaged.stat().st_size > 7
    changed = {name for name, mtime in mtimes(cache).items() if mtime != files.get(name)}
    assert changed == {"train/train-000001.tar", "manifest.json"}


def test_a_failed_encode_leaves_the_previous_cache_as_it_was(made: Made, tmp_path: Path) -> None:
    shards = Path(shutil.copytree(made.shards, tmp_path / "shards"))
    cache = Path(shutil.copytree(made.cache, tmp_path / "cache"))
    for damaged in ("train/train-000000.tar", "train/train-000001.tar"):  # both are encoded again
        (cache / damaged).write_bytes(b"corrupt")
    source = shards / "train" / "train-000001.tar"
    source.write_bytes(source.read_bytes()[::-1])  # the same size, another sha256: its task fails
    before = {name: (cache / name).read_bytes() for name in mtimes(cache)}
    with pytest.raises(DataFormatError, match="train-000001.tar: shard sha256 does not match the manifest"):
        run_encode(encode_cfg(made.vae, shards, cache))
    # The task of train-000000 succeeded, but the run did not: nothing of it lands, the manifest stays.
    assert {name: (cache / name).read_bytes() for name in mtimes(cache)} == before


def test_check_cache_refuses_another_checkpoint_other_data_settings_and_other_shards(made: Made,
                                                                                     tmp_path: Path) -> None:
    vae = load_frozen_vae(made.vae, CPU)
    data = ldm_data(made, vae)
    check_cache(data, vae, str(made.vae))  # its own: accepted
    older = made.vae / "checkpoints" / "step_00000001"
    with pytest.raises(ConfigError, match=rf"encoded by the VAE checkpoint .*step_00000002 \(step 2, autoencoder "
                                          rf"weights sha256 \w{{16}}\) but vae.checkpoint={older} \(step 1, "):
        check_cache(data, load_frozen_vae(older, CPU), str(older))
    with pytest.raises(ConfigError, match="data.simulation='IRT4' but data.latents=.* was encoded with "
                                          "simulation='DPM'"):
        check_cache(replace(data, simulation="IRT4"), vae, str(made.vae))
    other = Path(shutil.copytree(made.shards, tmp_path / "shards"))  # then one val shard is re-made
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"encoded from the shards at {made.shards} \(split val: identity \w+\) "
                                          rf"but data.shards={other} holds identity \w+"):
        check_cache(replace(data, shards=str(other)), vae, str(made.vae))


def test_training_on_a_cache_of_another_vae_checkpoint_exits_2_naming_both(made: Made, tmp_path: Path) -> None:
    older = made.vae / "checkpoints" / "step_00000001"
    done = subprocess.run(console_command("radiodiff-train-ldm", 1) + [
        f"run_dir={tmp_path / 'ldm'}", f"data.shards={made.shards}", f"data.latents={made.cache}",
        f"vae.checkpoint={older}", "model=tiny", "data.num_workers=0", "wandb.enabled=false"],
        check=False, capture_output=True, text=True, timeout=300, env=environment())
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert "step_00000002 (step 2," in errors[0] and f"vae.checkpoint={older} (step 1," in errors[0]
    assert not (tmp_path / "ldm" / "config.yaml").exists()


def test_encode_refuses_to_write_into_the_source_or_another_shard_set(made: Made, tmp_path: Path, capsys) -> None:
    base = [f"vae.checkpoint={made.vae}", f"data.shards={made.shards}"]
    assert run_app("encode", encode_command, [*base, f"out={made.shards}"]) == 2
    assert "is the source shard root data.shards" in capsys.readouterr().err
    other = Path(shutil.copytree(made.shards, tmp_path / "other"))
    assert run_app("encode", encode_command, [*base, f"out={other}"]) == 2
    assert "holds a 'radiodiff-shards' manifest, not a latent cache" in capsys.readouterr().err


def test_train_ldm_from_the_cache_end_to_end_follows_the_encoding_run(made: Made, tmp_path: Path) -> None:
    """Two fp32 runs of 3 steps, validating at step 3 (from the image shards): with the cache the
    losses are those of the run that encodes every batch, to float rounding."""
    steps = ["train.max_steps=3", "train.val_every=3", "deepspeed.precision=fp32", f"vae.checkpoint={made.vae}"]
    encoding = train("ldm", tmp_path / "encoding", made.shards, *steps, nproc=1)
    cached = train("ldm", tmp_path / "cached", made.shards, *steps, f"data.latents={made.cache}", nproc=1)
    assert encoding.returncode == 0 and cached.returncode == 0, (encoding.output + cached.output)[-3000:]
    assert cached.losses("loss").keys() == {1, 2, 3}
    for step, loss in encoding.losses("loss").items():
        assert cached.losses("loss")[step] == pytest.approx(loss, rel=1e-6)
    assert cached.losses("val/psnr")[3] == pytest.approx(encoding.losses("val/psnr")[3], abs=1e-3)
    assert f"latents: {made.cache}" in (tmp_path / "cached" / "config.yaml").read_text()
