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
holds an older snapshot (until then they are pending). So a batch sees each adapter fully loaded or
not at all, and its snapshot stays valid until it releases it.

Invariant, whenever the pool's lock is free: every row of every module is exactly one of free,
pending, or owned by one resident adapter (slots likewise), and the resident adapters are exactly
those of the published snapshot. `audit()` checks it.

Residency changes are transactions; a call that raises leaves everything as it was:
- Fast path: when every adapter a batch names is resident, it bumps their LRU ticks and takes the
  current snapshot; nothing changes.
- Otherwise it must change residency, and one caller at a time may (`_changing`, under the
  Condition; the others wait for it). pin() of an adapter that is not resident is such a change.
- Feasibility first, before any mutation: rows held by resident adapters that cannot be evicted
  (pinned, or named by this batch) are fixed; when the missing adapters do not fit in the rest of
  some module, or in the slots left, PoolFullError at once.
- Then it evicts the least recently used evictable adapters that help (rows in a module still
  short, or a slot), counting pending rows as coming free: they free no later than rows evicted
  now would (both wait for every older snapshot), so evicting more would only cost residency. The
  victims leave in one published snapshot and their rows become pending; it waits (cond.wait)
  until the rows and slots are free. Only the changer takes rows out of the free lists, so what it
  waits for cannot be taken by anyone else.
- After every wake-up it checks that every adapter it wants is still loaded (the same HostAdapter);
  when one was unloaded, it rolls back and raises AdapterUnloaded. Rollback gives each victim still
  loaded its own rows and slot back (out of the pending entry, or out of the free lists where they
  were reclaimed), rewrites their data from the host copies when a failed placement wrote into
  them, and republishes: the same snapshot contents as before, so the same outputs bit for bit.
  Victims unloaded meanwhile stay gone.
- Placement of every missing adapter happens at the end, under the lock with no waiting between,
  then one publish. When writing rows fails (a device error), the placements are undone (their
  rows and slots back on the free lists in the order they were taken) and the victims restored.
- remove() (unload) publishes, reclaims and wakes every waiter.
A thread that holds a snapshot and asks for a residency change that needs rows that snapshot holds
waits for itself: serving is not re-entrant (MultiLoRA never nests batches).
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import torch

from pylora.serve.batch import to_device


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


@dataclass(eq=False)
class Snapshot:
    version: int
    slots: dict  # adapter name -> slot
    tables: dict  # module name -> ModuleTables
    refs: int = 0


class _Pending:
    """Rows and a slot an eviction gave up: free once no snapshot older than `version` is held."""

    __slots__ = ("rows", "slot", "version")

    def __init__(self, version: int, rows: dict, slot: int):
        self.version, self.rows, self.slot = version, rows, slot


class PoolFullError(RuntimeError):
    """The pool cannot hold an adapter: every resident adapter that could make room is pinned or in use."""


