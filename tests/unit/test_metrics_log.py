"""metrics.jsonl on a full disk and after a cut-short write: one error naming the file and the step,
no partial line left, and a start that drops a broken line instead of failing on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radiodiff.config import WandbConfig
from radiodiff.train.logger import LogWriteError, RunLogger, truncate_metrics
from tests.conftest import fill

OFF = WandbConfig(enabled=False)


def test_a_full_disk_fails_the_append_in_one_error_and_leaves_no_partial_line(small_disk: Path) -> None:
    logger = RunLogger(small_disk, OFF, run_id="r", config={}, resume_step=0)
    logger.log(1, {"ae/loss": 1.5})
    first = (small_disk / "metrics.jsonl").read_bytes()
    fill(small_disk)
    wide = {f"metric/{k:05d}": float(k) for k in range(2000)}  # ~40 kB: more than the file's last page holds
    with pytest.raises(LogWriteError, match=f"appending step 2 to {small_disk / 'metrics.jsonl'} failed "
                                            r"\(No space left on device\)"):
        logger.log(2, wide)
    assert (small_disk / "metrics.jsonl").read_bytes() == first


def test_a_start_drops_a_line_a_killed_write_cut_short_and_says_so(tmp_path: Path, capsys) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "ae/loss": s / 2}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"step": 4, "ae/lo')  # killed mid-write
    truncate_metrics(path, 2)
    assert path.read_text() == "\n".join(lines[:2]) + "\n"
    assert f"{path}: dropping line(s) 4, not a logged step" in capsys.readouterr().err
