"""Workqueue(executor=...): a workqueue on a foreign concurrent.futures Executor keeps what is
its own (max_active, ordered, delayed work, flush, cancel, drain, destroy, its own stats) and
refuses what needs procpool's pools. A thread pool stands in for a foreign executor here (the
Dask cluster is in test_dask.py)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import pytest

from procpool import Workqueue


class Recorder:
    """Calls run in this process's threads: how many run at once, and in which order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.order: list[int] = []

    def run(self, i: int, gate: threading.Event | None = None, hold: float = 0.0) -> int:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.order.append(i)
        try:
            if gate is not None:
                assert gate.wait(30), "gate never opened"
            time.sleep(hold)
            return i * i
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def pool():
    with ThreadPoolExecutor(8) as ex:
        yield ex


def test_max_active_and_stats(pool):
    rec = Recorder()
    with Workqueue("foreign-a", executor=pool, max_active=3) as wq:
        works = [wq.queue(rec.run, i, None, 0.02) for i in range(20)]
        assert wq.flush(timeout=30)
        assert [w.result() for w in works] == [i * i for i in range(20)]
        assert rec.most <= 3 and wq.stats().max_in_flight <= 3
        st = wq.stats()
        assert (st.started, st.completed, st.in_flight, st.pending, st.delayed) == (20, 20, 0, 0, 0)
        assert (st.cpu_time, st.cpu_intensive, st.cm_wakeups) == (0.0, 0, 0)  # procpool's pools only
        assert "on <concurrent.futures.thread.ThreadPoolExecutor" in repr(wq)
    # destroy() left the executor to its owner: it still runs calls.
    assert pool.submit(pow, 2, 3).result(10) == 8


def test_ordered(pool):
    rec = Recorder()
    with Workqueue("foreign-o", executor=pool, ordered=True) as wq:
        works = [wq.queue(rec.run, i, None, 0.005) for i in range(15)]
        assert wq.drain(timeout=30)
    assert rec.order == list(range(15)) and rec.most == 1
    assert all(w.done() for w in works)


def test_delayed_and_mod_delayed(pool):
    with Workqueue("foreign-d", executor=pool) as wq:
        t0 = time.monotonic()
        early = wq.queue_delayed(0.2, time.monotonic)
        late = wq.queue_delayed(0.1, time.monotonic)
        assert wq.mod_delayed(late, 0.4)
        assert wq.flush_work(late) is False  # its timer is still pending: never queued yet
        assert wq.flush_delayed_work(early, timeout=30)
        assert early.result() - t0 >= 0.0  # flushed: queued at once, not waiting for 0.2 s
        assert wq.drain(timeout=30)
        assert late.result() - t0 >= 0.4


def test_cancel_work(pool):
    """Cancelled while waiting in the workqueue, and while handed to the executor but not
    started by it (a one-thread executor busy with the first item): neither ever runs."""
    rec = Recorder()
    gate = threading.Event()
    with ThreadPoolExecutor(1) as one:
        with Workqueue("foreign-c", executor=one, max_active=2) as wq:
            first = wq.queue(rec.run, 0, gate)
            in_executor = wq.queue(rec.run, 1)  # handed to the executor, behind the first
            waiting = wq.queue(rec.run, 2)  # beyond max_active: still the workqueue's
            assert wq.stats().in_flight == 2
            assert wq.cancel_work(waiting) and waiting.cancelled()
            assert wq.cancel_work(in_executor) and in_executor.cancelled()
            assert wq.cancel_work(first) is False  # running: cannot be stopped
            gate.set()
            assert wq.flush_work(first, timeout=30) and first.result() == 0
            with pytest.raises(CancelledError):
                in_executor.result()
            assert wq.drain(timeout=30)
    assert rec.order == [0]


def test_failures_and_refusals(pool):
    with Workqueue("foreign-f", executor=pool) as wq:
        bad = wq.queue(int, "not a number")
        assert isinstance(bad.exception(30), ValueError)
        with pytest.raises(ValueError, match="foreign executor"):
            wq.apply_attrs(nice=1)
    for options, named in [
        ({"nice": 5}, "nice=5"),
        ({"cpus": {0}}, "cpus={0}"),
        ({"max_workers": 4}, "max_workers=4"),
        ({"rescuer": True}, "rescuer=True"),
    ]:
        with pytest.raises(ValueError, match=f"{named}.*need procpool's own worker pools"):
            Workqueue("foreign-r", executor=pool, **options)
    with pytest.raises(TypeError, match="concurrent.futures.Executor"):
        Workqueue("foreign-t", executor=object())
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.queue(print)


def test_destroy_unpublishes_at_once(pool):
    """The workqueue segment procpool ps reads lists a live foreign workqueue and is gone as
    soon as the last workqueue is destroyed (no waiting for the publisher thread)."""
    from conftest import my_segments

    from procpool.idtable import is_wq_segment

    # Any name of ours: -wq, or -wq-<random> if a planted name ever took -wq (test_security).
    wq = Workqueue("foreign-p", executor=pool)
    assert any(is_wq_segment(n) for n in my_segments())
    wq.queue(pow, 2, 2).result(30)
    wq.destroy()
    assert not any(is_wq_segment(n) for n in my_segments())
