"""Reading the tensors of an adapter file, safely: safetensors (the header checked before anything is
loaded) or, only when the caller opts in, a pickle read with torch.load(weights_only=True).

Every failure raises FileProblem with a message naming the file, what was found and what was expected;
pylora.io turns it into an AdapterError.
"""
from __future__ import annotations

import json
import os
import pickle
import stat

import torch

# safetensors' own limit for the JSON header; a larger length field means a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000


class FileProblem(Exception):
    """A file that cannot be read at all (the message is the whole explanation)."""


def regular_file_size(path: str, what: str) -> int:
    """The size of `path`, which must be a regular file: a FIFO or a device would block or never end."""
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
    size = regular_file_size(path, what)
    if size > limit:
        raise FileProblem(f"{path}: {size} bytes, more than the {limit} bytes allowed for {what}")
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as exc:
        raise FileProblem(f"{path}: cannot be read ({exc.strerror})") from None


def _check_header(path: str, size: int) -> None:
    """What safetensors promises about its layout, checked with messages that say what is wrong:
    [8-byte little-endian header length N][N bytes of JSON][data]; each tensor's data_offsets
    [begin, end) lie inside the data and span numel * itemsize bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileProblem(f"{path}: truncated: {size} bytes, shorter than the 8-byte header length a "
                              "safetensors file starts with")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise FileProblem(f"{path}: truncated or not a safetensors file: its header length field says {n} "
                              f"bytes, but {size - 8} bytes follow it")
        if n > MAX_HEADER_BYTES:
            raise FileProblem(f"{path}: not a safetensors file: its header length field says {n} bytes, more than "
                              f"safetensors' limit of {MAX_HEADER_BYTES}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FileProblem(f"{path}: corrupt safetensors header: not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FileProblem(f"{path}: corrupt safetensors header: a JSON {type(header).__name__}, expected an object")
    data = size - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise FileProblem(f"{path}: corrupt safetensors header: tensor {key!r} has data_offsets={offsets!r}, "
                              "expected [begin, end] with 0 <= begin <= end")
        if offsets[1] > data:
            raise FileProblem(f"{path}: truncated: tensor {key!r} ends at byte {offsets[1]} of the data section, "
                              f"which holds {data} bytes")


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU."""
    from safetensors.torch import load_file

    size = regular_file_size(path, "the adapter's weights")
    _check_header(path, size)
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # SafetensorError and the errors of its torch conversion
        raise FileProblem(f"{path}: not a valid safetensors file ({exc})") from None


def _refusal_detail(exc: Exception) -> str:
    # torch's message suggests retrying with weights_only=False, which is exactly what must not
    # happen; keep only the line that says what was refused.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or ("global" in line.lower() and "unsupported" in line.lower()):
            return line
    return lines[-1] if lines else type(exc).__name__


def load_pickle(path: str) -> dict[str, torch.Tensor]:
    """A torch.save'd dict of tensors, read with torch.load(weights_only=True): tensors and plain
    containers only; there is no fallback to a full unpickle."""
    regular_file_size(path, "the adapter's weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FileProblem(f"{path}: refused: torch.load(weights_only=True) found more than tensors and plain "
                          f"containers ({_refusal_detail(exc)}); pylora never unpickles an adapter fully") from None
    except Exception as exc:
        raise FileProblem(f"{path}: not a readable torch file ({type(exc).__name__}: "
                          f"{_refusal_detail(exc)})") from None
    if not isinstance(obj, dict):
        raise FileProblem(f"{path}: holds a {type(obj).__name__}, expected a dict of tensor names to tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise FileProblem(f"{path}: entry {key!r} holds a {type(value).__name__}, expected a tensor under a "
                              "string key")
    return obj
