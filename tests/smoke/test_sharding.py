"""radiodiff-shard end to end on a synthetic RadioMapSeer, with real Ray tasks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import pytest

import numpy as np
from PIL import Image

from radiodiff.cli import run_app
from radiodiff.config import DataConfig, ShardConfig
from radiodiff.data.radiomapseer import RadioMapSeer
from radiodiff.data.schema import DataFormatError
from radiodiff.train.lock import RunLock
from radiodiff.train.remote_lock import RemoteLock
from pipeline.shard import ShardTask, ShardingError, run_shard, run_tasks, shard_command
from tests.conftest import resize


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
    message = str(error.value)
    assert "\n" not in message and message.count(str(bad_gain)) == 1 and message.count(str(missing)) == 1
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

    spec = importlib.util.spec_from_file_location("inspect_shards",
                                                  Path(__file__).parents[2] / "tools" / "inspect_shards.py")
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


def tar_keys(out: Path, manifest: dict) -> dict[str, list[str]]:
    """Shard path -> the sample keys its tar holds."""
    keys = {}
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            with tarfile.open(out / shard["path"]) as tar:
                keys[shard["path"]] = sorted({name.split(".")[0] for name in tar.getnames()})
    return keys


def mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


def test_unchanged_rerun_leaves_the_manifest_untouched(synth_root: Path, tmp_path: Path, ray_local) -> None:
    out = tmp_path / "shards"
    run_shard(shard_cfg(synth_root, str(out)))
    manifest = out / "manifest.json"
    before, files = manifest.read_bytes(), mtimes(out)
    os.utime(manifest, ns=(1_000_000_000, 1_000_000_000))  # a rewrite would move it, even within a tick
    run_shard(shard_cfg(synth_root, str(out)))
    assert manifest.read_bytes() == before and manifest.stat().st_mtime_ns == 1_000_000_000
    assert mtimes(out) == {**files, "manifest.json": 1_000_000_000}  # nothing written, moved aside or left


def test_rerun_of_a_skip_set_keeps_its_entries_and_skipped_files(synth_copy: Path, tmp_path: Path,
                                                                  ray_local) -> None:
    bad_gain = synth_copy / "gain" / "DPM" / "2_1.png"
    bad_gain.write_bytes(b"not a png")
    out = tmp_path / "shards"
    first = run_shard(shard_cfg(synth_copy, str(out), on_error="skip"))
    before = (out / "manifest.json").read_bytes()
    second = run_shard(shard_cfg(synth_copy, str(out), on_error="skip"))
    assert second == first and (out / "manifest.json").read_bytes() == before
    assert [bad["path"] for bad in second["skipped"]] == [str(bad_gain)]
    held = tar_keys(out, second)
    for entry in second["splits"].values():
        assert entry["num_samples"] == sum(len(held[s["path"]]) for s in entry["shards"])
        assert all(s["num_samples"] == len(held[s["path"]]) for s in entry["shards"])


def test_known_bad_files_fail_a_later_on_error_fail_run_at_once(synth_copy: Path, tmp_path: Path,
                                                                 ray_local, capsys) -> None:
    bad_gain = synth_copy / "gain" / "DPM" / "2_1.png"
    bad_gain.write_bytes(b"not a png")
    out = tmp_path / "shards"
    run_shard(shard_cfg(synth_copy, str(out), on_error="skip"))
    files = mtimes(out)
    capsys.readouterr()
    argv = [f"data.root={synth_copy}", f"out={out}", "min_shards_per_split=2"]
    assert run_app("shard", shard_command, argv) == 2
    captured = capsys.readouterr()
    reason = read_manifest(out)["skipped"][0]["error"]
    expected = f"error: 1 bad source file (on_error=skip leaves them out): {bad_gain} ({reason})"
    assert captured.err.splitlines() == [expected]
    assert "cannot decode PNG" in captured.err and "Ray:" not in captured.out  # failed before any work
    assert mtimes(out) == files


def test_a_bad_city_map_read_by_many_samples_is_named_once(synth_copy: Path, tmp_path: Path, ray_local,
                                                             capsys) -> None:
    bad_city = synth_copy / "png" / "buildings_complete" / "2.png"
    bad_city.write_bytes(b"not a png")
    argv = [f"data.root={synth_copy}", f"out={tmp_path / 'shards'}", "min_shards_per_split=2"]
    assert run_app("shard", shard_command, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: 1 bad source file (on_error=skip leaves them out): {bad_city} (cannot decode PNG")
    assert err.count(str(bad_city)) == 1 and len(err.splitlines()) == 1, err


def rewrite_gain(path: Path) -> None:
    gain = np.asarray(Image.open(path)).copy()
    gain[0, 0] = (int(gain[0, 0]) + 1) % 256
    Image.fromarray(gain, mode="L").save(path)


def test_a_changed_source_file_rewrites_exactly_the_shards_holding_it(synth_copy: Path, tmp_path: Path,
                                                                      ray_local) -> None:
    out = tmp_path / "shards"
    first = run_shard(shard_cfg(synth_copy, str(out)))
    holding = [path for path, keys in tar_keys(out, first).items() if "2_1" in keys]
    files = mtimes(out)
    rewrite_gain(synth_copy / "gain" / "DPM" / "2_1.png")  # same size is possible: mtime_ns tells
    second = run_shard(shard_cfg(synth_copy, str(out)))
    changed = {path for path, mtime in mtimes(out).items() if files.get(path) != mtime}
    assert changed == {*holding, "manifest.json"}
    with tarfile.open(out / holding[0]) as tar:
        assert tar.extractfile("2_1.gain.png").read() == (synth_copy / "gain" / "DPM" / "2_1.png").read_bytes()
    old = {s["path"]: s for e in first["splits"].values() for s in e["shards"]}
    new = {s["path"]: s for e in second["splits"].values() for s in e["shards"]}
    assert {p for p in new if new[p]["sha256"] != old[p]["sha256"]} == set(holding)


def test_another_source_root_rewrites_every_shard(synth_root: Path, synth_copy: Path, tmp_path: Path,
                                                  ray_local, capsys) -> None:
    out = tmp_path / "shards"
    run_shard(shard_cfg(synth_root, str(out)))
    files = mtimes(out)
    capsys.readouterr()
    manifest = run_shard(shard_cfg(synth_copy, str(out)))  # the same files (copied with their mtimes)
    assert "0 kept" in capsys.readouterr().out
    assert manifest["source_root"] == str(synth_copy)
    assert all(mtime != files[path] for path, mtime in mtimes(out).items())


def test_antenna_with_two_transmitters_is_a_bad_source_file(synth_copy: Path, tmp_path: Path, ray_local) -> None:
    path = synth_copy / "png" / "antennas" / "4_2.png"
    tx = np.asarray(Image.open(path)).copy()
    tx[0, 0] = 255  # a second transmitter pixel
    Image.fromarray(tx, mode="L").save(path)
    with pytest.raises(ShardingError, match=f"{path} \\(expected exactly one transmitter pixel .*found 2"):
        run_shard(shard_cfg(synth_copy, str(tmp_path / "shards")))


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits: /proc/sys)."""
    if os.geteuid() == 0:
        return Path("/proc/sys")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_unwritable_out_fails_at_once_with_one_line(synth_root: Path, tmp_path: Path, capsys) -> None:
    folder = unwritable_folder(tmp_path)
    argv = [f"data.root={synth_root}", f"out={folder / 'shards'}", "ray.num_cpus=1"]
    assert run_app("shard", shard_command, argv) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: out={folder / 'shards'}: {folder} is not writable"]
    assert "Ray:" not in captured.out and not (folder / "shards").exists()


