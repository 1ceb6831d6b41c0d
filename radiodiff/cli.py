"""Shared plumbing for the console scripts: each is a Hydra app over a typed schema.

``run_app`` composes ``conf/<name>.yaml`` with ``key=value`` overrides from the command line,
converts the result to the schema dataclass (which validates it), and calls the command with it.
Every override must name a key of the schema (``+key`` and ``++key`` too: the schema is closed) or
a preset of a config group (``model=tiny``); a value must have the key's type. Errors a user can
cause (bad config, bad paths, bad data) end with one line ``error: ...`` and exit code 2 instead of
a traceback; set ``RADIODIFF_TRACEBACK=1`` to see the traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from radiodiff.config import ConfigError

EXIT_USAGE = 2
EXIT_FAILURE = 1
REQUIRED_MARK = "  # required"
# torch.utils.data re-raises a worker's exception as the same type with this message prefix and
# the worker's traceback; its last line is the original "Type: message".
WORKER_ERROR = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")


def conf_dir() -> Path:
    """The repository's conf/ folder (the package is installed from a checkout, in editable mode)."""
    path = Path(__file__).resolve().parents[1] / "conf"
    if not path.is_dir():
        raise FileNotFoundError(
            f"config folder {path} not found: install radiodiff from a checkout with `pip install -e .`"
        )
    return path


def config_groups(folder: Path, name: str) -> dict[str, list[str]]:
    """Config groups in the defaults list of ``folder/name.yaml`` -> their presets (the yaml files).

    Only these are choices: the schemas registered in Hydra's ConfigStore are not presets.
    """
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.load(folder / f"{name}.yaml")).get("defaults") or []
    groups = [key for entry in defaults if isinstance(entry, dict) for key in entry]
    return {group: group_presets(folder, group) for group in groups}


def group_presets(folder: Path, group: str) -> list[str]:
    """The presets of a config group: the yaml files in ``folder/group``."""
    return sorted(p.stem for p in (folder / group).glob("*.yaml"))


def _node(cfg: Any, key: str) -> Any:
    """The config node at a dotted key, or None where the key is not part of the config."""
    from omegaconf import DictConfig

    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            return None
        node = node._get_node(part, validate_access=False)
        if node is None:
            return None
    return node


def _keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a composed config (sections and values)."""
    from omegaconf import DictConfig

    keys = []
    for name in cfg.keys():
        key = f"{prefix}{name}"
        keys.append(key)
        node = cfg._get_node(name)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            keys += _keys(node, f"{key}.")
    return keys


def unknown_key_error(key: str, cfg: Any) -> ConfigError:
    known = _keys(cfg)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if not close:  # a key given without its section: max_steps for train.max_steps
        close = [k for k in known if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{key}: unknown key{hint}")


def expected_type(node: Any, key: str) -> str:
    """What a config node accepts, in words: 'an integer', 'a list of numbers', ..."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.nodes import (
        BooleanNode,
        EnumNode,
        FloatNode,
        IntegerNode,
        StringNode,
    )

    words = {IntegerNode: "an integer", FloatNode: "a number", BooleanNode: "true or false",
             StringNode: "a string"}
    if isinstance(node, ListConfig):
        element = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(
            node._metadata.element_type)
        kind = f"a list of {element}, e.g. [a,b]" if element else "a list, e.g. [a,b]"
    elif isinstance(node, DictConfig):
        kind = f"a section: set its keys, e.g. {key}.<key>=<value>"
    elif isinstance(node, EnumNode):
        kind = "one of " + ", ".join(m.name for m in node.enum_type)
    else:
        kind = next((w for t, w in words.items() if isinstance(node, t)), "a value")
    return f"{kind} or null" if node._is_optional() and not isinstance(node, DictConfig) else kind


def _check_choices(parsed: list[Any], groups: dict[str, list[str]]) -> None:
    for override in parsed:
        key = override.key_or_group
        if key in groups and override.value() not in groups[key]:
            raise ConfigError(f"{key}={override.value()}: not a {key} preset; choose one of "
                              f"{', '.join(groups[key])}")


def _check_keys(parsed: list[Any], base: Any, groups: dict[str, list[str]]) -> None:
    """Every key must be in ``base``, the config composed with the group choices."""
    for override in parsed:
        key = override.key_or_group
        if key not in groups and _node(base, key) is None:
            raise unknown_key_error(key, base)
        if override.is_delete():  # the schema has every key; ~key would only restore its default
            raise ConfigError(f"{override.input_line}: removing a key is not supported; set {key}=<value>")


def _type_error(err: Exception, parsed: list[Any], base: Any) -> Exception:
    """A failed override merge -> '<override>: expected <type>' naming the user's override."""
    from omegaconf.errors import OmegaConfBaseException

    cause = err.__cause__
    full_key = getattr(cause, "full_key", None) if isinstance(cause, OmegaConfBaseException) else None
    if not full_key:
        return err
    for override in reversed(parsed):
        key = override.key_or_group
        if full_key == key or full_key.startswith((f"{key}.", f"{key}[")):
            return ConfigError(f"{override.input_line}: expected {expected_type(_node(base, key), key)}")
    return ConfigError(f"{full_key}: {str(cause).splitlines()[0]}")


