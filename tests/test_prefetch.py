"""Prefetch of short items: several items per write to a busy worker, and still exact
accounting when that worker is lost (only the item it was running fails)."""

from __future__ import annotations

import os
import signal
import time
from collections import deque

import psutil
import pytest
import tasks
from conftest import wait_until

import procpool
from procpool import books as pool_module
from procpool.books import Books, Item, Worker
from procpool.future import PoolFuture


@pytest.fixture
def always_prefetch(monkeypatch):
    # The policy prefetches only items seen to be short; make every item count as short so
    # the test does not depend on this machine's speed.
    monkeypatch.setattr(pool_module, "PREFETCH_BELOW", 1e9)
    monkeypatch.setattr(pool_module, "PREFETCH_WINDOW", 1e9)  # and as deep as PREFETCH_MAX allows


def test_short_items_are_prefetched_and_all_answered(always_prefetch):
    with procpool.WorkerPool(min_workers=2, max_workers=2) as pool:
        futs = [pool.submit(tasks.square, i) for i in range(3000)]
        assert [f.result(timeout=30) for f in futs] == [i * i for i in range(3000)]
        st = pool.stats()
        assert st.prefetched > 0 and st.items_done == 3000


def test_long_items_are_not_prefetched():
    with procpool.WorkerPool(min_workers=1, max_workers=1) as pool:
        futs = [pool.submit(tasks.sleep_then, 0.005, i) for i in range(40)]
        assert [f.result(timeout=30) for f in futs] == list(range(40))
        assert pool.stats().prefetched == 0


def test_lost_worker_fails_only_its_running_item_and_requeues_the_rest(always_prefetch, tmp_path):
    mark = tmp_path / "running"
    with procpool.WorkerPool(min_workers=1, max_workers=1) as pool:
        first = pool.submit(tasks.square, 1)  # goes straight to the idle worker
        blocker = pool.submit(tasks.touch_and_wait, str(mark), str(tmp_path / "never"))
        rest = [pool.submit(tasks.square, i) for i in range(50)]  # prefetched behind blocker
        assert first.result(timeout=10) == 1
        wait_until(mark.exists, what="blocker running")
        assert pool.stats().prefetched > 0
        victim = next(w.pid for w in pool.workers() if w.state == "busy")
        os.kill(victim, signal.SIGKILL)
        assert isinstance(blocker.exception(timeout=10), procpool.WorkerLost)
        assert [f.result(timeout=20) for f in rest] == [i * i for i in range(50)]
        st = pool.stats()
        assert st.requeued > 0 and st.lost == 1


def test_cancel_running_of_a_prefetched_item_ends_it_alone(always_prefetch, tmp_path):
    mark, release = tmp_path / "running", tmp_path / "go"
    with procpool.WorkerPool(min_workers=1, max_workers=1) as pool:
        first = pool.submit(tasks.square, 2)
        blocker = pool.submit(tasks.touch_and_wait, str(mark), str(release))
        rest = [pool.submit(tasks.square, i) for i in range(10)]
        first.result(timeout=10)
        wait_until(mark.exists, what="blocker running")
        assert pool.cancel_running(rest[3])
        assert isinstance(rest[3].exception(timeout=0), procpool.ItemCancelled)
        release.touch()
        assert isinstance(blocker.result(timeout=10), int)
        assert [f.result(timeout=10) for i, f in enumerate(rest) if i != 3] == [i * i for i in range(10) if i != 3]
        assert pool.stats().lost == 0


def test_prefetch_respects_max_tasks_per_child(always_prefetch):
    with procpool.WorkerPool(min_workers=1, max_workers=1, max_tasks_per_child=5) as pool:
        pids = [f.result(timeout=30) for f in [pool.submit(tasks.pid_and, i) for i in range(40)]]
        per_pid: dict[int, int] = {}
        for pid, _ in pids:
            per_pid[pid] = per_pid.get(pid, 0) + 1
        assert max(per_pid.values()) <= 5 and len(per_pid) >= 8


@pytest.mark.parametrize("spin", [0.0, 0.01])
def test_worker_spins_for_the_next_item_only_when_asked(spin):
    # A worker whose item came within `spin` of its previous answer polls for the next item
    # that long before it sleeps: each pair of back-to-back items followed by a pause costs it
    # `spin` seconds of CPU while it sits idle (one poll that misses, then it sleeps).
    # A loaded machine may answer the second item of a pair too late for a spin (or give the
    # spinner little of the CPU): with spin, pairs go on until the spins add up (bounded).
    with procpool.WorkerPool(1, 1, spin=spin) as pool:
        proc = psutil.Process(pool.workers()[0].pid)
        before = sum(proc.cpu_times()[:2])
        for pairs in range(1, 301):
            assert pool.submit(tasks.square, pairs).result(timeout=30) == pairs * pairs
            assert pool.submit(tasks.square, pairs).result(timeout=30) == pairs * pairs
            time.sleep(0.03)
            spent = sum(proc.cpu_times()[:2]) - before
            if spin and spent >= 0.06 or not spin and pairs == 20:
                break
        # CPU times come in clock ticks (10 ms): 20 spins of 10 ms are about 20 ticks.
        if spin:
            assert spent >= 0.06, (pairs, spent)
        else:
            assert spent < 0.06, spent


def test_spin_is_validated():
    for bad in (-1, 0.5, "fast"):
        with pytest.raises((ValueError, TypeError), match="spin"):
            procpool.WorkerPool(0, 1, spin=bad)


