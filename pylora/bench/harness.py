"""The one benchmark harness: interleaved timing with adaptive repeats, the machine's limits measured
in the same run, sanity checks that fail loudly, and the report (a printed table and a JSON file).

Every suite (merge, train_layer, train_model, multi_kernel, multi_model, merge_checkpoint) times through
Timer.measure, takes its floors from measure_limits, checks its results with Checks and writes them with
Report. The rules it enforces, and why:

- Methods alternate within each round (the order shuffled every round with a fixed seed), after
  warm-up rounds: on a shared machine the load changes while a benchmark runs, and timing one method
  after another turns that change into a false speed-up. Rounds also pair the methods, so a
  difference (a LoRA layer's extra cost over its frozen layer) is taken per round (Measurement.diff).
- Repeats are adaptive: rounds continue until every method's median has a 95% confidence interval
  (distribution-free, from order statistics) narrower than --target-ci of the median, or a time budget
  or --max-reps is reached, with at least --min-reps samples each. Every result carries its spread:
  quartiles, min/max, the interval and the sample count, and why the rounds stopped.
- On the CPU: wall time (time.perf_counter), or the calling thread's CPU time (time.thread_time: it
  stands still while other processes hold the core), which only one-thread runs can use; the thread
  count is explicit and recorded. On CUDA: events around each call, the L2 cache flushed before each
  call, and CUDA graphs for launch-bound sizes (a suite names the methods to capture).
- The limits (copy bandwidth by copy_ into a preallocated buffer, never a fresh clone, whose page
  faults would be timed; read bandwidth; matmul throughput per dtype) are measured in the same run,
  through the same Timer, at the start and again briefly after every case (Limits.refresh), and the
  best of all their samples sets the floors: a floor is a lower bound, and limits probed only at a
  busy moment would set it too high.
- A result that beats its floor, a model that beats its own base model, or a ratio its definition
  does not allow is a bug in the benchmark. Floors are compared with medians (more than half the
  samples under a true floor is impossible); a model and its base with the per-round ratio's 95%
  interval (Measurement.ratio), so noise cannot fail the check and a model faster round after round
  does. Checks collects such failures, Report.finish writes the JSON beside the requested path as
  <name>.failed.json and raises SanityError, and the suite exits with status EXIT_SANITY.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

# A measured time under FLOOR_SLACK x its floor fails: the floor comes from limits measured with noise
# of their own, so a result just under it is not yet impossible; one under 90% of it is.
FLOOR_SLACK = 0.9
# A model that contains its base model (MultiLoRA, a LoRA training step) may not run faster than
# BASE_SLACK x the base alone: interleaved medians of the same machine state differ by less than that.
BASE_SLACK = 0.95
# Never fewer samples per method than this, whatever the budget says.
MIN_SAMPLES = 3

EXIT_SANITY = 4  # a sanity check failed (SanityError)
EXIT_MISSING = 3  # an optional dependency the suite needs is not installed (MissingDependency)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class SanityError(RuntimeError):
    """A benchmark result that cannot be true: below its floor, faster than its own base model, or a
    ratio outside what its definition allows. The message names the suite, the case, the value and
    the bound."""


class MissingDependency(RuntimeError):
    """A suite needs an optional package that is not installed (transformers for the model-level suites);
    the message says which, what for, and how to install it."""


def require(module: str, suite: str, what: str):
    """import `module`, or raise MissingDependency saying that `suite` needs it for `what`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(f"pylora bench {suite}: needs {module} for {what}, and it cannot be imported "
                                f"({exc}); install it with `pip install {module}`") from exc


def optional(module: str):
    """The module, or None when it cannot be imported (a baseline the suite then leaves out, saying so)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------

def median_ci(sorted_samples: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval of the median: the order statistics of ranks
    n/2 -+ z sqrt(n)/2 (1-based, widened outward). Below 6 samples it is the whole range."""
    n = len(sorted_samples)
    lo = math.floor(n / 2 - z * math.sqrt(n) / 2)
    hi = math.ceil(1 + n / 2 + z * math.sqrt(n) / 2)
    return sorted_samples[max(lo, 1) - 1], sorted_samples[min(hi, n) - 1]


