"""Parameter errors that know which parameter they are about, and numeric parameter ranges.

:class:`ParamError` keeps the names of the parameters its message mentions apart from the
text, so that the Python API can say ``num_samples`` and the command line ``--num-samples``
from one raise site (:func:`fguide.cli.main.error_message` puts each flag in its place).
:class:`Range` is a numeric parameter's domain, stated once: configuration validation checks
values against it, and the command line parses flags with it (so a bad number is refused
before anything runs, in the same words).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OwnedFields", "ParamError", "Range", "check_choice", "check_ranges"]


def _rebuild(template: str, params: tuple[str, ...], values: dict[str, Any]) -> ParamError:
    return ParamError(template, *params, **values)


class ParamError(ValueError):
    """A bad parameter value. ``template`` names the parameters as ``{0}``, ``{1}``, ... (given
    in ``params``) and other values by keyword: ``str(err)`` shows the API names,
    :meth:`spelled` another spelling of them (the CLI's flags).

    >>> err = ParamError("{0} must be >= 1; got {value}", "num_samples", value=0)
    >>> str(err), err.spelled(lambda name: "--" + name.replace("_", "-"))
    ('num_samples must be >= 1; got 0', '--num-samples must be >= 1; got 0')
    """

    def __init__(self, template: str, *params: str, **values: Any) -> None:
        self.template, self.params, self.values = template, params, values
        super().__init__(self.spelled(str))

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with each parameter name ``p`` written as ``spell(p)``."""
        return self.template.format(*(spell(p) for p in self.params), **self.values)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (worker processes, distributed runs)
        return (_rebuild, (self.template, self.params, self.values))


@dataclass(frozen=True)
class Range:
    """A numeric parameter's domain: integers or finite floats within optional bounds.

    ``low_open`` excludes ``low`` itself; ``allow_inf`` admits +∞ (an unbounded upper limit
    such as EDM's S_tmax). NaN is never in a range. An instance is also an ``argparse`` type.
    """

    kind: type[int] | type[float]
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    allow_inf: bool = False

    def describe(self) -> str:
        """The domain in words: ``an integer >= 1``, ``a finite number in [0, 1]``, ..."""
        what = "an integer" if self.kind is int else "a finite number"
        if self.kind is float and self.allow_inf:
            what = "a number (inf allowed)"
        lo = None if self.low is None else f"{self.low:g}"
        hi = None if self.high is None else f"{self.high:g}"
        if lo is not None and hi is not None:
            return f"{what} in {'(' if self.low_open else '['}{lo}, {hi}]"
        if lo is not None:
            return f"{what} {'>' if self.low_open else '>='} {lo}"
        if hi is not None:
            return f"{what} <= {hi}"
        return what

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if math.isinf(value) and not (self.allow_inf and value > 0):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def check(self, name: str, value: Any) -> None:
        """Raise a :class:`ParamError` naming ``name`` unless ``value`` lies in the range."""
        if not self.contains(value):
            raise ParamError(
                "{0} must be {what}; got {value!r}", name, what=self.describe(), value=value
            )

    def __call__(self, text: str) -> int | float:
        """``argparse`` type: the parsed value, or an ``ArgumentTypeError`` in the same words."""
        try:
            value: int | float = self.kind(text)
        except ValueError:
            value = math.nan
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        return value


def check_ranges(values: Any, ranges: Mapping[str, Range]) -> None:
    """Check every attribute of ``values`` named in ``ranges`` that is not None."""
    for name, domain in ranges.items():
        value = getattr(values, name)
        if value is not None:
            domain.check(name, value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise a :class:`ParamError` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ParamError(
            "{0} must be one of {valid}; got {value!r}", name, valid=", ".join(choices), value=value
        )


@dataclass(frozen=True)
class OwnedFields:
    """Configuration fields that one model family or one guide kind alone uses, and the words
    that refuse them in a configuration of another one.

    ``applies_to`` completes "<fields> apply to ..." and may name other parameters in braces
    (``"diffusers pipeline folders ({model} DIR)"``); ``name_all`` names every owned field
    (they go together) rather than the ones given; ``neutral`` holds the values that count as
    not given besides None and empty (a field's non-None default).
    """

    names: tuple[str, ...]
    applies_to: str
    name_all: bool = False
    neutral: Mapping[str, Any] = field(default_factory=dict)

    def given(self, values: Any) -> list[str]:
        """The owned fields that ``values`` sets (not None, not empty, not neutral)."""
        out = []
        for name in self.names:
            value = getattr(values, name)
            if value is None or (isinstance(value, Collection) and not value):
                continue
            if name in self.neutral and value == self.neutral[name]:
                continue
            out.append(name)
        return out

    def refuse(self, values: Any, allowed: Collection[str] = ()) -> None:
        """Raise a :class:`ParamError` naming the owned fields ``values`` sets (those in
        ``allowed``, which the configuration's own family or guide uses too, excepted)."""
        given = [n for n in self.given(values) if n not in allowed]
        if not given:
            return
        named = list(self.names) if self.name_all else given
        words = [f"{{{i}}}" for i in range(len(named))]
        listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        extra = [p for p in _braced(self.applies_to)]
        applies_to = self.applies_to
        for j, p in enumerate(extra):
            applies_to = applies_to.replace(f"{{{p}}}", f"{{{len(named) + j}}}")
        verb = "applies" if len(named) == 1 else "apply"
        raise ParamError(f"{listed} {verb} to {applies_to}", *named, *extra)


def _braced(text: str) -> list[str]:
    """The names in braces in ``text``, in order."""
    return [part.split("}", 1)[0] for part in text.split("{")[1:]]
