"""Declaring config fields once: their role in the cache key, their bounds, their help text.

A config is a frozen dataclass whose fields are made with `key(...)` (the value changes the
numbers, so it is part of the cache or result key) or `setting(...)` (it does not: batch size,
workers, output folders). Each may carry a constraint; `validate` checks them all in
`__post_init__`, scikit-learn style (`_parameter_constraints`), so bounds live in one place and
the CLI holds none of its own. The CLI builds its options from the same metadata.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass
from typing import Any

from tlfeat.errors import TlfeatError


@dataclass(frozen=True)
class Constraint:
    """A check on one field's value; `describe` completes "--name must be ..."."""

    def ok(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Interval(Constraint):
    kind: type
    low: float | None = None
    high: float | None = None
    nullable: bool = False

    def ok(self, value: Any) -> bool:
        if value is None or not _number_like(value):
            return value is None and self.nullable
        if isinstance(value, float) and not (math.isfinite(value) and (self.kind is float or value.is_integer())):
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            bounds = f" between {_number(self.low)} and {_number(self.high)}"
        elif self.low is not None:
            bounds = f" of at least {_number(self.low)}"
        else:
            bounds = ""
        return what + bounds


def _number_like(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Positive(Constraint):
    """A finite number > 0 and at most `high`."""

    high: float = 1e6
    nullable: bool = False

    def ok(self, value: Any) -> bool:
        if value is None or not _number_like(value):
            return value is None and self.nullable
        return math.isfinite(value) and 0 < value <= self.high

    def describe(self) -> str:
        return f"a finite number in (0, {self.high:g}]"


@dataclass(frozen=True)
class Choice(Constraint):
    choices: tuple[str, ...]
    nullable: bool = False

    def ok(self, value: Any) -> bool:
        return (value is None and self.nullable) or value in self.choices

    def describe(self) -> str:
        return "one of " + ", ".join(self.choices)


@dataclass(frozen=True)
class Pattern(Constraint):
    regex: str
    description: str
    nullable: bool = False

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        return isinstance(value, str) and re.fullmatch(self.regex, value) is not None

    def describe(self) -> str:
        return self.description


@dataclass(frozen=True)
class Text(Constraint):
    """A non-empty string without control characters (names, paths, specs)."""

    nullable: bool = False

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        return isinstance(value, str) and value.strip() != "" and not any(ord(c) < 32 for c in value)

    def describe(self) -> str:
        return "a non-empty name without control characters"


@dataclass(frozen=True)
class NameList(Constraint):
    """Comma-separated names, none of them empty (`layer2,layer3`)."""

    nullable: bool = False

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        return Text().ok(value) and all(part.strip() for part in value.split(","))

    def describe(self) -> str:
        return "comma-separated names, none of them empty"


def key(default: Any = MISSING, **options: Any) -> Any:
    """A field whose value changes the numbers: part of the key of what it produces.

    Options: `help`, `check` (a Constraint), `factory` (a default factory), `cli` ("" for
    --field-name, None for no option, or the option's name) and `flag` (for booleans, the
    option that sets the non-default value, e.g. "--no-update").
    """
    return _field("key", default, **options)


def setting(default: Any = MISSING, **options: Any) -> Any:
    """A field that does not change the numbers (speed, places, output): never in a key. Options as `key`."""
    return _field("setting", default, **options)


def _field(
    role: str,
    default: Any,
    help: str = "",
    check: Constraint | None = None,
    factory: Callable[[], Any] | None = None,
    cli: str | None = "",
    flag: str | None = None,
) -> Any:
    metadata = {"role": role, "help": help, "check": check, "cli": cli, "flag": flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def role(f: Field[Any]) -> str | None:
    return f.metadata.get("role")


def option_name(f: Field[Any]) -> str:
    """How the user spells the field: its command-line option where it has one."""
    cli = f.metadata.get("cli", "")
    if cli is None:
        return f.name
    return cli or "--" + f.name.replace("_", "-")


def validate(config: Any) -> None:
    """Check every constrained field of a config dataclass; one line naming the option on failure."""
    for f in dataclasses.fields(config):
        check: Constraint | None = f.metadata.get("check")
        value = getattr(config, f.name)
        if check is not None and not check.ok(value):
            raise TlfeatError(f"{option_name(f)} must be {check.describe()}, got {_show(value)}")


def key_fields(config: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if role(f) == "key"]


def unclassified(cls: type) -> list[str]:
    """Fields declared with neither `key` nor `setting` (a test keeps this empty)."""
    return [f.name for f in dataclasses.fields(cls) if role(f) not in ("key", "setting")]


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, Sequence) or isinstance(value, str) else repr(tuple(value))
    return text if len(text) <= 60 else text[:57] + "..."
