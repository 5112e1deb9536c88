"""The serving pool: per wrapped module, a pool of rank rows; adapter slots shared by all modules;
host copies of every loaded adapter; LRU residency; immutable snapshots that batches read.

Layout: module m (I in, O out) owns A_rows [P, I] and B_rows [P, O]
(row j of B_rows is column j of some adapter's B). An adapter of rank r in m owns any r free rows,
so ranks are exact, nothing is padded, and loading or unloading never moves another adapter's rows.
A slot means the same adapter in every module. A snapshot holds, per module, row_ptr [N+1],
row_idx [nnz] and scales [N] on the device: slot s owns rows row_idx[row_ptr[s]:row_ptr[s+1]].

Concurrency: a batch pins the snapshot current when it starts and reads only that. Loading writes an
adapter into rows no snapshot references, then publishes a new snapshot; unloading publishes a
snapshot without the adapter and returns its rows to the free lists only once no running batch
holds an older snapshot. So a batch sees each adapter fully loaded or not at all.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import torch


@dataclass
class HostAdapter:
    """A loaded adapter's factors on the host: {module: (A [r, I], B [O, r], scale)}."""

    name: str
    modules: dict
    pinned: bool = False
    last_used: int = 0
    slot: int = -1  # -1: not resident on the device
    rows: dict = field(default_factory=dict)  # module -> list of pool rows while resident

    @property
    def nbytes(self) -> int:
        return sum(A.numel() * A.element_size() + B.numel() * B.element_size() for A, B, _ in self.modules.values())


class ModulePool:
    """The rank rows of one wrapped module, allocated once at full capacity (rows are pages)."""

    def __init__(self, name: str, in_features: int, out_features: int, rows: int, dtype, device):
        self.name = name
        self.in_features, self.out_features = in_features, out_features
        self.A_rows = torch.zeros(rows, in_features, dtype=dtype, device=device)
        self.B_rows = torch.zeros(rows, out_features, dtype=dtype, device=device)
        self.free = list(range(rows - 1, -1, -1))  # a stack: low rows first

    @property
    def capacity(self) -> int:
        return self.A_rows.shape[0]

    def write(self, rows: list, A: torch.Tensor, B: torch.Tensor) -> None:
        idx = torch.tensor(rows, dtype=torch.long, device=self.A_rows.device)
        self.A_rows.index_copy_(0, idx, A.to(self.A_rows.device, self.A_rows.dtype))
        self.B_rows.index_copy_(0, idx, B.t().to(self.B_rows.device, self.B_rows.dtype))


@dataclass
class ModuleTables:
    row_ptr: torch.Tensor  # int32 [N+1]
    row_idx: torch.Tensor  # int32 [nnz]
    scales: torch.Tensor  # fp32 [N]
    slot_rows: dict  # slot -> list of rows (host), for paths that gather per slot


@dataclass
class Snapshot:
    version: int
    slots: dict  # adapter name -> slot
    tables: dict  # module name -> ModuleTables
    refs: int = 0


class PoolFullError(RuntimeError):
    """The pool cannot hold an adapter: every resident adapter that could make room is pinned or in use."""


