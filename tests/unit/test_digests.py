"""Which rank hashes which checkpoint file (radiodiff/train/digests.py), by hand and against the names
DeepSpeed gives a rank's files; and a file that cannot be read while the commit hashes it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from radiodiff.runs import layout
from radiodiff.train.digests import owner, shares, spread_digests


def test_owners_are_read_from_our_rank_files_and_deepspeeds_zero_shards_only() -> None:
    assert owner("rank_00012.pt") == 12
    assert owner("unet/zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert owner("autoencoder/zero_pp_rank_0_mp_rank_00_model_states.pt") == 0  # ZeRO-3's model shards
    assert owner("unet/bf16_zero_pp_rank_7_mp_rank_00_optim_states.pt") == 7  # DeepSpeed's BF16 optimizer
    for unowned in ("unet/mp_rank_00_model_states.pt", "ema.pt", "meta.json", "latest", "unet/zero_to_fp32.py",
                    "autoencoder_weights.pt"):
        assert owner(unowned) is None, unowned


def test_own_files_stay_with_their_rank_and_the_rest_go_largest_first_to_the_least_loaded() -> None:
    seen = {"rank_00000.pt": 10, "rank_00001.pt": 10, "rank_00002.pt": 10,
            "big": 100, "mid": 60, "small": 30, "tiny": 5}
    # loads 10/10/10 -> big to 0 (tie: the lower rank); mid to 1; small to 2; tiny to 2 (40 < 70 < 110)
    assert shares([seen] * 3) == [["rank_00000.pt", "big"], ["rank_00001.pt", "mid"],
                                  ["rank_00002.pt", "small", "tiny"]]


def test_every_file_any_rank_sees_goes_to_exactly_one_rank_that_sees_it() -> None:
    # Rank 0's view of the directory lags (it misses rank 2's files), rank 1 misses rank 0's model
    # file, rank 2 sees everything; and rank 3's own file is listed only by others.
    whole = {"rank_00000.pt": 8, "rank_00001.pt": 8, "rank_00002.pt": 8, "rank_00003.pt": 8, "model": 500,
             "zero_pp_rank_2_x.pt": 50}
    listings = [{k: v for k, v in whole.items() if k not in ("rank_00002.pt", "zero_pp_rank_2_x.pt")},
                {k: v for k, v in whole.items() if k not in ("model", "rank_00003.pt")},
                dict(whole),
                {"rank_00000.pt": 8}]
    out = shares(listings)
    assigned = [name for share in out for name in share]
    assert sorted(assigned) == sorted(whole)  # each exactly once
    for rank, share in enumerate(out):
        assert all(name in listings[rank] for name in share), (rank, share)
    assert set(out[2]) >= {"rank_00002.pt", "zero_pp_rank_2_x.pt"}
    assert "rank_00003.pt" in out[0] + out[2]  # its owner did not list it: by size, among those who did


def test_a_resume_on_fewer_ranks_spreads_the_files_of_ranks_that_are_gone() -> None:
    record = {f"rank_{r:05d}.pt": 10 for r in range(4)}
    out = shares([record] * 2)
    assert out == [["rank_00000.pt", "rank_00002.pt"], ["rank_00001.pt", "rank_00003.pt"]]


def test_a_file_that_cannot_be_read_fails_the_commit_naming_it(tmp_path: Path) -> None:
    (tmp_path / "rank_00000.pt").write_bytes(b"state")
    (tmp_path / "meta.json").write_text("{}")
    assert spread_digests(tmp_path, 0) == {
        "meta.json": [2, hashlib.sha256(b"{}").hexdigest()],
        "rank_00000.pt": [5, hashlib.sha256(b"state").hexdigest()]}
    # A regular file by its mode whose read fails with an I/O error, as a failing disk's would.
    (tmp_path / "ema.pt").symlink_to("/proc/self/mem")
    assert "ema.pt" in layout.checkpoint_files(tmp_path)
    with pytest.raises(OSError, match=f"hashing the checkpoint's files failed: {tmp_path / 'ema.pt'}: "):
        spread_digests(tmp_path, 0)


@pytest.mark.filterwarnings("ignore:.*all_gather_into_tensor.*:FutureWarning")  # DeepSpeed's ZeRO-3 set-up
def test_owners_match_the_names_deepspeed_gives_a_ranks_files(world_of_one, tmp_path: Path) -> None:
    import torch

    from radiodiff.config import DeepSpeedConfig, TrainConfig
    from radiodiff.train.engines import build_engine

    def engine(zero_stage: int):
        return build_engine(torch.nn.Linear(4, 3), TrainConfig(micro_batch=1, lr=1e-2),
                            DeepSpeedConfig(zero_stage=zero_stage, precision="fp32"), world_size=1)

    def relative(path: str) -> str:
        return str(Path(path).relative_to(tmp_path))

    partitioned, replicated = engine(3), engine(1)
    for bf16 in (False, True):  # data-parallel rank 13's optimizer shard, as DeepSpeed names it
        assert owner(relative(replicated._get_rank_zero_ckpt_name(str(tmp_path), "unet", 0, 13, bf16))) == 13
    assert owner(relative(partitioned._get_ckpt_name(str(tmp_path), "unet", pp_placeholder=13))) == 13
    assert owner(relative(replicated._get_ckpt_name(str(tmp_path), "unet"))) is None  # rank 0's whole model
