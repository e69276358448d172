"""A workqueue's books: its queue, what it has in flight on which pool, its counters, and the
pool new items go to (with the pools ``apply_attrs`` replaced while items of ours still run
there).

Everything here changes under the workqueue's lock L, in the same critical section as the
item's own state (``Work.where``), so a pump and a cancel cannot both take the same item. It
makes no pool call and starts no thread: the workqueue hands the pump's take to the pool with
L released, and drops the references on the pools this returns outside L too.

Guards:  L = the owning Workqueue's _lock (docs/design.md, lock legend)   I = set in __init__
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .wqwork import Work

if TYPE_CHECKING:
    from .pool import WorkerPool

#: A pool with the registry key it was taken under: what put_pool needs to drop it.
Held = tuple[tuple, "WorkerPool"]


class Books:
    """The queue and the in-flight accounting of one workqueue. Every method: L held."""

    def __init__(self, key: tuple, pool: WorkerPool, max_active: int, mark_dirty: Callable[[], None]) -> None:
        self.max_active = max_active  # I
        self._mark_dirty = mark_dirty  # I: every change of a published number calls it
        self.key = key  # L: (nice, cpus), the registry key of `pool` (apply_attrs changes it)
        self.pool = pool  # L: where new items go (apply_attrs changes it)
        self.pending: deque[Work] = deque()  # L: queue order
        self.inflight: set[Work] = set()  # L
        self.active: dict[int, Work] = {}  # L: queued and not finished, by seq; the first key is the oldest
        self.seq = itertools.count()  # L
        self.started = self.completed = self.max_in_flight = 0  # L
        # L: items in flight per pool (by id), and the pools replaced while they still held
        # items of ours: id -> (key, pool), released when their last item finishes
        self._inflight_on: dict[int, int] = {}
        self.retired: dict[int, Held] = {}

    def enqueue(self, work: Work) -> None:
        """``work`` joins the end of the queue."""
        self._mark_dirty()
        work.seq = next(self.seq)
        work.where = "pending"
        self.pending.append(work)
        self.active[work.seq] = work

    def unqueue(self, work: Work) -> None:
        """``work``, pending, leaves the queue before the pump took it (mod_delayed)."""
        self.pending.remove(work)
        del self.active[work.seq]

    def pump(self) -> list[Work]:
        """Take items off the queue while there is room under max_active, marking them in
        flight on the current pool; the caller hands them to the pool outside L."""
        out = []
        while self.pending and len(self.inflight) < self.max_active:
            work = self.pending.popleft()
            work.where = "inflight"
            work.set_running_or_notify_cancel()  # never cancelled while queued: see cancel_work
            work.pool = self.pool
            self._inflight_on[id(self.pool)] = self._inflight_on.get(id(self.pool), 0) + 1
            self.inflight.add(work)
            out.append(work)
        if out:
            self.started += len(out)
            self._mark_dirty()
            self.max_in_flight = max(self.max_in_flight, len(self.inflight))
        return out

    def leave_inflight(self, work: Work, ran: bool = True) -> Held | None:
        """``work`` is no longer in flight (finished, or cancelled out of the pool's worklist).
        Returns a pool apply_attrs replaced, if this was its last item of ours.

        ``ran`` False: it was cancelled before any worker took it, so it is taken back out of
        ``started`` (counted when it was handed over) and never counted completed."""
        self.inflight.discard(work)
        if ran:
            self.completed += 1
        else:
            self.started -= 1
        self._mark_dirty()
        pool_id = id(work.pool)
        self._inflight_on[pool_id] -= 1
        if not self._inflight_on[pool_id]:
            del self._inflight_on[pool_id]
            return self.retired.pop(pool_id, None)
        return None

    def switch(self, key: tuple, new: WorkerPool) -> list[Held]:
        """New items go to ``new`` (attributes ``key``) from now on. Returns the references to
        drop outside L: the old pool if nothing of ours runs there (else it is retired until
        its last item ends), and ``new`` itself if it was retired (we hold it twice now)."""
        release = []
        old_key, old = self.key, self.pool
        self.key, self.pool = key, new
        if self._inflight_on.get(id(old)):
            self.retired[id(old)] = (old_key, old)  # released by its last item
        else:
            release.append((old_key, old))
        again = self.retired.pop(id(new), None)
        if again is not None:
            release.append(again)
        return release

    def pools(self) -> list[WorkerPool]:
        """The current pool and those retired pools that still run items of ours."""
        return [self.pool, *(p for _, p in self.retired.values())]

    def counts(self) -> dict[str, Any]:
        """The counters the workqueue's stats show (WorkqueueStats fields)."""
        return {
            "started": self.started,
            "in_flight": len(self.inflight),
            "completed": self.completed,
            "max_in_flight": self.max_in_flight,
            "pending": len(self.pending),
        }
