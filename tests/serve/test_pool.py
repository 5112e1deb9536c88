"""The serving pool's failure paths: a call that raises leaves the server exactly as it was (same
adapters, same residency, same outputs bit for bit) and nothing leaks (rows, slots, snapshots), under
deliberate interleavings of load, unload, pin and serve, and under seeded random churn.

Interleavings are held at chosen points, never timed: a batch stops inside its forward (a forward
pre-hook that waits on an Event) and so keeps its snapshot; the pool's Condition is swapped for one
that reports which thread waits on it, so a test knows when an acquire (or a pin) is blocked in the
pool before it acts. Every wait has a timeout that fails the test.
"""
import random
import threading

import pytest
import torch

import pylora
from tests.models import ids, randomize_lora, tiny_llama

VOCAB = 128
TIMEOUT = 30.0  # seconds; only reached when a test is broken
RANK4 = ["a", "b", "c", "d", "e"]  # rank 4 in q_proj and v_proj: two of them fill an 8-row pool


def make_base():
    return tiny_llama(seed=0, vocab=VOCAB)


def make_adapter(seed, r=4, targets=("q_proj", "v_proj")):
    model = make_base()
    pylora.inject(model, pylora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    return randomize_lora(model, seed=seed, std=0.2)


# name -> (rank, targets); the churn test's mix: different ranks and modules.
CHURN = {"a": (4, ("q_proj", "v_proj")), "b": (4, ("q_proj", "v_proj")), "c": (4, ("q_proj", "v_proj")),
         "d": (2, ("q_proj",)), "e": (8, ("v_proj", "o_proj")), "f": (4, ("o_proj", "q_proj"))}


@pytest.fixture(scope="module")
def adapters(one_thread):
    return {n: make_adapter(seed=i + 1, r=r, targets=t) for i, (n, (r, t)) in enumerate(CHURN.items())}


X = ids(batch=3, seq=6, vocab=VOCAB, seed=7)


def logits(server, names, x=None):
    x = X[:len(names)] if x is None else x
    return server(input_ids=x, adapter_names=list(names)).logits


@pytest.fixture(scope="module")
def expected(adapters):
    """Each adapter served alone (all rows) in a fresh server holding only it."""
    out = {}
    for n, model in adapters.items():
        server = pylora.MultiLoRA(make_base())
        server.load_adapter(n, model)
        out[n] = logits(server, [n] * X.shape[0])
    return out


# -- instruments ------------------------------------------------------------------------------------


class WatchedCondition(threading.Condition):
    """The pool's Condition, reporting which threads have waited on it."""

    def __init__(self):
        super().__init__(threading.RLock())
        self._waiting = {}
        self._guard = threading.Lock()

    def event(self, thread):
        with self._guard:
            return self._waiting.setdefault(thread.name, threading.Event())

    def wait(self, timeout=None):
        self.event(threading.current_thread()).set()
        return super().wait(timeout)

    def wait_for_waiter(self, thread):
        """Until `thread` is blocked in the pool: it set the event holding the lock, and cond.wait
        releases the lock, so whatever the caller does next under the lock happens while it waits."""
        assert self.event(thread).wait(TIMEOUT), f"{thread.name} never waited in the pool"


def watched(server):
    server.pool._cond = WatchedCondition()
    return server.pool._cond


class Call:
    """fn() in its own thread; join() returns its result or raises its exception."""

    def __init__(self, fn, name):
        self.value = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as exc:  # handed to join()
            self.error = exc

    def join(self):
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), f"{self.thread.name} did not finish"
        if self.error is not None:
            raise self.error
        return self.value


class Held:
    """A batch serving `names` that stops inside its forward (so it holds its snapshot) until release()."""

    def __init__(self, server, names, name="held"):
        self.go, self.entered, self.name = threading.Event(), threading.Event(), name
        self._handle = server.model.model.layers[0].register_forward_pre_hook(self._hook)
        self.call = Call(lambda: logits(server, names), name)
        assert self.entered.wait(TIMEOUT), "the held batch never reached its forward"

    def _hook(self, module, args):
        if threading.current_thread().name == self.name:  # (self.call may not be set yet)
            self.entered.set()
            if not self.go.wait(TIMEOUT):
                raise TimeoutError("the held batch was never released")

    def release(self):
        self.go.set()
        try:
            return self.call.join()
        finally:
            self._handle.remove()


