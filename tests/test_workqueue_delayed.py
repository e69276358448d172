"""Delayed work items: never early, re-armed and taken back by mod_delayed, cancelled,
flushed now, waited for by destroy."""

from __future__ import annotations

import os
import time
from pathlib import Path

import tasks
from conftest import wait_until

import procpool


def test_delayed_items_never_run_early():
    with procpool.Workqueue("delayed") as wq:
        t0 = time.monotonic()
        delays = [0.3, 0.1, 0.2, 0.0]
        works = [wq.queue_delayed(d, tasks.ran_at) for d in delays]
        for d, w in zip(delays, works, strict=True):
            assert w.result(10) - t0 >= d
        assert wq.flush_work(works[0]) is True


def test_mod_delayed_rearms():
    with procpool.Workqueue("rearm") as wq:
        t0 = time.monotonic()
        sooner = wq.queue_delayed(30.0, tasks.ran_at)
        later = wq.queue_delayed(0.5, tasks.ran_at)
        assert wq.flush_work(sooner) is False  # its timer is pending: nothing to wait for yet
        assert wq.mod_delayed(sooner, 0.1) is True
        assert wq.mod_delayed(later, 0.8) is True
        assert 0.1 <= sooner.result(10) - t0 < 5
        assert later.result(10) - t0 >= 0.8
        assert wq.mod_delayed(later, 1.0) is False  # done: nothing to re-arm
        assert wq.stats().started == 2


def test_mod_delayed_takes_back_a_pending_item(tmp_path):
    mark, release = str(tmp_path / "mark"), str(tmp_path / "release")
    with procpool.Workqueue("rearmpending", ordered=True) as wq:
        first = wq.queue(tasks.touch_and_wait, mark, release)
        waiting = wq.queue(tasks.ran_at)
        wait_until(lambda: os.path.exists(mark), what="first item running")
        # Off the queue, back on a timer; long enough that flush() below certainly returns
        # first, even on a loaded machine.
        t0 = time.monotonic()
        assert wq.mod_delayed(waiting, 3.0) is True
        Path(release).touch()
        first.result(10)
        assert wq.flush(10) is True  # the re-armed item is not queued: flush does not wait for it
        assert not waiting.done()
        assert waiting.result(20) - t0 >= 3.0
        assert wq.stats().started == 2


def test_cancel_delayed_never_runs(tmp_path):
    out = tmp_path / "ran"
    with procpool.Workqueue("canceldelayed") as wq:
        d = wq.queue_delayed(0.2, tasks.ran_at, str(out))
        assert wq.cancel_work(d) is True
        assert d.cancelled()
        time.sleep(0.35)
        assert wq.stats().started == 0
    assert not out.exists()


def test_destroy_waits_for_delayed_items():
    wq = procpool.Workqueue("destroydelayed")
    t0 = time.monotonic()
    d = wq.queue_delayed(0.2, tasks.ran_at)
    wq.destroy()
    assert d.done() and d.result() - t0 >= 0.2
    wq.destroy()  # idempotent


def test_flush_delayed_work_queues_it_now(tmp_path):
    with procpool.Workqueue("flushdelayed") as wq:
        w = wq.queue_delayed(3600, tasks.square, 9)
        t0 = time.monotonic()
        assert wq.flush_delayed_work(w, timeout=30) is True
        assert w.result() == 81 and time.monotonic() - t0 < 30
        assert wq.flush_delayed_work(w) is False  # ended before the call
        d = wq.queue_delayed(3600, tasks.square, 3)
        assert wq.cancel_delayed_work(d) is True and d.cancelled()
        assert wq.stats().delayed == 0
