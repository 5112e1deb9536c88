"""Reading files that come from elsewhere, bounded: only regular files (a FIFO or a device would block
or never end), sizes checked before reading, JSON parsed with every failure named.

Every failure raises FileProblem, whose message names the file, what was found and what was
expected; callers turn it into their own error (pylora.AdapterError, CheckpointError).
"""
from __future__ import annotations

import json
import os
import stat


class FileProblem(ValueError):
    """A file that cannot be read or is not what it should be (the message is the whole explanation)."""


def regular_file_size(path: str, what: str) -> int:
    """The size of `path`, which must be a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileProblem(f"{path}: missing ({what})") from None
    except OSError as exc:
        raise FileProblem(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileProblem(f"{path}: not a regular file ({what})")
    return st.st_size


def read_bytes(path: str, limit: int, what: str) -> bytes:
    """The bytes of regular file `path`, refused when it holds more than `limit`."""
    size = regular_file_size(path, what)
    if size > limit:
        raise FileProblem(f"{path}: {size} bytes, more than the {limit} bytes allowed for {what}")
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as exc:
        raise FileProblem(f"{path}: cannot be read ({exc.strerror})") from None


class _DuplicateField(Exception):
    pass


def _unique_fields(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateField(key)
        seen[key] = value
    return seen


def read_json(path: str, limit: int, what: str):
    """The JSON value in regular file `path` (at most `limit` bytes of UTF-8), with an object's fields
    each given once (a repeated field is refused: which of the two was meant is unknowable)."""
    data = read_bytes(path, limit, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileProblem(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); expected {what}") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_fields)
    except _DuplicateField as exc:
        raise FileProblem(f"{path}: field {exc.args[0]!r} appears more than once; expected each field once") \
            from None
    except json.JSONDecodeError as exc:
        raise FileProblem(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; expected "
                          f"{what}") from None
    except RecursionError:
        raise FileProblem(f"{path}: malformed JSON: nested too deeply; expected {what}") from None
