"""One way to build a command line: every subcommand's options come from its config dataclass.

A config field becomes `--field-name` with the field's type (bools as `--x/--no-x`), its default,
and the help, choices and bounds declared in the field's metadata (`opt(...)`). Options left out
on the command line leave no attribute in the namespace, so a YAML file (`--config`) or the dataclass
default fills them: `from_args` builds the config and validates it. A field added to a config is
therefore on the command line with the right type, and `tests/test_options.py` round-trips every
field of every command's config through its parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from diffcse.core.errors import InputError
from diffcse.core.io import read_yaml_file

T = TypeVar("T")
_NONE_WORDS = ("none", "null")


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: tuple | list | None = None,
    min: float | None = None,
    max: float | None = None,
    aliases: tuple[str, ...] = (),
    parse: Callable[[list[str]], Any] | None = None,
    format: Callable[[Any], list[str]] | None = None,
    metavar: str | None = None,
    none_words: tuple[str, ...] = (),
    positional: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with what its command-line option needs (help, choices, bounds, aliases).

    `parse`/`format` are for fields argparse cannot type by itself (dicts): the option is then
    repeatable and `parse` turns the list of its values into the field's value; `format` turns a
    value back into those strings. `none_words` are further spellings of None for an optional field
    (e.g. 'all' for "no limit"), besides 'none'. `positional` also takes the field as the command's
    first argument (the command's main path: `diffcse report RUN_DIR` = `--run-dir RUN_DIR`).
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "aliases": aliases,
            "parse": parse, "format": format, "metavar": metavar, "none_words": none_words,
            "positional": positional}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What the parser needs to know about one config field."""

    name: str
    flag: str
    kind: type  # bool, int, float, str, list or dict
    item: type  # element type of a list, else kind
    optional: bool
    field: dataclasses.Field

    @property
    def meta(self) -> typing.Mapping[str, Any]:
        """The field's option metadata (empty for a plain field)."""
        return self.field.metadata

    def default(self) -> Any:
        """The field's default value."""
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return self.field.default


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(type without None, whether None was allowed)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return tp, False


def fields_of(cls: type) -> list[FieldSpec]:
    """The command-line fields of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap(hints[f.name])
        origin = typing.get_origin(tp) or tp
        if origin is list:
            (item,) = typing.get_args(tp) or (str,)
            kind = list
        elif origin is dict:
            kind, item = dict, dict
        elif tp in (bool, int, float, str):
            kind = item = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for type {tp!r}")
        out.append(FieldSpec(f.name, "--" + f.name.replace("_", "-"), kind, item, optional, f))
    return out


def _scalar_parser(spec: FieldSpec) -> Callable[[str], Any]:
    """argparse `type=` for one value of the field: converts, checks bounds, names the option."""
    lo, hi, item = spec.meta.get("min"), spec.meta.get("max"), spec.item
    none_words = (*_NONE_WORDS, *spec.meta.get("none_words", ()))

    def parse(text: str) -> Any:
        if spec.optional and item is not str and text.lower() in none_words:
            return None
        try:
            value = item(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if item is int else 'a number'}, got {text!r}") from None
        if item is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if lo is not None and value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {text}")
        return value

    parse.__name__ = item.__name__  # argparse names the type in its own messages
    return parse


def add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one option per field of config class `cls` (defaults stay None: 'not given')."""
    for spec in fields_of(cls):
        if spec.name in skip:
            continue
        default = spec.default()
        required = default is dataclasses.MISSING
        shown = "" if required else f" (default: {'none' if default is None else default})"
        help_text = f"{spec.meta.get('help', '')}{shown}".strip()
        flags = [spec.flag, *spec.meta.get("aliases", ())]
        # SUPPRESS: an option not given leaves no attribute, so a given None ('none', 'all') stays distinct.
        kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": help_text}
        if required:
            kwargs["required"] = True
        if spec.meta.get("metavar"):
            kwargs["metavar"] = spec.meta["metavar"]
        if spec.kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif spec.kind is dict or spec.meta.get("parse"):
            parser.add_argument(*flags, action="append", **kwargs)
        elif spec.kind is list:
            # extend: `--x a b` and `--x a --x b` both give [a, b] (a repeated flag never drops values).
            parser.add_argument(*flags, action="extend", nargs="+",
                                type=_scalar_parser(spec) if spec.item is not str else str,
                                choices=spec.meta.get("choices"), **kwargs)
        else:
            parser.add_argument(*flags, type=_scalar_parser(spec) if spec.item is not str else str,
                                choices=spec.meta.get("choices"), **kwargs)
        if spec.meta.get("positional"):
            parser.add_argument(spec.name, nargs="?", default=argparse.SUPPRESS,
                                metavar=spec.meta.get("metavar") or spec.name.upper(), help=f"same as {spec.flag}")


