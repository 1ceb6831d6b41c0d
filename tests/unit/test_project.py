"""Project contracts: README set-up commands, CI, console scripts, configs."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest

from radiodiff.cli import compose, run_app
from radiodiff.config import (
    ConfigError,
    DemoConfig,
    EncodeConfig,
    EvalConfig,
    SampleConfig,
    ShardConfig,
    SynthConfig,
    TrainLdmConfig,
    TrainVaeConfig,
    TuneConfig,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["radiodiff-synth", "radiodiff-shard", "radiodiff-encode", "radiodiff-train-vae", "radiodiff-train-ldm",
           "radiodiff-tune", "radiodiff-eval", "radiodiff-sample", "radiodiff-demo"]


def setup_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n\s*(.+?)\n\s*```", section)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one() -> None:
    demo, tests = setup_commands()
    assert demo.endswith("radiodiff-demo") and "pip install -e ." in demo
    assert tests.split(" && ")[-1].startswith("pytest") and 'pip install -e ".[dev]"' in tests
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_every_console_script_resolves() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == sorted(SCRIPTS)
    for target in scripts.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name))


REQUIRED = {"synth": ["out=/tmp/x"], "shard": ["data.root=/tmp/r", "out=/tmp/s"], "demo": [],
            "encode": ["vae.checkpoint=/tmp/v", "data.shards=/tmp/s", "out=/tmp/l"],
            "train_vae": ["run_dir=/tmp/r", "data.shards=/tmp/s"],
            "train_ldm": ["run_dir=/tmp/r", "data.shards=/tmp/s", "vae.checkpoint=/tmp/v"],
            "tune": ["out_dir=/tmp/o", "data.shards=/tmp/s"], "eval": ["run_dir=/tmp/r", "out_dir=/tmp/o"],
            "sample": ["run_dir=/tmp/r", "buildings=/tmp/b.png", "antenna=/tmp/a.png", "out=/tmp/o.png"]}


@pytest.mark.parametrize("name,schema", [("synth", SynthConfig), ("shard", ShardConfig), ("demo", DemoConfig),
                                         ("encode", EncodeConfig),
                                         ("train_vae", TrainVaeConfig), ("train_ldm", TrainLdmConfig),
                                         ("tune", TuneConfig), ("eval", EvalConfig), ("sample", SampleConfig)])
def test_configs_compose_to_their_schema(name: str, schema: type) -> None:
    required = REQUIRED[name]
    cfg = compose(name, required)
    assert isinstance(cfg, schema)


def test_demo_paths_follow_out_dir() -> None:
    cfg = compose("demo", ["out_dir=/tmp/elsewhere"])
    assert cfg.synth.out == "/tmp/elsewhere/radiomapseer"
    assert cfg.shard.data.root == cfg.synth.out and cfg.shard.out == "/tmp/elsewhere/shards"


@pytest.mark.parametrize("override,message", [
    (["out=/tmp/x", "num_mapz=3"], "num_mapz"),  # unknown key
    (["out=/tmp/x", "num_maps=many"], "num_maps"),  # wrong type
    (["out=/tmp/x", "num_tx=81"], "num_tx=81"),  # invalid value
    (["out=/tmp/x", "simulations=[DPM,XYZ]"], "XYZ"),
])
def test_bad_config_is_rejected_naming_the_key(override: list[str], message: str, capsys) -> None:
    assert run_app("synth", lambda cfg: 0, override) == 2
    assert message in capsys.readouterr().err


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="on_error"):
        ShardConfig(out="x", on_error="maybe")