@dataclass(frozen=True)
class Stats:
    """The summary of one method's samples (seconds)."""

    n: int
    median: float
    q1: float
    q3: float
    min: float
    max: float
    ci_low: float
    ci_high: float

    @classmethod
    def of(cls, samples: Iterable[float]) -> "Stats":
        s = sorted(float(v) for v in samples)
        if not s:
            raise ValueError("Stats.of: no samples")
        if len(s) == 1:
            q1 = q3 = s[0]
        else:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        lo, hi = median_ci(s)
        return cls(len(s), statistics.median(s), q1, q3, s[0], s[-1], lo, hi)

    @property
    def rel_ci(self) -> float:
        """Half the confidence interval's width over the median (inf for a median of 0)."""
        return (self.ci_high - self.ci_low) / (2 * abs(self.median)) if self.median else math.inf

    @property
    def rel_iqr(self) -> float:
        return (self.q3 - self.q1) / abs(self.median) if self.median else math.inf

    def as_dict(self, unit: str = "ms") -> dict:
        k = UNITS[unit]
        return {f"median_{unit}": self.median * k, f"q1_{unit}": self.q1 * k, f"q3_{unit}": self.q3 * k,
                f"min_{unit}": self.min * k, f"max_{unit}": self.max * k,
                f"ci95_{unit}": [self.ci_low * k, self.ci_high * k], "n": self.n, "rel_ci": self.rel_ci}


UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6}


@dataclass
class Measurement:
    """What Timer.measure returns: every sample of every method (seconds per call), grouped by round."""

    samples: dict[str, list[float]]
    rounds: list[dict[str, list[float]]]
    stopped: str  # "converged" | "max_reps" | "budget"
    inner: dict[str, int]  # timed calls per round of each method
    graphs: dict[str, str] = field(default_factory=dict)  # method -> "captured" or why not
    seconds: float = 0.0
    target_ci: float = 0.02
    stats: dict[str, Stats] = field(init=False)

    def __post_init__(self):
        self.stats = {name: Stats.of(s) for name, s in self.samples.items()}

    def __getitem__(self, name: str) -> Stats:
        return self.stats[name]

    def __contains__(self, name: str) -> bool:
        return name in self.stats

    def median(self, name: str) -> float:
        return self.stats[name].median

    def diff(self, a: str, b: str) -> Stats:
        """Per round, the median of a's samples minus the median of b's: a's extra cost over b, paired
        within rounds so that load shared by both cancels."""
        return Stats.of(statistics.median(r[a]) - statistics.median(r[b]) for r in self.rounds)

    def ratio(self, a: str, b: str) -> Stats:
        """Per round, the median of a's samples over the median of b's: a's time as a multiple of b's,
        paired within rounds so that load shared by both cancels."""
        return Stats.of(statistics.median(r[a]) / statistics.median(r[b]) for r in self.rounds)

    @property
    def stable(self) -> bool:
        return all(s.rel_ci <= self.target_ci for s in self.stats.values())

    def as_dict(self, unit: str = "ms") -> dict:
        out = {}
        for name, s in self.stats.items():
            d = s.as_dict(unit)
            d["per_round"] = self.inner.get(name, 1)
            if name in self.graphs:
                d["cuda_graph"] = self.graphs[name]
            out[name] = d
        return out

    def describe(self) -> dict:
        return {"rounds": len(self.rounds), "stopped": self.stopped, "seconds": self.seconds,
                "stable": self.stable}


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

CLOCKS = ("auto", "wall", "thread")


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs), or 32 MiB when it cannot be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            digits = text[:-1] if text[-1:] in "KMG" else text
            if digits.isdigit():
                best = max(best, int(digits) * mult)
    except OSError:
        pass
    return best or (32 << 20)


