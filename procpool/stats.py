"""What a pool reports about itself: counters (``PoolStats``), its workers (``WorkerInfo``),
and the per-client counters a shared pool charges on a workqueue's behalf (``Account``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of a pool's counters (taken under the pool lock)."""

    nr_workers: int  # attached workers (idle + busy), dying ones excluded
    nr_idle: int
    nr_busy: int
    nr_dying: int  # destroyed, process not reaped yet
    nr_pending: int  # items waiting for a worker
    created: int
    destroyed: int
    items_done: int  # items that ended with a result or their function's exception
    lost: int  # workers that died without being destroyed
    killed: int = 0  # of `destroyed`: SIGKILLed for an item's timeout or by cancel_running()
    prefetched: int = 0  # items sent to a busy worker behind its current one (short items)
    requeued: int = 0  # prefetched items taken back, unstarted, from a worker that was lost
    concurrency: int = 0  # the concurrency target (running workers the pool aims for)
    nr_running: int = 0  # busy workers counted as running (not blocked, not CPU-intensive)
    cm_wakeups: int = 0  # workers started only because busy ones were blocked or CPU-intensive
    cpu_intensive: int = 0  # items marked CPU-intensive (kept the CPU past the threshold)
    cm_samples: int = 0  # sampling rounds of busy workers' process states
    cpu_time: float = 0.0  # seconds of CPU the answered items took in the workers (call, unpickling, pickling)


@dataclass(frozen=True)
class WorkerInfo:
    """One worker process, as ``WorkerPool.workers()`` reports it."""

    id: int
    pid: int
    state: str  # 'idle' | 'busy' | 'dying'
    title: str


class Account:
    """Counters a pool charges on behalf of one client's items: a workqueue's wq_monitor
    numbers, where several workqueues share a pool. Charged by the pools' arbiter threads
    (a workqueue moved by apply_attrs has items on two pools at once), hence a lock."""

    __slots__ = ("_lock", "cpu_time", "cpu_intensive", "cm_wakeups", "on_change")

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()  # guards the three counters
        self.cpu_time = 0.0  # seconds of CPU its answered items took in the workers
        self.cpu_intensive = 0  # its items marked CPU-intensive
        self.cm_wakeups = 0  # workers started by concurrency management for its waiting items
        self.on_change = on_change  # I: called after each charge (outside the lock)

    def charge(self, cpu_time: float = 0.0, cpu_intensive: int = 0, cm_wakeups: int = 0) -> None:
        with self._lock:
            self.cpu_time += cpu_time
            self.cpu_intensive += cpu_intensive
            self.cm_wakeups += cm_wakeups
        if self.on_change is not None:
            self.on_change()
