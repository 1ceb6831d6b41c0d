"""radiodiff-shard end to end on a synthetic RadioMapSeer, with real Ray tasks."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import pytest

from radiodiff.config import DataConfig, ShardConfig
from radiodiff.data.radiomapseer import RadioMapSeer
from pipeline.shard import ShardingError, run_shard


def shard_cfg(root: Path, out: str, **overrides) -> ShardConfig:
    data = DataConfig(root=str(root), **overrides.pop("data", {}))
    return ShardConfig(data=data, out=out, min_shards_per_split=2, **overrides)


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def sharded(synth_root: Path, tmp_path_factory: pytest.TempPathFactory, ray_local) -> Path:
    out = tmp_path_factory.mktemp("shards")
    run_shard(shard_cfg(synth_root, str(out)))
    return out


def test_manifest_lists_every_shard_with_checksums(sharded: Path, synth_root: Path) -> None:
    manifest = read_manifest(sharded)
    source = RadioMapSeer(DataConfig(root=str(synth_root)))
    assert manifest["format"] == "radiodiff-shards" and manifest["protocol"] == "radiounet"
    assert manifest["source_root"] == str(synth_root) and manifest["skipped"] == []
    for split, entry in manifest["splits"].items():
        assert entry["maps"] == source.splits[split]
        assert entry["num_samples"] == len(source.sample_ids(split)) == sum(s["num_samples"] for s in entry["shards"])
        assert len(entry["shards"]) >= 2
        for index, shard in enumerate(entry["shards"]):
            data = (sharded / shard["path"]).read_bytes()
            assert shard["path"] == f"{split}/{split}-{index:06d}.tar"
            assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert not list(sharded.rglob("*.tmp-*"))


def test_members_are_the_source_bytes_unchanged(sharded: Path, synth_root: Path) -> None:
    shard = read_manifest(sharded)["splits"]["train"]["shards"][0]
    with tarfile.open(sharded / shard["path"]) as tar:
        names = tar.getnames()
        key = names[0].split(".")[0]
        assert names[:4] == [f"{key}.buildings.png", f"{key}.tx.png", f"{key}.gain.png", f"{key}.json"]
        map_id, tx = key.split("_")
        assert tar.extractfile(f"{key}.gain.png").read() == (synth_root / f"gain/DPM/{key}.png").read_bytes()
        assert tar.extractfile(f"{key}.tx.png").read() == (synth_root / f"png/antennas/{key}.png").read_bytes()
        assert (tar.extractfile(f"{key}.buildings.png").read()
                == (synth_root / f"png/buildings_complete/{map_id}.png").read_bytes())
        record = json.loads(tar.extractfile(f"{key}.json").read())
    antenna = json.loads((synth_root / f"antenna/{map_id}.json").read_text())[int(tx)]
    assert record["map"] == int(map_id) and record["tx"] == int(tx) and record["split"] == "train"
    assert (record["tx_row"], record["tx_col"]) == (255 - antenna[1], antenna[0])


def test_plain_webdataset_and_tar_read_the_shards(sharded: Path) -> None:
    import webdataset as wds

    manifest = read_manifest(sharded)
    urls = [str(sharded / s["path"]) for s in manifest["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == manifest["splits"]["train"]["num_samples"]
    assert {"__key__", "buildings.png", "tx.png", "gain.png", "json"} <= set(samples[0])
    listing = subprocess.run(["tar", "tf", urls[0]], capture_output=True, text=True, check=True).stdout.split()
    assert len(listing) == 4 * manifest["splits"]["train"]["shards"][0]["num_samples"]


def test_rerun_keeps_intact_shards_and_rewrites_damaged_ones(synth_root: Path, tmp_path: Path, ray_local) -> None:
    out = tmp_path / "shards"
    first = run_shard(shard_cfg(synth_root, str(out)))
    shards = first["splits"]["train"]["shards"]
    (out / shards[0]["path"]).unlink()
    (out / shards[1]["path"]).write_bytes(b"corrupt")
    untouched = out / first["splits"]["test"]["shards"][0]["path"]
    mtime = untouched.stat().st_mtime_ns
    second = run_shard(shard_cfg(synth_root, str(out)))
    assert second == first  # same plan, deterministic bytes: the same manifest
    for shard in shards[:2]:
        assert hashlib.sha256((out / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
    assert untouched.stat().st_mtime_ns == mtime  # kept, not rewritten
    assert not (out / "manifest.json.previous").exists()


def test_bad_source_files_fail_naming_every_one(synth_copy: Path, tmp_path: Path, ray_local) -> None:
    bad_gain = synth_copy / "gain" / "DPM" / "2_1.png"
    bad_gain.write_bytes(b"not a png")
    missing = synth_copy / "png" / "antennas" / "7_3.png"
    missing.unlink()
    out = tmp_path / "shards"
    with pytest.raises(ShardingError) as error:
        run_shard(shard_cfg(synth_copy, str(out)))
    assert str(bad_gain) in str(error.value) and str(missing) in str(error.value)
    assert not (out / "manifest.json").exists()
    manifest = run_shard(shard_cfg(synth_copy, str(out), on_error="skip"))
    skipped = {entry["path"] for entry in manifest["skipped"]}
    assert skipped == {str(bad_gain), str(missing)}
    keys = set()
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            with tarfile.open(out / shard["path"]) as tar:
                keys |= {name.split(".")[0] for name in tar.getnames()}
    assert "2_1" not in keys and "7_3" not in keys and "2_0" in keys
    total = sum(e["num_samples"] for e in manifest["splits"].values())
    assert total == 12 * 4 - 2


def test_memory_filesystem_output(synth_root: Path, ray_local) -> None:
    manifest = run_shard(shard_cfg(synth_root, "memory://radiodiff-test/shards"))
    fs = fsspec.filesystem("memory")
    stored = json.loads(fs.cat_file("/radiodiff-test/shards/manifest.json"))
    assert stored == manifest
    shard = manifest["splits"]["val"]["shards"][0]
    data = fs.cat_file(f"/radiodiff-test/shards/{shard['path']}")
    assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert len(tar.getnames()) == 4 * shard["num_samples"]


def test_cli_shards_and_rejects_bad_config(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-c", "from pipeline.shard import main; raise SystemExit(main())",
         f"data.root={synth_root}", f"out={out}", "min_shards_per_split=2", "ray.num_cpus=1",
         "data.simulation=carsDPM", "data.cars_input=true"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"train\s+\d+ maps\s+\d+ samples", done.stdout)
    with tarfile.open(out / "train" / "train-000000.tar") as tar:
        assert any(name.endswith(".cars.png") for name in tar.getnames())
    bad = subprocess.run(
        [sys.executable, "-c", "from pipeline.shard import main; raise SystemExit(main())",
         f"data.root={synth_root}", f"out={out}", "on_error=ignore"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "on_error='ignore' is not valid" in bad.stderr


def test_inspect_shards_verifies_and_finds_a_corrupt_shard(sharded: Path, tmp_path: Path, capsys) -> None:
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("inspect_shards", Path(__file__).parents[2] / "tools" / "inspect_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(sharded), "--verify", "--show", "2"]) == 0
    assert "all shards verified" in capsys.readouterr().out
    copy = Path(shutil.copytree(sharded, tmp_path / "copy"))
    victim = copy / read_manifest(copy)["splits"]["val"]["shards"][0]["path"]
    victim.write_bytes(victim.read_bytes()[:-1024])
    assert tool.main([str(copy), "--verify"]) == 1
    assert "1 problem(s) found" in capsys.readouterr().out
    assert tool.main([str(tmp_path / "nothing")]) == 2