def compose_config(config_name: str, overrides: list[str], config_file: str | None = None) -> Any:
    """The composed, checked DictConfig of ``conf/<config_name>.yaml`` (or ``config_file``) with
    overrides: unknown keys, group choices and value types are checked here."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from radiodiff.config import register_configs

    register_configs()
    folder, name = conf_dir(), config_name
    if config_file is not None:
        path = Path(config_file).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--config {config_file}: no such file")
        folder, name = path.parent, path.stem
    groups = config_groups(folder, name)
    parsed = OverridesParser.create().parse_overrides(overrides)
    # A plain key named like a preset folder (the demo's model=tiny, passed on to both trainings):
    # Hydra would read it as a group choice missing from the defaults list, so it is checked against
    # the folder's presets like a group and set on the composed config.
    shadowed = {o.key_or_group: o for o in parsed
                if o.key_or_group not in groups and (folder / o.key_or_group).is_dir()}
    _check_choices(parsed, groups | {key: group_presets(folder, key) for key in shadowed})
    with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
        choices = [o.input_line.lstrip("+") for o in parsed if o.key_or_group in groups]
        base = hydra_compose(config_name=name, overrides=choices)
        _check_keys(parsed, base, groups)
        # Every key exists, so +key / ++key mean key: the schema decides what is accepted.
        plain = [o.input_line.lstrip("+") for o in parsed if o.key_or_group not in shadowed]
        try:
            cfg = hydra_compose(config_name=name, overrides=plain)
        except ConfigCompositionException as err:
            raise _type_error(err, parsed, base) from err
    for key, override in shadowed.items():
        OmegaConf.update(cfg, key, override.value(), merge=False)
    return cfg


def compose(config_name: str, overrides: list[str], config_file: str | None = None) -> Any:
    """Compose ``conf/<config_name>.yaml`` (or ``config_file``, e.g. a sweep's best.yaml, which
    names its schema in its defaults list) with overrides; returns the schema dataclass."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    cfg = compose_config(config_name, overrides, config_file)
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", None) or "a value"
        raise ConfigError(f"{key} is required: give {key}=<value>") from err


def split_config_file(args: list[str]) -> tuple[str | None, list[str]]:
    """``--config <file>`` anywhere in the arguments -> (file, the remaining overrides)."""
    if "--config" not in args:
        return None, args
    at = args.index("--config")
    if at + 1 >= len(args):
        raise ValueError("--config needs a file: --config <path/to/config.yaml>")
    return args[at + 1], args[:at] + args[at + 2:]


def script_name(config_name: str) -> str:
    return "radiodiff-" + config_name.replace("_", "-")


def _required_in_yaml(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys a yaml file sets to ``???``."""
    from omegaconf import DictConfig, OmegaConf

    keys = []
    for name in node.keys():
        key, child = f"{prefix}{name}", node._get_node(name)
        if isinstance(child, DictConfig):
            keys += _required_in_yaml(child, f"{key}.")
        elif OmegaConf.is_missing(node, name):
            keys.append(key)
    return keys


def help_text(config_name: str, args: list[str]) -> str:
    """Usage and the composed config (with any overrides given), required values marked."""
    from omegaconf import OmegaConf

    config_file, overrides = split_config_file(args)
    cfg = compose_config(config_name, overrides, config_file)
    source = Path(config_file) if config_file else conf_dir() / f"{config_name}.yaml"
    # A yaml ??? over a schema default of None (data.shards) composes to None: the command still
    # needs it, so it is shown as required.
    for key in _required_in_yaml(OmegaConf.load(source)):
        if key != "defaults" and _node(cfg, key) is not None and OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, "???")
    text = OmegaConf.to_yaml(cfg)
    lines = [line + REQUIRED_MARK if line.rstrip().endswith(": ???") else line for line in text.splitlines()]
    return (f"usage: {script_name(config_name)} [--config FILE] [key=value ...]\n\n"
            f"config ({source}; ??? marks a value you must give):\n" + "\n".join(lines))


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def check_output_dir(key: str, value: str) -> Path:
    """Before any work: ``key=value`` is a folder, or can be created as one, that we can write in."""
    folder = Path(value).expanduser()
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        if existing == folder.absolute():
            raise NotADirectoryError(f"{key}={value} is a file, not a folder")
        raise NotADirectoryError(f"{key}={value}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{key}={value}: {existing} is not writable")
    return folder


def check_output_file(key: str, value: str) -> Path:
    """Before any work: ``key=value`` names a file (not a folder) in a folder we can write in."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{key}={value} is a directory; give a file name, e.g. {key}={path / 'map.png'}")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise NotADirectoryError(f"{key}={value}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{key}={value}: {existing} is not writable")
    return path


def user_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            KeyError, HydraException, OmegaConfBaseException)


def error_line(err: BaseException) -> str:
    """One line for a user error: a data-loader worker's error is its original last line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError: the task's own exception
    if type(err).__name__.startswith("RayTaskError") and isinstance(cause, BaseException):
        err = cause
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if WORKER_ERROR.match(lines[0]):
        last = lines[-1]
        for prefix in (f"{type(err).__module__}.{type(err).__qualname__}: ", f"{type(err).__name__}: "):
            last = last.removeprefix(prefix)
        return last
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        return lines[0]  # the rest is Hydra's search path or OmegaConf's object details
    return " ".join(lines)


def run_app(config_name: str, command: Callable[[Any], int | None], argv: list[str] | None = None) -> int:
    """Entry-point body: compose the config from argv overrides and run ``command`` on it."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if "-h" in args or "--help" in args:
            print(help_text(config_name, [a for a in args if a not in ("-h", "--help")]))
            return 0
        config_file, overrides = split_config_file(args)
        cfg = compose(config_name, overrides, config_file)
        code = command(cfg)
    except (*user_errors(), OSError) as err:
        if os.environ.get("RADIODIFF_TRACEBACK"):
            raise
        print(f"error: {error_line(err)}", file=sys.stderr)
        # Any other OSError is the machine's, not the user's: a full disk, an I/O error.
        return EXIT_USAGE if isinstance(err, user_errors()) else EXIT_FAILURE
    return int(code or 0)
