"""WorkerPool: the userspace ``struct worker_pool``.

Worker state machine, as the parent sees it::

      create_workers()                 destroy_worker()                   (worker's exit path)
   ─────────────────────► idle ⇄ busy ──(idle only)──► dying ─────────────────────────────► gone
   M: alloc lowest id,     L: idle list  L: off the idle list,   title kworker/dying,           │
   start the process          + current    DIE flag + message,   M: free id, last one out       │
   (arbiter thread)                        return at once        completes the teardown wait    │
                                                                                                 │
   a crash at any point ─► sentinel readable ─► reap():  drain its pipe, fail the item it   ◄───┘
                           was running (WorkerLost), free its id on its behalf, maybe complete

   Other ways to dying, all through Books.take_off() (the one way off the books): a busy worker
   *retires* after max_tasks_per_child items (DIE, normal exit path); a worker whose
   initializer raised is destroyed (DIE) and breaks the pool; kill_worker() (item timeout,
   cancel_running) SIGKILLs a busy one, and reap() fails its item with the kill's reason.

Path of one work item::

   submit()   [caller thread]  pickle (fn, args, kwargs) ─► L: idle worker? ─yes─► send to it
                                                              │ no
                                                              └─► worklist (+ wake the arbiter to grow;
                                                                  every 256th: let it run if it has not)
   worker     recv ─► (spin up to SPIN for the next item if they come that fast) ─► run ─►
              send seq + CPU time + (ok, value, traceback)
   arbiter    [one thread]     recv ─► L: its next prefetched item, or the next from the
                               worklist (+ up to PREFETCH_MAX more behind it, about
                               PREFETCH_WINDOW of work, when items are short and the worklist
                               deep) ─► send; or enter idle
                               ─► set the Future

   A worker runs what it was sent in order and answers each item at once, so when it dies
   the oldest unanswered item is the one it was running (WorkerLost) and every later one
   never started: those go back to the front of the worklist.

Threads in the parent: callers (submit, close, stats), and one *arbiter* thread that owns the
selector: it receives results, reaps exited workers, grows the pool when work waits, culls
idle workers past their timeout and kills workers whose item ran past its own timeout. It
never blocks on a worker.

WorkerPool is a facade over parts with one job each, composed (none imports this module):
procpool.config (the validated, frozen arguments), procpool.books (workers, items, counters,
the one way off the books), procpool.policy (the kernel's predicates), procpool.creation
(starting workers), procpool.arbiter (the event loop and its handlers, the result decoding),
procpool.concurrency (when to grow: the nr_running rule and its sampler), procpool.teardown
(close(), the only place that waits for workers); procpool.calls pickles a call.

Guards (the legend is procpool.locking's): L = the pool lock (books.lock), M = Manager locks,
I = set in __init__, read-only after, A = arbiter thread only.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import multiprocessing
import multiprocessing.util  # (also) so that its atexit hook is registered before ours
import os
import selectors
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from . import faults as _faults
from .arbiter import YIELD_EVERY, Arbiter, Reaper, Wakeup, send_items
from .books import PREFETCH_BELOW as PREFETCH_BELOW
from .books import PREFETCH_BYTES as PREFETCH_BYTES
from .books import PREFETCH_MAX as PREFETCH_MAX
from .books import Books, Item, Worker, worker_infos
from .calls import dumps_call, dumps_initializer
from .checks import check_number
from .concurrency import ConcurrencyManagement
from .config import CPU_INTENSIVE_THRESHOLD, SPIN, PoolConfig
from .config import KEEP_IDLE as KEEP_IDLE
from .config import MAX_IDLE_WORKERS_RATIO as MAX_IDLE_WORKERS_RATIO
from .creation import CREATE_COOLDOWN as CREATE_COOLDOWN
from .creation import Creator
from .errors import ItemCancelled
from .future import new_future
from .idtable import MAX_WORKERS, IdTable, capacity_for
from .poollocks import PoolLocks
from .spawner import resolve_context, stop_spawner
from .stats import Account, PoolStats, WorkerInfo
from .teardown import Teardown

__all__ = ["MAX_WORKERS", "SPIN", "WorkerPool"]

#: How long a failed constructor waits for its filler thread to end (it may be making the
#: pool's locks, which may start the program's Manager): seconds.
ABORT_FILLER_JOIN = 10.0


# -- pool ids: small ints, unique among this program's live pools ---------------------------

_ids_lock = threading.Lock()  # guards _pool_ids
_pool_ids: set[int] = set()
_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


def _alloc_pool_id() -> int:
    with _ids_lock:
        pid = next(i for i in itertools.count() if i not in _pool_ids)
        _pool_ids.add(pid)
        return pid


def _free_pool_id(pid: int) -> None:
    with _ids_lock:
        _pool_ids.discard(pid)


@atexit.register
def _close_live_pools() -> None:
    """At interpreter exit, close pools their owners forgot (pending work still runs), then
    let the spawner go. Registered after multiprocessing's own exit hook (imported above), so
    it runs before that hook joins child processes such as the spawner."""
    for pool in list(_live_pools):
        # Only the program's own pools: a fork of the program (os.fork, then a normal exit)
        # inherits this set but not the pools' arbiter threads; closing them there would send
        # DIE to the program's workers through inherited pipes, then wait forever.
        if pool._owner_pid == os.getpid():
            pool.close(wait=True)
    stop_spawner()


# A process that multiprocessing started (a Dask worker, a Pool's worker, any Process) ends by
# joining its own multiprocessing children *before* atexit runs (Process._bootstrap calls
# util._exit_function directly); a spawner started through multiprocessing is such a child,
# and it leaves only once the program is gone: that join would wait forever. Finalizers of
# priority >= 0 run before that join, so the same clean-up runs there first (idempotent), before
# any other finalizer of the program's.
multiprocessing.util.Finalize(None, _close_live_pools, exitpriority=100)


class WorkerPool:
    """A pool of worker processes with asynchronous worker destruction.

    ``min_workers`` processes start at once (the constructor returns with the first 2 up; a
    thread starts the rest and makes the pool's Manager locks: docs/design.md "Pool start") and
    are never culled; a submit that finds no idle worker starts another, up to ``max_workers``
    (at most ``MAX_WORKERS``, 4096: see procpool.idtable); idle workers beyond "2 idle plus 1
    per 4 busy" are destroyed once idle for ``idle_timeout`` seconds. Destroying a worker never
    waits for it: the worker detaches itself on its way out, and only ``close`` waits, once,
    for the last one.

    ``title_prefix`` replaces ``kworker`` in the process titles; ``title`` replaces a live
    worker's whole title (a workqueue's rescuer: ``kworker/R-name``); both must be printable,
    without spaces (ValueError). ``linger_dying`` (debug) keeps a dying worker alive that many
    seconds after it detached, so ``kworker/dying`` and id reuse can be watched in ps/htop.
    ``faults`` arms fault points (tests only; see ``procpool.faults``). ``mp_context`` is a
    start method name or context ('forkserver' by default, or 'spawn').

    ``initializer(*initargs)`` runs in each worker before its first item; if it raises, the
    pool is broken (see ``InitializerFailed``). With ``max_tasks_per_child`` a worker retires
    after that many items: it is destroyed like an idle one (normal exit path, counted in
    ``destroyed``) and replaced when work waits.

    Concurrency management (the kernel's ``nr_running``): a new worker is started only while
    fewer than ``concurrency`` busy workers are running (default: the CPUs of ``cpus``, else of
    the affinity mask); a busy worker whose process is blocked, or whose item kept the CPU past
    ``cpu_intensive_threshold`` seconds (CPU-intensive), does not count. See procpool.concurrency.

    ``spin``: seconds a worker that has just answered polls for its next item before it sleeps,
    while items come that quickly (see SPIN); it trades at most that much CPU after a burst
    for the wake-up a one-at-a-time caller would otherwise wait for. 0 turns it off.
    """

    def __init__(
        self,
        min_workers: int | None = None,
        max_workers: int | None = None,
        idle_timeout: float = 300.0,
        *,
        title_prefix: str = "kworker",
        title: str | None = None,
        linger_dying: float = 0.0,
        mp_context: Any = None,
        faults: str | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        max_tasks_per_child: int | None = None,
        nice: int = 0,
        cpus: set[int] | frozenset[int] | None = None,
        concurrency: int | None = None,
        cpu_intensive_threshold: float = CPU_INTENSIVE_THRESHOLD,
        spin: float = SPIN,
    ) -> None:
        self.config = cfg = PoolConfig.build(
            min_workers, max_workers, idle_timeout, title_prefix=title_prefix, title=title,
            linger_dying=linger_dying, max_tasks_per_child=max_tasks_per_child, nice=nice, cpus=cpus,
            concurrency=concurrency, cpu_intensive_threshold=cpu_intensive_threshold, spin=spin,
        )  # fmt: skip
        # Last of the checks: it dups the descriptors initargs hold (closed in _abort_init or
        # _unlist, or just below if a check still fails).
        init_payload, self._init_fds = dumps_initializer(initializer, initargs)
        fault_text = faults if faults is not None else os.environ.get(_faults.ENV)
        self.fault_spec = _faults.parse(fault_text)  # I (tests arm and clear points in it)
        try:
            self._ctx = resolve_context(mp_context)  # I
        except BaseException:
            self._close_init_fds()
            raise
        # I: may the program's spawner be a plain fork of it (single-threaded programs only)?
        # Only by default: an explicit mp_context is honoured, e.g. by a program whose large,
        # changing heap should not be shared copy-on-write with a long-lived spawner.
        self._allow_fork = mp_context is None
        self._books = Books(cfg)
        self._seq = itertools.count()
        self.id = _alloc_pool_id()  # I
        self._owner_pid = os.getpid()  # I: the program; a fork of it must not tear the pool down
        try:
            self._build_parts(init_payload)
            # The filler first: the arbiter's own fill() passes wait for it to be gone.
            self._creator.start_filler(self._wake)
            self._arbiter.thread.start()
        except BaseException:
            self._abort_init()
            raise
        _live_pools.add(self)

    def _build_parts(self, init_payload: bytes | None) -> None:
        """The id table, the Manager locks, the pipes, the parts; then min_workers workers."""
        cfg, books = self.config, self._books
        # Dying workers keep their ids until they detach, so a pool under churn can hold
        # more ids than workers for a moment; when the table is full, creation waits for
        # the next detach.
        books.table = IdTable.create(self.id, capacity=capacity_for(cfg.max_workers))
        # M arb: one creator at a time, and none once teardown passed its point of no return;
        # M attach: id allocation and freeing, and the detach completion's state
        self._locks = PoolLocks(self._ctx, self._allow_fork, self.id, self.fault_spec)  # I (named; made by the filler)
        completion = self._ctx.Pipe(duplex=False)
        reaper = Reaper(
            self.id, books, self.fault_spec, self._locks, completion[1], Wakeup(), selectors.DefaultSelector()
        )
        self._creator = creator = Creator(
            self.id, books, self._locks, self._ctx, self._allow_fork, self.fault_spec, completion[1].fileno(),
            init_payload, lambda: self._init_fds, lambda w: arbiter.adopt(w), send_items,
        )  # fmt: skip
        cm = ConcurrencyManagement(books, creator.create_workers, lambda: creator.retry_at)
        self._arbiter = arbiter = Arbiter(self.id, books, self.fault_spec, reaper, creator, cm)
        self._teardown = Teardown(self.id, books, arbiter, creator, self._locks, completion, self._unlist)
        creator.start_first()  # the first workers; the filler makes the locks (docs/design.md "Pool start")

    def _unlist(self) -> None:
        """The end of teardown: no longer a live pool, and its id may be reused."""
        self._close_init_fds()
        _free_pool_id(self.id)
        _live_pools.discard(self)

    def _close_init_fds(self) -> None:
        fds, self._init_fds = self._init_fds, []
        for fd in fds:
            os.close(fd)

    def _abort_init(self) -> None:
        if hasattr(self, "_creator"):  # a filler started already (the arbiter could not) adds no more
            self._creator.abandon(ABORT_FILLER_JOIN)
        for w in list(self._books.workers.values()):
            try:
                w.proc.kill()
                w.proc.join(5)
            except Exception:  # noqa: BLE001 - best effort on the way out of a failed __init__
                pass
        if self._books.table is not None:
            self._books.table.destroy()
        self._close_init_fds()
        _free_pool_id(self.id)

    # -- the configuration, as attributes ---------------------------------------------------

    min_workers = property(lambda self: self.config.min_workers)
    max_workers = property(lambda self: self.config.max_workers)
    idle_timeout = property(lambda self: self.config.idle_timeout)
    title_prefix = property(lambda self: self.config.title_prefix)
    title = property(lambda self: self.config.title)
    linger_dying = property(lambda self: self.config.linger_dying)
    max_tasks_per_child = property(lambda self: self.config.max_tasks_per_child)
    nice = property(lambda self: self.config.nice)
    cpus = property(lambda self: self.config.cpus)
    cpu_intensive_threshold = property(lambda self: self.config.cpu_intensive_threshold)
    spin = property(lambda self: self.config.spin)

    @property
    def concurrency(self) -> int:
        """The target number of running workers (see procpool.concurrency)."""
        return self.config.concurrency

    @concurrency.setter
    def concurrency(self, value: int) -> None:
        """Retune the target: a new frozen configuration, swapped in under L for every part."""
        check_number("concurrency", value, minimum=1, integer=True)
        b = self._books
        with b.lock:
            self.config = b.cfg = b.policy.cfg = dataclasses.replace(self.config, concurrency=value)
        self._wake()

    # -- public API -------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)``; returns a ``concurrent.futures.Future``.

        The call is pickled here, in the caller's thread, so an unpicklable function or
        argument raises TypeError naming it, and nothing is queued.
        """
        return self._submit(fn, args, kwargs, None)

    def submit_with(self, fn: Callable[..., Any], /, *args: Any, timeout: float | None = None, **kwargs: Any) -> Future:
        """``submit`` with per-item options. ``timeout``: seconds the item may run once a
        worker has taken it (time spent waiting in the worklist does not count); past it the
        worker is SIGKILLed and replaced, and the item fails with ``ItemTimeout`` (a builtin
        ``TimeoutError``). A killed worker is the only sure way to stop arbitrary code."""
        if timeout is not None:
            check_number("timeout", timeout, minimum=0)
        return self._submit(fn, args, kwargs, timeout)

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        timeout: float | None,
        tag: str | None = None,
        account: Account | None = None,
    ) -> Future:
        """``tag``: shown in the worker's title around the call (``+tag`` while it runs, ``-tag``
        after), as the kernel's comm shows the last workqueue; ``account``: charged with the
        item's CPU time and marks. procpool.workqueue passes both."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {type(fn).__name__}: {fn!r}")
        seq = next(self._seq)
        fut: Future = new_future()
        item = Item(seq, fut, dumps_call(seq, fn, args, kwargs, tag), timeout, account)
        b = self._books
        with b.lock:
            if b.broken is not None:
                raise b.broken_error(self.id)
            if b.closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            w: Worker | None = None
            if b.policy.may_start_working():
                w = b.idle.pop()
                fut.set_running_or_notify_cancel()  # nobody else has seen it: cannot be cancelled
                item.started = True
                b.started += 1
                b.start_item(w, item)
                # The arbiter sleeps until its earliest deadline: tell it about this one.
                wake = timeout is not None
            else:
                b.worklist.append(item)
                # The arbiter decides (concurrency management samples); wake it if the pool might grow.
                wake = b.policy.may_grow()
        if w is not None:
            send_items(w, [item])
        if wake:
            self._wake()
        elif w is None and len(b.worklist) % YIELD_EVERY == 0:  # (read without L: a heuristic)
            self._arbiter.yield_if_starved()  # outside L: may sleep a moment
        return fut

    def cancel_running(self, future: Future) -> bool:
        """Cancel ``future``'s item even if it is running, which ``future.cancel()`` cannot.

        A pending item is simply cancelled. A running one has its worker SIGKILLed (and
        replaced when work waits); the future then fails with ``ItemCancelled``. Returns False
        if the item already ended or its worker is already being killed.
        """
        # Two rounds: an item can leave the worklist for a worker between the scan and
        # future.cancel(), but it is RUNNING only together with being some worker's current
        # item (both under L), so the second scan finds it if the first missed it.
        b = self._books
        for _ in range(2):
            with b.lock:
                if b.drop_prefetched(future):
                    return True
                w = b.running_on(future)
                if w is not None and w.state == "dying":
                    return False  # being killed already (its timeout, an earlier cancel)
                if w is not None:
                    b.kill_worker(w, ItemCancelled, "by cancel_running()")
            if w is not None:
                self._wake()  # growth: a replacement if work waits
                return True
            # Outside L: cancel() runs the future's done-callbacks, which may call submit().
            if future.cancel():
                return True
            if future.done():
                return False
        return False

    def take_unstarted(self, future: Future) -> bool:
        """Take ``future``'s item back out of the worklist if no worker has started it (a
        workqueue's rescuer runs it instead). True if taken: the pool forgets the item and
        never completes ``future``; the caller owns it from now on."""
        with self._books.lock:
            return self._books.take_unstarted(future)

    def creation_stalled_for(self) -> float:
        """Seconds the pool has wanted a worker it failed to create (work waits, nobody idle,
        room to grow, and every creation since the first failure of a row failed); 0.0 when
        it does not. What a workqueue's mayday timer looks at."""
        return self._creator.stalled_for()

    def _live_workers(self) -> list[Worker]:
        """Workers not reaped yet: attached and dying (for the executor's ``_processes``)."""
        with self._books.lock:
            return [*self._books.workers.values(), *self._books.dying]

    def _is_live_worker(self, w: Worker) -> bool:
        with self._books.lock:
            return self._books.is_live(w)

    def _wait_worker_reaped(self, w: Worker, timeout: float | None) -> None:
        """Wait until the reaper took ``w`` off the books, or ``timeout``."""
        b = self._books
        with b.lock:
            b.changed.wait_for(lambda: not b.is_live(w), timeout)

    @property
    def broken(self) -> bool:
        """True once the pool cannot take work: a worker's initializer raised
        (``InitializerFailed``) or the pool's machinery failed (``PoolBroken``); submit refuses."""
        with self._books.lock:
            return self._books.broken is not None

    def stats(self) -> PoolStats:
        with self._books.lock:
            return self._books.stats()

    def workers(self) -> list[WorkerInfo]:
        """Every worker process of the pool, dying ones included, with its title as ps shows it."""
        with self._books.lock:
            rows = [(w.id, w.pid, w.state) for w in self._books.workers.values()]
            rows += [(w.id, w.pid, "dying") for w in self._books.dying]
        return worker_infos(rows, self.id, self.config)

    @property
    def table_name(self) -> str:
        """The name of this pool's shared-memory id table (in /dev/shm)."""
        assert self._books.table is not None
        return self._books.table.name

    def destroy_idle(self, n: int = 1) -> int:
        """Asynchronously destroy up to ``n`` idle workers, longest idle first.

        Returns how many were flagged; never waits for a process (the seed's destroy_worker).
        """
        check_number("n", n, minimum=0, integer=True)
        b = self._books
        with b.lock:
            count = 0
            while count < n and b.idle:
                b.destroy_worker(b.idle[0])
                count += 1
        return count

    def close(self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None) -> None:
        """Tear the pool down (the seed's put_unbound_pool()); idempotent.

        Idle workers are destroyed at once; busy ones finish their item, and pending items
        still run unless ``cancel_futures``. With ``wait``, returns only once every worker
        detached and no process of the pool remains. ``timeout`` bounds the wait for running
        and pending items: after it, pending items fail with PoolClosed, and busy workers get
        SIGTERM, then SIGKILL, their items failing with TeardownTimeout. A teardown step that
        fails kills what is left, ends the teardown, then raises ``PoolBroken`` (its cause).
        """
        self._teardown.close(wait, cancel_futures=cancel_futures, timeout=timeout)

    shutdown = close

    @property
    def completions(self) -> int:
        """How many times the detach completion completed: 0 until teardown, then at most 1
        (0 too when no worker was left attached to wait for)."""
        return self._teardown.completions()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=True)

    def __repr__(self) -> str:
        s = self.stats()
        state = "closed" if self._closed.is_set() else "closing" if self._closing else "running"
        return f"<WorkerPool u{self.id} {state} workers={s.nr_workers} idle={s.nr_idle} dying={s.nr_dying}>"

    # -- what tests and sibling modules reach for (to become public test hooks) ---------------

    def _wake(self) -> None:
        self._arbiter.wakeup.wake()

    @property
    def _table(self) -> IdTable | None:
        return self._books.table

    # -- for tests and tools -----------------------------------------------------------------

    @property
    def manager_locks(self) -> PoolLocks:
        """For tests and tools: the pool's Manager locks (made first if need be; LOST if they cannot be)."""
        self._locks.start()
        return self._locks

    @property
    def id_table(self) -> IdTable:
        """For tests and tools: the pool's shared-memory id table (what ``procpool ps`` reads)."""
        assert self._books.table is not None
        return self._books.table

    @property
    def closed(self) -> bool:
        """For tests and tools: True once teardown finished (every worker gone)."""
        return self._teardown.closed.is_set()

    @property
    def arbiter_alive(self) -> bool:
        """For tests and tools: whether the arbiter thread is running."""
        return self._arbiter.thread.is_alive()

    @property
    def _closed(self) -> threading.Event:
        return self._teardown.closed

    @property
    def _closing(self) -> bool:
        return self._books.closing

    @property
    def _arbiter_thread(self) -> threading.Thread:
        return self._arbiter.thread

    @property
    def _lock(self) -> Any:
        return self._books.lock
