"""Timing and reporting shared by the benchmarks: medians after warm-up, the machine's own limits
measured in the same run, a printed table and a JSON file."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine(device: str) -> dict:
    """What the numbers were measured on."""
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = f"{names[0]} x{len(names)}" if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


class Timer:
    """Median wall time of fn() after warm-up. On CUDA: events, and an L2 flush before every run so
    each run starts with cold caches (inputs larger than the caches are the other half of that)."""

    def __init__(self, device: str, warmup: int = 2, reps: int = 7, flush_mb: int = 256):
        self.device, self.warmup, self.reps = device, warmup, reps
        self._flush = torch.empty(flush_mb << 18, dtype=torch.float32, device="cuda") if device == "cuda" else None

    def __call__(self, fn, setup=None) -> float:
        times = []
        for i in range(self.warmup + self.reps):
            if setup is not None:
                setup()
            if self.device == "cuda":
                self._flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
            if i >= self.warmup:
                times.append(elapsed)
        return statistics.median(times)


def copy_bandwidth(device: str, timer: Timer, mbytes: int = 1024) -> float:
    """Bytes per second of dst.copy_(src) for a tensor far larger than the caches, counting the
    bytes read and the bytes written."""
    n = (mbytes << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / t


def matmul_peak(device: str, timer: Timer, dtype=torch.float32, n: int | None = None) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (the machine's dense arithmetic limit)."""
    n = n or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = timer(lambda: a @ b)
    return 2 * n ** 3 / t


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format). Returns the table as markdown too (for the README)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def write_results(name: str, payload: dict, path: str | None = None) -> str:
    """Writes payload as JSON to `path`, or to bench/results/<name>.json."""
    path = path or os.path.join(RESULTS, f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path