class AdapterUnloaded(KeyError):
    """An adapter a batch (or a pin) names was unloaded by another thread before it became resident."""

    def __init__(self, name: str, during: str):
        super().__init__(name)
        self.name, self.during = name, during

    def __str__(self) -> str:
        return f"adapter {self.name!r} was unloaded while {self.during}"


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
        self._pending: list[_Pending] = []
        self._clock = itertools.count(1)
        self._versions = itertools.count(1)
        self._cond = threading.Condition(threading.RLock())
        self._changing = None  # the thread changing residency (see the module docstring), or None
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
        """Forget an adapter (KeyError when none of that name is loaded). A batch that holds a snapshot
        with it finishes with it; a residency change waiting for it fails and rolls back."""
        with self._cond:
            adapter = self.adapters.pop(name)
            if adapter.slot >= 0:
                self._evict(adapter)
                self._publish()
                self._reclaim()
            self._cond.notify_all()

    # -- residency ------------------------------------------------------------------------------

    def acquire(self, names: set) -> Snapshot:
        """Makes every adapter in `names` resident (evicting the least recently used unpinned ones
        when the pool is full) and returns the current snapshot, held until release().

        Raises PoolFullError (they cannot fit) or AdapterUnloaded (one was unloaded meanwhile), and
        then nothing changed."""
        with self._cond:
            wanted = self._settle(names, "batch")
            tick = next(self._clock)
            for a in wanted.values():
                a.last_used = tick
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
        """Pin (make resident, then never evict) or unpin an adapter. KeyError for an unknown name;
        pinning raises PoolFullError or AdapterUnloaded like acquire(), and then nothing changed."""
        with self._cond:
            if not pinned:
                self.adapters[name].pinned = False
                return
            if name not in self.adapters:
                raise KeyError(name)
            self._settle({name}, "pin")[name].pinned = True

    def _settle(self, names, what: str) -> dict:
        """{name: HostAdapter}, every one resident and in the current snapshot, changing residency
        when needed (one changer at a time). Lock held."""
        wanted = self._wanted(names, f"this {what} started")
        while any(a.slot < 0 for a in wanted.values()):
            if self._changing is None:
                self._changing = threading.get_ident()
                try:
                    self._change(wanted, what)
                finally:
                    self._changing = None
                    self._cond.notify_all()
                break
            self._cond.wait()
            self._check_loaded(wanted, what)
        return wanted

    def _wanted(self, names, during: str) -> dict:
        wanted = {}
        for n in sorted(names):
            a = self.adapters.get(n)
            if a is None:
                raise AdapterUnloaded(n, during)
            wanted[n] = a
        return wanted

    def _check_loaded(self, wanted: dict, what: str) -> None:
        for n, a in wanted.items():
            if self.adapters.get(n) is not a:
                raise AdapterUnloaded(n, f"this {what} waited")

    def _evictable(self, adapter: HostAdapter) -> bool:
        # The one place that says which resident adapters may make room.
        return not adapter.pinned

    def _change(self, wanted: dict, what: str) -> None:
        """Makes the wanted adapters resident as one transaction (see the module docstring). Lock held,
        this thread the changer."""
        missing = sorted((a for a in wanted.values() if a.slot < 0), key=lambda a: (a.last_used, a.name))
        need = {}
        for a in missing:
            for m, (A, _, _) in a.modules.items():
                need[m] = need.get(m, 0) + A.shape[0]
        self._reclaim()
        self._check_fits(wanted, missing, need, what)
        evicted: list = []  # (victim, its pending entry)
        placed: list = []
        written: dict = {}  # module -> rows a placement wrote
        try:
            for v in self._victims(wanted, need, len(missing)):
                evicted.append((v, self._evict(v)))
            if evicted:
                self._publish()
            self._reclaim()
            while not self._room(need, len(missing)):
                self._cond.wait()
                self._check_loaded(wanted, what)
                self._reclaim()
            self._place(missing, placed, written)
            self._publish()
        except BaseException:
            self._unplace(placed)
            self._restore(evicted, written)
            self._publish()
            raise

    def _check_fits(self, wanted: dict, missing: list, need: dict, what: str) -> None:
        """PoolFullError, changing nothing, when the missing adapters cannot fit even with every
        evictable adapter evicted and every pending row reclaimed."""
        fixed = [a for a in self.adapters.values() if a.slot >= 0 and (a.name in wanted or not self._evictable(a))]
        names = ", ".join(repr(a.name) for a in missing)
        head = f"MultiLoRA: cannot make adapter{'s' if len(missing) > 1 else ''} {names} resident: "
        tail = "is pinned" + (" or used by this batch" if what == "batch" else "")
        for m, r in need.items():
            cap = self.modules[m].capacity
            holders = sorted(a.name for a in fixed if a.rows.get(m))
            avail = cap - sum(len(a.rows.get(m, ())) for a in fixed)
            if r > avail:
                if not holders:
                    raise PoolFullError(f"{head}module {m!r} needs {r} rows, more than the {cap} it holds")
                raise PoolFullError(f"{head}module {m!r} needs {r} rows and has {avail} free of {cap}, and every "
                                    f"resident adapter holding the other {cap - avail} ({', '.join(holders)}) {tail}")
        avail = self.max_slots - len(fixed)
        if len(missing) > avail:
            if not fixed:
                raise PoolFullError(f"{head}it needs {len(missing)} slots, more than the {self.max_slots} there are "
                                    "(max_adapters)")
            raise PoolFullError(f"{head}it needs {len(missing)} slot{'s' if len(missing) > 1 else ''} and has "
                                f"{avail} free of {self.max_slots}, and every resident adapter holding the others "
                                f"({', '.join(sorted(a.name for a in fixed))}) {tail}")

    def _victims(self, wanted: dict, need: dict, slots: int) -> list:
        """The least recently used evictable adapters that help, until free and pending rows and
        slots cover the need (_check_fits made sure they can)."""
        short = {m: r - len(self.modules[m].free) - sum(len(p.rows.get(m, ())) for p in self._pending)
                 for m, r in need.items()}
        short_slots = slots - len(self._free_slots) - len(self._pending)
        victims = []
        candidates = sorted((a for a in self.adapters.values()
                             if a.slot >= 0 and a.name not in wanted and self._evictable(a)),
                            key=lambda a: (a.last_used, a.name))
        for a in candidates:
            if short_slots <= 0 and all(v <= 0 for v in short.values()):
                break
            if short_slots > 0 or any(v > 0 and a.rows.get(m) for m, v in short.items()):
                victims.append(a)
                short_slots -= 1
                for m in short:
                    short[m] -= len(a.rows.get(m, ()))
        return victims

    def _room(self, need: dict, slots: int) -> bool:
        return len(self._free_slots) >= slots and all(len(self.modules[m].free) >= r for m, r in need.items())

    def _place(self, missing: list, placed: list, written: dict) -> None:
        """Takes free rows and slots for every missing adapter and writes its factors (rows no
        snapshot references: invisible until published). `placed` and `written` say how far it got."""
        for a in missing:
            a.slot = self._free_slots.pop()
            a.rows = {}
            placed.append(a)
            for m, (A, B, _) in a.modules.items():
                pool = self.modules[m]
                rows = a.rows[m] = [pool.free.pop() for _ in range(A.shape[0])]
                written.setdefault(m, set()).update(rows)
                pool.write(rows, A, B)

    def _unplace(self, placed: list) -> None:
        # In reverse, so the free stacks end as they were.
        for a in reversed(placed):
            for m, rows in reversed(list(a.rows.items())):
                self.modules[m].free.extend(reversed(rows))
            self._free_slots.append(a.slot)
            a.rows, a.slot = {}, -1

    def _restore(self, evicted: list, written: dict) -> None:
        """Gives each victim still loaded its rows and slot back, from its pending entry or, where
        they were reclaimed, from the free lists (no one else took them: only the changer takes free
        rows); rewrites them from the host copy where a placement wrote into them."""
        for v, entry in reversed(evicted):
            if self.adapters.get(v.name) is not v:
                continue  # unloaded meanwhile: its rows stay pending or free
            if entry in self._pending:
                self._pending.remove(entry)
            else:
                for m, rows in entry.rows.items():
                    free = self.modules[m].free
                    for r in rows:
                        free.remove(r)
                self._free_slots.remove(entry.slot)
            try:
                # Reclaimed rows only: no held snapshot references them, so rewriting them is safe.
                for m, rows in entry.rows.items():
                    if written.get(m, set()).intersection(rows):
                        A, B, _ = v.modules[m]
                        self.modules[m].write(rows, A, B)
            except BaseException:  # the device failed again: the victim stays evicted, its rows free
                for m, rows in entry.rows.items():
                    self.modules[m].free.extend(reversed(rows))
                self._free_slots.append(entry.slot)
                continue
            v.rows, v.slot = entry.rows, entry.slot

    def _evict(self, adapter: HostAdapter) -> _Pending:
        # The rows and slot return to the free lists once every batch that might read them is done.
        entry = _Pending(next(self._versions), adapter.rows, adapter.slot)
        self._pending.append(entry)
        adapter.rows, adapter.slot = {}, -1
        return entry

    def _reclaim(self) -> None:
        oldest = min((s.version for s in self._live if s.refs > 0), default=None)
        keep = []
        for entry in self._pending:
            if oldest is None or oldest >= entry.version:
                for m, rs in entry.rows.items():
                    self.modules[m].free.extend(reversed(rs))
                self._free_slots.append(entry.slot)
            else:
                keep.append(entry)
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
                row_ptr=to_device(torch.tensor(row_ptr, dtype=torch.int32), self.device),
                row_idx=to_device(torch.tensor(row_idx, dtype=torch.int32), self.device),
                scales=to_device(torch.tensor(scales, dtype=torch.float32), self.device),
                slot_rows=slot_rows)
        return Snapshot(version=next(self._versions), slots={n: a.slot for n, a in resident.items()}, tables=tables)

    # -- reporting --------------------------------------------------------------------------------

    def resident(self) -> list:
        with self._cond:
            return sorted(a.name for a in self.adapters.values() if a.slot >= 0)

    def audit(self, idle: bool = False) -> list:
        """The pool's invariant, checked (for tests and debugging): a list of what is wrong, empty when
        all is well. Every row of every module is free, pending or owned by one resident adapter,
        exactly once (slots likewise); a resident adapter owns its rank in each of its modules; the
        published snapshot holds exactly the resident adapters, with their rows and scales.
        idle=True adds what holds once no batch runs: no snapshot held, nothing pending, no change."""
        with self._cond:
            problems = []
            resident = {n: a for n, a in self.adapters.items() if a.slot >= 0}
            for n, a in self.adapters.items():
                if a.slot < 0 and a.rows:
                    problems.append(f"adapter {n!r} is not resident but owns rows")
                if a.slot >= 0 and {m: len(r) for m, r in a.rows.items()} != \
                        {m: A.shape[0] for m, (A, _, _) in a.modules.items()}:
                    problems.append(f"adapter {n!r} owns rows that are not its ranks")
            for m, pool in self.modules.items():
                owners = [("free", r) for r in pool.free]
                owners += [(f"pending v{p.version}", r) for p in self._pending for r in p.rows.get(m, ())]
                owners += [(f"adapter {n!r}", r) for n, a in resident.items() for r in a.rows.get(m, ())]
                problems += _partition(f"module {m!r} row", owners, pool.capacity)
            owners = [("free", s) for s in self._free_slots] + [(f"pending v{p.version}", p.slot) for p in self._pending]
            owners += [(f"adapter {n!r}", a.slot) for n, a in resident.items()]
            problems += _partition("slot", owners, self.max_slots)
            snap = self.current
            if snap.slots != {n: a.slot for n, a in resident.items()}:
                problems.append(f"the published snapshot has slots {snap.slots}, the resident adapters "
                                f"{ {n: a.slot for n, a in resident.items()} }")
            for m, tables in snap.tables.items():
                want = {a.slot: a.rows[m] for a in resident.values() if a.rows.get(m)}
                if tables.slot_rows != want:
                    problems.append(f"the published snapshot's rows in module {m!r} are not the resident adapters'")
                for a in resident.values():
                    if a.rows.get(m) and float(tables.scales[a.slot]) != float(torch.tensor(a.modules[m][2],
                                                                                         dtype=torch.float32)):
                        problems.append(f"the published snapshot's scale of {a.name!r} in module {m!r} is wrong")
            if idle:
                held = [s.version for s in self._live if s.refs > 0]
                if held:
                    problems.append(f"snapshots still held: versions {held}")
                if self._pending:
                    problems.append(f"{len(self._pending)} evictions still pending")
                if self._changing is not None:
                    problems.append("a residency change is still in progress")
            return problems

    def device_bytes(self) -> int:
        return sum(p.A_rows.numel() * p.A_rows.element_size() + p.B_rows.numel() * p.B_rows.element_size()
                   for p in self.modules.values())


def _partition(what: str, owners: list, count: int) -> list:
    """Problems unless every index in range(count) has exactly one owner: [(owner, index)]."""
    by_index: dict = {}
    for owner, i in owners:
        by_index.setdefault(i, []).append(owner)
    problems = [f"{what} {i} belongs to {' and '.join(o)}" for i, o in sorted(by_index.items()) if len(o) > 1]
    problems += [f"{what} {i} is out of range [0, {count})" for i in sorted(by_index) if not 0 <= i < count]
    lost = [i for i in range(count) if i not in by_index]
    if lost:
        problems.append(f"{what}s {lost} are neither free, pending nor owned (leaked)")
    return problems

