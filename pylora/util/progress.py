"""Progress bars: shown when asked for, or by default when stderr is a terminal and TQDM_DISABLE is
not set (tqdm's own variable), always on stderr."""
from __future__ import annotations

import os
import sys
from typing import Optional


def progress_enabled(progress: Optional[bool] = None) -> bool:
    if progress is not None:
        return bool(progress)
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(iterable=None, *, progress: Optional[bool] = None, **kwargs):
    """tqdm over `iterable` (or with total=...) on stderr, disabled unless progress_enabled(progress)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress_enabled(progress), file=sys.stderr, **kwargs)
