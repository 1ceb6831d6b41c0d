"""A scale rehearsal on CPU: 8 ranks x 2 loader workers on a shard set with 3 train shards and 1
validation shard (more slots than shards, ranks without validation data) trains, validates,
checkpoints (every file recorded, hashed by the 8 ranks a share each) and finishes; stopped and
resumed on 4 ranks, then on 6, it continues with the global batches and the losses of the
uninterrupted 8-rank run (fp32, reduction-order tolerance).

The same at a cluster's size, on request (``RADIODIFF_REHEARSE_32=1``: ~17 GB of memory, ~5 minutes
on 2 cores): 32 ranks x 2 loader workers on 11 shards per split, then resumed on 16 ranks."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest

from tests.dist.conftest import stopped_at, train

# 24 maps per update: 8 ranks x 3, 4 x 6 and 6 x 4 micro-batches of one map.
SCALE = ["deepspeed.precision=fp32", "deepspeed.zero_stage=1", "train.global_batch=24", "train.micro_batch=1",
         "data.num_workers=2", "train.ckpt_every=2", "train.val_every=2", "train.val_batches=1",
         "train.lr=1e-3", "train.min_lr=1e-4", "train.lr_decay_steps=6", "train.keep_last=5"]


@pytest.fixture(scope="module")
def few_shards(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.synthetic_shards import shard_folder
    from radiodiff.config import DataConfig
    from radiodiff.data.radiomapseer import RadioMapSeer

    train_samples = len(RadioMapSeer(DataConfig(root=str(synth_root))).sample_ids("train"))
    out = shard_folder(synth_root, tmp_path_factory.mktemp("few-shards"), min_shards_per_split=1,
                       samples_per_shard=math.ceil(train_samples / 3))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) == 3 and len(manifest["splits"]["val"]["shards"]) == 1
    return out


def on_disk(folder: Path) -> dict[str, list]:
    """{file: [size, sha256]} of a checkpoint folder, by hashlib."""
    return {str(p.relative_to(folder)): [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "COMMITTED"}


def test_8_ranks_then_4_then_6_continue_the_8_rank_run(few_shards: Path, tmp_path: Path) -> None:
    whole = train("vae", tmp_path / "whole", few_shards, *SCALE, "train.max_steps=6", nproc=8, timeout_s=900)
    assert whole.returncode == 0, whole.output[-3000:]
    assert sorted(whole.losses("ae/loss")) == list(range(1, 7))
    assert sorted(whole.losses("val/psnr")) == [2, 4, 6]  # every rank entered validation, most without data
    for folder in (whole.run_dir / "checkpoints").glob("step_*"):  # committed by 8 ranks, each hashing a share
        assert json.loads((folder / "COMMITTED").read_text())["files"] == on_disk(folder), folder
    # The 8-rank run stopped at step 2: its run directory with only the step-2 checkpoint (and the
    # metrics up to it), as a preempted job would leave it.
    run_dir = stopped_at(whole.run_dir, 2, tmp_path / "elastic")
    for nproc, steps in ((4, 4), (6, 6)):
        part = train("vae", run_dir, few_shards, *SCALE, f"train.max_steps={steps}", nproc=nproc, timeout_s=900)
        assert part.returncode == 0, (nproc, part.output[-3000:])
    meta = json.loads((run_dir / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["world_size"] == 6 and meta["resumed_from"] == [2, 4]
    assert meta["loader"]["position"] == 6 * 24  # the same global batches: 24 maps per update
    elastic = part.losses("ae/loss")
    for step, value in whole.losses("ae/loss").items():
        assert math.isclose(elastic[step], value, rel_tol=1e-5), (step, elastic[step], value)


REHEARSE_32 = os.environ.get("RADIODIFF_REHEARSE_32") == "1"
CLUSTER = ["deepspeed.precision=fp32", "deepspeed.zero_stage=2", "train.global_batch=32", "train.micro_batch=1",
           "data.num_workers=2", "train.ckpt_every=2", "train.val_every=2", "train.val_batches=1",
           "train.lr=1e-3", "train.min_lr=1e-4", "train.lr_decay_steps=6", "train.keep_last=5"]


@pytest.fixture(scope="module")
def eleven_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.synthetic_shards import shard_folder
    from radiodiff.config import SynthConfig
    from radiodiff.data.synth_main import run_synth

    root = tmp_path_factory.mktemp("synth-80") / "radiomapseer"
    assert run_synth(SynthConfig(out=str(root), num_maps=20, num_tx=4, seed=3)) == 0
    out = shard_folder(root, tmp_path_factory.mktemp("eleven-shards"), min_shards_per_split=11)
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert [len(splits[s]["shards"]) for s in ("train", "val")] == [11, 11] and splits["val"]["num_samples"] < 32
    return out


@pytest.mark.skipif(not REHEARSE_32, reason="32 ranks x 2 workers need ~17 GB of memory and ~5 minutes: "
                                            "RADIODIFF_REHEARSE_32=1 pytest -n 0 tests/dist/test_scale_rehearsal.py")
def test_32_ranks_x_2_workers_on_11_shards_then_16_continue_the_32_rank_run(eleven_shards: Path,
                                                                           tmp_path: Path) -> None:
    whole = train("vae", tmp_path / "whole", eleven_shards, *CLUSTER, "train.max_steps=6", nproc=32, timeout_s=1200)
    assert whole.returncode == 0, whole.output[-3000:]
    assert sorted(whole.losses("val/psnr")) == [2, 4, 6]  # 32 ranks validated; most had no validation data
    for folder in (whole.run_dir / "checkpoints").glob("step_*"):
        assert json.loads((folder / "COMMITTED").read_text())["files"] == on_disk(folder), folder
    run_dir = stopped_at(whole.run_dir, 4, tmp_path / "elastic")
    part = train("vae", run_dir, eleven_shards, *CLUSTER, "train.max_steps=6", nproc=16, timeout_s=1200)
    assert part.returncode == 0, part.output[-3000:]
    meta = json.loads((run_dir / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["world_size"] == 16 and meta["resumed_from"] == [4] and meta["loader"]["position"] == 6 * 32
    elastic = part.losses("ae/loss")
    for step, value in whole.losses("ae/loss").items():
        assert math.isclose(elastic[step], value, rel_tol=1e-5), (step, elastic[step], value)
