"""safetensors files, safely and one tensor at a time: read and check a header, read one tensor, write a
file tensor by tensor; whole small files (adapters) through safetensors itself after the same header
check, and, only when a caller opts in, torch pickles through torch.load(weights_only=True).

Why not safetensors' own helpers alone: `safe_open`'s default (mmap) backend returns tensors that are
views of a private mapping of the file, so every tensor read stays resident, and every in-place change
becomes a private copy, until the file is closed (measured: reading and updating eight 32 MiB tensors
one after the other grew the process by 256 MiB); `save_file` needs every tensor of a file in memory at
once. Here a tensor is read with one `readinto` into a buffer of its own, freed with it, and a file is
written header first (names, dtypes and shapes are known before any data) and then tensor by tensor, so
the memory a whole checkpoint needs is about one tensor. The files written are checked by opening them
with safetensors itself.

Format (github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}} (padded with
spaces), then the data; offsets count from the start of the data.
"""
from __future__ import annotations

import json
import pickle
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from pylora.util.files import FileProblem, regular_file_size

# safetensors' own limit for the JSON header; a larger length field means a corrupt file.
MAX_HEADER_BYTES = 100_000_000

_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
# safetensors dtype string <-> torch dtype, for the dtypes this torch has.
DTYPES = {code: getattr(torch, name) for code, name in _NAMES.items() if hasattr(torch, name)}
CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: dtype, shape, and where its bytes lie (absolute file offsets)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Header:
    path: str
    metadata: Optional[dict[str, str]]
    entries: dict[str, Entry]


def _check_host() -> None:
    if sys.byteorder != "little":
        raise FileProblem("safetensors stores little-endian data; this machine is big-endian")


def read_header(path: str) -> Header:
    """The header of the safetensors file at `path`, checked before any tensor is read: a regular file,
    [8-byte little-endian header length N][N bytes of JSON][data], every tensor's dtype known to torch,
    its byte range [begin, end) inside the data section and of numel * itemsize bytes."""
    _check_host()
    size = regular_file_size(path, "a safetensors file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FileProblem(f"{path}: truncated: {size} bytes, shorter than the 8-byte header length a "
                                  "safetensors file starts with")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise FileProblem(f"{path}: not a safetensors file: its header length field says {n} bytes, more "
                                  f"than safetensors' limit of {MAX_HEADER_BYTES}")
            if n > size - 8:
                raise FileProblem(f"{path}: truncated or not a safetensors file: its header length field says {n} "
                                  f"bytes, but {size - 8} bytes follow it")
            raw = f.read(n)
    except OSError as exc:
        raise FileProblem(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FileProblem(f"{path}: corrupt safetensors header: not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FileProblem(f"{path}: corrupt safetensors header: a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise FileProblem(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    data_start, data_size = 8 + n, size - 8 - n
    entries = {}
    for name, e in header.items():
        if not isinstance(e, dict) or not isinstance(e.get("shape"), list) or \
                not all(isinstance(s, int) and s >= 0 for s in e["shape"]):
            raise FileProblem(f"{path}: corrupt safetensors header: tensor {name!r} has no valid shape ({e!r})")
        code = e.get("dtype")
        if code not in DTYPES:
            raise FileProblem(f"{path}: tensor {name!r} has dtype {code!r}, which this torch cannot hold "
                              f"(known: {', '.join(DTYPES)})")
        dtype, shape = DTYPES[code], tuple(e["shape"])
        offsets = e.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise FileProblem(f"{path}: corrupt safetensors header: tensor {name!r} has data_offsets={offsets!r}, "
                              "expected [begin, end] with 0 <= begin <= end")
        if offsets[1] > data_size:
            raise FileProblem(f"{path}: truncated: tensor {name!r} ends at byte {offsets[1]} of the data section, "
                              f"which holds {data_size} bytes")
        entry = Entry(dtype, shape, data_start + offsets[0], offsets[1] - offsets[0])
        expected = entry.numel * dtype.itemsize
        if entry.nbytes != expected:
            raise FileProblem(f"{path}: corrupt safetensors header: tensor {name!r} ({code} {list(shape)}) spans "
                              f"{entry.nbytes} bytes, but its dtype and shape need {expected}")
        entries[name] = entry
    return Header(path, metadata, entries)


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU, its header checked (read_header) first."""
    from safetensors.torch import load_file

    read_header(path)
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
    regular_file_size(path, "a torch pickle file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FileProblem(f"{path}: refused: torch.load(weights_only=True) found more than tensors and plain "
                          f"containers ({_refusal_detail(exc)}); pylora never unpickles a file fully") from None
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


def read_tensor(f, entry: Entry, buffer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The tensor `entry` describes, read from the open binary file `f` into memory of its own, or into
    the start of `buffer` (1-D uint8 of at least entry.nbytes), which the result then shares: reusing one buffer
    for tensor after tensor keeps the allocator from holding freed tensors' memory (glibc keeps freed
    blocks of up to 32 MiB in the heap, so a loop of fresh tensors can hold two or three at a time)."""
    if buffer is None:
        buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    elif buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < entry.nbytes:
        raise ValueError(f"read_tensor: buffer is {buffer.dtype} {list(buffer.shape)}; expected uint8 of at least "
                         f"{entry.nbytes} bytes")
    else:
        buf = buffer[:entry.nbytes]
    if entry.nbytes:
        f.seek(entry.start)
        got = f.readinto(memoryview(buf.numpy()))
        if got != entry.nbytes:
            raise FileProblem(f"{f.name}: truncated: expected {entry.nbytes} bytes at offset {entry.start}, "
                                   f"read {got}")
    return buf.view(entry.dtype).reshape(entry.shape)


def write_order(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[str]:
    """The order safetensors itself writes tensors in (larger items first, then by name), which starts
    every tensor at a multiple of its item size."""
    return sorted(specs, key=lambda name: (-specs[name][0].itemsize, name))


class StreamWriter:
    """Writes a safetensors file whose tensors are given up front as name -> (dtype, shape), then
    passed one at a time, in `order`, to write(). close() checks that all were written."""

    def __init__(self, path: str, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Optional[dict[str, str]] = None):
        _check_host()
        self.path, self.specs = path, specs
        self.order = write_order(specs)
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = dict(metadata)
        for name in self.order:
            dtype, shape = specs[name]
            if dtype not in CODES:
                raise FileProblem(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
            nbytes = dtype.itemsize
            for s in shape:
                nbytes *= s
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data then starts 8-byte aligned
        self._next = 0
        self._file = open(path, "xb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing more"
            raise FileProblem(f"{self.path}: tensor {name!r} written out of order; expected {expected!r}")
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise FileProblem(f"{self.path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}; the "
                                   f"header says {dtype} {list(shape)}")
        if tensor.numel():
            flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            self._file.write(memoryview(flat.numpy()))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.order):
            raise FileProblem(f"{self.path}: closed after {self._next} of {len(self.order)} tensors; next "
                                   f"was {self.order[self._next]!r}")
        # Checked by safetensors itself: a file it cannot open must not reach the output.
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="pt") as f:
                count = len(list(f.keys()))
        except Exception as exc:  # SafetensorError
            raise FileProblem(f"{self.path}: safetensors cannot read the file just written ({exc})") from None
        if count != len(self.order):
            raise FileProblem(f"{self.path}: safetensors reads {count} tensors; {len(self.order)} were written")

    def abort(self) -> None:
        self._file.close()

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