def server_with(adapters, names, **kw):
    server = pylora.MultiLoRA(make_base(), **kw)
    for n in names:
        server.load_adapter(n, adapters[n])
    return server


def check_pool(server, adapters_loaded, resident):
    """The server's state after a call: the adapters and residency given, the pool's accounting whole
    (every row and slot free, pending or owned by exactly one resident adapter, the published snapshot
    equal to the residency), and nothing held or pending once no batch runs."""
    assert server.adapters == sorted(adapters_loaded)
    assert server.resident_adapters() == sorted(resident)
    assert server.pool.audit(idle=True) == []


def check_alone(server, want):
    """Serving each adapter alone gives `want[name]` bit for bit."""
    for n, out in want.items():
        got = logits(server, [n] * out.shape[0])
        assert torch.equal(got, out), n


def full_rank4(adapters, capacity_rows=8, **kw):
    """a, b and c loaded into 8-row pools, a and b resident (the pools full), outputs of a and b recorded."""
    server = server_with(adapters, ["a", "b", "c"], capacity_rows=capacity_rows, **kw)
    logits(server, ["a", "b"])
    before = {n: logits(server, [n] * 3) for n in ("a", "b")}
    assert server.resident_adapters() == ["a", "b"]
    return server, before


def test_audit_finds_what_is_wrong(adapters):
    # The invariant checker the other tests rely on can fail: leaked, doubly owned and unpublished rows.
    server, _ = full_rank4(adapters)
    pool = server.pool
    assert pool.audit(idle=True) == []
    q = pool.modules["model.layers.0.self_attn.q_proj"]
    q.free.append(pool.adapters["a"].rows["model.layers.0.self_attn.q_proj"][0])
    assert any("belongs to free and adapter 'a'" in p for p in pool.audit())
    q.free.pop()
    stolen = pool._free_slots.pop()
    assert any(f"slots [{stolen}] are neither free, pending nor owned (leaked)" in p for p in pool.audit())
    pool._free_slots.append(stolen)
    pool.adapters["c"].slot, pool.adapters["c"].rows = stolen, {}
    problems = pool.audit()
    assert any("the published snapshot has slots" in p for p in problems)
    assert any("adapter 'c' owns rows that are not its ranks" in p for p in problems)
    pool.adapters["c"].slot = -1
    assert pool.audit() == []
    snap = pool.acquire({"a"})
    assert pool.audit() == [] and pool.audit(idle=True) == [f"snapshots still held: versions [{snap.version}]"]
    pool.release(snap)
    assert pool.audit(idle=True) == []


# -- the three defects ------------------------------------------------------------------------------


def outcome(call):
    """The exception call.join() raises (None when it returns)."""
    try:
        call.join()
    except Exception as exc:
        return exc
    return None


@pytest.mark.parametrize("waiter", ["batch", "pin"])
def test_unload_while_waiting_for_rows_leaks_nothing(adapters, expected, waiter):
    # Defect 1: a holds the snapshot in which b owns the other 8 rows; making c resident evicts b and
    # waits for those rows; c is unloaded meanwhile. The waiter must fail and give b its rows back,
    # not place c (whose rows and slot nothing would ever free).
    server, before = full_rank4(adapters)
    cond = watched(server)
    held = Held(server, ["a"])
    if waiter == "batch":
        wait = Call(lambda: logits(server, ["c"]), "waiter")
    else:
        wait = Call(lambda: server.pin("c"), "waiter")
    cond.wait_for_waiter(wait.thread)
    server.unload_adapter("c")
    assert torch.equal(held.release(), expected["a"][:1])
    error = outcome(wait)
    out = logits(server, ["a", "b", "a"])  # what served before the failure still fits
    assert torch.equal(out[0], before["a"][0]) and torch.equal(out[1], before["b"][1])
    if waiter == "batch":
        assert isinstance(error, ValueError) and "adapter 'c' was unloaded while this batch waited" in str(error)
    else:
        assert isinstance(error, KeyError) and "MultiLoRA.pin: adapter 'c' was unloaded while this pin waited" \
            in str(error)
    check_pool(server, ["a", "b"], ["a", "b"])
    check_alone(server, before)


