"""User errors on the command line: one line `error: ...` naming the key or file, exit code 2, nothing run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from radiodiff.cli import run_app
from radiodiff.data.schema import DataFormatError, check_antenna
from radiodiff.eval.main import evaluate_main, sample_main
from tests.dist.conftest import environment

REPO = Path(__file__).resolve().parents[2]
TRAIN_VAE = ["run_dir=/tmp/radiodiff-never/run", "data.shards=/tmp/radiodiff-never/shards"]


class Recorder:
    """A command that records the config it was given instead of running."""

    def __init__(self) -> None:
        self.configs: list = []

    def __call__(self, cfg) -> int:
        self.configs.append(cfg)
        return 0


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_unknown_key_is_an_error_with_or_without_plus(prefix: str, capsys) -> None:
    command = Recorder()
    assert run_app("train_vae", command, [*TRAIN_VAE, f"{prefix}train.max_stepz=5"]) == 2
    line = one_error_line(capsys)
    assert line == "error: train.max_stepz: unknown key (did you mean train.max_steps?)"
    assert command.configs == []


def test_unknown_key_without_a_close_match_is_named_and_no_plus_is_suggested(capsys) -> None:
    assert run_app("eval", Recorder(), ["run_dir=/r", "out_dir=/o", "model=tiny"]) == 2
    line = one_error_line(capsys)
    assert line == "error: model: unknown key" and "+" not in line


@pytest.mark.parametrize("prefix", ["+", "++"])
def test_plus_on_a_known_key_sets_it(prefix: str) -> None:
    command = Recorder()
    assert run_app("train_vae", command, [*TRAIN_VAE, f"{prefix}train.max_steps=7"]) == 0
    assert command.configs[0].train.max_steps == 7


@pytest.mark.parametrize("override,expected", [
    ("train.max_steps=abc", "an integer"),
    ("train.lr=fast", "a number"),
    ("data.cars_input=maybe", "true or false"),
    ("data.num_tx=all", "an integer or null"),
    ("train.betas=3", "a list of numbers"),
])
def test_type_error_names_the_override_and_the_expected_type(override: str, expected: str, capsys) -> None:
    command = Recorder()
    assert run_app("train_vae", command, [*TRAIN_VAE, override]) == 2
    assert one_error_line(capsys).startswith(f"error: {override}: expected {expected}")
    assert command.configs == []


def test_a_missing_required_value_is_named(capsys) -> None:
    assert run_app("eval", Recorder(), ["out_dir=/o"]) == 2
    assert one_error_line(capsys) == "error: run_dir is required: give run_dir=<value>"


REQUIRED = {"synth": ["out"], "shard": ["root", "out"], "encode": ["checkpoint", "shards", "out"],
            "train_vae": ["run_dir", "shards"],
            "train_ldm": ["run_dir", "shards", "checkpoint"], "tune": ["out_dir", "shards"],
            "eval": ["run_dir", "out_dir"], "sample": ["run_dir"], "demo": []}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_help_prints_the_composed_config_with_required_values_marked(name: str, capsys) -> None:
    command = Recorder()
    assert run_app(name, command, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: radiodiff-{name.replace('_', '-')} ")
    marked = sorted(line.strip().split(":")[0] for line in out.splitlines() if line.endswith(": ???  # required"))
    assert marked == sorted(REQUIRED[name])
    assert command.configs == []


@pytest.mark.parametrize("args", [["radiodiff-train-ldm", "--help", "model=tiny"], ["radiodiff-eval", "--help"]])
def test_help_of_the_installed_script_exits_0(args: list[str]) -> None:
    script = Path(sys.executable).parent / args[0]
    done = subprocess.run([str(script), *args[1:]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "run_dir: ???  # required" in done.stdout and done.stderr == ""


def test_a_model_preset_is_chosen_by_name() -> None:
    tiny = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")
    command = Recorder()
    assert run_app("train_vae", command, [*TRAIN_VAE, "model=tiny"]) == 0
    assert command.configs[0].model.autoencoder.ch == tiny.model.autoencoder.ch


@pytest.mark.parametrize("choice", ["model_schema", "huge"])
def test_only_real_model_presets_may_be_chosen(choice: str, capsys) -> None:
    command = Recorder()
    assert run_app("train_vae", command, [*TRAIN_VAE, f"model={choice}"]) == 2
    presets = ", ".join(sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml")))
    assert one_error_line(capsys) == f"error: model={choice}: not a model preset; choose one of {presets}"
    assert "model_schema" not in presets and command.configs == []


@pytest.mark.parametrize("choice", ["tiny", "reference"])
def test_the_demo_takes_the_model_preset_both_trainings_get(choice: str) -> None:
    # The demo's model is a plain string key named like the model/ preset folder, which Hydra alone
    # rejects as a group choice missing from the demo's defaults list.
    command = Recorder()
    assert run_app("demo", command, [f"model={choice}", "vae_steps=7"]) == 0
    assert command.configs[0].model == choice and command.configs[0].vae_steps == 7


def test_the_demo_refuses_a_model_that_is_not_a_preset(capsys) -> None:
    command = Recorder()
    assert run_app("demo", command, ["model=huge"]) == 2
    assert one_error_line(capsys) == "error: model=huge: not a model preset; choose one of reference, tiny"
    assert command.configs == []


class CorruptDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        raise DataFormatError("/data/shards/train-000001.tar: member 3_4.gain.png is corrupt")


def test_a_data_loader_worker_error_ends_in_its_own_one_line_message(capsys) -> None:
    def command(cfg) -> int:
        for _ in torch.utils.data.DataLoader(CorruptDataset(), num_workers=1):
            pass
        return 0

    assert run_app("synth", command, ["out=/tmp/radiodiff-never"]) == 2
    assert one_error_line(capsys) == "error: /data/shards/train-000001.tar: member 3_4.gain.png is corrupt"


SAMPLE = ["run_dir=/tmp/radiodiff-never/run", "buildings=/tmp/radiodiff-never/b.png", "tx_row=3", "tx_col=4"]


def test_sample_out_that_is_a_directory_is_named(tmp_path: Path, capsys) -> None:
    assert sample_main([*SAMPLE, f"out={tmp_path}"]) == 2
    assert one_error_line(capsys) == (f"error: out={tmp_path} is a directory; give a file name, "
                                      f"e.g. out={tmp_path / 'map.png'}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,kind", [("map.xyz", "'.xyz' images"), ("map", "a file without an extension")])
def test_sample_out_with_an_extension_pil_cannot_write_is_named(name: str, kind: str, tmp_path: Path,
                                                                capsys) -> None:
    out = tmp_path / name
    assert sample_main([*SAMPLE, f"out={out}"]) == 2
    assert one_error_line(capsys) == f"error: out={out}: cannot write {kind}; give a .png file name"
    assert list(tmp_path.iterdir()) == []


def test_sample_out_dir_that_is_a_file_fails_first(tmp_path: Path, capsys) -> None:
    existing = tmp_path / "predictions"
    existing.write_bytes(b"keep me")
    assert sample_main(["run_dir=/tmp/radiodiff-never/run", f"input_dir={tmp_path}", f"out_dir={existing}"]) == 2
    assert one_error_line(capsys) == f"error: out_dir={existing} is a file, not a folder"
    assert existing.read_bytes() == b"keep me"


def test_eval_out_dir_that_is_a_file_fails_before_the_run_is_opened(tmp_path: Path, capsys) -> None:
    existing = tmp_path / "metrics"
    existing.write_bytes(b"keep me")
    assert evaluate_main([f"run_dir={tmp_path / 'no-run'}", f"out_dir={existing}"]) == 2
    assert one_error_line(capsys) == f"error: out_dir={existing} is a file, not a folder"
    assert existing.read_bytes() == b"keep me"


def antenna(*pixels: tuple[int, int]) -> np.ndarray:
    tx = np.zeros((256, 256), dtype=np.uint8)
    tx[100, 100] = 254  # not a transmitter: only 255 is
    for row, col in pixels:
        tx[row, col] = 255
    return tx


def test_check_antenna_returns_the_one_transmitter_pixel() -> None:
    assert check_antenna(antenna((7, 200)), "a.png") == (7, 200)


@pytest.mark.parametrize("pixels,found", [((), "found 0"), (((1, 2), (3, 4)), "found 2 at (1, 2), (3, 4)")])
def test_check_antenna_rejects_none_or_several_naming_the_file(pixels, found: str) -> None:
    pattern = rf"^x/1_2\.png: expected exactly one transmitter pixel .*{re.escape(found)}$"
    with pytest.raises(DataFormatError, match=pattern):
        check_antenna(antenna(*pixels), "x/1_2.png")


def test_sample_rejects_an_antenna_png_with_two_transmitters_before_opening_the_run(tmp_path: Path, capsys) -> None:
    buildings, bad, out = tmp_path / "b.png", tmp_path / "a.png", tmp_path / "o.png"
    Image.fromarray(np.zeros((256, 256), dtype=np.uint8), mode="L").save(buildings)
    Image.fromarray(antenna((1, 2), (3, 4)), mode="L").save(bad)
    argv = ["run_dir=/tmp/radiodiff-never/run", f"buildings={buildings}", f"antenna={bad}", f"out={out}"]
    assert sample_main(argv) == 2
    assert one_error_line(capsys) == (f"error: {bad}: expected exactly one transmitter pixel (value 255), "
                                      "found 2 at (1, 2), (3, 4)")
    assert not out.exists()


@pytest.mark.parametrize("override", ["train.lr=nan", "train.lr=inf", "loss.kl_weight=nan", "train.min_lr=-inf"])
def test_a_non_finite_setting_is_refused_before_anything_runs(override: str, capsys) -> None:
    command = Recorder()
    assert run_app("train_vae", command, [*TRAIN_VAE, override]) == 2
    assert one_error_line(capsys) == f"error: {override} must be a finite number" and command.configs == []


def test_a_run_dir_that_is_a_file_is_refused_in_one_line(train_shards: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a run")
    script = Path(sys.executable).parent / "radiodiff-train-vae"
    done = subprocess.run([str(script), f"run_dir={a_file}", f"data.shards={train_shards}", "model=tiny",
                           "wandb.enabled=false"],
                          capture_output=True, text=True, timeout=300, env=environment())
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and f"error: run_dir={a_file} is a file, not a folder" in done.stderr
    assert a_file.read_text() == "not a run"


def test_eval_of_a_run_dir_that_is_a_file_says_so(tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a run")
    assert evaluate_main([f"run_dir={a_file}", f"out_dir={tmp_path / 'out'}"]) == 2
    assert one_error_line(capsys) == f"error: run_dir={a_file} is a file, not a run directory"


def test_sample_of_buildings_that_are_a_directory_says_so(tmp_path: Path, capsys) -> None:
    antenna_png = tmp_path / "a.png"
    Image.fromarray(antenna((1, 2)), mode="L").save(antenna_png)
    argv = ["run_dir=/tmp/radiodiff-never/run", f"buildings={tmp_path}", f"antenna={antenna_png}",
            f"out={tmp_path / 'o.png'}"]
    assert sample_main(argv) == 2
    assert one_error_line(capsys) == f"error: {tmp_path} is a directory, not a PNG file"


def test_the_demo_names_an_out_dir_that_is_a_file(tmp_path: Path, capsys) -> None:
    from pipeline.demo import run_demo

    taken = tmp_path / "demo_out"
    taken.write_text("a file someone else wrote\n")
    assert run_app("demo", run_demo, [f"out_dir={taken}"]) == 2
    assert one_error_line(capsys) == f"error: out_dir={taken} is a file, not a folder"
    assert taken.read_text() == "a file someone else wrote\n"
