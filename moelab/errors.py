"""The one exception type for user mistakes, printed by the CLI as a single line, and the check for numbers."""

from __future__ import annotations

import math


class MoelabError(Exception):
    """A problem with the user's input (recipe, model, flags, paths), with the fix in its message."""


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True):
    """`value` when it is finite and within [low, high] (or (low, high] without low_inclusive); None passes.

    NaN fails every comparison, so a bare `value > 0` lets `--timeout-min nan` through: check finiteness first."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MoelabError(f"{name} must be a number; got {value!r}")
    below = low is not None and (value < low if low_inclusive else value <= low)
    if not math.isfinite(value) or below or (high is not None and value > high):
        lower = "" if low is None else f"{'>=' if low_inclusive else '>'} {low:g}"
        upper = "" if high is None else f"<= {high:g}"
        bounds = " and ".join(b for b in (lower, upper) if b)
        raise MoelabError(f"{name} {value} is out of range; give a finite number{' ' + bounds if bounds else ''}")
    return value
