"""Workqueues: the kernel's ``struct workqueue_struct``, front ends sharing worker pools.

A workqueue keeps its own queue and hands the pool at most ``max_active`` items at a time;
workqueues with equal attributes (nice, cpus) share one refcounted ``WorkerPool``::

   queue()          ──► pending (FIFO) ──pump: fewer than max_active in flight?──► pool.submit
   queue_delayed()  ──► delayed (heap) ──timer thread, at the deadline──► pending
   pool future done ──► Work's result ──► L: off in-flight, pump the next ──► notify flushers
   rescuer=True: pool failed to create a worker for MAYDAY_INITIAL_TIMEOUT ──► mayday ──►
                 pool.take_unstarted (under the pool lock) ──► run on kworker/R-<name> ──► Work's result

apply_attrs(nice, cpus) switches new items to the pool for the new attributes; items in flight
finish on the old pool, and the last of them to complete drops the workqueue's reference on
it (put_pool with wait=False: a last reference closes it on a teardown thread of its own).
A rescuer process is replaced by one with the new attributes, as the kernel's rescuer takes
the attributes of the pool it rescues for.

One item's states, all changed under L (so cancel and start cannot both win)::

   delayed ─► pending ─► in flight (Work RUNNING: handed to the pool) ─► done
      └──────────┴───────────┴─► cancelling ─► done, cancelled (cancel_work / Work.cancel():
                                 in flight only while it waits in the pool's worklist, taken
                                 back under the pool's lock before any worker has it)

Statistics (the kernel's wq_monitor numbers) are counted per workqueue: here, and by its
pools through an ``Account`` (CPU time, CPU-intensive marks, concurrency-management wakeups).
A publisher thread writes every live workqueue's numbers to the program's workqueue segment
for ``procpool ps``, at most every PUBLISH_INTERVAL while they change, and at once when a
workqueue is made, moved or destroyed.

At interpreter exit, workqueues nobody destroyed are destroyed, newest first: their delayed
items are cancelled, everything already queued runs to its end (as concurrent.futures runs
an executor's pending work at exit).

Completions run on the pool's arbiter thread: a done-callback of a Work may queue more work
(chained queueing, allowed even during drain) but must not wait on this workqueue (flush,
drain, destroy, flush_work, cancel_work(sync=True)): the arbiter it would block delivers the
results, so those raise RuntimeError there instead of hanging.

``Workqueue(name, executor=EXECUTOR)`` hands its items to any concurrent.futures Executor
instead of a shared pool (procpool.foreign; for a Dask cluster, ``client.get_executor()``).
Everything that is the workqueue's own still holds: ``max_active``, ``ordered``, delayed work
and ``mod_delayed``, ``flush``, ``flush_work``, ``cancel_work`` (an item the executor has not
started, as its ``Future.cancel()`` decides), ``drain``, ``destroy``, and the stats it counts
itself (started, in flight, completed, pending, delayed). What needs procpool's own pools is
refused with ValueError: ``nice``, ``cpus``, ``max_workers``, ``rescuer`` and
``apply_attrs``; process titles, concurrency management, a row in ``procpool ps`` and the
CPU-time columns (``cpu_time``, ``cpu_intensive``, ``cm_wakeups`` stay 0) do not exist there.
``destroy`` never shuts the executor down: it is the caller's.

The class is a facade over parts with one job each, sharing its lock L: the books (queue,
in flight, counters, current and retired pools: procpool.wqbooks), the hand-off to the pools
and the completions (procpool.wqhandoff), the delayed-work timer (procpool.wqtimer), the
rescuer (procpool.wqrescuer); the pool registry and the statistics publisher are below.

Guards:  L = Workqueue._lock      I = set in __init__, read-only after
         R = _registry_lock (the pool registry and the live workqueues, module level)
         P = _publish_lock (one snapshot-and-write of the workqueue segment at a time)
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor
from typing import Any, cast

from .checks import check_attrs, check_name, check_number
from .foreign import ForeignExecutor
from .idtable import write_workqueues
from .pool import WorkerPool
from .stats import Account
from .wqbooks import Books
from .wqhandoff import Handoff, chained
from .wqrescuer import MAYDAY_INITIAL_TIMEOUT, MAYDAY_INTERVAL, Rescuer, start_rescuer_pool
from .wqtimer import DelayedTimer
from .wqwork import Work, WorkqueueStats

__all__ = ["DEFAULT_MAX_ACTIVE", "MAYDAY_INITIAL_TIMEOUT", "MAYDAY_INTERVAL", "Work", "Workqueue", "WorkqueueStats"]

#: The kernel's WQ_DFL_ACTIVE: items of one workqueue in flight at a time, by default.
DEFAULT_MAX_ACTIVE = 256
#: `procpool ps` sees a workqueue's counters at most this long (seconds) after they change.
PUBLISH_INTERVAL = 0.2

# -- the pool registry: one refcounted pool per attribute set (the kernel's unbound_pool_hash) --

_registry_lock = threading.Lock()
_pools: dict[tuple, list] = {}  # R: attrs key -> [WorkerPool, refcount]
_live: list[Workqueue] = []  # R: workqueues made and not destroyed, oldest first


def default_max_workers(cpus: frozenset[int] | None) -> int:
    """A workqueue pool's worker limit: generous, like the kernel's, so that blocking items
    get workers of their own; concurrency management keeps the running ones near the CPU
    count (the pool's concurrency target)."""
    ncpus = len(cpus) if cpus is not None else len(os.sched_getaffinity(0))
    return max(32, 4 * ncpus)


def get_pool(key: tuple, max_workers: int | None) -> WorkerPool:
    """The pool for attributes ``key`` = (nice, cpus), made on first use; takes a reference.
    ``max_workers`` only matters to the workqueue that makes the pool."""
    with _registry_lock:
        entry = _pools.get(key)
        if entry is None:
            nice, cpus = key
            if max_workers is None:
                max_workers = default_max_workers(cpus)
            entry = _pools[key] = [WorkerPool(0, max_workers, nice=nice, cpus=cpus), 0]
        entry[1] += 1
        return entry[0]


def live_pools() -> dict[tuple, int]:
    """For tests and tools: the registry's pools now, attributes key (nice, cpus) -> references."""
    with _registry_lock:
        return {key: entry[1] for key, entry in _pools.items()}


def put_pool(key: tuple, pool: WorkerPool, wait: bool = True) -> None:
    """Drop a reference; the last one closes the pool through its normal teardown (outside R,
    so teardown of one pool never holds up workqueues of other attributes). ``wait=False``
    returns at once: the teardown runs on a thread of its own."""
    with _registry_lock:
        entry = _pools[key]
        assert entry[0] is pool
        entry[1] -= 1
        last = entry[1] == 0
        if last:
            del _pools[key]
    _publish()  # before a slow teardown: the workqueue no longer uses the pool
    if last:
        pool.close(wait=wait)


# -- publishing the statistics for `procpool ps` -----------------------------------------------

_publish_lock = threading.Lock()
_dirty = threading.Event()  # set: some workqueue's numbers changed since the last write
_publisher: threading.Thread | None = None  # R: started with the first workqueue


def _publish() -> None:
    """Write every live workqueue's entry to the segment (none: unlink it). Snapshot and write
    under P, so that of two racing calls the later write holds the later state."""
    with _publish_lock:
        _dirty.clear()  # a change from now on is written by the next call
        with _registry_lock:
            wqs = list(_live)
        write_workqueues([_segment_entry(wq) for wq in wqs])


def _segment_entry(wq: Workqueue) -> dict[str, Any]:
    """A workqueue as the segment shows it to ``procpool ps``: attributes, the pools it
    holds (two while apply_attrs waits for items on the old one), and its stats."""
    stats = dataclasses.asdict(wq.stats())
    with wq._lock:
        nice, cpus = wq._key
        pools = [] if wq._foreign else sorted({p.id for p in wq._books.pools()})
    return {
        "name": wq.name,
        "pools": pools,
        "max_active": wq.max_active,
        "ordered": wq.ordered,
        "nice": nice,
        "cpus": sorted(cpus) if cpus is not None else None,
        "rescuer": wq._rescuer is not None,
        **stats,
    }


def _mark_dirty() -> None:
    if not _dirty.is_set():  # the common case is one cheap read
        _dirty.set()


def _publisher_loop() -> None:
    while True:
        _dirty.wait()
        try:
            _publish()
        except Exception:  # noqa: BLE001 - observers' numbers must never take a workqueue down
            pass
        time.sleep(PUBLISH_INTERVAL)


def _register(wq: Workqueue) -> None:
    global _publisher
    with _registry_lock:
        _live.append(wq)
        if _publisher is None:
            _publisher = threading.Thread(target=_publisher_loop, name="procpool-wq-publisher", daemon=True)
            _publisher.start()
    _publish()


def _unregister(wq: Workqueue) -> None:
    with _registry_lock:
        if wq in _live:
            _live.remove(wq)


def _forget_parents_workqueues() -> None:
    """In a child forked from the program: its workqueues and pools belong to the parent (their
    threads did not come along), so the child starts with none of its own. Fresh locks too: a
    fork copies a lock held by another thread as held, forever."""
    global _registry_lock, _publish_lock, _dirty, _publisher
    _registry_lock = threading.Lock()
    _publish_lock = threading.Lock()
    _dirty = threading.Event()
    _publisher = None
    _pools.clear()
    _live.clear()


os.register_at_fork(after_in_child=_forget_parents_workqueues)


@atexit.register
def _destroy_at_exit() -> None:
    """Registered after procpool.pool's own hook, so it runs first: the pools are still open
    while the workqueues' queued items finish. Each workqueue's delayed items are cancelled
    (their timers would hold the exit up), the queued ones finish, then it is destroyed."""
    with _registry_lock:
        # Only in the program that made them: a fork of it (os.fork, then sys.exit) inherits
        # the list but not the pools' threads, and would wait forever.
        wqs = [wq for wq in reversed(_live) if wq._owner_pid == os.getpid()]
    for wq in wqs:
        with wq._lock:
            delayed = sorted(wq._timer.delayed, key=lambda w: w.deadline or 0.0)
        for work in delayed:
            wq.cancel_work(work)
        wq.destroy()


def _release_later(held: tuple[tuple, WorkerPool]) -> None:
    """Drop a pool reference without waiting for a last one's teardown."""
    put_pool(*held, wait=False)


def _max_active(ordered: bool, max_active: int | None) -> int:
    """The items in flight at a time that ``ordered`` and ``max_active`` ask for, checked."""
    if ordered:
        if max_active not in (None, 1):
            raise ValueError(f"an ordered workqueue runs one item at a time; max_active={max_active}")
        return 1
    max_active = DEFAULT_MAX_ACTIVE if max_active is None else max_active
    check_number("max_active", max_active, minimum=1, integer=True)
    return max_active


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None:
        check_number("timeout", timeout, minimum=0)


def _refuse_for_foreign(name: str, nice: int, cpus: set[int] | None, max_workers: int | None, rescuer: bool) -> None:
    """What only procpool's own pools can do, refused for a workqueue on a foreign executor."""
    asked = [
        f"{what}={value!r}"
        for what, value, default in (("nice", nice, 0), ("cpus", cpus, None), ("max_workers", max_workers, None))
        if value != default
    ]
    if rescuer:
        asked.append("rescuer=True")
    if asked:
        raise ValueError(
            f"workqueue {name!r}: {', '.join(asked)} need procpool's own worker pools (pool attributes, "
            "pool size, a rescuer process); a foreign executor sizes and places its workers itself"
        )


class Workqueue:
    """A named front end on a shared worker pool, with its own ``max_active`` limit.

    ``ordered=True`` runs one item at a time, in queue order (max_active 1). ``nice`` and
    ``cpus`` are the pool attributes; ``max_workers`` sizes the pool if this workqueue makes it.
    Also a context manager: leaving it destroys the workqueue.

    ``rescuer=True`` (the kernel's WQ_MEM_RECLAIM) guarantees forward progress: a rescuer
    process titled ``kworker/R-<name>``, started now (while the OS still gives processes),
    runs this workqueue's waiting items one at a time when the pool cannot create workers.

    ``executor``: run the items on any ``concurrent.futures.Executor`` instead of procpool's
    pools; the module docstring says what holds there and what is refused.
    """

    def __init__(
        self,
        name: str,
        *,
        max_active: int | None = None,
        ordered: bool = False,
        nice: int = 0,
        cpus: set[int] | None = None,
        max_workers: int | None = None,
        rescuer: bool = False,
        executor: Executor | None = None,
    ) -> None:
        check_name("name", name)
        max_active = _max_active(ordered, max_active)
        self.name = name  # I
        self.max_active = max_active  # I
        self.ordered = ordered  # I
        key = check_attrs(nice, cpus)
        self._max_workers = max_workers  # I
        self._foreign = executor is not None  # I: items run on a foreign executor (procpool.foreign)
        if executor is not None:
            _refuse_for_foreign(name, nice, cpus, max_workers, rescuer)
            # Duck-typed: a ForeignExecutor has the part of WorkerPool a workqueue uses.
            pool = cast("WorkerPool", ForeignExecutor(executor))
        else:
            pool = get_pool(key, max_workers)
        # I (its state: L): the queue, what is in flight on which pool, the counters
        self._books = Books(key, pool, max_active, _mark_dirty)
        self._account = Account(_mark_dirty)  # I: what the pools count for this workqueue
        self._owner_pid = os.getpid()  # I

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # an item finished or left the queue
        # I: hands pumped items to their pools, completes them
        self._handoff = Handoff(
            self, name, self._lock, self._changed, self._books, self._account, self._pump, _release_later
        )
        self._submit = self._handoff.submit  # I
        self._finish = self._handoff.finish  # I
        # I (its state: L): the delayed items and the thread that queues them at their deadline
        self._timer = DelayedTimer(self._lock, name, self._due, self._submit)
        self._draining = 0  # L: drain() calls under way; only chained queueing is allowed
        self._destroyed = False  # L
        self._rescuer: Rescuer | None = None  # I: rescuer=True only (its state: L)
        if rescuer:
            try:
                self._rescuer = Rescuer(
                    self._lock, name, key, self._books.inflight, self._account, self._finish, _mark_dirty
                )
            except BaseException:
                put_pool(key, pool)
                raise
        _register(self)

    @property
    def pool(self) -> WorkerPool:
        """The pool new items go to (apply_attrs changes it)."""
        return self._books.pool

    @property
    def _key(self) -> tuple:
        """(nice, cpus): the pool attributes, the registry key of ``pool``."""
        return self._books.key

    @property
    def _rescuer_pool(self) -> WorkerPool | None:
        """The rescuer's one-worker pool now in use (None without a rescuer)."""
        return self._rescuer.pool if self._rescuer is not None else None

    # -- queueing ----------------------------------------------------------------------------

    def queue(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Work:
        """Queue ``fn(*args, **kwargs)``; returns its ``Work`` (a Future). A call that cannot
        be pickled fails its Work with TypeError when the pool is handed it."""
        work = Work(self, fn, args, kwargs)
        with self._lock:
            self._check_may_queue()
            self._books.enqueue(work)
            sends = self._pump()
        self._submit(sends)
        return work

    def queue_delayed(self, delay: float, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Work:
        """Queue ``fn(*args, **kwargs)`` once ``delay`` seconds have passed (never earlier)."""
        check_number("delay", delay, minimum=0)
        work = Work(self, fn, args, kwargs)
        with self._lock:
            self._check_may_queue()
            self._timer.arm(work, delay)
        return work

    def mod_delayed(self, work: Work, delay: float) -> bool:
        """Re-arm ``work`` to be queued ``delay`` seconds from now, if it has not started (its
        timer is pending, or it waits in the queue). False if it is in flight or done."""
        check_number("delay", delay, minimum=0)
        self._check_mine(work)
        with self._lock:
            if work.where == "pending":
                # Taken back from the queue under L, so the pump cannot start it meanwhile.
                self._books.unqueue(work)
                self._changed.notify_all()  # a flush may have waited for it
            elif work.where != "delayed":
                return False
            self._timer.arm(work, delay)
            return True

    # -- waiting and cancelling ---------------------------------------------------------------

    def flush_work(self, work: Work, timeout: float | None = None) -> bool:
        """Wait until ``work`` finished. False if it was never queued (its timer is pending);
        True once it ended (result, exception or cancelled). TimeoutError if ``timeout`` ran
        out first (as ``Future.result``)."""
        _check_timeout(timeout)
        self._check_mine(work)
        with self._lock:
            if work.where == "delayed":
                return False
        if not work.done():
            self._check_may_wait("flush_work")
        try:
            work.exception(timeout)
        except CancelledError:
            pass
        return True

    def flush_delayed_work(self, work: Work, timeout: float | None = None) -> bool:
        """Queue ``work`` now if its timer is pending, then wait until it finished. False if it
        had ended already before this call, else True once it ended (TimeoutError as
        ``flush_work``)."""
        _check_timeout(timeout)
        self._check_mine(work)
        with self._lock:
            if work.where == "done":
                return False
            sends = []
            if work.where == "delayed":
                self._timer.disarm(work)
                self._books.enqueue(work)
                sends = self._pump()
        self._submit(sends)
        return self.flush_work(work, timeout)

    def cancel_delayed_work(self, work: Work, sync: bool = False) -> bool:
        """The kernel's name for cancelling a delayed item: the same as ``cancel_work``, which
        stops a pending timer as well as a queued item."""
        return self.cancel_work(work, sync)

    def cancel_work(self, work: Work, sync: bool = False) -> bool:
        """Cancel ``work`` if no worker has started it: delayed, queued, or handed to the pool
        but still in its worklist. True, and it never runs. If a worker has it, it cannot be
        stopped: with ``sync`` wait for it to finish; False."""
        self._check_mine(work)
        with self._lock:
            # Cancel racing a start: the pump takes an item off the queue and marks it RUNNING
            # under L, and so does this: exactly one of them finds it pending. Without L a
            # cancelled item could still be handed to the pool, or a started one reported
            # cancelled while it runs. In the pool's worklist the pool's lock decides between
            # this and a worker taking it (take_unstarted, like the rescuer).
            if work.where == "pending":
                self._books.pending.remove(work)
            elif work.where == "delayed":
                work.deadline = None  # its heap entry goes stale
            elif (
                work.where == "inflight"
                and work.pool_future is not None
                and work.pool is not None
                and work.pool.take_unstarted(work.pool_future)
            ):
                pass  # the pool forgot it; its future is never completed
            else:
                # In flight (it may be running: only the pool's cancel_running could stop
                # it) or done already.
                if sync and work.where == "inflight":
                    self._lock.release()
                    try:
                        self._check_may_wait("cancel_work(sync=True)")
                    finally:
                        self._lock.acquire()
                    self._changed.wait_for(lambda: work.where == "done")
                return False
            # Off the queue and the timer: nobody can start, re-arm or cancel it any more.
            # It still counts for flush/drain until it is cancelled, below.
            was, work.where = work.where, "cancelling"
        # Outside L: cancel() runs the Work's done-callbacks, which may queue more.
        cancelled = work._cancel_now()
        sends, release = [], None
        with self._lock:
            # Only now off the books: a flusher woken here finds the Work already cancelled.
            if was == "pending":
                del self._books.active[work.seq]
            elif was == "inflight":
                del self._books.active[work.seq]
                release = self._books.leave_inflight(work, ran=False)
                sends = self._pump()
            else:
                self._timer.delayed.discard(work)
            work.where = "done"
            self._changed.notify_all()
        _mark_dirty()
        self._handoff.after_leaving(release, sends)
        return cancelled

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every item queued before this call finished. Items queued meanwhile
        (chained from completions) are not waited for; delayed items count once their timer
        put them on the queue. False if ``timeout`` ran out."""
        _check_timeout(timeout)
        self._check_may_wait("flush")
        with self._lock:
            # Flush racing a requeue: a mark, not "until empty". An item queued while we wait
            # (a completion chaining another, a timer firing) gets a later seq and does not
            # hold us, so a steady stream of requeues cannot starve a flusher.
            mark = next(self._books.seq) - 1

            def done() -> bool:
                oldest = next(iter(self._books.active), None)
                return oldest is None or oldest > mark

            return self._changed.wait_for(done, timeout)

    def drain(self, timeout: float | None = None) -> bool:
        """Flush until the workqueue is empty (delayed items included). Meanwhile only chained
        queueing (from a done-callback of one of its own items) is allowed; other queueing
        raises RuntimeError. False if ``timeout`` ran out."""
        _check_timeout(timeout)
        self._check_may_wait("drain")
        with self._lock:
            self._draining += 1
            try:
                return self._changed.wait_for(lambda: not self._books.active and not self._timer.delayed, timeout)
            finally:
                self._draining -= 1

    def destroy(self) -> None:
        """Drain, then drop this workqueue's reference on its pool (the last one closes it).
        Idempotent; queueing afterwards raises RuntimeError."""
        self._check_may_wait("destroy")
        with self._lock:
            if self._destroyed:
                return
            self._draining += 1
            try:
                self._changed.wait_for(lambda: not self._books.active and not self._timer.delayed)
            finally:
                self._draining -= 1
            if self._destroyed:
                return  # destroyed by another thread meanwhile
            # In the same critical section as the drain's last check: an unchained queue()
            # slipping in between would leave an item behind on a pool about to be closed.
            self._destroyed = True
            self._timer.stop()
            if self._rescuer is not None:
                self._rescuer.stop()
            key, pool = self._key, self.pool
        _unregister(self)
        self._timer.join()
        if self._rescuer is not None:
            self._rescuer.close()  # drained: the rescuer holds no item, only waits for a mayday
        if self._foreign:
            _publish()  # gone from procpool ps (put_pool does this for a pool of ours)
        else:  # a foreign executor is the caller's to shut down
            put_pool(key, pool)

    def apply_attrs(self, *, nice: int = 0, cpus: set[int] | None = None) -> None:
        """Switch the workqueue to the pool for attributes (``nice``, ``cpus``), the kernel's
        apply_workqueue_attrs(): the attributes are given in full, as to the constructor.
        Items not yet handed to a pool (waiting or delayed) and all new ones go to the new
        (shared, refcounted) pool; items already in flight finish on the old one, whose
        reference is dropped once the last of them finished (the last reference closes it,
        on a teardown thread of its own). A rescuer is replaced by a process with the new
        attributes, started here (so a failure to start it raises, and nothing changes)."""
        if self._foreign:
            raise ValueError(f"workqueue {self.name!r} runs on a foreign executor: it has no pool attributes to apply")
        key = check_attrs(nice, cpus)
        with self._lock:
            if self._destroyed:
                raise RuntimeError(f"workqueue {self.name!r} is destroyed")
            if key == self._key:
                return
        # Outside L: these start processes.
        rescuer_pool = start_rescuer_pool(self.name, key) if self._rescuer is not None else None
        try:
            new = get_pool(key, self._max_workers)
        except BaseException:
            if rescuer_pool is not None:
                rescuer_pool.close(wait=False)
            raise
        release = []
        unused_rescuer = None
        with self._lock:
            destroyed = self._destroyed
            if destroyed:
                release.append((key, new))  # destroyed meanwhile: undo
                unused_rescuer = rescuer_pool
            else:
                if self._rescuer is not None and rescuer_pool is not None:
                    # The rescuer thread switches over between rescues and closes the old one.
                    unused_rescuer = self._rescuer.replace(rescuer_pool)
                release = self._books.switch(key, new)
        for k, p in release:
            put_pool(k, p, wait=False)
        if unused_rescuer is not None:
            unused_rescuer.close(wait=False)
        if not release:
            _publish()  # the workqueue's pools changed
        if destroyed:
            raise RuntimeError(f"workqueue {self.name!r} is destroyed")

    def stats(self) -> WorkqueueStats:
        acct = self._account
        with self._lock:
            return WorkqueueStats(
                **self._books.counts(),
                delayed=len(self._timer.delayed),
                cpu_time=acct.cpu_time,
                cpu_intensive=acct.cpu_intensive,
                cm_wakeups=acct.cm_wakeups,
                mayday=self._rescuer.mayday if self._rescuer is not None else 0,
                rescued=self._rescuer.rescued if self._rescuer is not None else 0,
            )

    @property
    def pool_key(self) -> tuple:
        """For tests and tools: the attributes (nice, cpus) of the pool new items go to, its registry key."""
        with self._lock:
            return self._key

    @property
    def rescuer_pool(self) -> WorkerPool | None:
        """For tests and tools: the rescuer's own pool (None without rescuer=True)."""
        with self._lock:
            return self._rescuer_pool

    @property
    def draining(self) -> bool:
        """For tests and tools: whether a drain() is under way."""
        with self._lock:
            return self._draining > 0

    def __enter__(self) -> Workqueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        s = self.stats()
        where = f"on {cast(ForeignExecutor, self.pool).executor!r}" if self._foreign else f"u{self.pool.id}"
        return f"<Workqueue {self.name} {where} max_active={self.max_active} in_flight={s.in_flight}>"

    # -- internals (L held unless said) --------------------------------------------------------

    def _check_may_queue(self) -> None:
        if self._destroyed:
            raise RuntimeError(f"workqueue {self.name!r} is destroyed")
        if self._draining and getattr(chained, "wq", None) is not self:
            raise RuntimeError(f"workqueue {self.name!r} is draining: only chained queueing is allowed")

    def _check_may_wait(self, what: str) -> None:
        """Refuse to wait on the thread that would have to deliver what we wait for: a
        done-callback runs on a pool's arbiter thread, and blocking it there would wait
        forever. A clear error instead of a hang."""
        with self._lock:
            pools = self._books.pools()
            if self._rescuer is not None:
                pools.extend(self._rescuer.pools())
        self._handoff.refuse_on_arbiter(what, pools)

    def _check_mine(self, work: Work) -> None:
        if not isinstance(work, Work) or work.wq is not self:
            raise ValueError(f"{work!r} is not an item of workqueue {self.name!r}")

    def _pump(self) -> list[Work]:
        """Take items off the queue while there is room; the caller submits them outside L."""
        out = self._books.pump()
        if out and self._rescuer is not None:
            self._rescuer.kick()
        return out

    def _due(self, works: list[Work]) -> list[Work]:
        """The timer fired ``works``: queue them in deadline order; returns the pump's take."""
        for work in works:
            self._books.enqueue(work)
        return self._pump()
