"""The streaming shard reader: format checks, slot coverage, shuffling, decoding and exact resume."""

from __future__ import annotations

import gc
import io
import itertools
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from radiodiff.config import ConfigError, DataConfig
from radiodiff.data.schema import DataFormatError, decode_members
from radiodiff.data.shards import ShardLoader, ShardStateError, iter_tar, read_manifest
from tests.shard_fixtures import make_sample, make_tar, write_bytes, write_shards

TRAIN_SHARDS = [3, 4, 2, 3, 5, 3, 4, 2]  # 26 samples, uneven so that slots differ in size
VAL_SHARDS = [2, 3, 2]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Decoding makes many tiny tensors; on a few shared cores, intra-op threads only add
    # hand-off waits (tens of times slower under load). Workers already run single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, dict]:
    root = str(tmp_path_factory.mktemp("shards"))
    manifest, members = write_shards(root, {"train": TRAIN_SHARDS, "val": VAL_SHARDS})
    return root, manifest, members


@pytest.fixture(scope="module")
def root(written: tuple[str, dict, dict]) -> str:
    return written[0]


def loader(root: str, split: str = "train", *, num_workers: int = 0, **kwargs) -> ShardLoader:
    options = {k: kwargs.pop(k) for k in ("value_range", "threshold", "image_size", "cars_input",
                                          "simulation") if k in kwargs}
    cfg = DataConfig(shards=root, num_workers=num_workers, **options)
    kwargs.setdefault("batch_size", 3)
    return ShardLoader(cfg, split, **kwargs)


def take(shard_loader: ShardLoader, num_batches: int) -> list[dict]:
    return list(itertools.islice(iter(shard_loader), num_batches))


