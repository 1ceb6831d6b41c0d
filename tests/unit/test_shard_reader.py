"""The streaming shard reader: format checks, the global stream, exactly-once coverage at any number
of ranks x workers (up to a cluster's 32 x 2 on 11 shards), elastic resume, the cache folder and
byte counts."""

from __future__ import annotations

import gc
import hashlib
import io
import itertools
import json
import pickle
import tarfile
import threading

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from radiodiff.config import ConfigError, DataConfig
from radiodiff.data.schema import DataFormatError, decode_members
from radiodiff.data.shard_source import ShardReader, ShardSource
from radiodiff.data.shards import ShardLoader, ShardStateError, iter_tar, read_manifest
from tests.pickle_probe import UNPICKLED, Payload
from tests.shard_fixtures import make_sample, make_tar, write_bytes, write_shards

TRAIN_SHARDS = [3, 4, 2, 3, 5, 3, 4, 2]  # 26 samples, uneven so that micro-batches straddle shards
VAL_SHARDS = [2, 3, 2]
TEST_SHARDS = [5, 6]
TRAIN_SIZE = sum(TRAIN_SHARDS)


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
    manifest, members = write_shards(root, {"train": TRAIN_SHARDS, "val": VAL_SHARDS, "test": TEST_SHARDS})
    return root, manifest, members


@pytest.fixture(scope="module")
def root(written: tuple[str, dict, dict]) -> str:
    return written[0]


def loader(root: str, split: str = "train", *, num_workers: int = 0, cache_dir: str | None = None,
           **kwargs) -> ShardLoader:
    options = {k: kwargs.pop(k) for k in ("value_range", "threshold", "image_size", "cars_input",
                                          "simulation") if k in kwargs}
    cfg = DataConfig(shards=root, num_workers=num_workers, cache_dir=cache_dir, **options)
    kwargs.setdefault("batch_size", 3)
    return ShardLoader(cfg, split, **kwargs)


def take(shard_loader: ShardLoader, num_batches: int) -> list[dict]:
    return list(itertools.islice(iter(shard_loader), num_batches))


