"""The benchmark harness on methods whose cost the test controls: rounds hold every method once, in
shuffled orders, after warm-up; repeats stop when the medians are stable, at --max-reps or when the
budget is spent; the statistics and the paired differences are right; the limits copy into preallocated
buffers; and the sanity checks raise, naming suite, case, value and floor, on results that cannot be true."""
import json
import math
import random
import time

import pytest
import torch

from pylora.bench import harness as h


def constant(costs, log=None):
    """Self-timed methods: each call returns its method's cost (seconds) and logs (name, k)."""
    def make(name):
        def fn(k):
            if log is not None:
                log.append((name, k))
            return costs[name]
        return fn
    return {name: make(name) for name in costs}


def spin(seconds):
    """Burn this thread's CPU time: a cost the test controls on the thread clock."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def timer(**kw):
    args = dict(clock="wall", warmup=2, min_reps=10, max_reps=200, target_ci=0.02, budget_s=1e9)
    args.update(kw)
    return h.Timer("cpu", **args)


def test_rounds_hold_every_method_once_in_shuffled_orders_after_warmup():
    log = []
    m = timer(warmup=2, min_reps=10).measure(constant({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, log), self_timed=True)
    # Constant costs: every median's interval is empty, so the rounds stop at min_reps (plus 2 warm-up rounds).
    assert m.stopped == "converged" and len(m.rounds) == 10 and len(log) == 12 * 4
    rounds = [log[4 * i:4 * i + 4] for i in range(12)]
    assert all(sorted(n for n, _ in r) == ["a", "b", "c", "d"] for r in rounds)
    assert len({tuple(n for n, _ in r) for r in rounds}) >= 4  # the order changes from round to round
    for name in "abcd":  # k counts each method's own calls (inputs rotate per method)
        assert [k for n, k in log if n == name] == list(range(12))
        assert m[name].n == 10 and m.median(name) == {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}[name]
    # Warm-up calls are not samples: the first two rounds are left out.
    assert sum(len(r[n]) for r in m.rounds for n in r) == 40


def test_round_orders_come_from_the_seed():
    def orders(seed):
        log = []
        timer(seed=seed, min_reps=8).measure(constant(dict.fromkeys("abcde", 1.0), log), self_timed=True)
        return [n for n, _ in log]

    assert orders(1) == orders(1)
    assert orders(1) != orders(2)


def test_setup_runs_before_each_call():
    log = []
    fns = constant({"a": 1.0, "b": 1.0}, log)
    setup = {"a": lambda k: log.append(("setup a", k))}
    timer(warmup=1, min_reps=3).measure(fns, setup=setup, self_timed=True)
    for i, (name, k) in enumerate(log):
        if name == "a":
            assert log[i - 1] == ("setup a", k)
    assert sum(1 for n, _ in log if n == "setup a") == sum(1 for n, _ in log if n == "a") == 4


def test_noisy_methods_run_to_max_reps_and_the_budget_stops_them():
    rng = random.Random(0)
    noisy = {"a": lambda k: 1.0 + rng.random(), "b": lambda k: 2.0 + rng.random()}
    m = timer(target_ci=1e-6, max_reps=30).measure(noisy, self_timed=True)
    assert m.stopped == "max_reps" and m["a"].n == m["b"].n == 30 and not m.stable
    # A spent budget stops the rounds, but never before MIN_SAMPLES samples of every method.
    m = timer(target_ci=1e-6, min_reps=1, budget_s=0.0).measure(noisy, self_timed=True)
    assert m.stopped == "budget" and m["a"].n == h.MIN_SAMPLES
    slow = {"a": lambda k: time.sleep(0.002) or 1.0 + rng.random()}
    t0 = time.monotonic()
    m = timer(target_ci=1e-6, min_reps=3, budget_s=0.05, max_reps=10_000).measure(slow, self_timed=True)
    assert m.stopped == "budget" and 3 <= m["a"].n < 100 and time.monotonic() - t0 < 2


def test_paired_difference_cancels_load_shared_within_a_round():
    rng = random.Random(1)
    load = [rng.uniform(0, 5) for _ in range(100)]  # a round's load hits both methods alike
    fns = {"lora": lambda k: 1.0 + load[k], "base": lambda k: 0.25 + load[k]}
    m = timer(warmup=0, min_reps=40, max_reps=40, target_ci=0.0).measure(fns, self_timed=True)
    d = m.diff("lora", "base")
    assert d.n == 40 and d.median == pytest.approx(0.75) and d.q1 == pytest.approx(0.75) and d.q3 == pytest.approx(0.75)
    assert m["lora"].rel_iqr > 0.5  # while each method alone is all over the place


def test_stats_of_known_samples():
    s = h.Stats.of(range(11, 0, -1))
    assert (s.n, s.median, s.min, s.max) == (11, 6, 1, 11)
    assert (s.q1, s.q3) == (3.5, 8.5)
    assert (s.ci_low, s.ci_high) == (2, 10)  # order statistics n/2 -+ 1.96 sqrt(n)/2, widened outward
    assert s.rel_ci == pytest.approx((10 - 2) / 12)
    few = h.Stats.of([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (few.ci_low, few.ci_high) == (1.0, 5.0)  # below 6 samples: the whole range
    d = h.Stats.of([0.002, 0.001, 0.003]).as_dict("ms")
    assert d["median_ms"] == pytest.approx(2.0) and d["n"] == 3 and d["ci95_ms"] == pytest.approx([1.0, 3.0])
    with pytest.raises(ValueError):
        h.Stats.of([])


def test_real_clock_medians_follow_the_cost(one_thread):
    t = h.Timer("cpu", warmup=1, min_reps=9, target_ci=0.05, budget_s=5.0)
    assert t.clock == "thread"  # auto: one thread, so its CPU time
    m = t.measure({"x1": lambda k: spin(0.0004), "x3": lambda k: spin(0.0012), "x30": lambda k: spin(0.012)})
    assert 2.4 < m.median("x3") / m.median("x1") < 3.6
    assert 24 < m.median("x30") / m.median("x1") < 36
    # A method far faster than the slowest takes several timed calls a round (more samples, same pairing).
    assert m.inner["x30"] == 1 and m.inner["x1"] == t.max_inner
    assert m["x1"].n == t.max_inner * len(m.rounds)


def test_thread_clock_needs_one_thread():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match="one thread"):
            h.Timer("cpu", clock="thread")
        assert h.Timer("cpu").clock == "wall"
        torch.set_num_threads(1)
        assert h.Timer("cpu").clock == "thread"
        t = h.Timer("cpu", clock="thread")
        torch.set_num_threads(2)  # changed after the timer was made: measure refuses too
        with pytest.raises(ValueError, match="one thread"):
            t.measure({"a": lambda k: None})
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="events"):
        h.Timer("cuda", clock="thread")


def test_limits_copy_into_preallocated_buffers():
    seen = {}

    class Recording(h.Timer):
        def measure(self, fns, **kw):
            seen.update(fns)
            return super().measure(fns, **kw)

    t = Recording("cpu", clock="wall", warmup=1, min_reps=3, budget_s=0.2)
    lim = h.measure_limits(t, [torch.bfloat16], copy_bytes=8 << 20, matmul_n=128)
    # The copy probe writes into one existing tensor every call: no fresh allocation (page faults) is timed.
    assert seen["copy"](0).data_ptr() == seen["copy"](1).data_ptr()
    assert set(lim.matmul) == {"float32", "bfloat16"}
    assert lim.copy_Bps >= lim.copy_Bps_median > 0 and lim.read_Bps >= lim.read_Bps_median > 0
    assert lim.bandwidth() == max(lim.copy_Bps, lim.read_Bps)
    assert lim.floor_s(1e9, 0, torch.float32) == pytest.approx(1e9 / lim.bandwidth())
    assert lim.floor_s(0, 1e12, "bfloat16") == pytest.approx(1e12 / lim.matmul["bfloat16"])
    d = lim.as_dict()
    assert d["copy_GBps"] == pytest.approx(lim.copy_Bps / 1e9) and "fp32_matmul_TFLOPs" in d
    # A refresh probes again and keeps the best: limits measured at a busy moment only ever rise.
    lim.copy_Bps, lim.matmul["bfloat16"] = 1.0, 1e30
    lim.refresh(t, budget_s=0.05)
    assert lim.refreshes == 1 and lim.copy_Bps > 1e6 and lim.matmul["bfloat16"] == 1e30


def test_a_result_below_its_floor_raises_naming_suite_case_value_and_floor():
    c = h.Checks("merge")
    assert c.floor("4096x4096 bfloat16 r=16", "addmm", 0.004, 0.004)  # at the floor: possible
    assert c.floor("4096x4096 bfloat16 r=16", "addmm", 0.0037, 0.004)  # within the limits' own noise
    assert not c.floor("4096x4096 float32 r=8", "pylora", 0.001, 0.002, "64 MB at 32 GB/s")
    with pytest.raises(h.SanityError) as exc:
        c.raise_if_failed()
    msg = str(exc.value)
    assert "merge: 4096x4096 float32 r=8: pylora measured 1.000 ms, below its floor 2.000 ms" in msg
    assert "0.50x the floor; 64 MB at 32 GB/s" in msg and "1 of 3 sanity checks failed" in msg
    nan = h.Checks("s")
    assert not nan.floor("c", "m", math.nan, 1.0)


def test_a_model_faster_than_its_base_and_an_impossible_ratio_raise():
    c = h.Checks("multi-model")
    assert c.not_faster_than_base("decode", "MultiLoRA", 0.0104, "the base model alone", 0.0100)
    assert not c.not_faster_than_base("decode", "MultiLoRA", 0.0064, "the base model alone", 0.0100)
    assert not c.within("decode", "adapters used", 9, 1, 8, "one adapter per token allows")
    assert not c.positive("decode", "pylora", 0.0)
    with pytest.raises(h.SanityError) as exc:
        c.raise_if_failed()
    msg = str(exc.value)
    assert ("multi-model: decode: MultiLoRA measured 6.400 ms, faster than the base model alone 10.000 ms "
            "(0.64x; allowed: >= 0.95x)") in msg
    assert "adapters used = 9 is outside [1, 8]" in msg and "3 of 4 sanity checks failed" in msg


def test_a_model_faster_than_its_base_round_after_round_fails_and_noise_does_not():
    rng = random.Random(2)
    load = [rng.uniform(0, 3) for _ in range(50)]
    t = timer(warmup=0, min_reps=12, max_reps=12, target_ci=0.0)
    # Faster than its base in every round (what a benchmark bug looks like): the paired ratio says so.
    m = t.measure({"server": lambda k: 0.64 * (1 + load[k]), "base": lambda k: 1 + load[k]}, self_timed=True)
    c = h.Checks("multi-model")
    assert not c.not_faster_than_base("decode", "MultiLoRA", m.median("server"), "the base model alone",
                                      m.median("base"), ratio=m.ratio("server", "base"))
    assert "0.64x per round, 95% interval 0.64-0.64 over 12 rounds" in c.failures[0]
    # 3% slower on average with load that is not shared within the round: medians may cross, the check holds.
    noisy = t.measure({"server": lambda k: 1.03 * (1 + rng.uniform(0, 1)), "base": lambda k: 1 + rng.uniform(0, 1)},
                      self_timed=True)
    assert c.not_faster_than_base("decode", "MultiLoRA", noisy.median("server"), "the base model alone",
                                  noisy.median("base"), ratio=noisy.ratio("server", "base"))


def test_report_with_a_failed_check_writes_failed_json_and_raises(tmp_path):
    rep = h.Report("merge", "cpu", config={"x": 1})
    rep.add({"case": "a", "pylora_ms": 1.0})
    rep.checks.floor("a", "pylora", 0.001, 0.01)
    path = str(tmp_path / "merge_cpu.json")
    with pytest.raises(h.SanityError):
        rep.finish(path, [("case", "case", "s"), ("pylora_ms", "ms", ".1f")])
    assert not (tmp_path / "merge_cpu.json").exists()
    data = json.loads((tmp_path / "merge_cpu.failed.json").read_text())
    assert data["sanity"]["failures"] and data["rows"][0]["pylora_ms"] == 1.0

    ok = h.Report("merge", "cpu")
    ok.add({"case": "a", "pylora_ms": 1.0})
    ok.checks.floor("a", "pylora", 0.01, 0.001)
    ok.finish(path, [("case", "case", "s")])
    data = json.loads((tmp_path / "merge_cpu.json").read_text())
    assert data["suite"] == "merge" and data["sanity"] == {"checks": 1, "failures": [], "floor_slack": h.FLOOR_SLACK,
                                                          "base_slack": h.BASE_SLACK}
    for key in ("cpu", "threads", "torch", "isa", "logical_cpus", "extension"):
        assert key in data["machine"]


def test_missing_dependency_says_which_and_exits_3(capsys):
    with pytest.raises(h.MissingDependency, match=r"pylora bench train-model: needs pylora_no_such_pkg for the Llama"):
        h.require("pylora_no_such_pkg", "train-model", "the Llama")

    def run(argv):
        h.require("pylora_no_such_pkg", "multi-model", "the Llama")

    assert h.entry(run, []) == h.EXIT_MISSING
    assert "pip install pylora_no_such_pkg" in capsys.readouterr().err
