"""Merging PEFT adapters into a transformers-style safetensors checkpoint, tensor by tensor (`pylora merge`).

A checkpoint directory holds model.safetensors, or shards listed in model.safetensors.index.json, beside
config.json, tokenizer files and the like. The output has the same layout (the same files holding the
same tensors), every tensor transformed as pylora.checkpoint.updates says (the adapters merged with
pylora.ops.merge_, cast when a dtype is asked for), the index's metadata.total_size recomputed, and
every other file copied (weights in other formats are left out: they would hold the unmerged model).

Memory: one tensor at a time is read (into one buffer the size of the largest), transformed and written
(pylora.util.safetensors); a dtype change adds the converted copy; the adapters are held whole (they
are small).

Safety: every adapter is read and validated and every target found, with its shape and dtype checked,
before anything is written; the output is written to a temporary directory beside it and renamed into
place at the end, so a failure leaves no output; the inputs are only read. Temporary directories are
named .NAME.tmp-HOST-PID-XXXXXXXX: a later run removes those of processes of this host that no longer
exist (a merge killed with SIGKILL cannot clean up after itself).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch

from pylora.adapters import as_adapter
from pylora.checkpoint.updates import CheckpointError, Spec, Updates, build_updates, check_weight, transform
from pylora.util.files import FileProblem, read_json
from pylora.util.progress import progress_bar
from pylora.util.safetensors import Header, StreamWriter, read_header, read_tensor

__all__ = ["merge_checkpoint", "read_layout", "CheckpointError", "OUT_DTYPES"]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Top-level weight files of other formats (and safetensors files the layout does not use): not copied.
OTHER_WEIGHTS = re.compile(r"^(pytorch_model.*\.bin|tf_model.*\.h5|flax_model.*\.msgpack|.*\.safetensors|"
                           r".*\.(bin|h5|msgpack|safetensors)\.index\.json)$")
MAX_JSON_BYTES = 64 * 2**20


@dataclass
class Layout:
    """A checkpoint's weight files: index (the index JSON, None for one file), files (in order), their
    headers, and for every tensor its Spec and the file the index assigns it to."""

    base: str
    index: Optional[dict]
    files: list[str]
    headers: dict[str, Header]
    specs: dict[str, Spec]
    where: dict[str, str]


def _read_json(path: str, what: str):
    try:
        return read_json(path, MAX_JSON_BYTES, what)
    except FileProblem as exc:
        raise CheckpointError(str(exc)) from None


def _header(path: str) -> Header:
    try:
        return read_header(path)
    except FileProblem as exc:
        raise CheckpointError(str(exc)) from None


def read_layout(base: str) -> Layout:
    """The weight files of checkpoint directory `base`, their headers checked (no tensor is read).

    Like transformers, model.safetensors is used when present, else model.safetensors.index.json.
    """
    if not os.path.isdir(base):
        what = "not a directory" if os.path.exists(base) else "no such directory"
        raise CheckpointError(f"base checkpoint {base}: {what}")
    single, index_path = os.path.join(base, SINGLE_NAME), os.path.join(base, INDEX_NAME)
    if os.path.isfile(single):
        header = _header(single)
        specs = {k: Spec(e.dtype, e.shape) for k, e in header.entries.items()}
        return Layout(base, None, [SINGLE_NAME], {SINGLE_NAME: header}, specs, {k: SINGLE_NAME for k in specs})
    if not os.path.isfile(index_path):
        present = sorted(os.listdir(base))
        hint = " (convert other weight formats to safetensors first)" if any(OTHER_WEIGHTS.match(n) for n in present) \
            else ""
        raise CheckpointError(f"base checkpoint {base}: holds neither {SINGLE_NAME} nor {INDEX_NAME} (it holds "
                              f"{', '.join(present[:8]) or 'nothing'}{', ...' if len(present) > 8 else ''}){hint}")
    index = _read_json(index_path, "a safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: expected an object with a non-empty \"weight_map\" of tensor names to "
                              f"file names; found {type(weight_map).__name__ if weight_map is not None else 'none'}")
    files = sorted(set(weight_map.values()))
    headers = {}
    for name in files:
        if name != os.path.basename(name) or name in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: weight_map names file {name!r}; expected a file name in {base}")
        path = os.path.join(base, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{index_path}: names shard {name!r}, which {base} does not hold")
        headers[name] = _header(path)
    missing = [(k, f) for k, f in weight_map.items() if k not in headers[f].entries]
    if missing:
        k, f = missing[0]
        raise CheckpointError(f"{index_path}: tensor {k!r} is listed in shard {f!r}, which does not hold it"
                              + (f" (and {len(missing) - 1} more such tensors)" if len(missing) > 1 else ""))
    specs = {k: Spec(headers[f].entries[k].dtype, headers[f].entries[k].shape) for k, f in weight_map.items()}
    return Layout(base, index, files, headers, specs, dict(weight_map))


def _check_dirs(base: str, adapters: list[str], out: str, overwrite: bool) -> None:
    real_out = os.path.realpath(out)
    for role, path in [("base checkpoint", base)] + [("adapter", a) for a in adapters]:
        real = os.path.realpath(path)
        if os.path.commonpath([real, real_out]) in (real, real_out):
            raise CheckpointError(f"output directory {out} overlaps the {role} {path} (one contains the other); the "
                                  "inputs are never written to: choose another output directory")
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise CheckpointError(f"output directory {out}: exists and is not a directory")
        entries = os.listdir(out)
        if entries and not overwrite:
            raise CheckpointError(f"output directory {out}: exists and is not empty ({len(entries)} entries); pass "
                                  "--overwrite (overwrite=True) to replace it")


def _out_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in OUT_DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not supported; expected one of {', '.join(OUT_DTYPES)}")
        return OUT_DTYPES[dtype]
    if dtype not in OUT_DTYPES.values():
        raise CheckpointError(f"dtype {dtype} is not supported; expected one of {', '.join(OUT_DTYPES)}")
    return dtype


def _adapter_args(adapters) -> list[tuple[str, float]]:
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    out = []
    for item in adapters:
        path, weight = (item, 1.0) if isinstance(item, (str, os.PathLike)) else item
        path = os.fspath(path)
        out.append((path, check_weight(weight, f"adapter {path}")))
    if not out:
        raise CheckpointError("no adapter given; expected at least one adapter directory")
    return out


def _to_copy(layout: Layout) -> tuple[list[str], list[str]]:
    """(files to copy, files left out), as paths relative to the base directory."""
    copy, skipped, seen = [], [], set()
    # Links are followed (a model in the Hugging Face cache is links to blobs), each directory once.
    for root, dirs, files in os.walk(layout.base, followlinks=True):
        seen.add(os.path.realpath(root))
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) not in seen)
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), layout.base)
            if root == layout.base and (name in layout.files or name == INDEX_NAME or OTHER_WEIGHTS.match(name)):
                if name not in layout.files and name != INDEX_NAME:
                    skipped.append(rel)
            elif os.path.isfile(os.path.join(root, name)):
                copy.append(rel)
            else:
                skipped.append(rel)
    return copy, skipped


def _set_dtype(config, name: str) -> bool:
    """Set the "dtype"/"torch_dtype" entries transformers writes (top level and sub-configs) to `name`."""
    changed = False
    if isinstance(config, dict):
        for key, value in config.items():
            if key in ("dtype", "torch_dtype") and isinstance(value, str) and value != name:
                config[key], changed = name, True
            elif isinstance(value, dict):
                changed = _set_dtype(value, name) or changed
    return changed


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _new_dir(parent: str, name: str, tag: str) -> str:
    # os.mkdir honours the umask, so the renamed output gets the permissions a new directory would.
    while True:
        path = os.path.join(parent, f".{name}.{tag}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _clean_stale(parent: str, name: str) -> list[str]:
    """Remove what killed merges of this host left beside output `name`: their temporary outputs, and
    the previous output they had moved aside (put back when the output is missing). Returns what was
    removed or restored."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?P<tag>tmp|old)-{_host_tag()}-(?P<pid>\d+)-[0-9a-f]{{8}}$")
    done = []
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return done
    for entry in entries:
        m = pattern.match(entry)
        if m is None or _alive(int(m.group("pid"))):
            continue
        path, out = os.path.join(parent, entry), os.path.join(parent, name)
        if m.group("tag") == "old" and not os.path.lexists(out):
            os.rename(path, out)  # the merge died between moving the old output aside and installing the new
        else:
            shutil.rmtree(path, ignore_errors=True)
        done.append(path)
    return done


