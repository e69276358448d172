"""Batched detach: the Manager performs the attach lock's critical section for every worker
leaving at the same time (procpool.manager, ``_RobustLockServer.detach``).

The invariants are those of a worker's own detach: ids are freed under the attach lock (with
the generation check), at most one detacher completes the detach completion, and a worker
SIGKILLed while its request waits for the lock leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil
import pytest
from conftest import alive, title_of, wait_until

import procpool
from procpool import manager
from procpool.idtable import DYING, FREE, IdTable

pytestmark = pytest.mark.timeout(60)


class Replies:
    """What the Manager answered each request, in the order it answered."""

    def __init__(self) -> None:
        self.got: list[tuple[int, bool]] = []

    def reply_for(self, wid: int) -> object:
        outer = self

        class _R:
            conn = None

            def send(self, complete: bool) -> None:
                outer.got.append((wid, complete))

        return _R()


def _waiting(table: IdTable) -> int:
    return table.completion_waiting


@pytest.fixture
def table():
    t = IdTable.create(pool_id=900 + os.getpid() % 50, capacity=8)
    try:
        yield t
    finally:
        t.destroy()


def _requests(table: IdTable, ids: list[tuple[int, int]], replies: Replies) -> list[manager.Detach]:
    return [manager.Detach(table.name, table.created, wid, gen, replies.reply_for(wid)) for wid, gen in ids]


def test_a_batch_frees_every_id_and_completes_once(table):
    ids = [table.alloc() for _ in range(4)]
    table.install_completion()
    lock = manager._RobustLockServer()
    replies = Replies()
    lock.detach(_requests(table, ids, replies))
    assert [s.state for s in table.slots()[:4]] == [FREE] * 4
    assert sorted(w for w, _ in replies.got) == [0, 1, 2, 3]
    assert [w for w, complete in replies.got if complete] == [3]  # the last of the batch, once
    assert table.completions == 1
    assert lock.owner() is None  # released


def test_no_completion_while_ids_remain_or_nobody_waits(table):
    ids = [table.alloc() for _ in range(3)]
    lock = manager._RobustLockServer()
    replies = Replies()
    lock.detach(_requests(table, ids[:1], replies))  # nobody waits yet
    table.install_completion()
    lock.detach(_requests(table, ids[1:2], replies))  # one id still allocated
    assert not any(c for _, c in replies.got) and table.completions == 0
    lock.detach(_requests(table, ids[2:], replies))
    assert replies.got[-1] == (2, True) and table.completions == 1
    # A stale generation (the id was reused) frees nothing, and nothing completes twice.
    lock.detach(_requests(table, [(ids[0][0], ids[0][1])], replies))
    assert replies.got[-1] == (0, False) and table.completions == 1


def test_a_batch_waits_for_the_holder_and_takes_late_requests_along(table):
    ids = [table.alloc() for _ in range(4)]
    table.install_completion()
    lock = manager._RobustLockServer()
    me = os.getpid()
    assert lock.acquire(me)
    replies = Replies()
    lock.detach(_requests(table, ids[:2], replies))
    lock.detach(_requests(table, ids[2:], replies))  # queued behind the same parked batch
    assert replies.got == [] and [s.state for s in table.slots()[:4]] != [FREE] * 4
    assert len(lock._parked) == 1  # one parked grant for the whole batch
    lock.release(me)
    assert [s.state for s in table.slots()[:4]] == [FREE] * 4
    assert [w for w, c in replies.got if c] == [3] and table.completions == 1
    assert lock.owner() is None


def test_a_table_of_a_later_pool_with_the_same_name_is_not_touched(table):
    wid, gen = table.alloc()
    lock = manager._RobustLockServer()
    replies = Replies()
    stale = manager.Detach(table.name, table.created - 1.0, wid, gen, replies.reply_for(wid))
    lock.detach([stale])
    assert table.slot(wid).state != FREE
    assert replies.got == [(wid, False)]


def _close_while_holding_attach(pool) -> tuple[threading.Thread, dict[int, int]]:
    """Hold the pool's attach lock here, close the pool in a thread, and wait until every
    worker is dying (its detach request, batched, waits for the lock)."""
    pids = {w.id: w.pid for w in pool.workers()}
    closer = threading.Thread(target=pool.close)
    closer.start()
    wait_until(lambda: all(pool.id_table.slot(wid).state == DYING for wid in pids), what="all workers dying")
    wait_until(lambda: all(title_of(p) == "kworker/dying" for p in pids.values()), what="dying titles")
    return closer, pids


def test_worker_sigkilled_while_its_batched_detach_waits():
    pool = procpool.WorkerPool(min_workers=4, max_workers=4)
    assert all(w.pid for w in pool.workers())
    pool.manager_locks.attach.acquire()
    released = False
    try:
        closer, pids = _close_while_holding_attach(pool)
        os.kill(pids[2], signal.SIGKILL)
        wait_until(lambda: not alive(pids[2]), what="victim gone")
        pool.manager_locks.attach.release()
        released = True
        closer.join(20)
        assert not closer.is_alive()
    finally:
        if not released:
            pool.manager_locks.attach.release()
    assert pool.completions <= 1
    assert pool.manager_locks.attach.broken == 0  # the batch held the lock, no dead owner to take over from
    assert not any(alive(p) for p in pids.values())
    assert pool.stats().nr_workers == 0


def test_last_worker_out_completes_through_the_batch():
    # Worker 0 stops before it asks to detach; the others leave; the teardown installs its
    # completion (one id still allocated) and waits. Worker 0, resumed, is the last one out,
    # and stops again once detached: the completion is there while it is still alive, so it
    # came through the batch, not from teardown's fallback (which needs every worker reaped).
    pool = procpool.WorkerPool(min_workers=3, max_workers=3, faults="detach.before_lock@0=stop,detach.after@0=stop")
    pid0 = next(w.pid for w in pool.workers() if w.id == 0)
    table = pool.id_table
    closer = threading.Thread(target=pool.close)
    closer.start()
    try:
        wait_until(lambda: psutil.Process(pid0).status() == psutil.STATUS_STOPPED, what="worker 0 stopped")
        wait_until(lambda: _waiting(table) == 1, what="the teardown waits for its completion")
        # The teardown installs its completion once every worker is off the pool's books; the
        # other two may still be on their way out of the table then (not stopped: they leave).
        wait_until(lambda: table.nr_allocated() == 1, what="only worker 0 still allocated")
        assert table.completions == 0  # worker 0 still holds its id: nobody may complete yet
        os.kill(pid0, signal.SIGCONT)
        wait_until(
            lambda: table.slot(0).state == FREE and psutil.Process(pid0).status() == psutil.STATUS_STOPPED,
            what="worker 0 detached and stopped again",
        )
        assert alive(pid0)
        assert table.completions == 1
    finally:
        # Worker 0 stops twice (before and after its detach): on a failure between the two,
        # a single SIGCONT could let it stop again with nobody to resume it. Resume it until the
        # teardown is done (it reaps worker 0), bounded by the join below.
        deadline = time.monotonic() + 20
        while closer.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):  # reaped meanwhile
                os.kill(pid0, signal.SIGCONT)
            closer.join(0.05)
    closer.join(20)
    assert not closer.is_alive()
    assert pool.completions == 1
    assert pool.manager_locks.attach.broken == 0
    assert not alive(pid0)