def test_function_pickles_are_cached_only_where_they_cannot_change():
    # Module-level functions travel as cached references; a bound method carries its
    # instance's state, and a closure (cloudpickle) its cells: both must be pickled afresh.
    from procpool import protocol

    counter = tasks.Counter()
    with procpool.WorkerPool(1, 1) as pool:
        assert pool.submit(tasks.square, 3).result(timeout=30) == 9
        assert tasks.square in protocol._function_pickles
        assert pool.submit(tasks.square, 4).result(timeout=30) == 16
        for value in (1, 2, 3):
            counter.value = value
            assert pool.submit(counter.get).result(timeout=30) == value
        assert not any(isinstance(k, type(counter.get)) for k in protocol._function_pickles)
        try:
            import cloudpickle  # noqa: F401
        except ImportError:
            return
        for value in (5, 6):
            assert pool.submit(lambda v=value: v * 10).result(timeout=30) == value * 10

            def closure(v=value):
                return v + 1

            assert pool.submit(closure).result(timeout=30) == value + 1


def test_large_calls_and_results_do_not_deadlock_prefetch(always_prefetch, tmp_path):
    # Short items with 8 KiB arguments and results: prefetching 32 of them would be 256 KiB
    # for a 64 KiB pipe. The arbiter then blocked writing while the worker blocked sending a
    # result the arbiter was not reading: a deadlock. Prefetch is now bounded in bytes.
    release = tmp_path / "release"
    big = b"x" * 8192
    with procpool.WorkerPool(2, 2) as pool:
        blockers = [pool.submit(tasks.wait_for_file, str(release), i) for i in range(2)]
        futs = [pool.submit(tasks.identity, big) for _ in range(200)]
        release.touch()
        assert [f.result(timeout=30) for f in blockers] == [0, 1]
        assert all(f.result(timeout=30) == big for f in futs)
        assert pool.stats().prefetched > 0  # it still prefetched, within the byte bound


def _books_with_busy_worker(items: int) -> tuple[Books, Worker]:
    """The books alone (pure logic, no process): one busy worker, ``items`` waiting."""
    from procpool.config import PoolConfig

    cfg = PoolConfig.build(
        1, 1, 300.0, title_prefix="kworker", title=None, linger_dying=0.0, max_tasks_per_child=None,
        nice=0, cpus=None, concurrency=None, cpu_intensive_threshold=0.01, spin=0.0,
    )  # fmt: skip
    b = Books(cfg)
    w = Worker.__new__(Worker)
    w.id, w.state, w.current, w.queued, w.nr_done = 0, "busy", None, deque(), 0
    w.cm_blocked = w.cm_intensive = False
    b.workers[0] = w
    b.worklist.extend(Item(i, PoolFuture(), b"x" * 40) for i in range(items))
    return b, w


@pytest.mark.parametrize(
    ("ewma", "expected"),
    [
        (1e-6, pool_module.PREFETCH_MAX),  # tiny items: as deep as PREFETCH_MAX
        (1e-4, int(pool_module.PREFETCH_WINDOW / 1e-4)),  # about PREFETCH_WINDOW of work
        (4e-4, int(pool_module.PREFETCH_WINDOW / 4e-4)),
        (pool_module.PREFETCH_BELOW, 0),  # not short: nothing behind the running item
    ],
)
def test_prefetch_depth_is_bounded_by_count_and_expected_time(ewma, expected):
    b, w = _books_with_busy_worker(5000)
    b.service_ewma = ewma
    with b.lock:
        sent = b.prefetch(w)
    assert len(sent) == len(w.queued) == expected
    assert all(it.future.running() for it in sent) and len(b.worklist) == 5000 - expected
    # Bytes bound: never more unanswered bytes than PREFETCH_BYTES, whatever the depth.
    b, w = _books_with_busy_worker(5000)
    b.service_ewma = 1e-6
    for it in b.worklist:
        it.payload = b"x" * 1000
    with b.lock:
        assert len(b.prefetch(w)) == pool_module.PREFETCH_BYTES // 1000


def test_a_submitter_yields_only_while_the_arbiter_started_no_pass(tmp_path):
    # The heuristic behind Arbiter.yield_if_starved: a submitter queueing behind busy workers
    # lets go of the GIL only if the loop started no pass since it last asked, and never
    # when it runs in the arbiter thread itself (a done-callback that submits).
    mark, release = tmp_path / "running", tmp_path / "go"
    with procpool.WorkerPool(1, 1) as pool:
        arb = pool._arbiter
        answers: list[bool] = []

        def ask_twice_between_passes() -> bool:
            p0 = arb.passes
            arb.starved()  # forget what was seen before
            starved = arb.starved()
            if arb.passes != p0:
                return False  # a pass started in between (start-up's wake-ups): ask again
            answers.append(starved)
            return True

        wait_until(ask_twice_between_passes, what="two questions within one pass")
        assert answers == [True]  # no pass in between: starved (asked from this thread)
        blocker = pool.submit(tasks.touch_and_wait, str(mark), str(release))
        wait_until(mark.exists, what="blocker running")
        before = arb.passes
        pool._wake()  # one more pass, for nothing
        wait_until(lambda: arb.passes > before, what="an arbiter pass")
        assert not arb.starved()  # a pass started since
        seen_in_arbiter: list[bool] = []
        # In the arbiter thread, twice within one pass (a callback runs inside the pass):
        # from any other thread the second answer would be True.
        blocker.add_done_callback(lambda f: seen_in_arbiter.append(arb.starved() or arb.starved()))
        release.touch()
        assert isinstance(blocker.result(timeout=30), int)
        wait_until(lambda: seen_in_arbiter, what="the done-callback")
        assert seen_in_arbiter == [False]  # the arbiter thread never yields to itself
