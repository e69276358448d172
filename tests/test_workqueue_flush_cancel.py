"""Cancel, flush and drain: a cancelled item never runs (or is waited for, with sync),
nothing is lost or run twice when cancel races the start, flush waits for what was queued
before it, drain allows only chained queueing."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import tasks
from conftest import wait_until

import procpool


def test_cancel_pending_never_runs(tmp_path):
    mark, release = str(tmp_path / "mark"), str(tmp_path / "release")
    with procpool.Workqueue("cancel", ordered=True) as wq:
        first = wq.queue(tasks.touch_and_wait, mark, release)
        second = wq.queue(tasks.ran_at, str(tmp_path / "second"))
        third = wq.queue(tasks.square, 3)
        wait_until(lambda: os.path.exists(mark), what="first item running")
        assert wq.cancel_work(second) is True
        assert second.cancelled()
        assert wq.cancel_work(second) is False  # once only
        assert third.cancel() is True  # Future.cancel() goes through the workqueue too
        assert wq.cancel_work(first) is False  # in flight
        Path(release).touch()
        wq.flush()
        assert first.result(0) > 0
        s = wq.stats()
        assert (s.started, s.completed) == (1, 1)
    assert not (tmp_path / "second").exists()


def test_cancel_racing_start_loses_nothing_and_runs_nothing_twice():
    with procpool.Workqueue("cancelrace", max_active=2) as wq:
        works = []
        go = threading.Event()

        def canceller():
            go.wait()
            i = 0
            while i < 300:
                if i < len(works):
                    works[i].cancel()
                    i += 2
                else:
                    time.sleep(0)

        t = threading.Thread(target=canceller)
        t.start()
        go.set()
        for i in range(300):
            works.append(wq.queue(tasks.identity, i))
        t.join(10)
        assert wq.flush(20) is True
        cancelled = [w for w in works if w.cancelled()]
        ran = [w for w in works if not w.cancelled()]
        assert all(w.done() for w in works)
        assert [w.result() for w in ran] == [works.index(w) for w in ran]
        s = wq.stats()
        # Cancelled items include some taken back out of the pool's worklist: handed to the
        # pool, but never run, so counted neither started nor completed.
        assert s.started == s.completed == len(ran)
        assert len(cancelled) + len(ran) == 300


def test_cancel_sync_waits_for_running_item(tmp_path):
    mark = str(tmp_path / "mark")
    with procpool.Workqueue("cancelsync") as wq:
        w = wq.queue(tasks.touch_and_wait, mark, str(tmp_path / "release"))
        wait_until(lambda: os.path.exists(mark), what="item running")
        threading.Timer(0.2, (tmp_path / "release").touch).start()
        t0 = time.monotonic()
        assert wq.cancel_work(w, sync=True) is False
        assert w.done() and not w.cancelled()
        assert time.monotonic() - t0 >= 0.1


def test_flush_waits_for_everything_queued_before(tmp_path):
    with procpool.Workqueue("flush", max_active=2) as wq:
        works = [wq.queue(tasks.sleep_then, 0.05, i) for i in range(6)]
        assert wq.flush(10) is True
        assert all(w.done() for w in works)
        w = wq.queue(tasks.sleep_then, 0.1, "x")
        wq.flush_work(w)
        assert w.done() and w.result() == "x"


def test_flush_is_not_held_by_chained_requeue():
    with procpool.Workqueue("chain", ordered=True) as wq:
        chained: list[Future] = []
        stop = threading.Event()

        def requeue(_f):
            if not stop.is_set():
                chained.append(wq.queue(tasks.sleep_then, 0.02))
                chained[-1].add_done_callback(requeue)

        first = wq.queue(tasks.sleep_then, 0.02)
        first.add_done_callback(requeue)
        assert wq.flush(10) is True  # returns although the chain keeps requeueing
        stop.set()
        wq.drain(10)
        assert first.done()


def test_drain_allows_only_chained_queueing(tmp_path):
    mark, release = str(tmp_path / "mark"), str(tmp_path / "release")
    with procpool.Workqueue("drain") as wq:
        chained: list[Future] = []
        w = wq.queue(tasks.touch_and_wait, mark, release)
        w.add_done_callback(lambda _f: chained.append(wq.queue(tasks.square, 5)))
        wait_until(lambda: os.path.exists(mark), what="item running")
        drainer = threading.Thread(target=wq.drain)
        drainer.start()
        wait_until(lambda: wq.draining, what="drain under way")
        with pytest.raises(RuntimeError, match="draining"):
            wq.queue(tasks.square, 1)
        Path(release).touch()
        drainer.join(10)
        assert not drainer.is_alive()
        assert chained[0].done() and chained[0].result() == 25  # drain waited for the chained item
        assert wq.queue(tasks.square, 2).result(10) == 4  # queueing allowed again after drain
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.queue(tasks.square, 1)


def test_cancel_takes_an_item_back_from_the_pools_worklist(tmp_path):
    # A pool of one worker (its own attributes, so this workqueue makes it): the second item is
    # in flight, handed to the pool, but waits in the pool's worklist behind the first.
    release, mark = tmp_path / "release", tmp_path / "mark"
    with procpool.Workqueue("cancel-inpool", nice=4, max_workers=1) as wq:
        first = wq.queue(tasks.touch_and_wait, str(mark), str(release))
        wait_until(mark.exists, what="the first item running")
        second = wq.queue(tasks.touch_and_wait, str(tmp_path / "second-ran"), str(release))
        third = wq.queue(tasks.square, 7)
        assert wq.stats().in_flight == 3 and wq.pool.stats().nr_pending == 2
        assert wq.cancel_work(second) is True
        assert second.cancelled()
        assert wq.pool.stats().nr_pending == 1  # taken out of the pool's worklist
        assert wq.cancel_work(first) is False  # a worker runs it: cannot be taken back
        release.touch()
        assert first.result(timeout=30) > 0 and third.result(timeout=30) == 49
        assert wq.flush(10)
        assert not (tmp_path / "second-ran").exists()  # it never ran
        s = wq.stats()
        # The cancelled item was handed to the pool but never ran: not started, not completed.
        assert s.in_flight == 0 and s.started == s.completed == 2