class AdapterPool:
    """Slots, rows, host copies and snapshots for a set of module pools."""

    def __init__(self, max_slots: int, rows_per_module: int, dtype, device):
        if max_slots < 1:
            raise ValueError(f"AdapterPool: max_slots={max_slots} must be >= 1")
        if rows_per_module < 1:
            raise ValueError(f"AdapterPool: rows_per_module={rows_per_module} must be >= 1")
        self.max_slots, self.rows_per_module = max_slots, rows_per_module
        self.dtype, self.device = dtype, torch.device(device)
        self.modules: dict[str, ModulePool] = {}
        self.adapters: dict[str, HostAdapter] = {}
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self._pending: list = []  # (version, adapter rows, slot): freed once no older snapshot is in use
        self._clock = itertools.count(1)
        self._versions = itertools.count(1)
        self._cond = threading.Condition(threading.RLock())
        self._live: list[Snapshot] = []  # snapshots some batch holds
        self.current = self._build_snapshot()

    # -- modules ----------------------------------------------------------------------------------

    def add_modules(self, pools: dict[str, ModulePool]) -> None:
        """Add new module pools (their rows empty: no snapshot references them until an adapter is placed)."""
        with self._cond:
            clash = [m for m in pools if m in self.modules]
            if clash:
                raise ValueError(f"AdapterPool.add_modules: module {clash[0]!r} already has a pool")
            self.modules.update(pools)

    def remove_modules(self, names: list) -> None:
        """Remove pools no adapter has rows in (undoing add_modules)."""
        with self._cond:
            for m in names:
                if any(m in a.modules for a in self.adapters.values()):
                    raise ValueError(f"AdapterPool.remove_modules: adapters still have rows in module {m!r}")
                self.modules.pop(m, None)

    # -- adapters on the host -------------------------------------------------------------------

    def check_new(self, name: str) -> None:
        """ValueError when an adapter of that name is already loaded."""
        with self._cond:
            if name in self.adapters:
                raise ValueError(f"MultiLoRA: an adapter named {name!r} is already loaded; unload it first")

    def register(self, adapter: HostAdapter) -> None:
        """Add a loaded adapter (not yet resident). Its modules must have pools with room for its ranks."""
        with self._cond:
            self.check_new(adapter.name)
            for m, (A, B, _) in adapter.modules.items():
                pool = self.modules[m]
                if A.shape[0] > pool.capacity:
                    raise PoolFullError(f"MultiLoRA: adapter {adapter.name!r} has rank {A.shape[0]} in module {m!r}, "
                                        f"above the pool's {pool.capacity} rows per module")
            self.adapters[adapter.name] = adapter

    def remove(self, name: str) -> None:
        with self._cond:
            adapter = self.adapters.pop(name)
            if adapter.slot >= 0:
                self._evict(adapter)
                self._publish()

    # -- residency ------------------------------------------------------------------------------

    def acquire(self, names: set) -> Snapshot:
        """Makes every adapter in `names` resident (evicting the least recently used unpinned ones
        when the pool is full) and returns the current snapshot, held until release()."""
        with self._cond:
            missing = [n for n in names if self.adapters[n].slot < 0]
            if missing:
                for n in sorted(missing, key=lambda n: self.adapters[n].last_used):
                    self._make_resident(self.adapters[n], keep=names)
                self._publish()
            tick = next(self._clock)
            for n in names:
                self.adapters[n].last_used = tick
            snap = self.current
            snap.refs += 1
            if snap not in self._live:
                self._live.append(snap)
            return snap

    def release(self, snap: Snapshot) -> None:
        with self._cond:
            snap.refs -= 1
            if snap.refs == 0 and snap is not self.current:
                self._live.remove(snap)
            self._reclaim()
            self._cond.notify_all()

    def pin(self, name: str, pinned: bool = True) -> None:
        with self._cond:
            adapter = self.adapters[name]
            if pinned and adapter.slot < 0:
                self._make_resident(adapter, keep={name})
                self._publish()
            adapter.pinned = pinned

    def _make_resident(self, adapter: HostAdapter, keep: set) -> None:
        while True:
            self._reclaim()
            need = {m: A.shape[0] for m, (A, _, _) in adapter.modules.items()}
            short = [m for m, r in need.items() if len(self.modules[m].free) < r]
            if not short and self._free_slots:
                break
            victims = sorted((a for a in self.adapters.values()
                              if a.slot >= 0 and not a.pinned and a.name not in keep and a is not adapter),
                             key=lambda a: a.last_used)
            useful = [a for a in victims if not self._free_slots or any(a.rows.get(m) for m in short)]
            if useful:
                self._evict(useful[0])
                self._publish()
                continue
            if self._pending:  # rows of evicted adapters that a running batch still reads: wait for it
                self._cond.wait(timeout=10.0)
                continue
            where = (f"module {short[0]!r} needs {need[short[0]]} rows and has {len(self.modules[short[0]].free)} "
                     f"free of {self.modules[short[0]].capacity}") if short else \
                f"all {self.max_slots} slots are taken"
            blocked = sorted(a.name for a in self.adapters.values() if a.slot >= 0)
            raise PoolFullError(f"MultiLoRA: cannot make adapter {adapter.name!r} resident: {where}, and every "
                                f"resident adapter ({', '.join(blocked) or 'none'}) is pinned or used by this batch")
        rows = {}
        for m, (A, B, _) in adapter.modules.items():
            pool = self.modules[m]
            r = A.shape[0]
            rows[m] = [pool.free.pop() for _ in range(r)]
            pool.write(rows[m], A, B)  # rows no snapshot references: invisible until published
        adapter.rows = rows
        adapter.slot = self._free_slots.pop()

    def _evict(self, adapter: HostAdapter) -> None:
        # The rows and slot return to the free lists once every batch that might read them is done.
        self._pending.append((next(self._versions), adapter.rows, adapter.slot))
        adapter.rows, adapter.slot = {}, -1

    def _reclaim(self) -> None:
        oldest = min((s.version for s in self._live if s.refs > 0), default=None)
        keep = []
        for version, rows, slot in self._pending:
            if oldest is None or oldest >= version:
                for m, rs in rows.items():
                    self.modules[m].free.extend(reversed(rs))
                self._free_slots.append(slot)
            else:
                keep.append((version, rows, slot))
        self._pending = keep

    # -- snapshots --------------------------------------------------------------------------------

    def _publish(self) -> None:
        self.current = self._build_snapshot()
        self._live = [s for s in self._live if s.refs > 0]

    def _build_snapshot(self) -> Snapshot:
        N = self.max_slots
        resident = {a.name: a for a in self.adapters.values() if a.slot >= 0}
        tables = {}
        for m in self.modules:
            counts = [0] * N
            scales = [0.0] * N
            slot_rows = {}
            for a in resident.values():
                rows = a.rows.get(m)
                if rows:
                    counts[a.slot] = len(rows)
                    scales[a.slot] = a.modules[m][2]
                    slot_rows[a.slot] = rows
            row_ptr = [0]
            for c in counts:
                row_ptr.append(row_ptr[-1] + c)
            row_idx = [r for s in range(N) for r in slot_rows.get(s, ())]
            tables[m] = ModuleTables(
                row_ptr=_to_device(torch.tensor(row_ptr, dtype=torch.int32), self.device),
                row_idx=_to_device(torch.tensor(row_idx, dtype=torch.int32), self.device),
                scales=_to_device(torch.tensor(scales, dtype=torch.float32), self.device),
                slot_rows=slot_rows)
        return Snapshot(version=next(self._versions), slots={n: a.slot for n, a in resident.items()}, tables=tables)

    # -- reporting --------------------------------------------------------------------------------

    def resident(self) -> list:
        with self._cond:
            return sorted(a.name for a in self.adapters.values() if a.slot >= 0)

    def device_bytes(self) -> int:
        return sum(p.A_rows.numel() * p.A_rows.element_size() + p.B_rows.numel() * p.B_rows.element_size()
                   for p in self.modules.values())


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