def cache_bytes(device: torch.device) -> int:
    """The largest cache that can hold a benchmark's data: the L2 on a GPU, the last level on a CPU."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20))
    return last_level_cache_bytes()


class Timer:
    """The one timing helper. measure({name: fn}) runs each fn(k) (k counts that method's calls, for
    rotating inputs) in interleaved rounds and returns a Measurement; see the module docstring.

    device: "cpu" or "cuda". clock: "auto" (CPU: the thread's CPU time when torch runs one thread, wall
    time otherwise; CUDA: events), "wall" or "thread". warmup: untimed rounds first. min_reps: samples
    per method at least; max_reps: rounds at most; target_ci: stop once every median's 95% interval is
    narrower than this fraction of it; budget_s: stop (with MIN_SAMPLES at least) after this many
    seconds of one measure() call; max_inner: a method much faster than the slowest runs up to this many
    timed calls per round (more samples at the same pairing); seed: the round orders.
    """

    def __init__(self, device="cpu", *, clock: str = "auto", warmup: int = 2, min_reps: int = 7,
                 max_reps: int = 200, target_ci: float = 0.02, budget_s: float = 10.0, max_inner: int = 4,
                 seed: int = 0):
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"Timer: device={device!r} must be cpu or cuda")
        if clock not in CLOCKS:
            raise ValueError(f"Timer: clock={clock!r} must be one of {', '.join(CLOCKS)}")
        if self.device.type == "cuda":
            if clock == "thread":
                raise ValueError("Timer: clock='thread' is a CPU clock; CUDA work is timed with events")
            self.clock = "cuda_events"
        elif clock == "auto":
            self.clock = "thread" if torch.get_num_threads() == 1 else "wall"
        else:
            self.clock = clock
        self._check_threads()
        if min_reps < 1 or max_reps < 1 or warmup < 0 or max_inner < 1:
            raise ValueError(f"Timer: min_reps={min_reps}, max_reps={max_reps}, max_inner={max_inner} must be "
                             f">= 1 and warmup={warmup} >= 0")
        self.warmup, self.min_reps, self.max_reps = warmup, min_reps, max_reps
        self.target_ci, self.budget_s, self.max_inner, self.seed = target_ci, budget_s, max_inner, seed
        self._rng = random.Random(seed)
        self._flush_buf: torch.Tensor | None = None

    def _check_threads(self):
        if self.clock == "thread" and torch.get_num_threads() != 1:
            raise ValueError(f"Timer: the thread clock measures the calling thread's CPU time only, and torch runs "
                             f"{torch.get_num_threads()} threads; use one thread (--threads 1) or the wall clock")

    def describe(self) -> dict:
        return {"clock": self.clock, "threads": torch.get_num_threads(), "warmup_rounds": self.warmup,
                "min_reps": self.min_reps, "max_reps": self.max_reps, "target_ci": self.target_ci,
                "budget_s": self.budget_s, "max_per_round": self.max_inner, "seed": self.seed,
                "order": "shuffled every round (fixed seed)"}

    # -- the pieces of one call

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def flush(self):
        """Evict the caches: on CUDA zero a buffer twice the L2; on the CPU add to one twice the last-level
        cache (a read-modify-write through the cache: a large zero_ may use streaming stores that bypass it)."""
        if self._flush_buf is None:
            nbytes = 2 * cache_bytes(self.device)
            if self.device.type == "cuda":
                nbytes = max(nbytes, 256 << 20)
            self._flush_buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=self.device)
        if self.device.type == "cuda":
            self._flush_buf.zero_()
        else:
            self._flush_buf.add_(1.0)

    def _clock(self) -> Callable[[], float]:
        return time.thread_time if self.clock == "thread" else time.perf_counter

    def time_call(self, fn: Callable[[int], object], k: int = 0) -> float:
        """Seconds of one fn(k): CUDA events around it, or the CPU clock."""
        if self.device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn(k)
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / 1e3
        clock = self._clock()
        t0 = clock()
        fn(k)
        return clock() - t0

    def _capture(self, fn: Callable[[int], object], calls: int):
        """A CUDA graph of fn(0) .. fn(calls - 1) (warmed up on a side stream first, as capture requires)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for i in range(min(3, calls)):
                fn(i)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(i)
        self.sync()
        return graph

    # -- measure

    def measure(self, fns: Mapping[str, Callable[[int], object]], *,
                setup: Mapping[str, Callable[[int], object]] | None = None, flush: bool | None = None,
                graph: Iterable[str] = (), graph_calls: int = 8, self_timed: bool = False,
                budget_s: float | None = None, min_reps: int | None = None, max_reps: int | None = None,
                target_ci: float | None = None, warmup: int | None = None) -> Measurement:
        """Time every fns[name](k) in interleaved rounds (see the class docstring).

        setup[name](k), untimed, runs before each call of that method (restore a weight, copy a cache).
        flush: evict the caches before each timed call (default: on CUDA yes, on the CPU no; a suite whose
        inputs do not rotate past the caches asks for it). graph: methods to capture as a CUDA graph of
        graph_calls consecutive calls, each sample then being one replay over graph_calls (launch-bound
        sizes; ignored on the CPU; a method that cannot be captured is timed plainly and says why).
        self_timed: each fn returns its own seconds (a subprocess that times itself); nothing is timed here.
        budget_s, min_reps, max_reps, target_ci, warmup: this call's own values instead of the Timer's.
        """
        if not fns:
            raise ValueError("Timer.measure: no methods")
        self._check_threads()
        names = list(fns)
        setup = dict(setup or {})
        unknown = set(setup) - set(names)
        if unknown:
            raise ValueError(f"Timer.measure: setup for unknown methods {sorted(unknown)}")
        flush = (self.device.type == "cuda") if flush is None else flush
        flush = flush and not self_timed
        budget = self.budget_s if budget_s is None else budget_s
        min_reps = self.min_reps if min_reps is None else min_reps
        max_reps = self.max_reps if max_reps is None else max_reps
        target = self.target_ci if target_ci is None else target_ci

        run = dict(fns)
        per_call = {n: 1 for n in names}
        graphs: dict[str, str] = {}
        if self.device.type == "cuda" and not self_timed:
            for n in graph:
                if n not in fns:
                    continue
                if n in setup:
                    graphs[n] = "not captured: it has a per-call setup"
                    continue
                try:
                    g = self._capture(fns[n], graph_calls)
                except Exception as exc:  # a host synchronisation or an allocation inside the region
                    graphs[n] = f"not captured: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    torch.cuda.synchronize(self.device)
                    continue
                run[n] = lambda k, g=g: g.replay()
                per_call[n] = graph_calls
                graphs[n] = f"captured ({graph_calls} calls per replay)"

        calls = {n: 0 for n in names}

        def one(n: str) -> float:
            k = calls[n]
            calls[n] += 1
            if n in setup:
                setup[n](k)
            if flush:
                self.flush()
            if self_timed:
                t = float(run[n](k))
            else:
                self.sync()
                t = self.time_call(run[n], k)
            return t / per_call[n]

        t_start = time.monotonic()
        warm = {n: [] for n in names}
        for _ in range(self.warmup if warmup is None else warmup):
            order = names[:]
            self._rng.shuffle(order)
            for n in order:
                warm[n].append(one(n))
        self.sync()
        inner = {n: 1 for n in names}
        if any(warm.values()) and not self_timed and len(names) > 1:
            typical = {n: max(statistics.median(warm[n]), 1e-9) for n in names}
            slowest = max(typical.values())
            inner = {n: max(1, min(self.max_inner, int(0.25 * slowest / typical[n]))) for n in names}

        samples = {n: [] for n in names}
        rounds: list[dict[str, list[float]]] = []
        t_timed = time.monotonic()
        while True:
            order = names[:]
            self._rng.shuffle(order)
            this = {}
            for n in order:
                this[n] = [one(n) for _ in range(inner[n])]
                samples[n].extend(this[n])
            rounds.append(this)
            counts = [len(samples[n]) for n in names]
            if min(counts) >= max(min_reps, MIN_SAMPLES) and all(Stats.of(samples[n]).rel_ci <= target for n in names):
                stopped = "converged"
                break
            if len(rounds) >= max_reps and min(counts) >= MIN_SAMPLES:
                stopped = "max_reps"
                break
            if time.monotonic() - t_timed >= budget and min(counts) >= MIN_SAMPLES:
                stopped = "budget"
                break
        self.sync()
        return Measurement(samples, rounds, stopped, inner, graphs, time.monotonic() - t_start, target)

    def once(self, fn: Callable[[], object], **kw) -> Stats:
        """One method alone (a probe that has nothing to alternate with)."""
        return self.measure({"fn": lambda k: fn()}, **kw)["fn"]


