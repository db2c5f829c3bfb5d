"""Command line for every recipe: `--preset NAME`, `--config FILE`, dotted overrides.

Precedence, lowest first: the stage's dataclass defaults, the preset (a Python function), the config
file (TOML or YAML, nested tables mirroring the dataclasses), then command-line flags. `tyro` does
the parsing of flags; this module picks the preset's instance, applies the config file to it field
by field (checking every key, so that a typo names the closest valid key and the file, and every
value's type) and hands the result to tyro as the default that the flags override. A file's values
are only ever data: a string that looks like a flag stays a string.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import json
import os
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import tyro

from pipeline.errors import ConfigError, UsageError, closest, write_failure

T = TypeVar("T")

EXIT_USAGE = 2
EXIT_FAILED = 1


def say(line: str) -> None:
    """One line to stderr in one write: a helper thread's line and the main thread's cannot interleave
    (print writes the text and its newline apart, and a line could end up glued to another's start)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def fail(message: str, status: int = EXIT_USAGE) -> typing.NoReturn:
    say(f"error: {message}")
    raise SystemExit(status)


def run(main: Callable[[T], Any], cfg: T) -> Any:
    """Call a recipe's main(cfg), turning bad input found on the way into `error: ...`, exit 2.

    A run that cannot go on prints `error: ...` and exits 1 instead of a traceback: the training
    loop's non-finite policy (FloatingPointError), and a collective that timed out waiting for a
    stalled rank or lost a crashed one.

    The writes of the pipeline raise a WriteError (a UsageError) for a full disk or a read-only
    folder; an OSError of that kind from elsewhere (TensorBoard's event files) gets the same
    message. Permission errors are left alone here: outside a write they may come from a read.
    """
    try:
        with _thread_write_failures_in_one_line():
            return main(cfg)
    except (ConfigError, UsageError) as err:
        fail(str(err))
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS:
            raise
        # A failed write() carries no file name (TensorBoard's writer thread): name the run folder.
        out = getattr(cfg, "out", "") or "the run folder"
        where = err.filename or f"a file under {out}"
        fail(str(write_failure(err, where, "output", None if err.filename else out)))
    except FloatingPointError as err:
        fail(str(err), EXIT_FAILED)
    except RuntimeError as err:
        from pipeline import accel  # torch and Accelerate: only once a recipe has imported them anyway

        known = isinstance(err, accel.CollectiveFailure)
        message = str(err) if known else accel.collective_failure(err, "a collective operation")
        if message is None:
            raise
        say(f"error: {message}")
        sys.stdout.flush()
        # A normal exit tears the process group down, which can wait on the stalled rank again (seconds
        # measured with a 5 s timeout). metrics.jsonl and the states are on disk already (TensorBoard
        # may lose its last unflushed events), so leave at once.
        os._exit(EXIT_FAILED)


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@contextlib.contextmanager
def _thread_write_failures_in_one_line() -> Iterator[None]:
    """A helper thread that dies of a full disk (TensorBoard's writer) prints one line, not a traceback.

    Its writer raises the error again in the main thread at the next event or at close, where
    `run` reports it as `error: ...`; the line keeps that message the last one printed.
    """
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        err = args.exc_value
        if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
            name = args.thread.name if args.thread is not None else "?"
            say(f"warning: thread {name}: {err}")
        else:
            default(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = default


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
        head, flags = tyro.cli(
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
        if head.config:
            base = apply_config_file(base, Path(head.config), flags)
    except ConfigError as err:
        fail(str(err))
    # The file's instance is tyro's default: every flag overrides one field of it, and tyro builds
    # the final instance (running the __post_init__ checks on the combination).
    return tyro.cli(cls, default=base, args=args, prog=prog)


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


def apply_config_file(base: T, path: Path, flags: Sequence[str] = ()) -> T:
    """`base` (the preset's instance) with the settings of the config file at `path` applied.

    Every key and value is checked first: unknown keys name the closest valid one, and a value must
    have its field's type, so the file only ever sets data and never adds flags. Then the fields
    are replaced one by one (nested tables into nested dataclasses), and `dataclasses.replace`
    re-runs the `__post_init__` checks; their error names the file. When command-line `flags`
    follow, a failed check is left to tyro, which checks the final instance after the flags (the
    file may set d_model and a flag the n_heads that divides it).
    """
    changes = _file_values(type(base), load_config_file(path), "", path)
    try:
        return _build(base, changes, check=True)
    except ValueError as err:  # a __post_init__ check (ConfigError is a ValueError)
        if not flags:
            raise ConfigError(f"config file {path}: {err}") from err
    return _build(base, changes, check=False)


def _file_values(cls: type, data: Mapping[str, Any], prefix: str, path: Path) -> dict[str, Any]:
    """The file's table `data` for dataclass `cls` as typed values (nested tables as nested dicts)."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        dotted = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(
                f"config file {path}: unknown key '{dotted}'{closest(name, fields)}; "
                f"valid keys here: {', '.join(fields)}"
            )
        if not prefix and name in ("preset", "config"):
            raise ConfigError(f"config file {path}: '{name}' belongs on the command line (--{name})")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config file {path}: '{dotted}' must be a table of settings")
            values[name] = _file_values(hint, value, f"{dotted}.", path)
        elif isinstance(value, Mapping):
            raise ConfigError(f"config file {path}: '{dotted}' is a single value, not a table")
        else:
            try:
                values[name] = _typed(hint, value)
            except _WrongType as wrong:
                raise ConfigError(
                    f"config file {path}: '{dotted}{wrong.where}' must be {_describe(wrong.hint)}, "
                    f"got {wrong.value!r}"
                ) from None
    return values


class _WrongType(Exception):
    def __init__(self, hint: Any, value: Any, where: str = "") -> None:
        super().__init__(hint, value, where)
        self.hint, self.value, self.where = hint, value, where


_NONE = type(None)


def _typed(hint: Any, value: Any) -> Any:
    """`value` (as read from the file) as the field type `hint`; `_WrongType` when it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is _NONE:
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is typing.Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return choice
    elif origin in (typing.Union, types.UnionType):
        for member in args:
            try:
                return _typed(member, value)
            except _WrongType:
                continue
    elif origin is tuple:
        if isinstance(value, list | tuple):
            variadic = len(args) == 2 and args[1] is Ellipsis
            if not variadic and args and len(args) != len(value):
                raise _WrongType(hint, value)
            items = []
            for i, item in enumerate(value):
                item_hint = args[0] if variadic else args[i] if args else Any
                try:
                    items.append(item if item_hint is Any else _typed(item_hint, item))
                except _WrongType as wrong:
                    raise _WrongType(wrong.hint, wrong.value, f"[{i}]{wrong.where}") from None
            return tuple(items)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _WrongType(hint, value)


def _describe(hint: Any) -> str:
    """The field type `hint` in words, for an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is _NONE:
        return "null"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer (int)"
    if hint is float:
        return "a number (float)"
    if hint is str:
        return "a string (str)"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(choice) for choice in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(member) for member in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list, each item {_describe(args[0])}"
        if args:
            return f"a list of {len(args)}: " + ", ".join(_describe(a) for a in args)
        return "a list"
    return getattr(hint, "__name__", str(hint))


def _build(obj: T, changes: Mapping[str, Any], check: bool) -> T:
    """`obj` with `changes` applied (nested dicts to nested dataclasses), checked when `check`."""
    values = {
        name: _build(getattr(obj, name), value, check) if isinstance(value, dict) else value
        for name, value in changes.items()
    }
    if check:
        return dataclasses.replace(obj, **values)  # type: ignore[type-var]
    new = copy.copy(obj)
    for name, value in values.items():
        object.__setattr__(new, name, value)
    return new


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
