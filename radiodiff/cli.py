"""Shared plumbing for the console scripts: each is a Hydra app over a typed schema.

``run_app`` composes ``conf/<name>.yaml`` with ``key=value`` overrides from the command line,
converts the result to the schema dataclass (which validates it), and calls the command with it.
Errors a user can cause (bad config, bad paths, bad data) end with a one-line message and exit
code 2 instead of a traceback; set ``RADIODIFF_TRACEBACK=1`` to see the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

EXIT_USAGE = 2


def conf_dir() -> Path:
    """The repository's conf/ folder (the package is installed from a checkout, in editable mode)."""
    path = Path(__file__).resolve().parents[1] / "conf"
    if not path.is_dir():
        raise FileNotFoundError(
            f"config folder {path} not found: install radiodiff from a checkout with `pip install -e .`"
        )
    return path


def compose(config_name: str, overrides: list[str], config_file: str | None = None) -> Any:
    """Compose ``conf/<config_name>.yaml`` (or ``config_file``, e.g. a sweep's best.yaml, which
    names its schema in its defaults list) with overrides; returns the schema dataclass."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from radiodiff.config import register_configs

    register_configs()
    folder, name = str(conf_dir()), config_name
    if config_file is not None:
        path = Path(config_file).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--config {config_file}: no such file")
        folder, name = str(path.parent), path.stem
    with initialize_config_dir(config_dir=folder, version_base="1.3"):
        cfg = hydra_compose(config_name=name, overrides=overrides)
    return OmegaConf.to_object(cfg)


def split_config_file(args: list[str]) -> tuple[str | None, list[str]]:
    """``--config <file>`` anywhere in the arguments -> (file, the remaining overrides)."""
    if "--config" not in args:
        return None, args
    at = args.index("--config")
    if at + 1 >= len(args):
        raise ValueError("--config needs a file: --config <path/to/config.yaml>")
    return args[at + 1], args[:at] + args[at + 2:]


def user_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError,
            HydraException, OmegaConfBaseException)


def run_app(config_name: str, command: Callable[[Any], int | None], argv: list[str] | None = None) -> int:
    """Entry-point body: compose the config from argv overrides and run ``command`` on it."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(f"usage: {Path(sys.argv[0]).name} [--config FILE] [key=value ...]\n\n"
              f"config ({conf_dir() / config_name}.yaml):")
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(compose(config_name, [])))
        return 0
    try:
        config_file, overrides = split_config_file(args)
        cfg = compose(config_name, overrides, config_file)
        code = command(cfg)
    except user_errors() as err:
        if os.environ.get("RADIODIFF_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return int(code or 0)