# ----------------------------------------------------------------------------------------------
# The machine's limits, measured in the same run
# ----------------------------------------------------------------------------------------------

@dataclass
class Limits:
    """Copy and read bandwidth (bytes/s; copy counts the bytes read and the bytes written) and matmul
    throughput per dtype (flop/s), each the best of its samples (floors must be lower bounds) with the
    median beside it."""

    device: str
    copy_Bps: float
    copy_Bps_median: float
    read_Bps: float
    read_Bps_median: float
    matmul: dict[str, float]
    matmul_median: dict[str, float]
    copy_bytes: int
    matmul_n: int
    stats: dict = field(default_factory=dict)
    refreshes: int = 0
    probes: dict = field(default_factory=dict, repr=False)  # the probe methods over their preallocated buffers

    def absorb(self, m: Measurement):
        """Raise each limit to the best of m's samples of the probes (a floor must stay a lower bound)."""
        flops = 2.0 * self.matmul_n ** 3
        self.copy_Bps = max(self.copy_Bps, 2 * self.copy_bytes / m["copy"].min)
        self.read_Bps = max(self.read_Bps, self.copy_bytes / m["read"].min)
        for k in self.matmul:
            self.matmul[k] = max(self.matmul[k], flops / m[f"matmul_{k}"].min)

    def refresh(self, timer: "Timer", budget_s: float = 0.25):
        """Probe the limits again, briefly, and keep the best: a suite calls this right after each case's
        rounds, so the floors it then computes include samples taken under the load that case ran under
        (a shared machine's load changes; limits probed once, at a busy moment, set floors too high)."""
        if not self.probes:
            return
        self.absorb(timer.measure(self.probes, flush=False, budget_s=budget_s, min_reps=MIN_SAMPLES, target_ci=1.0,
                                  warmup=0))
        self.refreshes += 1

    def bandwidth(self) -> float:
        """The bandwidth floors use: the faster of copy (read + write) and read-only, so a kernel that
        mostly reads cannot beat its floor by reading faster than a copy moves bytes."""
        return max(self.copy_Bps, self.read_Bps)

    def rate(self, dtype: torch.dtype | str) -> float:
        """The matmul throughput of `dtype` (the fastest measured dtype if this one was not measured)."""
        name = dtype if isinstance(dtype, str) else dtype_name(dtype)
        return self.matmul.get(name, max(self.matmul.values()))

    def floor_s(self, nbytes: float, flops: float, dtype: torch.dtype | str) -> float:
        """The roofline floor: the larger of moving nbytes at bandwidth() and doing flops at rate(dtype)."""
        return max(nbytes / self.bandwidth(), flops / self.rate(dtype))

    def as_dict(self) -> dict:
        d = {"copy_GBps": self.copy_Bps / 1e9, "copy_GBps_median": self.copy_Bps_median / 1e9,
             "read_GBps": self.read_Bps / 1e9, "read_GBps_median": self.read_Bps_median / 1e9,
             "floor_bandwidth_GBps": self.bandwidth() / 1e9,
             "matmul_TFLOPs": {k: v / 1e12 for k, v in self.matmul.items()},
             "matmul_TFLOPs_median": {k: v / 1e12 for k, v in self.matmul_median.items()},
             "copy_bytes": self.copy_bytes, "matmul_n": self.matmul_n, "refreshes": self.refreshes,
             "how": "copy_ into a preallocated buffer (read + write bytes), sum of the same buffer (read bytes), "
                    "mm into a preallocated output; interleaved samples at the start (their median) and after "
                    "every case (refreshes); the best of all of them",
             "samples": self.stats}
        for name in self.matmul:  # the flat names the README's tables were read from
            d[f"{SHORT.get(name, name)}_matmul_TFLOPs"] = self.matmul[name] / 1e12
        return d

    def describe(self) -> str:
        mm = ", ".join(f"{SHORT.get(k, k)} {v / 1e12:.3g}" for k, v in self.matmul.items())
        return (f"limits measured now: copy {self.copy_Bps / 1e9:.1f} GB/s (read+write; median "
                f"{self.copy_Bps_median / 1e9:.1f}), read {self.read_Bps / 1e9:.1f} GB/s, matmul TFLOP/s: {mm}")


