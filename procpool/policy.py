"""The kernel's policy predicates, named as the questions they answer.

Each reads the books under L and changes nothing::

   may_start_working()   an idle worker can take an item now (submit sends straight to it)
   may_grow()            work waits, nobody idle to take it, room for another worker
   need_more_worker()    may_grow() and fewer running than the concurrency target
   too_many_workers()    more idle than "KEEP_IDLE plus 1 per MAX_IDLE_WORKERS_RATIO busy"
   used_up(w)            w ran its max_tasks_per_child items: it retires instead of idling

``nr_running`` is the kernel's count: busy workers not blocked and not CPU-intensive (see
procpool.concurrency, which keeps ``nr_cm_out``).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from .config import KEEP_IDLE, MAX_IDLE_WORKERS_RATIO, PoolConfig


class Counts(Protocol):
    """What the predicates read of the books (all L)."""

    workers: dict[int, Any]
    idle: deque[Any]
    worklist: deque[Any]
    nr_cm_out: int


class Policy:
    """The predicates over one pool's books. Every method: L held."""

    __slots__ = ("cfg", "books")

    def __init__(self, cfg: PoolConfig, books: Counts) -> None:
        self.cfg = cfg  # L (written only by WorkerPool.concurrency's setter; else I)
        self.books = books  # I

    def may_start_working(self) -> bool:
        return bool(self.books.idle)

    def may_grow(self) -> bool:
        b = self.books
        return bool(b.worklist) and not b.idle and len(b.workers) < self.cfg.max_workers

    def nr_running(self) -> int:
        b = self.books
        return len(b.workers) - len(b.idle) - b.nr_cm_out

    def need_more_worker(self) -> bool:
        """Blocked and CPU-intensive busy workers do not count, so blocking items get extra
        workers and CPU-bound ones do not oversubscribe the CPUs."""
        return self.may_grow() and self.nr_running() < self.cfg.concurrency

    def nr_to_create(self) -> int:
        if not self.need_more_worker():
            return 0
        b = self.books
        return min(len(b.worklist), self.cfg.max_workers - len(b.workers), self.cfg.concurrency - self.nr_running())

    def too_many_workers(self) -> bool:
        b = self.books
        nr_idle = len(b.idle)
        nr_busy = len(b.workers) - nr_idle
        return (
            len(b.workers) > self.cfg.min_workers
            and nr_idle > KEEP_IDLE
            and (nr_idle - KEEP_IDLE) * MAX_IDLE_WORKERS_RATIO >= nr_busy
        )

    def used_up(self, w: Any) -> bool:
        limit = self.cfg.max_tasks_per_child
        return limit is not None and w.nr_done >= limit