def test_out_that_is_a_file_fails_at_once(synth_root: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "shards"
    target.write_bytes(b"keep me")
    assert run_app("shard", shard_command, [f"data.root={synth_root}", f"out={target}"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: out={target} is a file, not a folder"]
    assert target.read_bytes() == b"keep me"


def test_a_ray_task_error_is_raised_as_itself(synth_root: Path, tmp_path: Path, ray_local, capsys) -> None:
    def failing(task: ShardTask, cfg: ShardConfig) -> None:
        raise DataFormatError(f"{task.keys[0]}.png: corrupt")

    def command(cfg: ShardConfig) -> int:
        run_tasks(failing, [ShardTask("train", 0, ["3_1"], "plan")], cfg, desc="test")
        return 0

    argv = [f"data.root={synth_root}", f"out={tmp_path / 'shards'}"]
    assert run_app("shard", command, argv) == 2
    assert capsys.readouterr().err.splitlines() == ["error: 3_1.png: corrupt"]


def test_a_full_disk_fails_in_one_line_and_leaves_no_partial_file(synth_root: Path, small_disk: Path, ray_local,
                                                                  capsys) -> None:
    resize(small_disk, 256 << 10)  # room for a few shards of the synthetic set, not all of them
    out = small_disk / "shards"
    assert run_app("shard", shard_command, [f"data.root={synth_root}", f"out={out}", "min_shards_per_split=2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "No space left on device" in err[0], err
    assert files_under(out) == []  # no partial file, and no whole shard of the failed run either


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_failed_rerun_leaves_the_previous_set_as_it_was(synth_copy: Path, tmp_path: Path, ray_local) -> None:
    out = tmp_path / "shards"
    first = run_shard(shard_cfg(synth_copy, str(out)))
    before = {name: (out / name).read_bytes() for name in files_under(out)}
    (synth_copy / "gain" / "DPM" / "2_1.png").write_bytes(b"not a png")
    with pytest.raises(ShardingError, match="2_1.png"):  # a new cut: every good shard was built before the error
        run_shard(shard_cfg(synth_copy, str(out), samples_per_shard=5))
    assert {name: (out / name).read_bytes() for name in files_under(out)} == before  # nothing staged stays
    assert read_manifest(out) == first  # and the previous set is still the valid one, for every reader


def test_a_second_run_on_the_same_folder_is_refused_naming_the_owner(synth_root: Path, tmp_path: Path,
                                                                      capsys) -> None:
    out = tmp_path / "new" / "shards"
    with RunLock(out, name="out", owner="radiodiff-encode"):
        assert run_app("shard", shard_command, [f"data.root={synth_root}", f"out={out}"]) == 2
        assert files_under(out) == ["LOCK"]
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: out={out} is in use by another radiodiff-encode: "
                                               f"host {socket.gethostname()}, pid {os.getpid()}"), err
    assert "Ray:" not in captured.out and not (tmp_path / "new").exists()


def test_a_second_run_on_the_same_url_is_refused_naming_the_owner(synth_root: Path, capsys) -> None:
    fs, url = fsspec.filesystem("memory"), "memory://radiodiff-locked/shards"
    with RemoteLock(fs, "/radiodiff-locked/shards", where=url, name="out", owner="radiodiff-encode"):
        assert run_app("shard", shard_command, [f"data.root={synth_root}", f"out={url}"]) == 2
        assert fs.find("/radiodiff-locked") == ["/radiodiff-locked/shards/LOCK"]
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: out={url} is in use by another radiodiff-encode: "
                                               f"host {socket.gethostname()}, pid {os.getpid()}"), err
    assert "Ray:" not in captured.out and fs.find("/radiodiff-locked") == []


def test_the_next_run_removes_what_a_killed_run_staged(synth_root: Path, tmp_path: Path, ray_local) -> None:
    out = tmp_path / "shards"
    first = run_shard(shard_cfg(synth_root, str(out)))
    leftover = out / "train" / "train-000000.tar.staged-0123456789ab"
    leftover.write_bytes(b"half of a killed run")
    assert run_shard(shard_cfg(synth_root, str(out))) == first
    assert files_under(out) == sorted(["manifest.json", *(s["path"] for e in first["splits"].values()
                                                          for s in e["shards"])])