def measure_limits(timer: Timer, dtypes: Iterable[torch.dtype] = (torch.float32, torch.bfloat16), *,
                   copy_bytes: int | None = None, matmul_n: int | None = None,
                   budget_s: float | None = None) -> Limits:
    """The machine's limits now, through `timer` (its clock and thread count): copy_ of copy_bytes into a
    preallocated buffer (default: 1 GiB on CUDA, 8x the last-level cache and at least 256 MiB on the CPU),
    a sum over the same buffer, and an n x n matmul into a preallocated output for each dtype (float32
    always), all interleaved in one measurement. Buffers are filled before timing: first touches (page
    faults) are never timed, and nothing is timed on zeros. The Limits keep the probes and their buffers,
    for Limits.refresh."""
    dev = timer.device
    cuda = dev.type == "cuda"
    if copy_bytes is None:
        copy_bytes = (1 << 30) if cuda else max(256 << 20, 8 * last_level_cache_bytes())
    n_el = copy_bytes // 4
    src = torch.empty(n_el, dtype=torch.float32, device=dev).uniform_(-1, 1)
    dst = torch.empty_like(src).fill_(0.5)
    acc = torch.empty((), dtype=torch.float32, device=dev)
    n = matmul_n or (8192 if cuda else 2048)
    dts = {dtype_name(torch.float32): torch.float32}
    dts.update({dtype_name(d): d for d in dtypes})
    mats = {}
    for name, dt in dts.items():
        a = torch.randn(n, n, device=dev).to(dt)
        b = torch.randn(n, n, device=dev).to(dt)
        mats[name] = (a, b, torch.empty(n, n, dtype=dt, device=dev))
    fns = {"copy": lambda k: dst.copy_(src), "read": lambda k: torch.sum(src, dim=0, out=acc)}
    for name, (a, b, c) in mats.items():
        fns[f"matmul_{name}"] = lambda k, a=a, b=b, c=c: torch.mm(a, b, out=c)
    m = timer.measure(fns, flush=False, budget_s=budget_s)
    flops = 2.0 * n ** 3
    return Limits(
        device=dev.type,
        copy_Bps=2 * copy_bytes / m["copy"].min, copy_Bps_median=2 * copy_bytes / m["copy"].median,
        read_Bps=copy_bytes / m["read"].min, read_Bps_median=copy_bytes / m["read"].median,
        matmul={k: flops / m[f"matmul_{k}"].min for k in mats},
        matmul_median={k: flops / m[f"matmul_{k}"].median for k in mats},
        copy_bytes=copy_bytes, matmul_n=n, stats={"measurement": m.describe(), **m.as_dict("ms")}, probes=fns)