def test_batch_too_big_for_the_pool_changes_nothing(adapters, expected):
    # Defect 2: c, d and e need 12 rows of 8. Refused before anything moves: a and b stay resident,
    # and nothing half-placed stays outside the published snapshot.
    server = server_with(adapters, ["a", "b", "c"], capacity_rows=8)
    server.load_adapter("d", make_adapter(seed=11))
    server.load_adapter("e", make_adapter(seed=12))
    logits(server, ["a", "b"])
    before = {n: logits(server, [n] * 3) for n in ("a", "b")}
    with pytest.raises(pylora.PoolFullError) as info:
        logits(server, ["c", "d", "e"])
    assert server.resident_adapters() == ["a", "b"]
    check_alone(server, before)
    assert torch.equal(logits(server, ["c"] * 3), expected["c"])  # c alone fits, evicting a
    assert server.resident_adapters() == ["b", "c"]
    assert "cannot make adapters 'c', 'd', 'e' resident: module 'model.layers.0.self_attn.q_proj' needs 12 " \
           "rows, more than the 8 it holds" in str(info.value)
    check_pool(server, list("abcde"), ["b", "c"])


def test_adapter_names_as_a_string_is_refused(adapters):
    server = server_with(adapters, ["a"])
    server.load_adapter("alice", adapters["b"])
    for names, rows in (("alice", 5), ("a", 1)):  # a one-row batch would otherwise be served with 'a'
        with pytest.raises(ValueError, match=rf"adapter_names='{names}' is a string; give one adapter name "
                                             rf"\(or None\) per row, e.g\. adapter_names=\['{names}'\]"):
            server(input_ids=ids(batch=rows, seq=4, vocab=VOCAB), adapter_names=names)
    with pytest.raises(ValueError, match=r"adapter_names=b'a' is a string"):
        server(input_ids=ids(batch=1, seq=4, vocab=VOCAB), adapter_names=b"a")
    check_pool(server, ["a", "alice"], [])


# -- other failures leave everything as it was ------------------------------------------------------


def test_pinned_pool_refuses_and_changes_nothing(adapters, expected):
    server, before = full_rank4(adapters)
    server.pin("a")
    server.pin("b")
    with pytest.raises(pylora.PoolFullError, match=r"cannot make adapter 'c' resident: module "
                                                   r"'model\.layers\.0\.self_attn\.q_proj' needs 4 rows and has 0 free "
                                                   r"of 8, and every resident adapter holding the other 8 \(a, b\) is "
                                                   r"pinned or used by this batch"):
        logits(server, ["c", None])
    with pytest.raises(pylora.PoolFullError, match=r"cannot make adapter 'c' resident: .* \(a, b\) is pinned$"):
        server.pin("c")
    check_pool(server, ["a", "b", "c"], ["a", "b"])
    check_alone(server, before)
    # One pinned and one in the batch: still no room, still nothing changed.
    server.unpin("b")
    with pytest.raises(pylora.PoolFullError, match=r"holding the other 8 \(a, b\) is pinned or used by this batch"):
        logits(server, ["c", "b"])
    check_pool(server, ["a", "b", "c"], ["a", "b"])
    check_alone(server, before)
    assert torch.equal(logits(server, ["c"] * 3), expected["c"])
    check_pool(server, ["a", "b", "c"], ["a", "c"])


