"""The checkpoint writer (train/checkpoint.py) and reader (runs/layout.py) on their own, on a real
one-process DeepSpeed engine: save, commit, prune, resolve, read back, restore."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from radiodiff.config import DeepSpeedConfig, TrainConfig
from radiodiff.runs import layout
from radiodiff.train import checkpoint
from radiodiff.train.engines import build_engine


def make_engine(seed: int):
    torch.manual_seed(seed)
    return build_engine(torch.nn.Linear(4, 3), TrainConfig(micro_batch=1, lr=1e-2),
                        DeepSpeedConfig(zero_stage=1, precision="fp32"), world_size=1)


def save(run_dir: Path, step: int, engine, info, keep_last: int = 2) -> Path:
    return checkpoint.save(run_dir, step, {"net": engine}, rank_state={"loader": {"pos": torch.tensor(step)}},
                           meta={"step": step, "world_size": 1, "stage": "vae"},
                           extras={"ema": {"w": torch.full((2,), float(step))}}, dist=info, keep_last=keep_last)


def test_save_commit_prune_resolve_and_read_back(world_of_one, tmp_path: Path) -> None:
    engine = make_engine(0)
    for step in (1, 2, 3):
        folder = save(tmp_path, step, engine, world_of_one)
        assert folder == layout.step_dir(tmp_path, step) and layout.is_committed(folder)
    # keep_last=2: step 1 pruned; a killed save (no COMMITTED) is never resolved, and pruned next time.
    assert [s for s, _ in layout.committed_steps(tmp_path)] == [2, 3]
    partial = layout.step_dir(tmp_path, 4)
    partial.mkdir()
    (partial / layout.META_FILE).write_text(json.dumps({"step": 4}))
    assert layout.resolve_checkpoint(tmp_path) == layout.step_dir(tmp_path, 3)
    with pytest.raises(FileNotFoundError, match="not committed"):
        layout.resolve_checkpoint(partial)
    save(tmp_path, 5, engine, world_of_one)
    assert not partial.exists() and [s for s, _ in layout.committed_steps(tmp_path)] == [3, 5]
    newest = layout.resolve_checkpoint(tmp_path)
    assert layout.read_meta(newest) == {"step": 5, "world_size": 1, "stage": "vae"}
    assert torch.equal(layout.load_extra(newest, "ema")["w"], torch.full((2,), 5.0))
    assert int(layout.load_tensor_file(layout.rank_file(newest, 0))["loader"]["pos"]) == 5
    record = json.loads((newest / layout.COMMITTED).read_text())
    assert record["step"] == 5 and record["files"] == layout.file_digests(newest)  # every file, size + sha256
    assert "meta.json" in record["files"] and "rank_00000.pt" in record["files"]


def test_load_restores_the_engine_and_the_rank_state(world_of_one, tmp_path: Path) -> None:
    saved = make_engine(1)
    folder = save(tmp_path, 7, saved, world_of_one)
    fresh = make_engine(2)
    assert not torch.equal(fresh.module.weight, saved.module.weight)
    meta, rank_state = checkpoint.load(folder, {"net": fresh}, world_of_one)
    assert meta["step"] == 7 and int(rank_state["loader"]["pos"]) == 7
    assert torch.equal(fresh.module.weight, saved.module.weight) and torch.equal(fresh.module.bias, saved.module.bias)


def test_verification_names_a_changed_file(world_of_one, tmp_path: Path) -> None:
    folder = save(tmp_path, 1, make_engine(0), world_of_one)
    layout.verify_checkpoint(folder)
    victim = layout.rank_file(folder, 0)
    victim.write_bytes(victim.read_bytes()[:-1] + b"x")  # same size, other content
    with pytest.raises(layout.CheckpointError, match=f"{victim}: sha256 differs"):
        layout.verify_checkpoint(folder)
    victim.write_bytes(b"short")
    with pytest.raises(layout.CheckpointError, match="truncated or replaced"):
        layout.verify_checkpoint(folder)


def test_a_checkpoint_committed_before_files_were_recorded_still_verifies(world_of_one, tmp_path: Path) -> None:
    folder = save(tmp_path, 1, make_engine(0), world_of_one)
    (folder / layout.COMMITTED).write_text("1\n")  # what older versions wrote
    layout.verify_checkpoint(folder)
    assert layout.resolve_checkpoint(tmp_path) == folder


@pytest.mark.parametrize("damage", ["truncated", "not a record", "files not a map"])
def test_a_damaged_commit_record_fails_verification_and_the_previous_checkpoint_is_used(
        damage: str, world_of_one, tmp_path: Path) -> None:
    older = save(tmp_path, 1, make_engine(0), world_of_one)
    newer = save(tmp_path, 2, make_engine(0), world_of_one)
    record = (newer / layout.COMMITTED).read_bytes()
    damaged = {"truncated": record[:len(record) // 2], "not a record": b'"2"',
               "files not a map": json.dumps({"step": 2, "files": [1, 2]}).encode()}[damage]
    (newer / layout.COMMITTED).write_bytes(damaged)
    with pytest.raises(layout.CheckpointError, match=f"{newer / layout.COMMITTED}: "):
        layout.verify_checkpoint(newer)
    rejected: list[Path] = []
    assert layout.newest_verified(tmp_path, lambda folder, reason: rejected.append(folder)) == older
    assert rejected == [newer]


def test_a_diverged_model_is_not_saved_and_the_previous_checkpoint_stays(world_of_one, tmp_path: Path) -> None:
    engine = make_engine(0)
    save(tmp_path, 1, engine, world_of_one)
    with torch.no_grad():
        engine.module.weight[0, 0] = float("nan")
    with pytest.raises(checkpoint.CheckpointSaveError, match="parameters are no longer finite"):
        save(tmp_path, 2, engine, world_of_one)
    assert [step for step, _ in layout.committed_steps(tmp_path)] == [1]
    assert not layout.step_dir(tmp_path, 2).exists()


def test_unreadable_meta_names_the_file(tmp_path: Path) -> None:
    folder = layout.step_dir(tmp_path, 1)
    folder.mkdir(parents=True)
    (folder / layout.META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=str(folder / layout.META_FILE)):
        layout.read_meta(folder)


class _Planted:
    """A pickle that would run code when unpickled (it only writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.parametrize("zero_stage, precision", [(0, "fp32"), (1, "autocast"), (2, "bf16")])
def test_engines_load_with_weights_only(world_of_one, tmp_path: Path, zero_stage: int, precision: str) -> None:
    """DeepSpeed's files of every stage/precision we train with load through the restricted unpickler."""
    def engine():
        torch.manual_seed(0)
        return build_engine(torch.nn.Linear(4, 3), TrainConfig(micro_batch=1, global_batch=1, lr=1e-2),
                            DeepSpeedConfig(zero_stage=zero_stage, precision=precision), world_size=1)

    saved = engine()
    x = torch.randn(1, 4, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    saved.backward(saved(x).float().sum())
    saved.step()
    folder = save(tmp_path, 1, saved, world_of_one)
    fresh = engine()
    checkpoint.load(folder, {"net": fresh}, world_of_one)
    assert torch.equal(fresh.module.weight, saved.module.weight)


def test_a_planted_pickle_is_refused_without_running(world_of_one, tmp_path: Path) -> None:
    folder = save(tmp_path, 1, make_engine(0), world_of_one)
    marker = tmp_path / "marker"
    model_file = folder / "net" / layout.ENGINE_MODEL_FILE
    torch.save({"module": _Planted(marker)}, model_file)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        checkpoint.load(folder, {"net": make_engine(1)}, world_of_one)
    assert not marker.exists()


def test_a_run_config_with_an_unknown_key_is_one_error_naming_the_file(tmp_path: Path) -> None:
    """A config.yaml written by another version (a key this one does not know) names the file and the key."""
    from radiodiff.config import TrainVaeConfig

    (tmp_path / layout.CONFIG_FILE).write_text("train:\n  no_such_key: 3\n")
    with pytest.raises(ValueError,
                       match=r"config\.yaml: Key 'no_such_key' not in 'TrainConfig'.*another radiodiff version"):
        layout.read_run_config(tmp_path, TrainVaeConfig)


def test_a_run_config_that_is_not_yaml_is_one_error_naming_the_file_and_line(tmp_path: Path) -> None:
    from radiodiff.config import TrainVaeConfig

    (tmp_path / layout.CONFIG_FILE).write_text("train:\n  lr: 1e-4\nseed: [\n")
    with pytest.raises(ValueError, match=r"config\.yaml: not valid YAML at line \d+ \(a damaged or hand-edited"):
        layout.read_run_config(tmp_path, TrainVaeConfig)
