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
       ├─ wait on the completion (the last worker to detach completes it)
       ├─ wait until every process is reaped
       ├─ stop the arbiter
       └─ free: pipes, selector, the id table (unlinked), the pool id

_escalate (only when ``timeout`` runs out): pending items fail with PoolClosed; busy and
dying workers get SIGTERM, then SIGKILL after KILL_GRACE, and their items fail with
TeardownTimeout (or the reason they were already being killed for).

This is a mixin of WorkerPool: the fields it uses are the pool's (see its __init__; guards
L = pool lock, M = Manager locks).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import faults as _faults
from .checks import check_number
from .errors import PoolClosed, TeardownTimeout

if TYPE_CHECKING:
    from .pool import _Item

#: Between SIGTERM and SIGKILL when close(timeout=...) runs out.
KILL_GRACE = 1.0


class Teardown:
    """``close()`` and the teardown steps; see the module docstring."""

    # Declared for readers and type checkers; set in WorkerPool.__init__.
    id: int
    _lock: Any
    _changed: Any
    _closing: bool
    _closed: threading.Event
    _workers: dict
    _dying: set
    _idle: Any
    _worklist: deque
    _faults: Any

    def close(self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None) -> None:
        """Tear the pool down (the seed's put_unbound_pool()); idempotent.

        Idle workers are destroyed at once; busy ones finish their item, and pending items
        still run unless ``cancel_futures``. With ``wait``, returns only once every worker
        detached and no process of the pool remains. ``timeout`` bounds the wait for running
        and pending items: after it, pending items fail with PoolClosed, and busy workers get
        SIGTERM, then SIGKILL, their items failing with TeardownTimeout.
        """
        if timeout is not None:
            check_number("timeout", timeout, minimum=0)
        cancelled: list[_Item] = []
        with self._lock:
            first = not self._closing
            self._closing = True
            if first:
                if cancel_futures:
                    # Items taken back from a lost worker's prefetch are RUNNING already:
                    # they cannot be cancelled, so they stay and run.
                    cancelled = [it for it in self._worklist if not it.started]
                    self._worklist = deque(it for it in self._worklist if it.started)
                while self._idle:
                    self._destroy_worker(self._idle.popleft())
        for item in cancelled:
            item.future.cancel()
        if first:
            # The pool stays in the live pools until its teardown ends (see _teardown), so that
            # at interpreter exit the pending work of a close(wait=False) still runs, as
            # concurrent.futures promises for shutdown(wait=False).
            self._wake()
            if wait and threading.current_thread() is not self._arbiter_thread:
                self._teardown(timeout)
                return
            # close() from a done-callback runs on the arbiter thread, which teardown must
            # join: hand teardown to its own thread instead of deadlocking.
            threading.Thread(
                target=self._teardown, args=(timeout,), name=f"procpool-teardown-{self.id}", daemon=True
            ).start()
        elif wait:
            self._closed.wait()

    # -- teardown ---------------------------------------------------------------------------------

    def _teardown(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._wait_drained(deadline)
            assert self._table is not None
            with self._arb:
                self._no_create = True
                with self._attach:
                    waiting = self._table.nr_allocated() > 0
                    if waiting:
                        self._table.install_completion()
            if waiting:
                _faults.hit(self._faults, "teardown.before_wait")
                self._wait_completion(deadline)
            self._wait_reaped(deadline)
            with self._lock:
                self._stop_arbiter = True
            self._wake()
            self._arbiter_thread.join()
        finally:
            self._free_resources()
            self._closed.set()
            self._unlist()

    def _wait_drained(self, deadline: float | None) -> None:
        """Wait until no worker is attached and no item waits; past the deadline, give up on
        pending items and kill the busy workers."""
        self._wait_for(lambda: not self._workers and not self._worklist, deadline, "its timeout ran out")

    def _wait_for(self, done: Callable[[], bool], deadline: float | None, reason: str) -> None:
        """Wait on ``self._changed`` until ``done()`` (evaluated under L); past the deadline,
        escalate (``reason`` goes into the items' errors)."""
        with self._lock:
            while not done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._changed.wait(left)
            else:
                return
        self._escalate(reason)

    def _escalate(self, reason: str) -> None:
        with self._lock:
            self._abandon = True
            abandoned = list(self._worklist)
            self._worklist.clear()
            victims = list(self._workers.values()) + list(self._dying)
            for w in victims:
                if w.kill_reason is None:  # a worker already killed for its item keeps that reason
                    w.kill_reason = (TeardownTimeout, f"by close() after {reason}")
        self._fail_unstarted(abandoned)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for w in victims:
                try:
                    os.kill(w.pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + KILL_GRACE
            with self._lock:
                while (self._workers or self._dying) and time.monotonic() < end:
                    self._changed.wait(end - time.monotonic())
                if not self._workers and not self._dying:
                    return

    def _fail_unstarted(self, items: list[_Item]) -> None:
        for item in items:
            if item.started or item.future.set_running_or_notify_cancel():
                item.future.set_exception(PoolClosed(f"pool u{self.id} was closed (timed out) before this item ran"))

    def _wait_completion(self, deadline: float | None) -> None:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if self._completion_r.poll(left):
            return
        self._escalate("its timeout ran out while workers were still detaching")
        self._completion_r.poll(KILL_GRACE)

    def _wait_reaped(self, deadline: float | None) -> None:
        self._wait_for(
            lambda: not self._workers and not self._dying,
            deadline,
            "its timeout ran out while dying workers were still alive",
        )

    def _free_resources(self) -> None:
        for conn in (self._completion_r, self._completion_w):
            conn.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._sel.close()
        if self._table is not None:
            self._completions_seen = self._table.completions
            self._table.destroy()
            self._table = None

    @property
    def completions(self) -> int:
        """How many times the detach completion completed: 0 until teardown, then at most 1
        (0 too when no worker was left attached to wait for)."""
        if self._table is not None:
            return self._table.completions
        return self._completions_seen


