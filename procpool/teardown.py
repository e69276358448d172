"""Teardown: the seed's ``put_unbound_pool()``, the one place that waits for workers.

::

   close()   L: closing; destroy idle workers (busy ones are destroyed as they go idle and
             nothing is left to run); cancel_futures: cancel items no worker has
       │
       ▼  (the caller's thread, or a thread of its own for close(wait=False) and for a
       │   close() from a done-callback, which runs on the arbiter thread teardown joins)
   _teardown
       ├─ wait: no attached worker, no pending item  ── past close(timeout): _escalate
       ├─ M arb + attach: ids still allocated? install the detach completion
       ├─ wait on the completion (the last worker to detach completes it)  ── every worker
       │     reaped and still no completion (detaches the lost Manager could not do):
       │     free the leftover ids, complete on their behalf
       ├─ wait until every process is reaped
       ├─ stop the arbiter (a bounded join)
       └─ free: pipes, selector, the id table (unlinked), the pool id

_escalate (when ``timeout`` runs out, or a teardown step failed): pending items fail with
PoolClosed (PoolBroken after a failure); busy and dying workers get SIGTERM, then SIGKILL
after KILL_GRACE, and their items fail with TeardownTimeout (PoolBroken), or the reason they
were already being killed for.

Nothing here waits on the arbiter alone: every wait is on L's condition, woken by the arbiter
as workers go and items end, and checks in slices of WATCH seconds that the arbiter thread is
still there. If it is gone, ``Arbiter.arbiter_died`` has killed and reaped everything already (or is
run from here, should the thread have ended without it).

A composed part of WorkerPool: it is handed the books (L), the arbiter, the creator and the
pool's descriptors; ``closed`` is set once teardown finished (I: the Event itself).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import faults as _faults
from .arbiter import Arbiter
from .books import Books, Item, fail_items
from .checks import check_number
from .creation import Creator
from .errors import LOST, PoolBroken, PoolClosed, TeardownTimeout
from .idtable import FREE

#: Between SIGTERM and SIGKILL when close(timeout=...) runs out.
KILL_GRACE = 1.0
#: How often teardown's waits look whether the arbiter thread is still there (seconds).
WATCH = 0.1
#: How long teardown waits for the arbiter thread to end once asked (seconds).
ARBITER_JOIN = 5.0


class Teardown:
    """``close()`` and the teardown steps; see the module docstring."""

    def __init__(
        self,
        pool_id: int,
        books: Books,
        arbiter: Arbiter,
        creator: Creator,
        locks: Any,
        completion: tuple[Any, Any],
        unlist: Callable[[], None],
    ) -> None:
        self.id = pool_id  # I
        self.books = books  # I
        self.arbiter = arbiter  # I
        self.creator = creator  # I
        self._locks = locks  # I
        self._completion_r, self._completion_w = completion  # I (closed here)
        self._unlist = unlist  # I: the pool leaves the live pools, its id may be reused
        self._faults = creator.faults  # I
        self.closed = threading.Event()  # set when teardown finished
        self.completions_seen = 0  # set from the id table just before it is freed

    def close(self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None) -> None:
        """``WorkerPool.close`` (what it promises is documented there); the steps are in the
        module docstring."""
        if timeout is not None:
            check_number("timeout", timeout, minimum=0)
        cancelled: list[Item] = []
        b = self.books
        with b.lock:
            first = not b.closing
            b.closing = True
            if first:
                if cancel_futures:
                    # Items taken back from a lost worker's prefetch are RUNNING already:
                    # they cannot be cancelled, so they stay and run.
                    cancelled = [it for it in b.worklist if not it.started]
                    b.worklist = deque(it for it in b.worklist if it.started)
                while b.idle:
                    b.destroy_worker(b.idle[0])
        for item in cancelled:
            item.future.cancel()
        if first:
            # The pool stays in the live pools until its teardown ends (see _teardown), so that
            # at interpreter exit the pending work of a close(wait=False) still runs, as
            # concurrent.futures promises for shutdown(wait=False).
            self.arbiter.wakeup.wake()
            if wait and threading.current_thread() is not self.arbiter.thread:
                self._teardown(timeout)
                return
            # close() from a done-callback runs on the arbiter thread, which teardown must
            # join: hand teardown to its own thread instead of deadlocking.
            threading.Thread(
                target=self._teardown, args=(timeout,), name=f"procpool-teardown-{self.id}", daemon=True
            ).start()
        elif wait:
            self.closed.wait()

    # -- teardown ---------------------------------------------------------------------------------

    def _teardown(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        failure: BaseException | None = None
        try:
            self._wait_drained(deadline)
            if self._install_completion():
                _faults.hit(self._faults, "teardown.before_wait")
                self._wait_completion(deadline)
            self._wait_reaped(deadline)
        except Exception as exc:  # noqa: BLE001 - raised again below, once nothing is left
            failure = exc
            self._escalate(f"its teardown failed: {exc!r}", PoolBroken)
            self._wait_reaped(time.monotonic() + KILL_GRACE)
        finally:
            self._stop_the_arbiter()
            self._free_resources()
            self.closed.set()
            self._unlist()
        if failure is not None:
            raise PoolBroken(f"pool u{self.id}: its teardown failed, and what was left of it was killed") from failure

    def _install_completion(self) -> bool:
        """The point of no return: no more creation; ids still allocated? then install the
        detach completion for the last one out to complete. True if there is one to wait for.
        A Manager that is gone for good is no reason to stop: the completion then comes from
        reaping (``_wait_completion``)."""
        table = self.books.table
        assert table is not None
        self.creator.no_create = True  # also set under M arb below; set first in case that fails
        # The filler's reserved step forks without M arb: wait for it to end (bounded: one
        # spawner request), so that the workers it forked are on the books, or their ids given
        # back, before the ids still allocated are counted.
        with self.creator.reserved_lock:
            pass
        try:
            with self._locks.held("arb"):
                self.creator.no_create = True
                with self._locks.held("attach"):
                    waiting = table.nr_allocated() > 0
                    if waiting:
                        table.install_completion()
                    return waiting
        except LOST:
            return table.nr_allocated() > 0

    def _stop_the_arbiter(self) -> None:
        with self.books.lock:
            self.arbiter.stop = True
        self.arbiter.wakeup.wake()
        if threading.current_thread() is not self.arbiter.thread:
            self.arbiter.thread.join(ARBITER_JOIN)

    def _wait_drained(self, deadline: float | None) -> None:
        """Wait until no worker is attached and no item waits; past the deadline, give up on
        pending items and kill the busy workers."""
        self._wait_for(lambda: not self.books.workers and not self.books.worklist, deadline, "its timeout ran out")

    def _wait_for(self, done: Callable[[], bool], deadline: float | None, reason: str) -> None:
        """Wait on ``books.changed`` until ``done()`` (evaluated under L); past the deadline,
        escalate (``reason`` goes into the items' errors). Checks every WATCH seconds that the
        arbiter thread, which makes ``done()`` come true, is still there."""
        b, arb = self.books, self.arbiter
        with b.lock:
            while not done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                if not b.changed.wait(WATCH if left is None else min(left, WATCH)):
                    if not arb.thread.is_alive() and not arb.dead:
                        b.lock.release()
                        try:
                            arb.arbiter_died(RuntimeError("the arbiter thread ended without a word"))
                        finally:
                            b.lock.acquire()
            else:
                return
        self._escalate(reason)

    def _escalate(self, reason: str, error: type[Exception] = TeardownTimeout) -> None:
        """Give up on what is left: waiting items fail (PoolClosed, or ``error`` if that is
        PoolBroken), every worker still there is killed (SIGTERM, then SIGKILL) and its item
        fails with ``error`` (unless it was being killed for a reason of its own already)."""
        b = self.books
        with b.lock:
            b.abandon = True
            abandoned = list(b.worklist)
            b.worklist.clear()
            victims = list(b.workers.values()) + list(b.dying)
            for w in victims:
                if w.kill_reason is None:  # a worker already killed for its item keeps that reason
                    w.kill_reason = (error, f"by close() after {reason}")
        closed = PoolBroken if error is PoolBroken else PoolClosed
        fail_items(abandoned, closed(f"pool u{self.id} was closed ({reason}) before this item ran"))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for w in victims:
                try:
                    os.kill(w.pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + KILL_GRACE
            with b.lock:
                while (b.workers or b.dying) and time.monotonic() < end:
                    b.changed.wait(min(WATCH, end - time.monotonic()))
                if not b.workers and not b.dying:
                    return
        if not self.arbiter.thread.is_alive():
            self.arbiter.arbiter_died(RuntimeError("the arbiter thread ended without a word"))

    def _wait_completion(self, deadline: float | None) -> None:
        """Wait for the last worker to detach. If every worker is reaped and none completed,
        their detaches could not be done (the Manager was lost): free what they left."""
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if self._completion_r.poll(WATCH if left is None else max(0.0, min(left, WATCH))):
                return
            with self.books.lock:
                gone = not self.books.workers and not self.books.dying
            if gone:
                self._free_leftover_ids()
                return
            if left is not None and left <= 0:
                self._escalate("its timeout ran out while workers were still detaching")
                deadline = None  # escalation reaped them: the next round ends it

    def _wait_reaped(self, deadline: float | None) -> None:
        self._wait_for(
            lambda: not self.books.workers and not self.books.dying,
            deadline,
            "its timeout ran out while dying workers were still alive",
        )

    def _free_leftover_ids(self) -> None:
        """Every worker is reaped: free the ids still allocated (no process is left that
        could touch them) and complete the detach completion on their behalf."""
        table = self.books.table
        assert table is not None
        for slot in table.slots():
            if slot.state != FREE:
                table.free(slot.id, slot.gen)
        if table.should_complete():
            table.mark_completed()

    def _free_resources(self) -> None:
        for conn in (self._completion_r, self._completion_w):
            conn.close()
        self.arbiter.wakeup.close()
        self.arbiter.sel.close()
        table = self.books.table
        if table is not None:
            self.completions_seen = table.completions
            table.destroy()
            with self.books.lock:
                self.books.table = None

    def completions(self) -> int:
        """How many times the detach completion completed: 0 until teardown, then at most 1
        (0 too when no worker was left attached to wait for)."""
        table = self.books.table
        if table is not None:
            return table.completions
        return self.completions_seen
