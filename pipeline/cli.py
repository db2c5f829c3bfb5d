"""Command line for every recipe: `--preset NAME`, `--config FILE`, dotted overrides.

Precedence, lowest first: the stage's dataclass defaults, the preset (a Python function), the config
file (TOML or YAML, nested tables mirroring the dataclasses), then command-line flags. `tyro` does
all the parsing and type checking; this module only picks the preset's instance as tyro's default
and turns a config file into the equivalent flags (after checking its keys, so that a typo names
the closest valid key and the file).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import tyro

from pipeline.errors import ConfigError, UsageError, closest

T = TypeVar("T")

EXIT_USAGE = 2


def fail(message: str, status: int = EXIT_USAGE) -> typing.NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def run(main: Callable[[T], Any], cfg: T) -> Any:
    """Call a recipe's main(cfg), turning bad input found on the way into `error: ...`, exit 2."""
    try:
        return main(cfg)
    except (ConfigError, UsageError) as err:
        fail(str(err))


@dataclasses.dataclass
class _Head:
    preset: str = ""
    config: str = ""


def parse(
    cls: type[T],
    presets: Mapping[str, Callable[[], T]],
    args: Sequence[str] | None = None,
    *,
    prog: str | None = None,
) -> T:
    """Parse `args` (default: sys.argv) into a `cls` instance; exits with status 2 on bad input."""
    args = list(sys.argv[1:] if args is None else args)
    try:
        head, _ = tyro.cli(
            _Head,
            args=[a for a in args if a not in ("-h", "--help")],
            return_unknown_args=True,
            prog=prog,
        )
        name = head.preset or cls().preset  # type: ignore[attr-defined]
        if name not in presets:
            raise ConfigError(
                f"unknown preset '{name}'{closest(name, list(presets))}; choose one of: {', '.join(presets)}"
            )
        base = dataclasses.replace(presets[name](), preset=name, config=head.config)  # type: ignore[type-var]
        file_args = config_file_args(cls, Path(head.config)) if head.config else []
    except ConfigError as err:
        fail(str(err))
    return tyro.cli(cls, default=base, args=file_args + args, prog=prog)


# --------------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------------


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file into a nested dict."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing --config FILE")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text()) or {}
        elif suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ConfigError(f"config file {path}: use a .toml, .yaml, .yml or .json file")
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"config file {path} could not be read: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings, not {type(data).__name__}")
    return data


def config_file_args(cls: type, path: Path) -> list[str]:
    """The command-line flags equivalent to the config file at `path`, after checking every key."""
    data = load_config_file(path)
    args: list[str] = []
    _flatten(cls, data, "", path, args)
    return args


def _flatten(cls: type, data: Mapping[str, Any], prefix: str, path: Path, out: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        name = key.replace("-", "_")
        dotted = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(
                f"config file {path}: unknown key '{dotted}'{closest(name, list(fields))}; "
                f"valid keys here: {', '.join(fields)}"
            )
        if not prefix and name in ("preset", "config"):
            raise ConfigError(f"config file {path}: '{name}' belongs on the command line (--{name})")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config file {path}: '{dotted}' must be a table of settings")
            _flatten(hint, value, f"{dotted}.", path, out)
        elif hint is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"config file {path}: '{dotted}' must be true or false, got {value!r}")
            out.append(f"--{dotted}" if value else f"--{prefix}no-{name}")
        elif isinstance(value, list | tuple):
            out.append(f"--{dotted}")
            out.extend(str(v) for v in value)
        elif isinstance(value, Mapping):
            raise ConfigError(f"config file {path}: '{dotted}' is a single value, not a table")
        else:
            out.extend([f"--{dotted}", _scalar(value)])


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)  # True / False / None, as tyro spells them
    return str(value)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