# ----------------------------------------------------------------------------------------------
# Sanity checks
# ----------------------------------------------------------------------------------------------

def _fmt_s(seconds: float) -> str:
    if not math.isfinite(seconds):
        return str(seconds)
    if abs(seconds) >= 1:
        return f"{seconds:.3f} s"
    if abs(seconds) >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.2f} us"


class Checks:
    """Collects the sanity checks of one suite. Each check that fails records a message naming the suite,
    the case, the measured value and the bound; raise_if_failed raises SanityError listing them all."""

    def __init__(self, suite: str):
        self.suite = suite
        self.failures: list[str] = []
        self.count = 0

    def _fail(self, case: str, message: str):
        self.failures.append(f"{self.suite}: {case}: {message}")

    def floor(self, case: str, what: str, measured_s: float, floor_s: float, basis: str = "",
              slack: float = FLOOR_SLACK) -> bool:
        """measured_s must be at least slack x floor_s (the time the measured limits allow at best)."""
        self.count += 1
        if measured_s >= slack * floor_s:  # False for NaN too
            return True
        ratio = measured_s / floor_s if floor_s else math.nan
        self._fail(case, f"{what} measured {_fmt_s(measured_s)}, below its floor {_fmt_s(floor_s)} "
                         f"({ratio:.2f}x the floor{'; ' + basis if basis else ''}); nothing runs faster than the "
                         f"machine's measured limits allow (allowed: {slack:.2f}x), so the benchmark is wrong")
        return False

    def not_faster_than_base(self, case: str, what: str, measured_s: float, base_what: str, base_s: float,
                             ratio: Stats | None = None, slack: float = BASE_SLACK) -> bool:
        """A model that contains `base_what` and does its work and more may not run faster than it. With
        `ratio` (Measurement.ratio: per-round measured / base, paired), it fails only when the whole 95%
        interval of the ratio lies under `slack`, so a noisy pair of medians cannot fail it and a model
        that is faster round after round does; without it, when measured_s < slack x base_s."""
        self.count += 1
        if ratio is None:
            if measured_s >= slack * base_s:
                return True
            how = f"{measured_s / base_s:.2f}x"
        else:
            if ratio.ci_high >= slack:
                return True
            how = (f"{ratio.median:.2f}x per round, 95% interval {ratio.ci_low:.2f}-{ratio.ci_high:.2f} over "
                   f"{ratio.n} rounds")
        self._fail(case, f"{what} measured {_fmt_s(measured_s)}, faster than {base_what} {_fmt_s(base_s)} "
                         f"({how}; allowed: >= {slack:.2f}x), which it contains; the benchmark is wrong")
        return False

    def within(self, case: str, what: str, value: float, lo: float, hi: float, why: str) -> bool:
        """A ratio or size that its definition bounds to [lo, hi]."""
        self.count += 1
        if lo <= value <= hi:
            return True
        self._fail(case, f"{what} = {value:.6g} is outside [{lo:.6g}, {hi:.6g}], which {why}")
        return False

    def positive(self, case: str, what: str, value: float) -> bool:
        """A time or size that must be finite and above zero."""
        self.count += 1
        if value is not None and math.isfinite(value) and value > 0:
            return True
        self._fail(case, f"{what} = {value} must be finite and positive")
        return False

    def as_dict(self) -> dict:
        return {"checks": self.count, "failures": list(self.failures), "floor_slack": FLOOR_SLACK,
                "base_slack": BASE_SLACK}

    def raise_if_failed(self):
        if self.failures:
            raise SanityError(f"{len(self.failures)} of {self.count} sanity checks failed:\n  "
                              + "\n  ".join(self.failures))


# ----------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------