def _install(tmp: str, out: str, overwrite: bool) -> None:
    """Rename the finished output into place (replacing an existing directory only with overwrite)."""
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise CheckpointError(f"output directory {out}: became non-empty while merging; pass --overwrite to "
                                  "replace it")
        old = _new_dir(os.path.dirname(os.path.abspath(out)), os.path.basename(out), "old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)  # onto an empty directory too (POSIX rename replaces it)


def _write_file(layout: Layout, name: str, updates: Updates, out_dtype, dst: str, buffer: torch.Tensor, bar) -> int:
    header = layout.headers[name]
    specs = {k: (out_dtype if out_dtype is not None and e.dtype.is_floating_point else e.dtype, e.shape)
             for k, e in header.entries.items()}
    written = 0
    with open(header.path, "rb") as f, StreamWriter(dst, specs, header.metadata) as writer:
        for key in writer.order:
            entry = header.entries[key]
            # Into the one read buffer: transform() changes it in place and the writer has written it
            # before the next tensor is read.
            t = read_tensor(f, entry, buffer)
            todo = updates.by_key.get(key, []) if layout.where.get(key) == name else []
            out = transform(key, t, todo, out_dtype)
            del t
            writer.write(key, out)
            nbytes = out.numel() * out.element_size()
            del out
            written += nbytes
            bar.update(nbytes)
    return written


def merge_checkpoint(base_dir: Union[str, os.PathLike], adapters, out_dir: Union[str, os.PathLike],
                     dtype: Union[None, str, torch.dtype] = None, overwrite: bool = False,
                     progress: Optional[bool] = None, allow_pickle: bool = False) -> dict:
    """Merge PEFT adapters into the safetensors checkpoint in base_dir, writing the result to out_dir.

    Semantics: for adapters [(dir_k, weight_k)] in order, every tensor W that adapter k's module m targets
    becomes W + weight_k * scale_m * B_m A_m (pylora.ops.merge_: fp32 accumulation, one rounding), in
    W's layout (Linear [O, I], Conv1D [I, O], Embedding [V, D] += (B A)^T, Conv2d as [C_out, C_in*kh*kw]);
    `<m>.bias` gains weight_k * scale_m * lora_B.bias (lora_bias); tensors the adapter saves
    (modules_to_save, bias="all"/"lora_only", embedding layers) replace the checkpoint's, unscaled. See
    pylora.checkpoint.updates for how names are matched. With dtype ("float32" | "float16" | "bfloat16" or the
    torch dtype), floating tensors are written in it, merged in float32 when it differs from theirs.
    adapters: a list of directories or (directory, weight) pairs; a progress bar shows when `progress`
    is True, or by default when stderr is a terminal and TQDM_DISABLE is unset.

    Returns a summary dict (files, tensors, bytes, what changed, copied and skipped files, warnings).
    Raises CheckpointError or pylora.AdapterError (both ValueErrors) before writing anything when an
    input is wrong, CheckpointError when a result would not be finite, and OSError on I/O failure; after
    any failure the output directory is as it was.
    """
    start = time.perf_counter()
    base, out = os.fspath(base_dir), os.fspath(out_dir)
    out_dtype = _out_dtype(dtype)
    args = _adapter_args(adapters)
    layout = read_layout(base)
    _clean_stale(os.path.dirname(os.path.abspath(out)), os.path.basename(os.path.abspath(out)))
    _check_dirs(base, [p for p, _ in args], out, overwrite)
    config_path = os.path.join(base, CONFIG_NAME)
    config = _read_json(config_path, "a transformers config") if os.path.isfile(config_path) else None
    read = [(path, as_adapter(path, allow_pickle=allow_pickle), weight) for path, weight in args]
    plan = build_updates(layout.specs, config, read, out_dtype, base=f"the checkpoint {base}")
    copy, skipped = _to_copy(layout)

    def out_bytes(e):
        item = out_dtype.itemsize if out_dtype is not None and e.dtype.is_floating_point else e.dtype.itemsize
        return e.numel * item
    total = sum(out_bytes(e) for h in layout.headers.values() for e in h.entries.values())
    parent = os.path.dirname(os.path.abspath(out))
    existing = parent
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    need = total + sum(os.path.getsize(os.path.join(base, rel)) for rel in copy)
    free = shutil.disk_usage(existing).free
    if free < need:
        raise CheckpointError(f"output directory {out}: needs {need} bytes, {existing} has {free} free")

    os.makedirs(parent, exist_ok=True)
    tmp = _new_dir(parent, os.path.basename(os.path.abspath(out)), "tmp")
    try:
        with progress_bar(total=total, progress=progress, desc="pylora merge", unit="B", unit_scale=True,
                          unit_divisor=1024) as bar:
            largest = max((e.nbytes for h in layout.headers.values() for e in h.entries.values()), default=0)
            buffer = torch.empty(largest, dtype=torch.uint8)
            for name in layout.files:
                _write_file(layout, name, plan, out_dtype, os.path.join(tmp, name), buffer, bar)
            del buffer
        if layout.index is not None:
            index = dict(layout.index)
            index["metadata"] = dict(index.get("metadata") or {})
            index["metadata"]["total_size"] = sum(out_bytes(layout.headers[f].entries[k])
                                                  for k, f in layout.where.items())
            with open(os.path.join(tmp, INDEX_NAME), "x") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for rel in copy:
            dst = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(base, rel), dst)
        if out_dtype is not None and isinstance(config, dict) and CONFIG_NAME in copy:
            new_config = json.loads(json.dumps(config))
            if _set_dtype(new_config, str(out_dtype).removeprefix("torch.")):
                with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
                    f.write(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
        _install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    kinds = {}
    for todo in plan.by_key.values():
        for op in todo:
            kinds[op.kind] = kinds.get(op.kind, 0) + 1
    return {
        "out_dir": out, "base_dir": base, "files": list(layout.files), "sharded": layout.index is not None,
        "tensors": sum(len(h.entries) for h in layout.headers.values()), "bytes": total,
        "dtype": str(out_dtype).removeprefix("torch.") if out_dtype is not None else None,
        "changed_tensors": len(plan.by_key), "lora_updates": kinds.get("lora", 0),
        "bias_updates": kinds.get("bias", 0), "replacements": kinds.get("replace", 0),
        "adapters": [{"path": p, "weight": w, "modules": len(a.modules), "saved_tensors": len(a.extra_tensors)}
                     for p, a, w in read],
        "tied": dict(plan.tied), "copied": copy, "skipped": skipped, "warnings": list(plan.warnings),
        "seconds": time.perf_counter() - start,
    }