def test_no_free_slot_refuses_and_changes_nothing(adapters, expected):
    server, before = full_rank4(adapters, capacity_rows=16, max_adapters=2)
    server.pin("a")
    server.pin("b")
    with pytest.raises(pylora.PoolFullError, match=r"cannot make adapter 'c' resident: it needs 1 slot and has 0 "
                                                   r"free of 2, and every resident adapter holding the others "
                                                   r"\(a, b\) is pinned or used by this batch"):
        logits(server, ["c"])
    check_pool(server, ["a", "b", "c"], ["a", "b"])
    check_alone(server, before)
    server.unpin("a")
    assert torch.equal(logits(server, ["c"] * 3), expected["c"])
    check_pool(server, ["a", "b", "c"], ["b", "c"])


def test_device_error_while_writing_rows_rolls_back(adapters, expected, monkeypatch):
    # c takes b's rows (reclaimed at once: no batch holds them); the second module's write fails after
    # the first overwrote b's rows there. b must come back with its own data, a untouched.
    server, before = full_rank4(adapters)
    writes = [0]
    real_write = pylora.serve.pool.ModulePool.write

    def failing_write(self, rows, A, B):
        writes[0] += 1
        if writes[0] == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        real_write(self, rows, A, B)

    monkeypatch.setattr(pylora.serve.pool.ModulePool, "write", failing_write)
    with pytest.raises(RuntimeError, match="simulated"):
        logits(server, ["c", "a"])
    check_pool(server, ["a", "b", "c"], ["a", "b"])
    check_alone(server, before)
    monkeypatch.setattr(pylora.serve.pool.ModulePool, "write", real_write)
    assert torch.equal(logits(server, ["c"] * 3), expected["c"])


# -- interleavings held at chosen points ------------------------------------------------------------


def hold_a_then_wait(server, names):
    """Holds a batch of adapter a mid-forward, then starts a batch of `names` in a thread and returns
    once that batch waits for rows: (the watched condition, the held batch, the waiting call)."""
    cond = watched(server)
    held = Held(server, ["a"])
    wait = Call(lambda: logits(server, names), "waiter")
    cond.wait_for_waiter(wait.thread)
    return cond, held, wait


def test_unload_of_the_wanted_adapter_fails_the_waiter_at_once(adapters, expected):
    # The waiter notices the unload when it happens, not when the held batch ends, and gives b its
    # rows back while the held batch still reads them (their data never changed).
    server, before = full_rank4(adapters)
    _, held, wait = hold_a_then_wait(server, ["c"])
    server.unload_adapter("c")
    with pytest.raises(ValueError, match="adapter 'c' was unloaded while this batch waited"):
        wait.join()
    assert server.resident_adapters() == ["a", "b"]
    assert server.pool.audit() == []
    out = logits(server, ["b", "a", "b"])  # served beside the held batch, with b's old rows
    assert torch.equal(out[0], before["b"][0]) and torch.equal(out[1], before["a"][1])
    assert torch.equal(held.release(), expected["a"][:1])
    check_pool(server, ["a", "b"], ["a", "b"])
    check_alone(server, before)


def test_unload_of_a_victim_while_the_acquire_waits(adapters, expected):
    server, _ = full_rank4(adapters)
    _, held, wait = hold_a_then_wait(server, ["c", "a"])
    server.unload_adapter("b")  # the victim: its rows stay pending behind the held batch
    assert wait.thread.is_alive()
    held.release()
    out = wait.join()
    assert torch.equal(out[0], expected["c"][0]) and torch.equal(out[1], expected["a"][1])
    check_pool(server, ["a", "c"], ["a", "c"])


def test_unload_of_the_victim_and_the_wanted_adapter_while_the_acquire_waits(adapters, expected):
    server, before = full_rank4(adapters)
    _, held, wait = hold_a_then_wait(server, ["c"])
    server.unload_adapter("b")
    server.unload_adapter("c")  # the rollback has no victim left to restore
    with pytest.raises(ValueError, match="adapter 'c' was unloaded while this batch waited"):
        wait.join()
    held.release()
    check_pool(server, ["a"], ["a"])
    check_alone(server, {"a": before["a"]})