_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
          "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def machine(device) -> dict:
    """What the numbers were measured on: CPU model, cores, threads, ISA, caches, load, torch, the GPU."""
    import pylora
    from pylora import _ext

    device = torch.device(device)
    info = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "pylora": getattr(pylora, "__version__", None), "threads": torch.get_num_threads(),
            "logical_cpus": os.cpu_count()}
    model, flags, cores = platform.processor() or platform.machine(), set(), set()
    try:
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                key, _, val = line.partition(":")
                key, val = key.strip(), val.strip()
                if key == "model name":
                    model = val
                elif key in ("flags", "Features") and not flags:
                    flags = set(val.split())
                elif key == "physical id":
                    phys = val
                elif key == "core id":
                    core = val
                elif not key and core is not None:
                    cores.add((phys, core))
                    phys = core = None
            if core is not None:
                cores.add((phys, core))
    except OSError:
        pass
    info["cpu"] = model
    info["physical_cores"] = len(cores) or None
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    try:
        info["isa"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        info["isa"] = None
    info["cpu_flags"] = [f for f in _FLAGS if f in flags]
    info["last_level_cache_bytes"] = last_level_cache_bytes()
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    info["extension"] = {"loaded": _ext.loaded, "error": _ext.load_error, **_ext.build_info()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_memory_GiB": props.total_memory / 2**30,
                     "gpu_sms": props.multi_processor_count, "gpu_l2_bytes": getattr(props, "L2_cache_size", None),
                     "cuda": torch.version.cuda})
    return info


# ----------------------------------------------------------------------------------------------
# Report: the printed table and the JSON file
# ----------------------------------------------------------------------------------------------

def markdown_table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec). Missing values print as '-'."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = []
        for key, _, spec in columns:
            v = r.get(key)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread(m: Measurement, name: str) -> float:
    """The interquartile range over the median of one method: the '± spread' column of the tables."""
    return m[name].rel_iqr


class Report:
    """One suite's results: the machine, the harness settings, the limits, every case (its medians as flat
    fields, its full statistics under "stats"), the sanity checks, a printed table and the JSON file."""

    def __init__(self, suite: str, device, *, timer: Timer | None = None, limits: Limits | None = None,
                 config: dict | None = None, quick: bool = False):
        self.suite = suite
        self.device = torch.device(device)
        self.timer, self.limits = timer, limits
        self.config = dict(config or {})
        self.quick = quick
        self.checks = Checks(suite)
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.machine = machine(self.device)
        self._t0 = time.monotonic()
        load = self.machine.get("loadavg_start")
        cpus = self.machine.get("usable_cpus") or self.machine.get("logical_cpus") or 1
        threads = torch.get_num_threads()
        if self.device.type == "cpu" and threads > 1 and load and load[0] + threads > cpus + 0.5:
            self.note(f"the machine is busy (load average {load[0]:.1f} on {cpus} CPUs) and {threads} threads are timed "
                      f"by the wall clock: a parallel region waits for any descheduled thread, so times swing; on a "
                      f"shared machine use --threads 1 (timed by the thread's CPU time)")

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        return row

    def note(self, text: str):
        """A caveat printed with the table and kept in the JSON (a baseline left out, and why)."""
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def payload(self, table: str, extra: dict | None = None) -> dict:
        if hasattr(os, "getloadavg"):
            self.machine["loadavg_end"] = list(os.getloadavg())
        out = {"suite": self.suite, "schema": 2, "quick": self.quick, "machine": self.machine,
               "harness": self.timer.describe() if self.timer else None,
               "limits": self.limits.as_dict() if self.limits else None, "config": self.config,
               "rows": self.rows, "table": table, "notes": self.notes, "sanity": self.checks.as_dict(),
               "seconds": time.monotonic() - self._t0}
        out.update(extra or {})
        return out

    def finish(self, path: str, columns: Sequence[tuple[str, str, str]], *, title: str = "",
               extra: dict | None = None) -> str:
        """Print the table, write the JSON to `path`, and raise SanityError when a check failed (the JSON
        then goes to <path minus .json>.failed.json, never to `path`, so a wrong result cannot be cited)."""
        table = markdown_table(self.rows, columns)
        print()
        if title:
            print(title)
        if self.limits:
            print(self.limits.describe())
        if self.timer:
            t = self.timer.describe()
            print(f"timing: {t['clock']} clock, {t['threads']} thread(s), medians of interleaved rounds "
                  f"(spread = IQR / median; n = samples of the first method)")
        print(table, flush=True)
        data = self.payload(table, extra)
        if self.checks.failures:
            failed = (path[:-5] if path.endswith(".json") else path) + ".failed.json"
            write_json(failed, data)
            print(f"\nSANITY CHECKS FAILED; results written to {failed}, not {path}", file=sys.stderr)
            self.checks.raise_if_failed()
        write_json(path, data)
        print(f"\n{self.checks.count} sanity checks passed; wrote {path}", flush=True)
        return path


