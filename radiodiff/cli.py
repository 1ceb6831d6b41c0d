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


def compose(config_name: str, overrides: list[str]) -> Any:
    """Compose ``conf/<config_name>.yaml`` with overrides and return the schema dataclass."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from radiodiff.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_object(cfg)


def user_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError,
            HydraException, OmegaConfBaseException)


def run_app(config_name: str, command: Callable[[Any], int | None], argv: list[str] | None = None) -> int:
    """Entry-point body: compose the config from argv overrides and run ``command`` on it."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(f"usage: {Path(sys.argv[0]).name} [key=value ...]\n\nconfig ({conf_dir() / config_name}.yaml):")
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(compose(config_name, [])))
        return 0
    try:
        cfg = compose(config_name, args)
        code = command(cfg)
    except user_errors() as err:
        if os.environ.get("RADIODIFF_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return int(code or 0)


def not_available(capability: str) -> Callable[[], int]:
    """A console script whose capability has not landed yet: says so, exits 2."""

    def main() -> int:
        print(f"error: {capability} is not available in this version yet", file=sys.stderr)
        return EXIT_USAGE

    return main
