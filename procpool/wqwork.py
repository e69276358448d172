"""A workqueue's items and numbers: ``Work`` (one queued call, a Future the workqueue
completes) and ``WorkqueueStats`` (the kernel's wq_monitor columns).

Apart from procpool.workqueue so that the workqueue's parts (the delayed-work timer in
procpool.wqtimer, the rescuer in procpool.wqrescuer) can name the items they move without
importing the workqueue itself. An item's state fields are guarded by its workqueue's lock.

Guards:  L = the owning Workqueue's _lock      I = set in __init__, read-only after
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import _base as _futures_base
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .pool import WorkerPool


class _Owner(Protocol):
    """What an item needs of its workqueue: cancelling goes through it."""

    def cancel_work(self, work: Work, sync: bool = False) -> bool: ...


@dataclass(frozen=True)
class WorkqueueStats:
    """One workqueue's numbers, the kernel's wq_monitor columns and a few of our own."""

    started: int  # items handed to the pool, ever, less those cancelled there unstarted (wq_monitor: total)
    in_flight: int  # handed to the pool, not finished (infl)
    completed: int  # of `started`, finished: result, exception, or procpool error
    max_in_flight: int  # the most ever in flight at once (never above max_active)
    pending: int  # queued, waiting for room under max_active
    delayed: int  # waiting for their timer
    cpu_time: float = 0.0  # seconds of CPU its answered items took in the workers (CPUtime)
    cpu_intensive: int = 0  # its items marked CPU-intensive (CPUitsv)
    cm_wakeups: int = 0  # workers concurrency management started for its waiting items (CMW)
    mayday: int = 0  # mayday calls: the pool could not create a worker while items waited
    rescued: int = 0  # items the rescuer took back from the pool and ran


class Work(Future):
    """One queued call: a ``concurrent.futures.Future`` the workqueue completes. ``cancel()``
    goes through the workqueue (the same as ``cancel_work(work)``)."""

    def __init__(self, wq: _Owner, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.wq = wq  # I
        self.fn, self.args, self.kwargs = fn, args, kwargs  # I
        self.seq = -1  # L: queue order, set when it enters the pending queue
        self.deadline: float | None = None  # L: a delayed item's timer, monotonic; None when not armed
        self.where = "new"  # L: 'delayed' | 'pending' | 'inflight' | 'cancelling' | 'done'
        self.pool_future: Future | None = None  # the pool's future once handed to it (set once)
        self.pool: WorkerPool | None = None  # L: the pool it is handed to, chosen when it goes in flight

    def cancel(self) -> bool:
        return self.wq.cancel_work(self)

    def _cancel_now(self) -> bool:
        with self._condition:
            if self._state == _futures_base.RUNNING:
                # In flight but taken back out of the pool's worklist before any worker had
                # it (cancel_work): it never ran, so it may end cancelled. Future.cancel()
                # refuses a RUNNING future, hence the step back.
                self._state = _futures_base.PENDING
        return super().cancel()