def test_unload_of_a_resident_adapter_of_the_batch_while_it_waits(adapters, expected):
    # The batch names a (resident) and c (missing); a is unloaded while it waits: roll back.
    server, before = full_rank4(adapters)
    _, held, wait = hold_a_then_wait(server, ["c", "a"])
    server.unload_adapter("a")
    with pytest.raises(ValueError, match="adapter 'a' was unloaded while this batch waited"):
        wait.join()
    assert torch.equal(held.release(), expected["a"][:1])  # its snapshot stayed valid
    check_pool(server, ["b", "c"], ["b"])
    check_alone(server, {"b": before["b"]})


def test_pin_while_an_acquire_waits(adapters, expected):
    server, _ = full_rank4(adapters)
    cond, held, wait = hold_a_then_wait(server, ["c"] * 3)
    server.pin("a")  # resident: no residency change, no waiting
    pin_b = Call(lambda: server.pin("b"), "pin_b")  # b, the victim, is not resident: a change, so it waits
    cond.wait_for_waiter(pin_b.thread)
    assert server.resident_adapters() == ["a"] and wait.thread.is_alive() and pin_b.thread.is_alive()
    held.release()
    assert torch.equal(wait.join(), expected["c"])
    pin_b.join()  # then b evicts c, the only unpinned adapter
    check_pool(server, ["a", "b", "c"], ["a", "b"])
    assert server.pool.adapters["a"].pinned and server.pool.adapters["b"].pinned
    with pytest.raises(pylora.PoolFullError, match=r"\(a, b\) is pinned"):
        logits(server, ["c"])
    check_pool(server, ["a", "b", "c"], ["a", "b"])
    check_alone(server, {n: expected[n] for n in ("a", "b")})


def test_pin_of_the_wanted_adapter_while_the_acquire_waits(adapters, expected):
    server, _ = full_rank4(adapters)
    cond, held, wait = hold_a_then_wait(server, ["c"] * 3)
    pin_c = Call(lambda: server.pin("c"), "pin_c")
    cond.wait_for_waiter(pin_c.thread)
    held.release()
    assert torch.equal(wait.join(), expected["c"])
    pin_c.join()  # c was made resident by the batch: the pin only marks it
    check_pool(server, ["a", "b", "c"], ["a", "c"])
    assert server.pool.adapters["c"].pinned


def test_rows_pending_behind_a_batch_are_waited_for_not_evicted_around(adapters, expected):
    # b's rows are pending behind the held batch once b is unloaded; d waits for them rather than
    # evicting c too (rows evicted now would come free no sooner).
    server, _ = full_rank4(adapters, capacity_rows=12)
    server.load_adapter("d", make_adapter(seed=11))
    logits(server, ["c"])
    cond = watched(server)
    held = Held(server, ["a"])
    server.unload_adapter("b")
    wait = Call(lambda: logits(server, ["d"] * 3), "waiter")
    cond.wait_for_waiter(wait.thread)
    assert server.resident_adapters() == ["a", "c"]
    held.release()
    wait.join()
    check_pool(server, ["a", "c", "d"], ["a", "c", "d"])


@pytest.mark.parametrize("second", ["b", "c"])
def test_a_second_change_waits_for_the_first(adapters, expected, second):
    # The first waiter evicted b for c; the second needs a change too (b back: it evicts a, the least
    # recently used; or c: made resident by the first, so no change at all) and waits its turn.
    server, _ = full_rank4(adapters)
    cond = watched(server)
    held = Held(server, ["a"])
    first = Call(lambda: logits(server, ["c"] * 3), "first")
    cond.wait_for_waiter(first.thread)
    second_call = Call(lambda: logits(server, [second] * 3), "second")
    cond.wait_for_waiter(second_call.thread)
    assert server.resident_adapters() == ["a"]  # the second changed nothing while it waited
    held.release()
    assert torch.equal(first.join(), expected["c"])
    assert torch.equal(second_call.join(), expected[second])
    resident = ["b", "c"] if second == "b" else ["a", "c"]
    check_pool(server, ["a", "b", "c"], resident)


