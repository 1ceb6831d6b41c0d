"""train.profile_steps: a real one-process run writes a Chrome trace of exactly the chosen updates;
a run without the option, or resumed past the window, writes none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radiodiff.config import ConfigError, TrainConfig
from tests.dist.conftest import Run, train

TRACE = "rank0_steps2-3.json"


@pytest.fixture(scope="module")
def profiled(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = train("vae", tmp_path_factory.mktemp("profile") / "vae", train_shards, "train.max_steps=3",
                "train.ckpt_every=3", "train.profile_steps=[2,3]", nproc=1)
    assert run.returncode == 0, run.output[-3000:]
    return run


def test_profile_steps_writes_a_chrome_trace_of_those_updates(profiled: Run) -> None:
    folder = profiled.run_dir / "profile"
    assert [p.name for p in folder.iterdir()] == [TRACE]
    events = json.loads((folder / TRACE).read_text())["traceEvents"]
    updates = {e["name"] for e in events if str(e.get("name", "")).startswith("update ")}
    assert updates == {"update 2", "update 3"}
    assert any(e.get("cat") == "cpu_op" and e.get("name") == "aten::convolution" for e in events)
    printed = [line for line in profiled.output.splitlines() if line.startswith("profile of updates 2-3")]
    assert len(printed) == 1 and str(folder) in printed[0]


def test_a_run_resumed_past_the_window_records_nothing(profiled: Run, train_shards: Path) -> None:
    trace = profiled.run_dir / "profile" / TRACE
    written = trace.stat().st_mtime_ns
    resumed = train("vae", profiled.run_dir, train_shards, "train.max_steps=4", "train.profile_steps=[2,3]", nproc=1)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert [m["step"] for m in resumed.metrics()] == [1, 2, 3, 4]
    assert [p.name for p in trace.parent.iterdir()] == [TRACE] and trace.stat().st_mtime_ns == written
    assert "profile of updates" not in resumed.output


def test_a_run_without_profile_steps_writes_no_profile_folder(train_shards: Path, tmp_path: Path) -> None:
    run = train("vae", tmp_path / "vae", train_shards, "train.max_steps=1", nproc=1)
    assert run.returncode == 0, run.output[-3000:]
    assert run.metrics() and not (run.run_dir / "profile").exists()


@pytest.mark.parametrize("steps", [[0, 2], [3, 2], [2], [1, 2, 3], [2, 9]])
def test_profile_steps_must_be_a_window_within_the_run(steps: list[int]) -> None:
    with pytest.raises(ConfigError, match=r"^train\.profile_steps=.* 1 <= a <= b <= train\.max_steps=5$"):
        TrainConfig(max_steps=5, profile_steps=steps)
    assert TrainConfig(max_steps=5, profile_steps=[5, 5]).profile_steps == [5, 5]
