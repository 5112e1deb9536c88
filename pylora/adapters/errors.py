"""The errors of reading, validating, loading and saving adapters."""
from __future__ import annotations

from typing import Optional, Union

_MAX_LISTED = 25


class AdapterError(ValueError):
    """An adapter that cannot be read, validated, loaded or saved.

    `problems` lists every problem found, each naming the file, the key or field, the value found and
    what was expected; `path` is the adapter directory (or None)."""

    def __init__(self, problems: Union[str, list[str]], path: Optional[str] = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.path = path
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            listed = self.problems[:_MAX_LISTED]
            more = len(self.problems) - len(listed)
            message = f"{path}: {len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in listed) + \
                (f"\n  ... and {more} more" if more else "")
        super().__init__(message)


class AdapterWarning(UserWarning):
    """With strict=False: a key the adapter holds that is not used, or one it lacks (left at zero)."""