def write_json(path: str, payload: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return path


# ----------------------------------------------------------------------------------------------
# Command-line plumbing shared by the suites
# ----------------------------------------------------------------------------------------------

class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that keeps the docstring's layout and shows every default that is a value (the options whose
    default depends on --quick say so in their help)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


def parser(doc: str, prog: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=Formatter)


def add_arguments(p: argparse.ArgumentParser, *, quick: str, full: str, budget: tuple[float, float],
                  out_dir: str | None = None):
    """The options every suite takes. quick/full: what each size means; budget: seconds per case (quick, full);
    out_dir: where the JSON goes without --out (default ./bench-results)."""
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="where to run (default: cuda when available)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="quick", action="store_true", default=False, help=quick)
    g.add_argument("--full", dest="quick", action="store_false", help=full + " (the default)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads (torch.set_num_threads); default: torch's own, {torch.get_num_threads()} here")
    p.add_argument("--clock", choices=CLOCKS, default="auto",
                   help="CPU timing: wall time, or the thread's CPU time (one thread only: robust to other processes "
                        "on a shared machine); auto: thread with --threads 1, wall otherwise. CUDA always uses events")
    p.add_argument("--out", default=None,
                   help=f"the JSON file (default: {out_dir or './bench-results'}/<suite>_<device>[_<N>t][_quick].json)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds of timing per case before the rounds stop (default: {budget[0]:g} with --quick, "
                        f"{budget[1]:g} otherwise)")
    p.add_argument("--min-reps", type=int, default=None, help="samples per method at least (default: 5 quick, 11 full)")
    p.add_argument("--max-reps", type=int, default=200, help="rounds per case at most")
    p.add_argument("--target-ci", type=float, default=0.02,
                   help="stop a case once every median's 95%% confidence interval is within this fraction of it")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 1 quick, 2 full)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the inputs and of the round orders")
    p.set_defaults(_budget=budget)


def timer_from_args(args) -> Timer:
    """Apply --device and --threads (recorded in args) and build the suite's Timer."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    quick_budget, full_budget = args._budget
    budget = args.budget if args.budget is not None else (quick_budget if args.quick else full_budget)
    try:
        return Timer(args.device, clock=args.clock, warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
                     min_reps=args.min_reps or (5 if args.quick else 11), max_reps=args.max_reps,
                     target_ci=args.target_ci, budget_s=budget, seed=args.seed)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


def default_out(stem: str, args, out_dir: str | None = None) -> str:
    """<out_dir or ./bench-results>/<stem>_<device>[_<N>t][_quick].json"""
    threads = f"_{args.threads}t" if args.threads and args.device == "cpu" else ""
    name = f"{stem}_{args.device}{threads}{'_quick' if args.quick else ''}.json"
    return os.path.join(out_dir or os.path.join(os.getcwd(), "bench-results"), name)


def child_env(**extra) -> dict:
    """This process's environment for a child Python (a suite, a memory run), with the folder that holds
    the imported pylora first on PYTHONPATH, so the child imports the same pylora: a checkout run from
    bench/, an editable install or a wheel."""
    import pylora

    root = os.path.dirname(os.path.dirname(os.path.abspath(pylora.__file__)))
    env = dict(os.environ, TQDM_DISABLE=os.environ.get("TQDM_DISABLE", "1"), **extra)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_child(args: Sequence[str], what: str, **env) -> dict:
    """python -m args in a fresh process (child_env, plus env): the JSON object it prints last. Raises
    RuntimeError naming `what` with the end of its stderr when it fails."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=child_env(**env),
                         timeout=3600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def proc_status_bytes(field_name: str) -> int:
    """A size in /proc/self/status (VmRSS: the resident set, VmHWM: its high-water mark), in bytes."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field_name + ":")).split()[1]) * 1024


def reset_peak_rss() -> int:
    """Resets this process's resident high-water mark to its current resident set (Linux) and returns
    that, in bytes: a memory run's peak is then proc_status_bytes("VmHWM") minus it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_bytes("VmRSS")


def entry(run: Callable[[list | None], int], argv: list | None) -> int:
    """A suite's main(): run it, turning SanityError and MissingDependency into exit statuses."""
    try:
        return run(argv)
    except SanityError as exc:
        print(f"\n{exc}", file=sys.stderr)
        return EXIT_SANITY
    except MissingDependency as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_MISSING
