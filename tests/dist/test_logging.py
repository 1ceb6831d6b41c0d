"""Run-directory logging: config.yaml, metrics.jsonl, and one wandb run (offline) across a resume."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.dist.conftest import train


def test_resumed_run_continues_the_same_offline_wandb_run(train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["wandb.enabled=true", "wandb.mode=offline", "train.ckpt_every=2"]
    first = train("vae", run_dir, train_shards, *args, "train.max_steps=2", nproc=1)
    second = train("vae", run_dir, train_shards, *args, "train.max_steps=3", nproc=1)
    assert first.returncode == 0 and second.returncode == 0, second.output[-3000:]
    ids = [json.loads((run_dir / f"checkpoints/step_{s:08d}/meta.json").read_text())["wandb_run_id"] for s in (2, 3)]
    assert ids[0] == ids[1] and len(ids[0]) >= 8
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{ids[0]}") for name in runs)  # two sessions, one run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 3 and config["run_dir"] == str(run_dir)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
