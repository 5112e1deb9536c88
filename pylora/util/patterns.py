"""Regular expressions that come from files people download (target_modules, exclude_modules,
rank_pattern / alpha_pattern keys, layers_pattern), matched with bounded work.

Python's `re` backtracks, so a pattern such as `(.+)+X` takes minutes on a 40-character module name.
Every match here runs through the `regex` package (mrab-regex, which transformers itself requires)
with a timeout: it has Python's `re` syntax and semantics (its default VERSION0 mode is the
re-compatible one), so every pattern PEFT accepts means the same here, and a match that runs longer
than MATCH_TIMEOUT raises PatternError naming the field, the pattern and the name. A linear-time
engine (google-re2) would bound the work too, but it lacks lookarounds and backreferences, which
PEFT configs use (`^(?!.*vision_tower).*q_proj$`), so it would refuse adapters PEFT loads.
"""
from __future__ import annotations

import functools
from typing import Optional

import regex

# A legitimate pattern matches a module name in microseconds; this bounds a hostile one.
MATCH_TIMEOUT = 0.25  # seconds


class PatternError(ValueError):
    """A pattern that is not a valid regular expression, or whose match ran out of time."""

    def __init__(self, field: str, pattern: str, message: str):
        self.field, self.pattern = field, pattern
        super().__init__(message)


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> "regex.Pattern":
    return regex.compile(pattern, flags=regex.VERSION0)


def check(field: str, pattern) -> None:
    """PatternError unless `pattern` is a string that compiles."""
    if not isinstance(pattern, str):
        raise PatternError(field, pattern, f"{field}={pattern!r} must be a string (a regular expression)")
    try:
        _compiled(pattern)
    except regex.error as exc:
        raise PatternError(field, pattern, f"{field}={pattern!r} is not a valid regular expression ({exc})") \
            from None


def _run(how: str, field: str, pattern: str, name: str, shown: Optional[str] = None):
    check(field, pattern)
    try:
        return getattr(_compiled(pattern), how)(name, timeout=MATCH_TIMEOUT)
    except TimeoutError:
        raise PatternError(field, shown or pattern,
                           f"{field}={shown or pattern!r}: matching it against the module name {name!r} took more "
                           f"than {MATCH_TIMEOUT:g} s (a pattern that backtracks exponentially, such as a nested "
                           "quantifier like (.+)+); refused") from None


def fullmatch(field: str, pattern: str, name: str) -> bool:
    """Whether `pattern` matches all of `name` (re.fullmatch), with bounded work."""
    return _run("fullmatch", field, pattern, name) is not None


def match(field: str, pattern: str, name: str, shown: Optional[str] = None):
    """re.match(pattern, name) with bounded work; `shown` is the user's pattern when `pattern` wraps it."""
    return _run("match", field, pattern, name, shown)
