"""The rescuer (issue 3, forward progress): a workqueue with ``rescuer=True`` keeps running its
items when its pool cannot create workers; one without it waits until creation works again."""

from __future__ import annotations

import time

import psutil
import pytest
import tasks
from conftest import alive, title_of, wait_until

import procpool
from procpool import faults


def _refuse_new_workers(wq: procpool.Workqueue) -> None:
    """From now on the OS "refuses" every new worker of ``wq``'s (fresh, empty) pool."""
    assert wq.pool.stats().nr_workers == 0
    wq.pool.fault_spec.update(faults.parse("create.start=raise"))


def test_rescuer_runs_items_when_no_worker_can_be_created():
    wq = procpool.Workqueue("resc-test", rescuer=True)
    try:
        rescuer_pid = wq.rescuer_pool.workers()[0].pid
        # The title is set by the new process itself: wait for it to show.
        wait_until(lambda: title_of(rescuer_pid) == "kworker/R-resc-test", what="the rescuer's title")
        _refuse_new_workers(wq)
        works = [wq.queue(tasks.pid_and, i * i) for i in range(5)]
        results = [w.result(timeout=10) for w in works]
        assert [v for _, v in results] == [i * i for i in range(5)]
        for pid, _ in results:
            assert pid == rescuer_pid
            assert psutil.Process(pid).cmdline()[0] == "kworker/R-resc-test"
        s = wq.stats()
        assert s.rescued == 5 and s.mayday > 0 and s.completed == 5
        assert wq.pool.stats().nr_workers == 0  # every item ran on the rescuer
    finally:
        wq.pool.fault_spec.clear()
        wq.destroy()
    assert not alive(rescuer_pid)  # torn down with the workqueue


def test_without_rescuer_no_progress_until_creation_works():
    wq = procpool.Workqueue("no-resc-test")
    try:
        _refuse_new_workers(wq)
        works = [wq.queue(tasks.square, i) for i in range(3)]
        time.sleep(0.3)
        assert not any(w.done() for w in works)
        s = wq.stats()
        assert s.mayday == 0 and s.rescued == 0
        wq.pool.fault_spec.clear()  # the OS "recovers"; the pool retries after its cooldown
        assert [w.result(timeout=10) for w in works] == [0, 1, 4]
    finally:
        wq.pool.fault_spec.clear()
        wq.destroy()


def test_no_mayday_while_workers_can_be_created():
    with procpool.Workqueue("resc-ok-test", rescuer=True) as wq:
        works = [wq.queue(tasks.sleep_then, 0.05, i) for i in range(4)]
        assert [w.result(timeout=10) for w in works] == list(range(4))
        s = wq.stats()
        assert s.mayday == 0 and s.rescued == 0


def test_rescuer_title_must_be_valid():
    with pytest.raises(ValueError):
        procpool.WorkerPool(0, 1, title="has space")


def test_rescuer_follows_apply_attrs():
    wq = procpool.Workqueue("resc-attrs", rescuer=True)
    try:
        old_pid = wq.rescuer_pool.workers()[0].pid
        wait_until(lambda: title_of(old_pid) == "kworker/R-resc-attrs", what="the first rescuer's title")
        assert psutil.Process(old_pid).nice() == 0
        wq.apply_attrs(nice=3)

        def rescuers() -> list[psutil.Process]:
            # This program's only: a second suite running at once has a resc-attrs of its own.
            return [p for p in psutil.Process().children(recursive=True) if title_of(p.pid) == "kworker/R-resc-attrs"]

        # The new rescuer takes over; the old one exits through its pool's teardown.
        wait_until(lambda: not alive(old_pid), what="the old rescuer gone")
        wait_until(lambda: len(rescuers()) == 1, what="one rescuer")
        new = rescuers()[0]
        assert new.pid != old_pid and new.nice() == 3
        # And it is the one that rescues.
        _refuse_new_workers(wq)
        assert wq.queue(tasks.pid_and, 5).result(timeout=10) == (new.pid, 5)
        assert wq.stats().rescued == 1
    finally:
        wq.pool.fault_spec.clear()
        wq.destroy()