def given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` given on the command line, parsed to their field types."""
    out: dict[str, Any] = {}
    present = vars(args)
    for spec in fields_of(cls):
        if spec.name not in present:
            continue
        value = present[spec.name]
        parse = spec.meta.get("parse")
        out[spec.name] = parse(value) if parse else value
    return out


def to_argv(cls: type, config: object, fields: list[str] | None = None) -> list[str]:
    """The command-line arguments that give these fields of `config` (the parser's inverse)."""
    argv: list[str] = []
    for spec in fields_of(cls):
        if fields is not None and spec.name not in fields:
            continue
        value = getattr(config, spec.name)
        fmt = spec.meta.get("format")
        if spec.kind is bool:
            argv.append(spec.flag if value else "--no-" + spec.flag[2:])
        elif fmt is not None:
            for item in fmt(value):
                argv += [spec.flag, item]
        elif value is None:
            argv += [spec.flag, "none"]
        elif spec.kind is list:
            argv += [spec.flag, *map(str, value)]
        else:
            argv += [spec.flag, str(value)]
    return argv


def read_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML mapping of `cls` fields; errors name the file, line and field."""
    path = Path(path)
    loaded = read_yaml_file(path, "config file")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise InputError(f"config file {path}: expected a mapping of field: value, got {type(loaded).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in loaded if k not in names)
    if unknown:
        raise InputError(f"config file {path}: unknown field(s) {', '.join(unknown)}")
    specs = {s.name: s for s in fields_of(cls)}
    for key, value in loaded.items():
        spec = specs.get(key)
        if spec is not None:
            check_type(spec, value, f"config file {path}: field {key!r}")
    return loaded


def check_type(spec: FieldSpec, value: Any, where: str) -> None:
    """Raise InputError unless value fits the field's type (ints pass as floats; bools are not ints)."""
    if value is None:
        if spec.optional:
            return
        raise InputError(f"{where}: must not be empty")
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }[spec.kind](value)
    if not ok:
        raise InputError(f"{where}: expected {spec.kind.__name__}, got {value!r}")


def check_fields(config: object) -> None:
    """Every field's value against its declared type, choices and bounds; InputError naming the field.

    The parser checks what comes from the command line; this checks what comes from YAML files
    and Python, so a config is held to the same rules however it was made.
    """
    for spec in fields_of(type(config)):
        value = getattr(config, spec.name)
        check_type(spec, value, spec.name)
        if value is None:
            continue
        items = value if spec.kind is list else [value]
        choices, lo, hi = spec.meta.get("choices"), spec.meta.get("min"), spec.meta.get("max")
        for item in items:
            if choices and item not in choices:
                raise InputError(f"{spec.name}: {item!r} is not one of {', '.join(map(str, choices))}")
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                if isinstance(item, float) and not math.isfinite(item):
                    raise InputError(f"{spec.name}: must be a finite number, got {item}")
                if lo is not None and item < lo:
                    raise InputError(f"{spec.name}: must be >= {lo}, got {item}")
                if hi is not None and item > hi:
                    raise InputError(f"{spec.name}: must be <= {hi}, got {item}")


def from_args(cls: type[T], args: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """Build `cls` from `base` (e.g. a YAML file's values) overridden by the options given; validate it."""
    values = dict(base or {})
    values.update(given(cls, args))
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    cls: type,
    run: Callable[[Any], int | None],
    help: str,
    description: str | None = None,
    config_file: bool = False,
) -> argparse.ArgumentParser:
    """A subcommand whose options are `cls`'s fields; `run(config)` executes it.

    With config_file=True the command also takes `--config FILE.yaml`, whose values the options
    override.
    """
    p = subparsers.add_parser(name, help=help, description=description or help)
    if config_file:
        p.add_argument("--config", default=None, help="YAML file of the fields below; options given here override it")
    add_options(p, cls)

    def execute(args: argparse.Namespace) -> int:
        base = read_yaml(args.config, cls) if config_file and args.config else None
        return int(run(from_args(cls, args, base)) or 0)

    p.set_defaults(func=execute, config_class=cls, command_name=p.prog)
    return p
