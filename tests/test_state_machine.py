"""Any sequence of these, in any order: submit, map, cancel, cancel_running, submit_with a
timeout, destroy_idle, SIGKILL of a worker, of the spawner, of the Manager, and close.

After every step the pool's books are consistent; at the end every future has ended within
a bound, each with its result, its function's own exception, a cancellation or a named
procpool error; close() ended; the books add up; no process or table is left.

The suite runs a small number of examples (CHAOS_EXAMPLES, default 30); ``scripts/chaos
--examples N`` runs many more.
"""

from __future__ import annotations

import os
import signal

import hypothesis.strategies as st
import tasks
from conftest import assert_books_add_up, my_segments, run_bounded, wait_until, worker_processes
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import procpool
from procpool import manager, spawner

EXAMPLES = int(os.environ.get("CHAOS_EXAMPLES", "30"))
BOUND = 30.0  # seconds any future or close() may take before it counts as a hang

#: What each kind of call returns when it runs to the end.
CALLS = {
    "square": (tasks.square, (7,), 49),
    "short": (tasks.sleep_then, (0.01, "s"), "s"),
    "long": (tasks.sleep_then, (0.3, "l"), "l"),
    "fails": (tasks.fail, ("own",), None),
}


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ex = procpool.ProcessPoolExecutor(3, idle_timeout=0.2)
        self.futures: list[tuple[object, str]] = []
        self.closed = False

    # -- work ----------------------------------------------------------------------------------

    @precondition(lambda self: not self.closed)
    @rule(kind=st.sampled_from(sorted(CALLS)))
    def submit(self, kind: str) -> None:
        fn, args, _ = CALLS[kind]
        self.futures.append((self.ex.submit(fn, *args), kind))

    @precondition(lambda self: not self.closed)
    @rule(n=st.integers(0, 20), chunksize=st.sampled_from([1, 4]))
    def map(self, n: int, chunksize: int) -> None:
        try:
            assert list(self.ex.map(tasks.square, range(n), timeout=BOUND, chunksize=chunksize)) == [
                i * i for i in range(n)
            ]
        except procpool.ProcpoolError:
            pass  # a worker killed under one of its items: named, and the rest cancelled

    @precondition(lambda self: not self.closed)
    @rule(timeout=st.sampled_from([0.05, 5.0]))
    def submit_with_timeout(self, timeout: float) -> None:
        self.futures.append((self.ex.submit_with(tasks.sleep_then, 0.3, "l", timeout=timeout), "long"))

    @precondition(lambda self: self.futures)
    @rule(data=st.data())
    def cancel(self, data) -> None:
        fut, _ = data.draw(st.sampled_from(self.futures))
        fut.cancel()

    @precondition(lambda self: self.futures)
    @rule(data=st.data())
    def cancel_running(self, data) -> None:
        fut, _ = data.draw(st.sampled_from(self.futures))
        self.ex.cancel_running(fut)

    @precondition(lambda self: not self.closed)
    @rule(n=st.integers(0, 3))
    def destroy_idle(self, n: int) -> None:
        self.ex.pool.destroy_idle(n)

    # -- crashes -------------------------------------------------------------------------------

    @rule(which=st.integers(0, 7))
    def kill_a_worker(self, which: int) -> None:
        # Which workers exist depends on timing: draw an index, not one of them (hypothesis
        # needs the same draws to replay an example).
        pids = sorted(w.pid for w in self.ex.pool.workers())
        if pids:
            _kill(pids[which % len(pids)])

    @rule()
    def kill_the_spawner(self) -> None:
        s = spawner._spawner
        if s is not None:
            _kill(s.pid)

    @rule()
    def kill_the_manager(self) -> None:
        pid = manager.server_pid()
        if pid is not None:
            _kill(pid)

    @precondition(lambda self: not self.closed)
    @rule(cancel_futures=st.booleans())
    def close(self, cancel_futures: bool) -> None:
        _bounded(lambda: self.ex.shutdown(cancel_futures=cancel_futures))
        self.closed = True

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def books_are_consistent(self) -> None:
        s = self.ex.pool.stats()
        assert 0 <= s.nr_idle <= s.nr_workers <= 3, s
        assert s.nr_busy == s.nr_workers - s.nr_idle, s
        assert s.created >= s.destroyed + s.lost, s

    def teardown(self) -> None:
        try:
            for fut, kind in self.futures:
                exc = fut.exception(timeout=BOUND) if not fut.cancelled() else None
                if fut.cancelled():
                    continue
                if exc is None:
                    assert fut.result() == CALLS[kind][2]
                elif kind == "fails" and isinstance(exc, ValueError):
                    pass  # its function's own exception
                else:
                    assert isinstance(exc, procpool.ProcpoolError), repr(exc)
        finally:
            _bounded(self.ex.shutdown)
        assert_books_add_up(self.ex.pool.stats())
        wait_until(lambda: not worker_processes(), timeout=10, what="no worker process left")
        assert my_segments() == []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _bounded(fn) -> None:
    run_bounded(fn, BOUND)


PoolMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
test_any_sequence_ends_every_item_and_leaves_nothing = PoolMachine.TestCase