def keys(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def split_keys(members: dict, split: str) -> list[str]:
    """The split's keys in manifest order (the fixture numbers samples across splits in this order)."""
    sizes = {"train": TRAIN_SHARDS, "val": VAL_SHARDS, "test": TEST_SHARDS}
    offset = 0
    for name, shard_sizes in sizes.items():
        if name == split:
            return list(members)[offset:offset + sum(shard_sizes)]
        offset += sum(shard_sizes)
    raise KeyError(split)


def shard_of_key(manifest: dict, members: dict, split: str) -> dict[str, int]:
    found, keys_in_order = {}, iter(split_keys(members, split))
    for i, shard in enumerate(manifest["splits"][split]["shards"]):
        found.update({next(keys_in_order): i for _ in range(shard["num_samples"])})
    return found


def run_ranks(root: str, split: str, geometry: tuple[int, int, int], num_batches: int,
              state: dict | None = None, **kwargs) -> tuple[list[dict], list[ShardLoader]]:
    """``num_batches`` micro-batches (or fewer, when finite) of every rank of a (world size, micro
    batch, workers) geometry, in global order: micro-batch k of rank 0, ..., of rank W-1, then k+1."""
    world_size, micro_batch, num_workers = geometry
    loaders = [loader(root, split, rank=r, world_size=world_size, batch_size=micro_batch,
                      num_workers=num_workers, **kwargs) for r in range(world_size)]
    for rank_loader in loaders:
        if state is not None:
            rank_loader.load_state_dict(state)
    per_rank = [take(rank_loader, num_batches) for rank_loader in loaders]
    ordered = [batches[k] for k in range(num_batches) for batches in per_rank if k < len(batches)]
    return ordered, loaders


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
    assert [s["__key__"] for s in samples] == split_keys(members, "val")
    assert all(s["gain.png"] == members[s["__key__"]]["gain.png"] for s in samples)


def test_iter_tar_groups_members_by_key() -> None:
    rng = np.random.default_rng(0)
    samples = [make_sample(n, rng, cars=n == 1) for n in range(3)]
    parsed = list(iter_tar(make_tar(samples), "s.tar"))
    assert parsed == samples


@pytest.mark.parametrize("member", ["0_0.pickle", "0_0.pyd", "0_0.pth", "0_0.gain.npy", "0_0"])
def test_foreign_member_types_are_rejected_and_never_unpickled(member: str) -> None:
    payload = pickle.dumps(Payload())
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


# --- the global stream ------------------------------------------------------------------------


def test_without_shuffle_the_stream_is_the_manifest_order_epoch_after_epoch(written) -> None:
    root, _, members = written
    batches = take(loader(root, shuffle=False, batch_size=5), 11)  # 55 samples; 26 per epoch
    in_order = split_keys(members, "train")
    assert keys(batches) == (in_order * 3)[:55]
    assert [p for b in batches for p in b["pos"].tolist()] == list(range(55))
    assert batches[5]["key"] == in_order[25:] + in_order[:4]  # a micro-batch straddles the epoch boundary


def _shuffled_stream(root: str, seed: int) -> list[str]:
    return keys(take(loader(root, seed=seed, batch_size=6), 13))  # 78 samples: 3 epochs


def test_shuffled_epochs_permute_shards_and_their_samples_by_seed_and_epoch(written) -> None:
    root, manifest, members = written
    stream = _shuffled_stream(root, seed=0)
    epochs = [stream[e * TRAIN_SIZE:(e + 1) * TRAIN_SIZE] for e in range(3)]
    shard = shard_of_key(manifest, members, "train")
    for epoch in epochs:
        assert sorted(epoch) == sorted(split_keys(members, "train"))
        runs = [i for i, _ in itertools.groupby(shard[key] for key in epoch)]
        assert sorted(runs) == list(range(len(TRAIN_SHARDS)))  # each shard one contiguous run
    assert len({tuple(epoch) for epoch in epochs}) == 3
    in_order = split_keys(members, "train")
    assert any(in_order.index(a) > in_order.index(b) for a, b in zip(epochs[0], epochs[0][1:])
               if shard[a] == shard[b])  # samples are shuffled within shards too
    assert _shuffled_stream(root, seed=0) == stream
    assert _shuffled_stream(root, seed=1)[:TRAIN_SIZE] != epochs[0]


@pytest.mark.parametrize("world_size", [1, 3, 8])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("micro_batch", [1, 3])
def test_one_pass_serves_every_sample_once(written, world_size: int, num_workers: int, micro_batch: int) -> None:
    root, _, members = written
    size, found = sum(TEST_SHARDS), []
    for rank in range(world_size):
        rank_loader = loader(root, "test", rank=rank, world_size=world_size, batch_size=micro_batch,
                             num_workers=num_workers, epochs=1)
        batches = list(rank_loader)
        assert len(batches) == len(rank_loader)
        for k, batch in enumerate(batches):  # rank r's k-th micro-batch: positions (k*W + r)*m ...
            first = (k * world_size + rank) * micro_batch
            assert batch["pos"].tolist() == list(range(first, min(first + micro_batch, size)))
        found += keys(batches)
    assert sorted(found) == sorted(split_keys(members, "test"))


def test_drop_last_drops_only_the_partial_micro_batch(written) -> None:
    root = written[0]
    ranks = [loader(root, "val", rank=r, world_size=2, batch_size=2, epochs=1, drop_last=True) for r in range(2)]
    batches = [list(rank_loader) for rank_loader in ranks]
    assert [len(b) for b in batches] == [len(r) for r in ranks] == [2, 1]  # positions 0-1, 4-5 | 2-3; 6 dropped
    assert sorted(keys(batches[0] + batches[1])) == sorted(keys(list(loader(root, "val", epochs=1)))[:6])


@pytest.mark.parametrize("geometry", [(2, 2, 0), (4, 1, 0), (1, 4, 2), (2, 2, 2), (4, 1, 2)])
def test_global_order_does_not_depend_on_ranks_workers_or_micro_batch(root: str, geometry) -> None:
    reference, _ = run_ranks(root, "train", (1, 4, 0), 10, seed=3)  # 40 samples, over an epoch boundary
    world_size, micro_batch, _ = geometry
    batches, _ = run_ranks(root, "train", geometry, 40 // (world_size * micro_batch), seed=3)
    assert keys(batches) == keys(reference)
    assert [p for b in batches for p in b["pos"].tolist()] == list(range(40))


def test_eight_ranks_with_two_workers_on_three_shards(written) -> None:
    root, _, members = written
    batches, _ = run_ranks(root, "val", (8, 1, 2), 3)  # 24 samples of a 7-sample, 3-shard split
    stream = keys(batches)
    assert stream == keys(take(loader(root, "val", batch_size=8), 3))
    for epoch in range(3):
        assert sorted(stream[7 * epoch:7 * epoch + 7]) == sorted(split_keys(members, "val"))


def test_empty_shards_are_skipped_and_an_empty_training_split_is_refused(tmp_path) -> None:
    _, members = write_shards(str(tmp_path), {"train": [2, 0, 3], "val": [0]})
    assert sorted(keys(list(loader(str(tmp_path), epochs=1, batch_size=2)))) == sorted(members)
    assert list(loader(str(tmp_path), "val", epochs=1)) == []
    with pytest.raises(ConfigError, match="split 'val' of .* holds no samples"):
        loader(str(tmp_path), "val")


def test_file_url_root_works_with_workers(written) -> None:
    root, _, members = written
    found = keys(list(loader(f"file://{root}", "val", num_workers=2, epochs=1)))
    assert sorted(found) == sorted(split_keys(members, "val"))


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


# --- state and resume -------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", [(4, 2, 0), (4, 2, 2), (2, 2, 2), (6, 1, 0), (6, 2, 2)])
def test_resume_continues_the_global_stream_at_any_geometry(root: str, geometry) -> None:
    uninterrupted, _ = run_ranks(root, "train", (4, 2, 0), 9, seed=5)  # 72 samples, 2 epoch boundaries
    _, stopped = run_ranks(root, "train", (4, 2, 0), 3, seed=5)  # 3 micro-batches on every rank
    states = [json.loads(json.dumps(rank_loader.state_dict())) for rank_loader in stopped]
    assert all(state == states[0] for state in states) and states[0]["position"] == 24
    world_size, micro_batch, _ = geometry
    tail, _ = run_ranks(root, "train", geometry, 48 // (world_size * micro_batch), state=states[0], seed=5)
    assert keys(tail) == keys(uninterrupted)[24:]
    assert [p for b in tail for p in b["pos"].tolist()] == list(range(24, 72))


def test_a_restored_loader_reports_the_position_it_continues_from(root: str) -> None:
    first = loader(root, rank=1, world_size=2, batch_size=2)
    take(first, 3)
    assert first.state_dict()["position"] == 12
    second = loader(root, rank=0, world_size=3, batch_size=1)
    second.load_state_dict(first.state_dict())
    assert second.state_dict()["position"] == 12
    take(second, 2)
    assert second.state_dict()["position"] == 18


def test_finite_stop_and_restore_and_a_finished_pass_starts_over(written) -> None:
    root, _, members = written
    full_loader = loader(root, "val", num_workers=2, batch_size=2, epochs=1)
    full = keys(list(full_loader))
    assert sorted(full) == sorted(split_keys(members, "val"))
    assert keys(list(full_loader)) == full
    for stop in range(1, len(full_loader)):
        stopped = loader(root, "val", batch_size=2, epochs=1)
        head = take(stopped, stop)
        restored = loader(root, "val", num_workers=2, batch_size=2, epochs=1)
        restored.load_state_dict(json.loads(json.dumps(stopped.state_dict())))
        assert keys(head) + keys(list(restored)) == full, stop


def test_state_is_plain_json_and_refused_for_other_data(tmp_path, root: str) -> None:
    saved = loader(root, world_size=2, batch_size=2)
    take(saved, 2)
    state = saved.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert set(state) >= {"split", "manifest", "seed", "shuffle", "epochs", "position"}
    with pytest.raises(ShardStateError, match="seed=0 but this loader has seed=1"):
        loader(root, batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ShardStateError, match="shuffle=True but this loader has shuffle=False"):
        loader(root, batch_size=2, shuffle=False).load_state_dict(state)
    with pytest.raises(ShardStateError, match="split='train' but this loader has split='val'"):
        loader(root, "val", batch_size=2).load_state_dict(state)
    write_shards(str(tmp_path), {"train": [2, 2]}, seed=9)
    with pytest.raises(ShardStateError, match="saved with manifest="):
        loader(str(tmp_path), batch_size=2).load_state_dict(state)
    with pytest.raises(ShardStateError, match="version 1 is not supported"):
        loader(root).load_state_dict({**state, "version": 1})
    with pytest.raises(ShardStateError, match="invalid ShardLoader position -3"):
        loader(root).load_state_dict({**state, "position": -3})


# --- bytes read and the cache folder ----------------------------------------------------------


def _split_bytes(manifest: dict, split: str) -> int:
    return sum(s["bytes"] for s in manifest["splits"][split]["shards"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_pass_on_one_rank_reads_the_split_once_per_worker(written, num_workers: int) -> None:
    root, manifest, _ = written
    rank_loader = loader(root, num_workers=num_workers, batch_size=1, epochs=1)
    assert len(list(rank_loader)) == TRAIN_SIZE
    # Every shard holds >= 2 samples, so with micro batch 1 each worker has a sample in each.
    assert rank_loader.bytes_read == _split_bytes(manifest, "train") * max(num_workers, 1)
    assert rank_loader.cache_bytes_read == 0


@pytest.mark.parametrize("geometry", [(1, 1, 1), (2, 3, 2), (3, 2, 2), (1, 4, 3)])
def test_prefetch_picks_the_next_shard_the_worker_reads(root: str, geometry) -> None:
    world_size, micro_batch, workers = geometry
    for rank in range(world_size):
        stream = loader(root, rank=rank, world_size=world_size, batch_size=micro_batch, seed=2).dataset
        stream.start = 5
        for worker in range(workers):
            # Independently: this worker's positions, listed chunk by chunk.
            mine = [stream.start + (k * world_size + rank) * micro_batch + i
                    for k in range(worker, 120, workers) for i in range(micro_batch)]
            for after in range(0, 3 * TRAIN_SIZE, 2):
                expected = stream.plan.shard_at(next(p for p in mine if p >= after))
                assert stream.next_shard_after(after, worker, workers) == expected, (rank, worker, after)


def test_a_prefetched_shard_is_read_once_and_its_error_surfaces_when_needed(tmp_path) -> None:
    manifest, _ = write_shards(str(tmp_path), {"train": [2, 2]})
    shards = loader(str(tmp_path)).plan.shards
    reader = ShardReader(ShardSource(str(tmp_path)))
    reader.prefetch(shards[0])
    assert [key for key, _ in reader.get(shards[0]).index] == ["0_0", "0_1"]
    reader.prefetch(shards[0])
    reader.get(shards[0])
    assert reader.source_bytes == manifest["splits"]["train"]["shards"][0]["bytes"]
    (tmp_path / "train" / "train-000001.tar").unlink()
    reader.prefetch(shards[1])  # fails in the background thread, silently
    with pytest.raises(DataFormatError, match=f"{tmp_path}/train/train-000001.tar: shard not found"):
        reader.get(shards[1])


def test_cache_dir_fetches_each_shard_once(tmp_path, written) -> None:
    root, manifest, members = written
    cache, total = tmp_path / "cache", _split_bytes(manifest, "val")
    first = loader(root, "val", batch_size=2, epochs=1, cache_dir=str(cache))
    assert sorted(keys(list(first))) == sorted(split_keys(members, "val"))
    assert (first.bytes_read, first.cache_bytes_read) == (total, 0)
    shas = sorted(s["sha256"] for s in manifest["splits"]["val"]["shards"])
    assert sorted(p.name for p in cache.iterdir()) == [f"{sha}.tar" for sha in shas]  # no temporary left
    second = loader(root, "val", num_workers=2, batch_size=1, epochs=1, cache_dir=str(cache))
    assert sorted(keys(list(second))) == sorted(split_keys(members, "val"))
    assert (second.bytes_read, second.cache_bytes_read) == (0, 2 * total)  # two workers, from the cache


def test_a_corrupt_cached_shard_is_detected_and_fetched_again(tmp_path, written) -> None:
    root, manifest, members = written
    cache = tmp_path / "cache"
    list(loader(root, "val", epochs=1, cache_dir=str(cache)))
    shard = manifest["splits"]["val"]["shards"][1]
    cached = cache / f"{shard['sha256']}.tar"
    data = cached.read_bytes()
    cached.write_bytes(data[:600] + bytes([data[600] ^ 0xFF]) + data[601:])  # same size, one byte off
    again = loader(root, "val", epochs=1, cache_dir=str(cache))
    with pytest.warns(RuntimeWarning, match=f"{cached}: cached shard does not match the sha256"):
        assert sorted(keys(list(again))) == sorted(split_keys(members, "val"))
    assert again.bytes_read == shard["bytes"]
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == shard["sha256"]
    cached.write_bytes(data[:100])  # a stale partial file: its size differs, so it is refetched
    third = loader(root, "val", epochs=1, cache_dir=str(cache))
    list(third)
    assert third.bytes_read == shard["bytes"] and cached.read_bytes() == data
    cached.write_bytes(data[:600] + bytes([data[600] ^ 0xFF]) + data[601:])
    with pytest.raises(DataFormatError, match=str(cached)):  # unverified, the bad copy is used and named
        list(loader(root, "val", epochs=1, cache_dir=str(cache), verify=False, shuffle=False))


def test_cache_dir_must_be_a_local_folder() -> None:
    with pytest.raises(ConfigError, match="data.cache_dir='s3://bucket/cache' must be a local folder"):
        DataConfig(cache_dir="s3://bucket/cache")


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


# --- the cluster's geometry: 32 ranks x 2 workers on 11 shards ------------------------------------

ELEVEN = [7, 3, 5, 4, 6, 2, 5, 3, 4, 6, 5]  # 50 training samples in 11 uneven shards
NINE = [3, 2, 4]  # 9 validation samples: 23 of 32 ranks get none


@pytest.fixture(scope="module")
def eleven(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("eleven"))
    _, members = write_shards(root, {"train": ELEVEN, "val": NINE})
    return root, members


def test_32_ranks_x_2_workers_on_11_shards_follow_one_reader_and_resume_on_8(eleven) -> None:
    root, members = eleven
    # One reader in one process: 3 global batches of 32, over the epoch boundary at 50 (seed 7).
    reference = keys(take(loader(root, batch_size=32, seed=7), 3))
    batches, ranks = run_ranks(root, "train", (32, 1, 2), 2, seed=7)  # 64 worker slots, 11 shards
    assert keys(batches) == reference[:64]
    assert sorted(reference[:50]) == sorted(split_keys_of(members, "train"))  # an epoch: each sample once
    state = json.loads(json.dumps(ranks[0].state_dict()))
    assert state["position"] == 64
    tail, _ = run_ranks(root, "train", (8, 4, 2), 1, state=state, seed=7)  # resubmitted on 8 ranks
    assert keys(tail) == reference[64:96]


def test_32_ranks_x_2_workers_validate_9_samples_once_and_the_ranks_without_data_get_none(eleven) -> None:
    root, members = eleven
    per_rank = [list(loader(root, "val", rank=r, world_size=32, batch_size=1, num_workers=2, epochs=1))
                for r in range(32)]
    assert [len(batches) for batches in per_rank] == [1] * 9 + [0] * 23
    assert sorted(keys([b for batches in per_rank for b in batches])) == sorted(split_keys_of(members, "val"))



def split_keys_of(members: dict, split: str) -> list[str]:
    return [key for key, sample in members.items() if json.loads(sample["json"])["split"] == split]


class SlowFileSystem(MemoryFileSystem):
    """memory:// as a slow shared filesystem: opening ``held`` waits until the test releases it."""

    protocol = "slow"
    held = ""
    release = threading.Event()

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return MemoryFileSystem._strip_protocol(path.removeprefix("slow://"))

    def _open(self, path: str, mode: str = "rb", **kwargs):
        if mode == "rb" and path.endswith(self.held):
            self.release.wait(timeout=60)
        return super()._open(path, mode, **kwargs)


def test_workers_fork_only_once_this_process_s_prefetch_thread_is_done(tmp_path) -> None:
    """A pass without workers dropped mid-way leaves its prefetch thread reading (and hashing) the
    next shard; a pass with workers forked meanwhile would copy any lock it holds, held for ever."""
    manifest, _ = write_shards("memory://prefetch-before-fork", {"train": [3, 3]})
    SlowFileSystem.held = manifest["splits"]["train"]["shards"][1]["path"]
    SlowFileSystem.release = threading.Event()  # unset, also when the test runs again in this process
    fsspec.register_implementation("slow", SlowFileSystem, clobber=True)
    other = str(tmp_path / "other")
    write_shards(other, {"train": [2, 2]})
    dropped = iter(loader("slow://prefetch-before-fork", batch_size=3, shuffle=False))
    assert len(next(dropped)["key"]) == 3  # the first shard; the second one's prefetch now waits
    threading.Timer(3, SlowFileSystem.release.set).start()
    batch = next(iter(loader(other, batch_size=2, num_workers=2)))
    assert SlowFileSystem.release.is_set(), "the workers forked while a prefetch thread was still reading"
    assert len(batch["key"]) == 2
    assert len(next(dropped)["key"]) == 3  # the prefetched shard, whole and verified
