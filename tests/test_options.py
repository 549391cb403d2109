"""One CLI mechanism: every field of every command's config round-trips through its parser."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from diffcse.cli import build_parser
from diffcse.core.options import fields_of, given, read_yaml, to_argv
from diffcse.training.config import TrainConfig

# Dict-typed fields cannot be invented generically; a new one must add its example here.
DICT_EXAMPLES = {
    "loss_weights": {"cce": 0.4, "softtriple": 0.6},
    "loss_params": {"softtriple": {"la": 8, "margin": 0.1}, "proxyanchor": {"alpha": 32.0}},
    "where": {"lang": {"in": ["en", "de"]}, "year": {"gte": 2000, "lt": 2010}},
}


def commands() -> list[tuple[str, argparse.ArgumentParser, type]]:
    """(name, parser, config class) of every subcommand, nested ones included."""
    found = []

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    cls = sub.get_default("config_class")
                    if cls is not None:
                        found.append((f"{prefix}{name}", sub, cls))
                    walk(sub, f"{prefix}{name} ")

    walk(build_parser(), "")
    return found


def other_value(spec: object) -> object:
    """A valid value of the field that differs from its default."""
    meta, default = spec.meta, spec.default()
    lo, hi = meta.get("min"), meta.get("max")
    if spec.kind is bool:
        return not default
    if spec.kind is dict:
        return DICT_EXAMPLES[spec.name]
    if spec.kind is list:
        return [3, 5] if spec.item is int else ["first text", "second"]
    if meta.get("choices"):
        return next(c for c in meta["choices"] if c != default)
    if spec.item is int:
        base = (lo if lo is not None else 1) + 2
        value = base if default in (None, dataclasses.MISSING) or base != default else base + 1
        return min(value, hi) if hi is not None else value
    if spec.item is float:
        value = 0.375 if default != 0.375 else 0.625
        return min(max(value, lo if lo is not None else value), hi if hi is not None else value)
    return f"value-of-{spec.name}"


def test_every_command_is_built_from_a_config() -> None:
    names = {name for name, _, _ in commands()}
    assert names == {"train", "eval", "encode", "index build", "index add", "index delete", "index info",
                     "search", "serve", "mine", "finetune", "experiment", "report",
                     "index upsert", "index upgrade"}


@pytest.mark.parametrize("name", [name for name, _, _ in commands()])
def test_every_field_round_trips_through_the_parser(name: str) -> None:
    _, parser, cls = next(c for c in commands() if c[0] == name)
    values = {spec.name: other_value(spec) for spec in fields_of(cls)}
    config = argparse.Namespace(**values)
    args = parser.parse_args(to_argv(cls, config))
    parsed = given(cls, args)
    assert parsed == values
    # Types survive: an int field is an int, a bool a bool, never the string "false".
    for spec in fields_of(cls):
        assert type(parsed[spec.name]) is type(values[spec.name]), spec.name


@pytest.mark.parametrize("name", [name for name, _, _ in commands()])
def test_options_not_given_take_the_config_defaults(name: str) -> None:
    _, parser, cls = next(c for c in commands() if c[0] == name)
    required = [s for s in fields_of(cls) if s.default() is dataclasses.MISSING]
    minimal = argparse.Namespace(**{s.name: other_value(s) for s in required})
    args = parser.parse_args(to_argv(cls, minimal, fields=[s.name for s in required]))
    assert set(given(cls, args)) == {s.name for s in required}


def test_bools_cannot_be_silently_misread(tmp_path: object) -> None:
    parser = build_parser()
    assert parser.parse_args(["train", "--no-packing"]).packing is False
    assert parser.parse_args(["train", "--packing"]).packing is True
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--packing", "false"])  # a value after a bool flag is refused
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("packing: 'false'\n")
    with pytest.raises(ValueError, match=r"field 'packing': expected bool, got 'false'"):
        read_yaml(yaml_file, TrainConfig)


def test_numbers_are_checked_where_they_are_parsed(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for argv, message in [
        (["train", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["train", "--learning-rate", "nan"], "--learning-rate: must be a finite number"),
        (["serve", "--index-dir", "x", "--port", "99999"], "--port: must be <= 65535, got 99999"),
        (["train", "--max-steps", "ten"], "--max-steps: expected an integer, got 'ten'"),
    ]:
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert message in capsys.readouterr().err


def test_repeated_list_options_accumulate() -> None:
    args = build_parser().parse_args(["search", "--index-dir", "x", "--query", "a b", "--query", "c"])
    assert args.query == ["a b", "c"]