def keys(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def split_keys(manifest_members: dict, split_sizes: list[int], offset: int = 0) -> list[str]:
    return list(manifest_members)[offset:offset + sum(split_sizes)]


# --- manifest and tar format ------------------------------------------------------------------


def test_missing_manifest_names_the_url(tmp_path) -> None:
    with pytest.raises(DataFormatError, match=f"{tmp_path}/manifest.json.*not found"):
        read_manifest(str(tmp_path))


@pytest.mark.parametrize("content, message", [
    (b'{"format": "webdataset", "version": 1}', "not a radiodiff shard manifest"),
    (b'{"format": "radiodiff-shards", "version": 7, "splits": {}}', "version 7 is not supported"),
    (b"{not json", "not valid JSON"),
    (b'{"format": "radiodiff-shards", "version": 1, "splits": {"train": {"shards": [{"path": "/x"}]}}}',
     r"splits.train.shards\[0\]"),
])
def test_bad_manifest_is_rejected(tmp_path, content: bytes, message: str) -> None:
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(DataFormatError, match=message) as info:
        read_manifest(str(tmp_path))
    assert str(tmp_path / "manifest.json") in str(info.value)


def test_fixture_shards_read_with_plain_webdataset(written) -> None:
    """The shard format contract: the fixture's shards are what plain webdataset reads."""
    webdataset = pytest.importorskip("webdataset")
    root, manifest, members = written
    urls = [f"{root}/{s['path']}" for s in manifest["splits"]["val"]["shards"]]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == split_keys(members, VAL_SHARDS, offset=sum(TRAIN_SHARDS))
    assert all(s["gain.png"] == members[s["__key__"]]["gain.png"] for s in samples)


def test_iter_tar_groups_members_by_key() -> None:
    rng = np.random.default_rng(0)
    samples = [make_sample(n, rng, cars=n == 1) for n in range(3)]
    parsed = list(iter_tar(make_tar(samples), "s.tar"))
    assert parsed == samples


UNPICKLED: list[int] = []


def _record_unpickling() -> None:
    UNPICKLED.append(1)


class _Payload:
    """Unpickling this calls ``_record_unpickling``, so a test can see whether anything unpickled it."""

    def __reduce__(self) -> tuple:
        return (_record_unpickling, ())


@pytest.mark.parametrize("member", ["0_0.pickle", "0_0.pyd", "0_0.pth", "0_0.gain.npy", "0_0"])
def test_foreign_member_types_are_rejected_and_never_unpickled(member: str) -> None:
    payload = pickle.dumps(_Payload())
    assert pickle.loads(payload) is None and UNPICKLED == [1]  # the payload is live
    UNPICKLED.clear()
    data = make_tar([make_sample(0, np.random.default_rng(0))], extra=[(member, payload)])
    with pytest.raises(DataFormatError, match=f"bad.tar: member '{member}' is not an accepted"):
        list(iter_tar(data, "bad.tar"))
    assert UNPICKLED == []


def _tar_with(build) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        build(archive)
    return buffer.getvalue()


def test_structural_problems_are_rejected() -> None:
    rng = np.random.default_rng(0)
    (key0, first), (key1, second) = make_sample(0, rng), make_sample(1, rng)
    lacking = {k: v for k, v in first.items() if k != "gain.png"}
    with pytest.raises(DataFormatError, match="s.tar: sample 0_0 lacks member.*gain.png"):
        list(iter_tar(make_tar([(key0, lacking)]), "s.tar"))
    split_up = make_tar([(key0, {"json": first["json"]}), (key1, second),
                         (key0, {k: v for k, v in first.items() if k != "json"})])
    with pytest.raises(DataFormatError, match="members of sample 0_0 are not adjacent"):
        list(iter_tar(split_up, "s.tar"))

    def add_link(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("0_0.gain.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(info)
    with pytest.raises(DataFormatError, match="'0_0.gain.png' is not a regular file"):
        list(iter_tar(_tar_with(add_link), "s.tar"))


def test_corrupt_tar_is_rejected() -> None:
    with pytest.raises(DataFormatError, match="junk.tar: not a readable tar"):
        list(iter_tar(b"\x17garbage" * 200, "junk.tar"))
    data = make_tar([make_sample(0, np.random.default_rng(0))])
    with pytest.raises(DataFormatError, match="cut.tar"):
        list(iter_tar(data[: len(data) // 2], "cut.tar"))


# --- slots, coverage, shuffling ---------------------------------------------------------------


def _first_epoch_keys(root: str, world_size: int, num_workers: int, batch_size: int) -> list[str]:
    """Keys every slot serves in its first epoch, over all ranks of an endless stream."""
    found = []
    for rank in range(world_size):
        rank_loader = loader(root, num_workers=num_workers, batch_size=batch_size, rank=rank,
                             world_size=world_size)
        plan, per_rank = rank_loader.plan, max(num_workers, 1)
        slots = [rank * per_rank + j for j in range(per_rank)]
        num_batches = per_rank * max(-(-plan.slot_size(s, 0) // batch_size) for s in slots)
        for batch in take(rank_loader, num_batches):
            found += [k for k, s, p in zip(batch["key"], batch["slot"], batch["pos"])
                      if p < plan.slot_size(int(s), 0)]
    return found


@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (2, 2)])
def test_an_epoch_over_all_ranks_covers_the_split_once(written, world_size: int, num_workers: int) -> None:
    root, _, members = written
    found = _first_epoch_keys(root, world_size, num_workers, batch_size=2)
    assert sorted(found) == sorted(split_keys(members, TRAIN_SHARDS))


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (3, 2)])
def test_finite_pass_serves_every_sample_once(written, world_size: int, num_workers: int) -> None:
    root, _, members = written
    found = []
    for rank in range(world_size):
        rank_loader = loader(root, num_workers=num_workers, rank=rank, world_size=world_size, epochs=1)
        batches = list(rank_loader)
        assert len(batches) == len(rank_loader)
        found += keys(batches)
    assert sorted(found) == sorted(split_keys(members, TRAIN_SHARDS))


def test_file_url_root_works_with_workers(written) -> None:
    root, _, members = written
    found = keys(list(loader(f"file://{root}", "val", num_workers=2, epochs=1)))
    assert sorted(found) == sorted(split_keys(members, VAL_SHARDS, offset=sum(TRAIN_SHARDS)))


def test_finite_pass_with_fewer_shards_than_slots(written) -> None:
    root, _, members = written
    found = [k for rank in range(2) for k in keys(list(loader(
        root, "val", num_workers=2, rank=rank, world_size=2, epochs=1)))]
    assert sorted(found) == sorted(split_keys(members, VAL_SHARDS, offset=sum(TRAIN_SHARDS)))


def test_too_few_shards_for_ranks_times_workers(root: str) -> None:
    with pytest.raises(ConfigError, match=r"has 3 non-empty shards.*world_size=2 x max\(num_workers, 1\)=2 "
                                          r"needs at least 4.*min_shards_per_split >= 4"):
        loader(root, "val", num_workers=2, world_size=2)


def _epochs_of_one_slot(root: str, seed: int, shuffle: bool = True) -> list[list[str]]:
    batches = take(loader(root, seed=seed, shuffle=shuffle, batch_size=13), 4)  # 26 samples per epoch
    flat = keys(batches)
    return [flat[:26], flat[26:]]


def test_shuffling_depends_on_epoch_and_seed_only(written) -> None:
    root, _, members = written
    first = _epochs_of_one_slot(root, seed=0)
    assert first == _epochs_of_one_slot(root, seed=0)
    assert sorted(first[0]) == sorted(first[1]) == sorted(split_keys(members, TRAIN_SHARDS))
    assert first[0] != first[1]
    assert _epochs_of_one_slot(root, seed=1)[0] != first[0]


def test_without_shuffle_the_order_is_the_manifest_order(written) -> None:
    root, _, members = written
    in_order = split_keys(members, TRAIN_SHARDS)
    assert _epochs_of_one_slot(root, seed=3, shuffle=False) == [in_order, in_order]


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"value_range": "unit", "threshold": 0.2},
                                     {"image_size": 128}])
def test_batches_equal_decode_members(written, options: dict) -> None:
    root, _, members = written
    batch = take(loader(root, batch_size=4, **options), 1)[0]
    cfg = DataConfig(shards=root, **options)
    expected = [decode_members(members[key], cfg, key) for key in batch["key"]]
    size = options.get("image_size", 256)
    assert batch["cond"].shape == (4, 3, size, size) and batch["target"].shape == (4, 1, size, size)
    assert torch.equal(batch["cond"], torch.stack([e["cond"] for e in expected]))
    assert torch.equal(batch["target"], torch.stack([e["target"] for e in expected]))
    assert batch["map"].tolist() == [e["map"] for e in expected]
    if options.get("value_range") == "unit":  # an independent check of the option
        buildings = np.asarray(Image.open(io.BytesIO(members[batch["key"][0]]["buildings.png"])))
        np.testing.assert_allclose(batch["cond"][0, 0].numpy(), buildings / 255.0)
        assert batch["target"].min() >= 0.0
    elif not options:
        assert batch["cond"].min() == -1.0


def test_manifest_options_must_match_the_config(root: str) -> None:
    with pytest.raises(ConfigError, match="data.simulation=IRT2 but .*manifest.json holds simulation DPM"):
        loader(root, simulation="IRT2")
    with pytest.raises(ConfigError, match="data.cars_input=true"):
        loader(root, cars_input=True)


# --- exact resume -----------------------------------------------------------------------------


def _stop_points(rank_loader: ShardLoader, batches: list[dict]) -> tuple[int, int]:
    """A stop with a slot mid-shard in epoch 0, and one with a slot mid-shard after an epoch boundary."""
    positions: dict[int, int] = {}
    mid_shard = after_epoch = None
    for stop, batch in enumerate(batches[:-1], start=1):
        positions[int(batch["slot"][0])] = int(batch["pos"][-1]) + 1
        located = [rank_loader.plan.locate(s, p) for s, p in positions.items()]
        if mid_shard is None and any(e == 0 and off > 0 for e, _, off in located):
            mid_shard = stop
        if after_epoch is None and any(e >= 1 and off > 0 for e, _, off in located):
            after_epoch = stop
    assert mid_shard is not None and after_epoch is not None, "the data does not reach both cases"
    return mid_shard, after_epoch


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_stop_and_restore_continues_exactly(root: str, world_size: int, num_workers: int) -> None:
    num_batches = 14 if num_workers else 10
    for rank in range(world_size):
        def build() -> ShardLoader:
            return loader(root, num_workers=num_workers, rank=rank, world_size=world_size, seed=5)
        first_loader = build()
        uninterrupted = take(first_loader, num_batches)
        for stop in _stop_points(first_loader, uninterrupted):
            stopped = build()
            head = take(stopped, stop)
            state = json.loads(json.dumps(stopped.state_dict()))
            restored = build()
            restored.load_state_dict(state)
            tail = take(restored, num_batches - stop)
            assert keys(head) + keys(tail) == keys(uninterrupted), (rank, stop)
            assert [b["pos"].tolist() for b in head + tail] == [b["pos"].tolist() for b in uninterrupted]


def test_finite_stop_and_restore_after_a_slot_ran_out(written) -> None:
    root, _, members = written
    # Slots of 2 workers over 7 val samples; batch 2: one slot runs out before the other.
    full_loader = loader(root, "val", num_workers=2, batch_size=2, epochs=1)
    full = keys(list(full_loader))
    assert sorted(full) == sorted(split_keys(members, VAL_SHARDS, offset=sum(TRAIN_SHARDS)))
    assert keys(list(full_loader)) == full  # a finished pass starts over
    for stop in range(1, len(full_loader)):
        stopped = loader(root, "val", num_workers=2, batch_size=2, epochs=1)
        head = take(stopped, stop)
        restored = loader(root, "val", num_workers=2, batch_size=2, epochs=1)
        restored.load_state_dict(json.loads(json.dumps(stopped.state_dict())))
        assert keys(head) + keys(list(restored)) == full, stop


def test_restore_with_another_geometry_or_data_is_refused(tmp_path, root: str) -> None:
    saved = loader(root, world_size=2, batch_size=2)
    take(saved, 2)
    state = saved.state_dict()
    with pytest.raises(ShardStateError, match="world_size=2 x num_workers=0.*world_size=1 x num_workers=0"):
        loader(root, batch_size=2).load_state_dict(state)
    with pytest.raises(ShardStateError, match="seed=0 but this loader has seed=1"):
        loader(root, world_size=2, batch_size=2, seed=1).load_state_dict(state)
    write_shards(str(tmp_path), {"train": [2, 2]}, seed=9)
    with pytest.raises(ShardStateError, match="saved with manifest="):
        loader(str(tmp_path), world_size=2, batch_size=2).load_state_dict(state)


# --- shard files ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_missing_shard_names_the_url(tmp_path, num_workers: int) -> None:
    write_shards(str(tmp_path), {"train": [2, 2]})
    (tmp_path / "train" / "train-000001.tar").unlink()
    with pytest.raises(DataFormatError, match=f"{tmp_path}/train/train-000001.tar: shard not found"):
        list(loader(str(tmp_path), num_workers=num_workers, batch_size=1, epochs=1, shuffle=False))
    # After a worker error torch's DataLoader takes ~5 s to stop its workers; pay it here.
    gc.collect()


def test_replaced_or_truncated_shard_is_detected(tmp_path) -> None:
    write_shards(str(tmp_path), {"train": [2, 2]})
    shard = tmp_path / "train" / "train-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:600] + bytes([data[600] ^ 0xFF]) + data[601:])  # same size, one byte off
    with pytest.raises(DataFormatError, match=f"{shard}: shard sha256 does not match"):
        list(loader(str(tmp_path), epochs=1))
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=str(shard)):
        list(loader(str(tmp_path), epochs=1, verify=False))


def test_shard_with_a_pickle_member_is_rejected_by_the_loader(tmp_path) -> None:
    write_shards(str(tmp_path), {"train": [1]})
    bad = make_tar([make_sample(0, np.random.default_rng(0))], extra=[("0_0.pickle", b"x")])
    write_bytes(str(tmp_path / "train" / "train-000000.tar"), bad)
    with pytest.raises(DataFormatError, match="train-000000.tar: member '0_0.pickle'"):
        list(loader(str(tmp_path), epochs=1, verify=False))


def test_memory_root_works_in_process_and_is_refused_for_workers() -> None:
    _, members = write_shards("memory://shard-reader-test", {"train": [3, 2]})
    batches = take(loader("memory://shard-reader-test", batch_size=2), 3)
    assert sorted(keys(batches)[:5]) == sorted(members)
    with pytest.raises(ConfigError, match="memory://.*num_workers=0"):
        loader("memory://shard-reader-test", num_workers=2)
