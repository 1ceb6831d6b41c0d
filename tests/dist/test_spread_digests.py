"""A checkpoint's files are hashed at commit and checked at resume by all the ranks, each a share
(radiodiff/train/digests.py): 8 real gloo ranks on a folder laid out as a ZeRO-2 save, every file
read counted per rank, the record checked against hashlib on the bytes each file was written with.
The same ranks then report a failed write to each other (radiodiff.dist.first_error)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist.conftest import environment
from tests.dist.digests_check import content, files

WORLD = 8
STEP2 = "checkpoints/step_00000002"
VICTIM = "unet/zero_pp_rank_5_mp_rank_00_optim_states.pt"


def own(rank: int) -> list[str]:
    return [f"rank_{rank:05d}.pt", f"unet/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]


@pytest.fixture(scope="module")
def eight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, list[dict]]:
    """The check's run directory, its torchrun and every rank's report."""
    run_dir = tmp_path_factory.mktemp("digests")
    script = Path(__file__).with_name("digests_check.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                           str(script), str(run_dir)], capture_output=True, text=True, timeout=300, env=environment())
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done, [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_eight_ranks_hash_and_verify_a_share_each_and_agree(eight) -> None:
    tmp_path, done, ranks = eight

    written = {name: content(name, WORLD) for name in files(WORLD)}
    written["meta.json"] = json.dumps({"step": 2}).encode()
    expected = {name: [len(data), hashlib.sha256(data).hexdigest()] for name, data in written.items()}
    assert all(r["record"] == expected for r in ranks)  # every file once, the same record on every rank

    # Each rank read its own files; rank 0's, largest first, went one each to the least-loaded
    # (all equal after their own files: the lowest rank wins a tie).
    extra = {0: ["unet/mp_rank_00_model_states.pt"], 1: ["ema.pt"], 2: ["meta.json"], 3: ["latest"]}
    for rank, result in enumerate(ranks):
        share = sorted(f"{STEP2}/{name}" for name in own(rank) + extra.get(rank, []))
        assert result["phases"]["commit"] == share, rank
        assert result["phases"]["verify"] == share, rank
        assert result["intact"] is None
    # The resume found step 2's changed shard on the one rank that read it, and every rank chose step 1.
    assert all(r["resumed"] == str(tmp_path / "checkpoints/step_00000001") for r in ranks)
    readers = [rank for rank, r in enumerate(ranks) if f"{STEP2}/{VICTIM}" in r["phases"]["resume"]]
    assert readers == [5]
    assert f"{tmp_path / STEP2 / VICTIM}: sha256 differs" in done.stdout
    assert not (tmp_path / STEP2).exists() and len(list((tmp_path / "checkpoints/rejected").iterdir())) == 1


def test_every_rank_learns_the_lowest_failing_ranks_cause_of_a_failed_write(eight) -> None:
    _, _, ranks = eight  # ranks 3 and 5 failed; then none did
    cause = "rank 3: [Errno 28] No space left on device (rank 3 writing)"
    assert [r["causes"] for r in ranks] == [[cause, None]] * WORLD
