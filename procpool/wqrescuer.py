"""A workqueue's rescuer (``rescuer=True``, the kernel's WQ_MEM_RECLAIM): the mayday timer,
the one-worker rescuer pool titled ``kworker/R-<name>``, the thread that runs rescues, and the
mayday/rescued counters.

While the workqueue has items in flight, the thread looks every MAYDAY_INITIAL_TIMEOUT
whether a pool holding them has failed to create a worker for that long; if so (a mayday) it
takes the items no worker started back out of that pool's worklist (under the pool's lock, so
no worker can start one after) and runs them on the rescuer process, one at a time, in queue
order; then it looks again after MAYDAY_INTERVAL. ``apply_attrs`` hands it a successor pool
with the new attributes, which the thread switches to between rescues.

It shares the workqueue's lock L (its condition ``cv`` is on that lock) and never holds it
around a pool call.

Guards:  L = the owning Workqueue's _lock (docs/design.md, lock legend)   I = set in __init__
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .pool import WorkerPool
from .stats import Account
from .wqwork import Work

#: Rescuer (the kernel's MAYDAY_INITIAL_TIMEOUT and MAYDAY_INTERVAL): a workqueue with a
#: rescuer calls it once its pool has failed to create a worker for this long (seconds) while
#: its items wait there, then again every MAYDAY_INTERVAL while that lasts.
MAYDAY_INITIAL_TIMEOUT = 0.010
MAYDAY_INTERVAL = 0.100


def start_rescuer_pool(name: str, key: tuple) -> WorkerPool:
    """One worker, never culled, titled exactly ``kworker/R-<name>``, with the attributes
    ``key`` = (nice, cpus). Starts a process: never called under L."""
    nice, cpus = key
    return WorkerPool(1, 1, title=f"kworker/R-{name}", nice=nice, cpus=cpus)


class Rescuer:
    """The rescuer of one workqueue. ``inflight`` is the workqueue's in-flight set (read under
    L); ``finish(work, value, exc)`` completes a rescued item (called with L released);
    ``mark_dirty()`` tells the statistics publisher the counters changed."""

    def __init__(
        self,
        lock: threading.Lock,
        name: str,
        key: tuple,
        inflight: set[Work],
        account: Account,
        finish: Callable[[Work, Any, BaseException | None], None],
        mark_dirty: Callable[[], None],
    ) -> None:
        self._lock = lock  # I: the workqueue's L
        self._inflight = inflight  # I (its contents: L)
        self._account = account  # I
        self._finish = finish  # I
        self._mark_dirty = mark_dirty  # I
        self.cv = threading.Condition(lock)  # items went in flight, a new rescuer pool, or stopped
        # The one-worker pool: used and replaced only by the rescuer thread (and closed by
        # close() after that thread ended); replace() leaves its successor in _next_pool (L).
        self.pool: WorkerPool = start_rescuer_pool(name, key)
        self._next_pool: WorkerPool | None = None  # L
        self._stopped = False  # L
        self.mayday = self.rescued = 0  # L
        self._thread = threading.Thread(target=self._loop, name=f"procpool-rescuer-{name}", daemon=True)  # I
        self._thread.start()

    def kick(self) -> None:
        """Items went in flight: start watching for a mayday. L held."""
        self.cv.notify_all()

    def replace(self, pool: WorkerPool) -> WorkerPool | None:
        """Rescue on ``pool`` from the next rescue on (apply_attrs); returns a successor
        handed over earlier and never taken up, for the caller to close outside L. L held."""
        unused, self._next_pool = self._next_pool, pool
        self.cv.notify_all()
        return unused

    def pools(self) -> list[WorkerPool]:
        """The rescuer pool now in use (for the done-callback deadlock check). L held."""
        return [self.pool]

    def stop(self) -> None:
        """The workqueue is destroyed (drained: the rescuer holds no item). L held."""
        self._stopped = True
        self.cv.notify_all()

    def close(self) -> None:
        """After stop(), with L released: end the thread, close the rescuer pools."""
        if self._thread is not threading.current_thread():
            self._thread.join()
        for p in (self.pool, self._next_pool):
            if p is not None:
                p.close(wait=True)

    def _wait_for_a_look(self, wait: float) -> float:
        """Wait while nothing is in flight, then ``wait`` more. L held; returns the next wait."""
        while not self._stopped and not self._inflight and self._next_pool is None:
            wait = MAYDAY_INITIAL_TIMEOUT
            self.cv.wait()
        if not self._stopped and self._next_pool is None:
            self.cv.wait(wait)
        return wait

    def _loop(self) -> None:
        wait = MAYDAY_INITIAL_TIMEOUT
        while True:
            with self._lock:
                wait = self._wait_for_a_look(wait)
                if self._stopped:
                    return
                old, nxt = self.pool, self._next_pool
                if nxt is not None:
                    self.pool, self._next_pool = nxt, None
                futures = [
                    (w.seq, w.pool_future, w, w.pool)
                    for w in self._inflight
                    if w.pool_future is not None and w.pool is not None  # both set together in _pump
                ]
            if nxt is not None:
                # apply_attrs: rescue with the new attributes from now on. Between rescues,
                # so the old rescuer is idle; its process exits through the usual teardown.
                old.close(wait=True)
                continue
            # Usually one pool; after apply_attrs, items may still wait in the old one too.
            stalled = {id(p) for _, _, _, p in futures if p.creation_stalled_for() >= MAYDAY_INITIAL_TIMEOUT}
            if not stalled:
                wait = MAYDAY_INITIAL_TIMEOUT
                continue
            futures.sort(key=lambda t: t[0])
            # Taken under the pool lock only if still unstarted: no worker can start it after.
            taken = [w for _, f, w, p in futures if id(p) in stalled and p.take_unstarted(f)]
            wait = MAYDAY_INTERVAL
            if not taken:
                continue
            with self._lock:
                self.mayday += 1
                self.rescued += len(taken)
            self._mark_dirty()
            for work in taken:
                self._rescue(work)

    def _rescue(self, work: Work) -> None:
        """Run ``work`` on the rescuer process and complete it. Rescuer thread, L not held."""
        try:
            fut = self.pool._submit(work.fn, work.args, work.kwargs, None, None, self._account)
            value, exc = None, fut.exception()
            if exc is None:
                value = fut.result()
        except BaseException as e:  # noqa: BLE001 - unpicklable call, rescuer pool broken: ends the item
            value, exc = None, e
        self._finish(work, value, exc)
