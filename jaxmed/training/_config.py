"""A system's configuration: one dataclass that is the single source of its command-line
options and of the run's `config.json`.

Each field is declared with `option(...)`: its default, its `--help` text, the argparse group
it appears in and how its value is parsed and checked. A program adds the options with
`Config.add_options(parser)` and builds the configuration with `Config.from_args(args)`;
`apply`/`predict` commands rebuild it from `config.json` with `Config.from_dict`::

    @dataclasses.dataclass(frozen=True)
    class MyConfig(Config):
        width: int = option(16, "base width", type=positive_int)
        steps: int = option(1000, "total training steps", cli=False, resumable=True)

Fields with `cli=False` take their value from an option added elsewhere under the same name
(e.g. `--steps`, `--seed` from `add_training_args`). Fields marked `resumable` may differ when
a run is resumed (see `jaxmed.training.prepare_run_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Sequence
from typing import Any, Self


def option(default: Any, help: str, *, group: str = "model", type: Callable | None = None,
           choices: Sequence[Any] | None = None, metavar: str | None = None, cli: bool = True,
           resumable: bool = False) -> Any:
    """A configuration field and its command-line option `--field-name`.

    **Arguments:**

    - `default`: the default value (tuples for sequences).
    - `help`: the `--help` text; "(default: ...)" is appended.
    - `group`: title of the argparse group the option is listed under.
    - `type`: parses (and checks) the option's text; bool fields get `--x/--no-x`.
    - `choices`: allowed values.
    - `cli`: False when the option is added by other code under the field's name.
    - `resumable`: the value may change when a run resumes (e.g. `steps`).
    """
    metadata = dict(help=help, group=group, type=type, choices=choices, metavar=metavar,
                    cli=cli, resumable=resumable)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of the systems' configuration dataclasses (see the module docstring)."""

    def check(self) -> None:
        """Raise `ValueError` naming the options when values contradict each other.

        Single values are checked by their option's `type` already; override this for
        combinations (e.g. batch-normalised critic with the gradient penalty).
        """

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add one option per command-line field, into argparse groups by `group` title."""
        groups = {g.title: g for g in parser._action_groups}  # argparse has no public lookup
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            meta = field.metadata
            if not meta.get("cli", False):
                continue
            group = groups.get(meta["group"]) or parser.add_argument_group(meta["group"])
            groups[meta["group"]] = group
            flag = "--" + field.name.replace("_", "-")
            text = meta["help"] + " (default: %(default)s)"
            if hints[field.name] is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction,
                                   default=field.default, help=text)
                continue
            kind = meta["type"] or _plain_type(hints[field.name])
            group.add_argument(flag, type=kind, default=field.default, choices=meta["choices"],
                               metavar=meta["metavar"], help=text)
        return parser

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """The configuration from parsed options; raises `ValueError` from `check`."""
        config = cls(**{f.name: _frozen(getattr(args, f.name)) for f in dataclasses.fields(cls)})
        config.check()
        return config

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """The configuration from `config.json`'s dict; keys that are not fields (values
        derived from the data, such as class names) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _frozen(v) for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples as lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default, JSON-ready (for `prepare_run_config(defaults=)`)."""
        return {f.name: _jsonable(f.default) for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}

    @classmethod
    def resumable(cls) -> frozenset[str]:
        """The fields that may change when a run resumes."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable"))


def _plain_type(hint: Any) -> Callable | None:
    return hint if hint in (int, float, str) else None


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, list | tuple) else value


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, list | tuple) else value


# ----------------------------------------------------------------------------- option types


def _number(kind: type, text: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def bounded(kind: type = float, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> Callable[[str], int | float]:
    """An option type: a number of `kind` in the given interval, else a usage error that
    states the interval (argparse then exits with status 2, naming the option)."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"

    def parse(text: str) -> int | float:
        value = _number(kind, text)
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} in {interval}"
    return parse


positive_int = bounded(int, low=1)
non_negative_int = bounded(int, low=0)
non_negative = bounded(float, low=0.0)
positive = bounded(float, low=0.0, low_open=True)
fraction = bounded(float, low=0.0, high=1.0, high_open=True)      # [0, 1)
unit_interval = bounded(float, low=0.0, high=1.0)                  # [0, 1]
open_unit_interval = bounded(float, low=0.0, high=1.0, low_open=True, high_open=True)


def comma_ints(text: str) -> tuple[int, ...]:
    """An option type: `'8,16,32'` -> `(8, 16, 32)`, each a positive integer."""
    values = tuple(_number(int, v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}")
    return values


def comma_names(text: str) -> tuple[str, ...]:
    """An option type: `'a,b'` -> `('a', 'b')`; `'none'` -> `()`."""
    return tuple(v for v in (v.strip() for v in text.split(",")) if v and v != "none")