def test_unload_while_waiting_for_the_change(adapters, expected):
    # The second waiter waits for the first's change; its adapter is unloaded meanwhile.
    server, before = full_rank4(adapters, capacity_rows=12)
    server.load_adapter("d", make_adapter(seed=11))
    logits(server, ["c"])
    cond = watched(server)
    held = Held(server, ["a"])  # a, b and c resident: 12 rows
    first = Call(lambda: logits(server, ["d"] * 3), "first")
    cond.wait_for_waiter(first.thread)
    second = Call(lambda: logits(server, ["b", "d"]), "second")  # b was first's victim
    cond.wait_for_waiter(second.thread)
    server.unload_adapter("b")
    with pytest.raises(ValueError, match="adapter 'b' was unloaded while this batch waited"):
        second.join()
    held.release()
    first.join()
    check_pool(server, ["a", "c", "d"], ["a", "c", "d"])
    check_alone(server, {"a": before["a"]})


def test_pool_full_after_waiting_for_the_change_changes_nothing(adapters, expected):
    # pin(b) waits for pin(c)'s change; once it is its turn, a and c are pinned and hold every row.
    server, _ = full_rank4(adapters)
    cond = watched(server)
    server.pin("a")
    held = Held(server, ["a"])
    pin_c = Call(lambda: server.pin("c"), "pin_c")  # evicts b, waits for the rows the held batch reads
    cond.wait_for_waiter(pin_c.thread)
    pin_b = Call(lambda: server.pin("b"), "pin_b")
    cond.wait_for_waiter(pin_b.thread)
    held.release()
    pin_c.join()
    with pytest.raises(pylora.PoolFullError, match=r"cannot make adapter 'b' resident: .* \(a, c\) is pinned$"):
        pin_b.join()
    check_pool(server, ["a", "b", "c"], ["a", "c"])
    assert not server.pool.adapters["b"].pinned
    check_alone(server, {n: expected[n] for n in ("a", "c")})


# -- churn ------------------------------------------------------------------------------------------


def test_random_churn_ends_consistent(adapters, expected):
    # Two threads serve batches of loaded adapters (their outputs checked row by row), one loads,
    # unloads, pins and unpins; seeded, a fixed number of steps each. Then the pool's accounting is
    # whole and every adapter left serves as it does alone in a fresh server, bit for bit.
    names = list(CHURN)
    server = server_with(adapters, names[:4], capacity_rows=12, max_adapters=3)
    errors = []

    def serve(seed):
        rng = random.Random(seed)
        for _ in range(80):
            loaded = server.adapters or [None]
            batch = [rng.choice(loaded + [None]) for _ in range(rng.randint(1, 3))]
            try:
                out = logits(server, batch)
            except pylora.PoolFullError:
                continue
            except ValueError as exc:  # named an adapter the churner unloaded: before or while it waited
                if "not loaded" not in str(exc) and "was unloaded" not in str(exc):
                    errors.append(repr(exc))
                continue
            for row, n in enumerate(batch):
                if n is not None and not torch.allclose(out[row], expected[n][row], rtol=1e-5, atol=1e-6):
                    errors.append(f"row {row} ({n}) differs")

    def churn(seed):
        rng = random.Random(seed)
        for _ in range(120):
            n = rng.choice(names)
            op = rng.choice(["load", "load", "unload", "pin", "unpin", "unpin"])
            try:
                if op == "load" and n not in server.adapters:
                    server.load_adapter(n, adapters[n])
                elif op == "unload":
                    server.unload_adapter(n)
                elif op == "pin":
                    server.pin(n)
                elif op == "unpin":
                    server.unpin(n)
            except (pylora.PoolFullError, KeyError):  # full of pinned adapters; not loaded (now)
                pass
            except ValueError as exc:  # loaded by no one else: only this thread loads
                errors.append(repr(exc))

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in (1, 2)]
    threads.append(threading.Thread(target=churn, args=(3,), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "churn did not finish"
    assert not errors, errors[:5]
    assert server.pool.audit(idle=True) == []
    for n in server.adapters:
        server.unpin(n)
    for n in server.adapters:
        assert torch.equal(logits(server, [n] * 3), expected[n]), n
    assert server.pool.audit(idle=True) == []
