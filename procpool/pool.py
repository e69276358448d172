"""WorkerPool: the userspace ``struct worker_pool``.

Worker state machine, as the parent sees it::

      _create_workers()                _destroy_worker()                 (worker's exit path)
   ─────────────────────► idle ⇄ busy ──(idle only)──► dying ─────────────────────────────► gone
   M: alloc lowest id,     L: idle list  L: off the idle list,   title kworker/dying,           │
   start the process          + current    DIE flag + message,   M: free id, last one out       │
   (arbiter thread)                        return at once        completes the teardown wait    │
                                                                                                 │
   a crash at any point ─► sentinel readable ─► _reap(): drain its pipe, fail the item it   ◄───┘
                           was running (WorkerLost), free its id on its behalf, maybe complete

   Other ways to dying, all off the books at once like _destroy_worker(): a busy worker
   *retires* after max_tasks_per_child items (DIE, normal exit path); a worker whose
   initializer raised is destroyed (DIE) and breaks the pool; _kill_worker() (item timeout,
   cancel_running) SIGKILLs a busy one, and _reap() fails its item with the kill's reason.

Path of one work item::

   submit()   [caller thread]  pickle (fn, args, kwargs) ─► L: idle worker? ─yes─► send to it
                                                              │ no
                                                              └─► worklist (+ wake the arbiter to grow)
   worker     recv ─► (spin up to SPIN for the next item if they come that fast) ─► run ─►
              send seq + CPU time + (ok, value, traceback)
   arbiter    [one thread]     recv ─► L: its next prefetched item, or the next from the
                               worklist (+ up to PREFETCH_MAX more behind it when items are
                               short and the worklist deep) ─► send; or enter idle
                               ─► set the Future

   A worker runs what it was sent in order and answers each item at once, so when it dies
   the oldest unanswered item is the one it was running (WorkerLost) and every later one
   never started: those go back to the front of the worklist.

Threads in the parent: callers (submit, close, stats), and one *arbiter* thread that owns the
selector: it receives results, reaps exited workers, grows the pool when work waits, culls
idle workers past their timeout and kills workers whose item ran past its own timeout. It
never blocks on a worker.

The module is split by concept: procpool.concurrency (when to grow: the nr_running rule and
its sampler), procpool.teardown (close(), the only place that waits for workers),
procpool.calls (pickling a call), procpool.stats (what a pool reports), procpool.checks.

Guards:  L = self._lock (parent only)     M = Manager locks (any process)
         I = set in __init__, read-only after    A = arbiter thread only
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing
import multiprocessing.util  # noqa: F401 - its atexit hook must be registered before ours
import os
import pickle
import selectors
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from . import faults as _faults
from .calls import dumps_call, dumps_initializer
from .checks import check_attrs, check_name, check_number
from .concurrency import CPU_INTENSIVE_THRESHOLD, ConcurrencyManagement
from .errors import (
    LOST,
    InitializerFailed,
    ItemCancelled,
    ItemTimeout,
    PoolBroken,
    PoolClosed,
    RemoteTraceback,
    ResultNotUnpicklable,
    WorkerLost,
)
from .frames import FrameReader, frame, write_all
from .future import new_future
from .idtable import FLAG_DIE, MAX_WORKERS, IdTable, PoolCounters, capacity_for
from .spawner import get_spawner, resolve_context, spawner_pid, stop_spawner
from .stats import Account, PoolStats, WorkerInfo
from .teardown import Teardown
from .worker import (
    CPU_TIME,
    DIE,
    INIT_FAILED,
    RESULT_HEAD,
    SEQ_BYTES,
    WorkerSpec,
    dying_title,
    worker_title,
)

if TYPE_CHECKING:  # the Manager machinery is loaded by the first pool, not on import
    from .manager import PoolLocks

#: Idle workers kept regardless of load, and busy workers per extra idle one kept
#: (the kernel's ``too_many_workers()``: 2 idle plus 1 per MAX_IDLE_WORKERS_RATIO busy).
KEEP_IDLE = 2
MAX_IDLE_WORKERS_RATIO = 4
#: After the OS refuses a new process, wait this long before trying again (kernel: 1 s).
CREATE_COOLDOWN = 1.0
#: Prefetch: items whose recent service time (EWMA, seconds) is below PREFETCH_BELOW are sent
#: to a busy worker up to PREFETCH_MAX at a time when the worklist is deep.
PREFETCH_BELOW = 0.0005
PREFETCH_MAX = 32
#: ... and while the calls sent to it and not answered yet add up to at most this many bytes:
#: well under a pipe's 64 KiB, so the arbiter's write never waits for the worker to read.
#: (A worker blocked sending a large result while the arbiter is blocked writing it more
#: work would be a deadlock.)
PREFETCH_BYTES = 32 * 1024
SERVICE_EWMA_WEIGHT = 0.1
#: A worker that has just answered keeps polling its pipe for the next item this long (seconds)
#: before it sleeps, as long as its previous item came within that time: on a 2-core VM a
#: blocking pipe ping-pong averaged 45 µs, 4 µs with the reader polling (waking a sleeper on
#: the other CPU is the cost), which was most of a one-at-a-time round trip.
SPIN = 0.0002


class _Item:
    __slots__ = ("seq", "future", "payload", "timeout", "started", "dropped", "account")

    def __init__(
        self, seq: int, future: Future, payload: bytes, timeout: float | None = None, account: Account | None = None
    ) -> None:
        self.seq = seq
        self.future = future
        self.payload = payload
        self.timeout = timeout  # seconds it may run once a worker has it (submit_with)
        self.account = account  # I: whose counters its CPU time and marks go to, besides the pool's
        self.started = False  # L: its future is RUNNING (set when first given to a worker)
        self.dropped = False  # L: ended by cancel_running() while prefetched; ignore its answer


class _Worker:
    """The parent's handle on one worker process."""

    __slots__ = (
        "id", "gen", "proc", "conn", "rconn", "rfd", "reader", "pid", "state", "current", "queued", "started_at",
        "idle_since", "kill_reason", "nr_done", "ps", "cm_seq", "cm_cpu0", "cm_blocked", "cm_intensive", "reaped",
    )

    def __init__(self, wid: int, gen: int, proc: Any, conn: Any, rconn: Any) -> None:
        self.id = wid  # I
        self.gen = gen  # I
        self.proc = proc  # I
        self.conn = conn  # I: write end of its work pipe (only this process has it)
        self.rconn = rconn  # I: read end of its result pipe
        # I: its number, what the selector knows it by (a closed Connection has no fileno())
        self.rfd: int = rconn.fileno()
        # A: _reap() ran: its pipes are closed, and any event of the same select() for it is stale
        self.reaped = False
        self.reader = FrameReader(rconn.fileno())  # A: buffered reads of its results
        self.pid: int = proc.pid  # I
        self.state = "idle"  # L
        self.current: _Item | None = None  # L: the item it runs
        # L: items sent to it behind ``current`` (prefetched short items), in the order it
        # runs them; each becomes ``current`` when the result before it arrives.
        self.queued: deque[_Item] = deque()
        self.started_at = 0.0  # L: when ``current`` started, as far as the parent can tell
        self.idle_since = time.monotonic()  # L
        # L: if the parent killed it, the error its item gets and the why for the message
        self.kill_reason: tuple[type[Exception], str] | None = None
        self.nr_done = 0  # L: items it answered (max_tasks_per_child)
        self.ps: Any = None  # A: cached psutil.Process, made on its first sample
        # Concurrency management (L): the item the samples below are about, its CPU time at the
        # first sample, and whether it is excluded from nr_running (blocked / CPU-intensive).
        self.cm_seq = -1
        self.cm_cpu0 = 0.0
        self.cm_blocked = False
        self.cm_intensive = False


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
# priority >= 0 run before that join, so the same clean-up runs there first (idempotent). Above
# the manager proxies' own finalizers (priority 10), which would forget the pools' locks first.
multiprocessing.util.Finalize(None, _close_live_pools, exitpriority=100)


class WorkerPool(ConcurrencyManagement, Teardown):
    """A pool of worker processes with asynchronous worker destruction.

    ``min_workers`` processes start at once and the pool never culls below them; a submit that
    finds no idle worker starts another, up to ``max_workers``; idle workers beyond "2 idle
    plus 1 per 4 busy" are destroyed once idle for ``idle_timeout`` seconds. Destroying a
    worker never waits for it: the worker detaches itself on its way out, and only ``close``
    waits, once, for the last one to leave.

    ``max_workers`` is at most ``MAX_WORKERS`` (4096; see procpool.idtable for why).

    ``title_prefix`` replaces ``kworker`` in the process titles; ``title`` replaces a live
    worker's whole title (a workqueue's rescuer: ``kworker/R-name``); both must be printable,
    without spaces (ValueError). ``linger_dying`` (debug) keeps
    a dying worker alive that many seconds after it detached, so ``kworker/dying`` and id
    reuse can be watched in ps/htop. ``faults`` arms fault points (tests only; see
    ``procpool.faults``). ``mp_context`` is a start method name or context ('forkserver' by
    default, or 'spawn').

    ``initializer(*initargs)`` runs in each worker before its first item; if it raises, the
    pool is broken (see ``InitializerFailed``). With ``max_tasks_per_child`` a worker retires
    after that many items: it is destroyed like an idle one (normal exit path, counted in
    ``destroyed``) and replaced when work waits.

    Concurrency management (the kernel's ``nr_running``): a new worker is started only while
    fewer than ``concurrency`` busy workers are running (default: the CPUs of ``cpus``, else of
    the affinity mask); a busy worker whose process is blocked, or whose item kept the CPU past
    ``cpu_intensive_threshold`` seconds (CPU-intensive), does not count. See _maybe_sample().

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
        cpus: set[int] | None = None,
        concurrency: int | None = None,
        cpu_intensive_threshold: float = CPU_INTENSIVE_THRESHOLD,
        spin: float = SPIN,
    ) -> None:
        if max_workers is None:
            max_workers = max(min(os.cpu_count() or 1, MAX_WORKERS), (min_workers or 0))
        check_number("max_workers", max_workers, minimum=1, integer=True)
        if max_workers > MAX_WORKERS:
            raise ValueError(
                f"max_workers must be at most {MAX_WORKERS} (procpool.pool.MAX_WORKERS: each worker is a process), "
                f"got {max_workers}"
            )
        if min_workers is None:
            min_workers = min(KEEP_IDLE, max_workers)
        check_number("min_workers", min_workers, minimum=0, integer=True)
        if min_workers > max_workers:
            raise ValueError(f"min_workers ({min_workers}) must not exceed max_workers ({max_workers})")
        check_number("idle_timeout", idle_timeout, minimum=0)
        check_number("linger_dying", linger_dying, minimum=0)
        if max_tasks_per_child is not None:
            check_number("max_tasks_per_child", max_tasks_per_child, minimum=1, integer=True)
        nice, cpus = check_attrs(nice, cpus)
        if concurrency is None:
            concurrency = len(cpus) if cpus is not None else len(os.sched_getaffinity(0))
        check_number("concurrency", concurrency, minimum=1, integer=True)
        check_number("cpu_intensive_threshold", cpu_intensive_threshold, minimum=0)
        check_number("spin", spin, minimum=0)
        if spin > 0.01:
            raise ValueError(f"spin must be at most 0.01 s (it burns CPU while it lasts), got {spin!r}")
        check_name("title_prefix", title_prefix)
        if title is not None:
            check_name("title", title)
        # Last of the checks: it dups the descriptors initargs hold (closed in _abort_init or
        # _unlist, or just below if a check still fails).
        init_payload, init_fds = dumps_initializer(initializer, initargs)
        fault_text = faults if faults is not None else os.environ.get(_faults.ENV)
        self._faults = _faults.parse(fault_text)  # I

        self.min_workers = min_workers  # I
        self.max_workers = max_workers  # I
        self.idle_timeout = float(idle_timeout)  # I
        self.title_prefix = title_prefix  # I
        self.title = title  # I: every worker's whole title, or None for worker_title()
        self.linger_dying = float(linger_dying)  # I
        self.max_tasks_per_child = max_tasks_per_child  # I
        self.nice = nice  # I: niceness every worker adds to its own at start (os.nice)
        self.cpus = cpus  # I: CPUs every worker is bound to at start, or None (inherit)
        self.concurrency = concurrency  # I: target number of running workers
        self.spin = float(spin)  # I: see SPIN
        self.cpu_intensive_threshold = float(cpu_intensive_threshold)  # I
        self._init_payload = init_payload  # I: pickled (initializer, initargs) for WorkerSpec
        # I: copies of the descriptors initargs hold (a Queue's pipe, a Value's arena), sent with
        # every spawn request for the workers to inherit; closed when the pool is gone.
        self._init_fds = init_fds
        try:
            self._ctx = resolve_context(mp_context)  # I
        except BaseException:
            self._close_init_fds()
            raise
        # I: may the program's spawner be a plain fork of it (single-threaded programs only)?
        # Only by default: an explicit mp_context is honoured, e.g. by a program whose large,
        # changing heap should not be shared copy-on-write with a long-lived spawner.
        self._allow_fork = mp_context is None

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when workers or items go away
        self._workers: dict[int, _Worker] = {}  # L: attached workers by id (idle + busy)
        self._idle: deque[_Worker] = deque()  # L: most recently idle at the right; cull from the left
        self._dying: set[_Worker] = set()  # L: destroyed, not reaped yet
        self._worklist: deque[_Item] = deque()  # L: items waiting for a worker
        self._closing = False  # L: close() was called; submit refuses
        self._no_create = False  # M arb: teardown passed the point of no return
        self._created = self._destroyed = self._items_done = self._lost = 0  # L
        self._create_retry_at = 0.0  # A: creation cooldown after the OS refused a process
        self._create_error: BaseException | None = None  # A: why the last creation failed
        # A: when creation started failing (first failure of a row with no success), or None
        self._create_failing_since: float | None = None
        self._completions_seen = 0  # set from the id table just before it is freed
        self._seq = itertools.count()
        self._closed = threading.Event()  # set when teardown finished
        # L: what broke the pool: the initializer's exception, or a PoolBroken (see _break)
        self._broken: BaseException | None = None
        self._deadlines: dict[_Worker, float] = {}  # L: busy workers whose item has a timeout
        # L: recent time an item takes from its start to its result, as seen here. Starts
        # high: nothing is prefetched until items have shown they are short.
        self._service_ewma = 1.0
        self._abandon = False  # L: a timed-out close() gave up: fail, do not requeue, unstarted items
        self._killed = 0  # L
        self._prefetched = self._requeued = 0  # L
        self._nr_cm_out = 0  # L: busy workers excluded from nr_running (blocked or CPU-intensive)
        self._cm_wakeups = self._cpu_intensive = self._cm_samples = 0  # L
        self._cpu_time = 0.0  # L
        self._started = 0  # L: items that went RUNNING (sent to a worker), each counted once
        self._next_sample_at = 0.0  # A

        self.id = _alloc_pool_id()  # I
        self._owner_pid = os.getpid()  # I: the program; a fork of it must not tear the pool down
        self._table: IdTable | None = None
        try:
            # Dying workers keep their ids until they detach, so a pool under churn can hold
            # more ids than workers for a moment; when the table is full, creation waits for
            # the next detach.
            self._table = IdTable.create(self.id, capacity=capacity_for(max_workers))
            # M arb: one creator at a time, and none once teardown passed its point of no return;
            # M attach: id allocation and freeing, and the detach completion's state
            from .manager import PoolLocks  # the Manager's machinery: loaded by the first pool

            self._locks = PoolLocks(self._ctx, self._allow_fork, self.id, self._faults)
            self._completion_r, self._completion_w = self._ctx.Pipe(duplex=False)
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._sel = selectors.DefaultSelector()  # A (and __init__ before the arbiter starts)
            self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
            self._create_workers(min_workers)
            if len(self._workers) < min_workers:
                raise OSError(f"procpool: could not start {min_workers} workers") from self._create_error
        except BaseException:
            self._abort_init()
            raise
        self._arbiter_thread = threading.Thread(target=self._arbiter, name=f"procpool-arbiter-{self.id}", daemon=True)
        self._arbiter_thread.start()
        _live_pools.add(self)

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
        for w in list(self._workers.values()):
            try:
                w.proc.kill()
                w.proc.join(5)
            except Exception:
                pass
        if self._table is not None:
            self._table.destroy()
        self._close_init_fds()
        _free_pool_id(self.id)

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
        payload = dumps_call(seq, fn, args, kwargs, tag)
        fut: Future = new_future()
        item = _Item(seq, fut, payload, timeout, account)
        wake = False
        with self._lock:
            if self._broken is not None:
                raise self._broken_error()
            if self._closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._idle:
                w: _Worker | None = self._idle.pop()
                fut.set_running_or_notify_cancel()  # nobody else has seen it: cannot be cancelled
                item.started = True
                self._started += 1
                self._start_item(w, item)
                # The arbiter sleeps until its earliest deadline: tell it about this one.
                wake = timeout is not None
            else:
                w = None
                self._worklist.append(item)
                # The arbiter decides (concurrency management needs its samples); wake it
                # whenever the pool might grow.
                wake = self._may_grow()
        if w is not None:
            self._send(w, [item])
        if wake:
            self._wake()
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
        for _ in range(2):
            with self._lock:
                if self._drop_prefetched(future):
                    return True
                w = self._running_on(future)
                if w is not None and w.state == "dying":
                    return False  # being killed already (its timeout, an earlier cancel)
                if w is not None:
                    self._kill_worker(w, ItemCancelled, "by cancel_running()")
            if w is not None:
                self._wake()  # growth: a replacement if work waits
                return True
            # Outside L: cancel() runs the future's done-callbacks, which may call submit().
            if future.cancel():
                return True
            if future.done():
                return False
        return False

    def _drop_prefetched(self, future: Future) -> bool:
        """cancel_running() of an item already sent to a worker behind its current one: the
        bytes cannot be called back, so it may still run there, but its future ends now with
        ItemCancelled and its answer is ignored. L held."""
        for w in self._workers.values():
            for item in w.queued:
                if item.future is future and not item.dropped:
                    item.dropped = True
                    item.future.set_exception(ItemCancelled("cancelled by cancel_running() before it started"))
                    return True
        return False

    def _running_on(self, future: Future) -> _Worker | None:
        """The worker whose current item is ``future``'s: attached, or being killed. L held."""
        for w in itertools.chain(self._workers.values(), self._dying):
            if w.current is not None and w.current.future is future:
                return w
        return None

    def take_unstarted(self, future: Future) -> bool:
        """Take ``future``'s item back out of the worklist if no worker has started it (a
        workqueue's rescuer runs it instead). True if taken: the pool forgets the item and
        never completes ``future``; the caller owns it from now on."""
        with self._lock:
            for item in self._worklist:
                if item.future is future:
                    if item.started:
                        return False
                    self._worklist.remove(item)
                    return True
        return False

    def creation_stalled_for(self) -> float:
        """Seconds the pool has wanted a worker it failed to create (work waits, nobody idle,
        room to grow, and every creation since the first failure of a row failed); 0.0 when
        it does not. What a workqueue's mayday timer looks at."""
        since = self._create_failing_since
        with self._lock:
            if since is None or not self._may_grow():
                return 0.0
        return max(0.0, time.monotonic() - since)

    def _live_workers(self) -> list[_Worker]:
        """Workers not reaped yet: attached and dying (for the executor's ``_processes``)."""
        with self._lock:
            return [*self._workers.values(), *self._dying]

    def _is_live_worker(self, w: _Worker) -> bool:
        with self._lock:
            return self._workers.get(w.id) is w or w in self._dying

    def _wait_worker_reaped(self, w: _Worker, timeout: float | None) -> None:
        """Wait until _reap() took ``w`` off the books, or ``timeout``. _reap notifies
        _changed; the arbiter reaps as soon as the spawner reports the exit."""
        with self._lock:
            self._changed.wait_for(lambda: not (self._workers.get(w.id) is w or w in self._dying), timeout)

    @property
    def broken(self) -> bool:
        """True once the pool cannot take work: a worker's initializer raised
        (``InitializerFailed``) or the pool's machinery failed (``PoolBroken``); submit refuses."""
        with self._lock:
            return self._broken is not None

    def _broken_error(self) -> Exception:
        """What submit raises on a broken pool: a new error each time (raising one instance
        again and again would pile every caller's traceback onto it). L held."""
        cause = self._broken
        if isinstance(cause, PoolBroken):
            err: Exception = PoolBroken(str(cause))
            err.__cause__ = cause.__cause__
        else:
            err = InitializerFailed(f"pool u{self.id} is broken: a worker's initializer raised {cause!r}")
            err.__cause__ = cause
        return err

    def stats(self) -> PoolStats:
        with self._lock:
            nr_idle = len(self._idle)
            return PoolStats(
                nr_workers=len(self._workers),
                nr_idle=nr_idle,
                nr_busy=len(self._workers) - nr_idle,
                nr_dying=len(self._dying),
                nr_pending=len(self._worklist),
                created=self._created,
                destroyed=self._destroyed,
                items_done=self._items_done,
                lost=self._lost,
                killed=self._killed,
                prefetched=self._prefetched,
                requeued=self._requeued,
                concurrency=self.concurrency,
                nr_running=self._nr_running(),
                cm_wakeups=self._cm_wakeups,
                cpu_intensive=self._cpu_intensive,
                cm_samples=self._cm_samples,
                cpu_time=self._cpu_time,
            )

    def workers(self) -> list[WorkerInfo]:
        """Every worker process of the pool, dying ones included, with its title as ps shows it."""
        import psutil

        with self._lock:
            rows = [(w.id, w.pid, w.state) for w in self._workers.values()]
            rows += [(w.id, w.pid, "dying") for w in self._dying]
        out = []
        for wid, pid, state in sorted(rows, key=lambda r: (r[2] == "dying", r[0], r[1])):
            try:
                title = " ".join(psutil.Process(pid).cmdline()).strip()
            except psutil.Error:
                title = (
                    dying_title(self.title_prefix)
                    if state == "dying"
                    else self.title or worker_title(self.title_prefix, self.id, wid)
                )
            out.append(WorkerInfo(wid, pid, state, title))
        return out

    @property
    def table_name(self) -> str:
        """The name of this pool's shared-memory id table (in /dev/shm)."""
        assert self._table is not None
        return self._table.name

    def destroy_idle(self, n: int = 1) -> int:
        """Asynchronously destroy up to ``n`` idle workers, longest idle first.

        Returns how many were flagged; never waits for a process (the seed's destroy_worker).
        """
        check_number("n", n, minimum=0, integer=True)
        with self._lock:
            count = 0
            while count < n and self._idle:
                self._destroy_worker(self._idle.popleft())
                count += 1
        return count

    shutdown = Teardown.close

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=True)

    def __repr__(self) -> str:
        s = self.stats()
        state = "closed" if self._closed.is_set() else "closing" if self._closing else "running"
        return f"<WorkerPool u{self.id} {state} workers={s.nr_workers} idle={s.nr_idle} dying={s.nr_dying}>"

    # -- policies (L held) --------------------------------------------------------------------

    def _may_grow(self) -> bool:
        """Work waits, nobody idle to take it, and room for another worker."""
        return bool(self._worklist) and not self._idle and len(self._workers) < self.max_workers

    def _used_up(self, w: _Worker) -> bool:
        """Has ``w`` run its max_tasks_per_child items? Then it retires instead of idling."""
        return self.max_tasks_per_child is not None and w.nr_done >= self.max_tasks_per_child

    def _too_many_workers(self) -> bool:
        """More idle workers than "2 plus 1 per 4 busy", and above min_workers."""
        nr_idle = len(self._idle)
        nr_busy = len(self._workers) - nr_idle
        return (
            len(self._workers) > self.min_workers
            and nr_idle > KEEP_IDLE
            and (nr_idle - KEEP_IDLE) * MAX_IDLE_WORKERS_RATIO >= nr_busy
        )

    # -- transitions (L held) -----------------------------------------------------------------

    def _start_item(self, w: _Worker, item: _Item) -> None:
        """``item`` is already RUNNING (see _next_item); ``w`` is off the idle list."""
        w.state = "busy"
        w.current = item
        self._cm_set(w, False, False)  # a new item counts as running until sampled otherwise
        w.started_at = now = time.monotonic()
        if item.timeout is not None:
            self._deadlines[w] = now + item.timeout

    def _next_item(self) -> _Item | None:
        while self._worklist:
            item = self._worklist.popleft()
            # An item taken back from a lost worker's prefetch queue is RUNNING already.
            if item.started:
                return item
            if item.future.set_running_or_notify_cancel():
                item.started = True
                self._started += 1
                return item
        return None

    def _prefetch(self, w: _Worker) -> list[_Item]:
        """Items to send ``w`` behind its current one, into ``w.queued``. L held.

        Only when items are short (the pool's recent service time under PREFETCH_BELOW) and
        the worklist is deep: then one write carries many items and one read many results,
        which is most of the cost of a short item. A long item never waits behind another
        in a worker while a different worker could take it, and an item with a timeout is
        never prefetched (its clock starts when it starts)."""
        if self._service_ewma >= PREFETCH_BELOW or not self._worklist:
            return []
        depth = min(PREFETCH_MAX, len(self._worklist) // max(1, len(self._workers)))
        if self.max_tasks_per_child is not None:
            depth = min(depth, self.max_tasks_per_child - w.nr_done - 1 - len(w.queued))
        if len(w.queued) > depth // 2:
            # Still well fed: top it up later, many items in one write, rather than one
            # write (and maybe one wake-up of the worker) per item answered.
            return []
        sent = sum(len(it.payload) for it in w.queued)
        if w.current is not None:
            sent += len(w.current.payload)
        out: list[_Item] = []
        while len(w.queued) < depth and self._worklist and self._worklist[0].timeout is None:
            if sent + len(self._worklist[0].payload) > PREFETCH_BYTES:
                break
            item = self._next_item()
            if item is None:
                break
            sent += len(item.payload)
            w.queued.append(item)
            out.append(item)
        self._prefetched += len(out)
        return out

    def _enter_idle(self, w: _Worker) -> None:
        self._cm_set(w, False, False)
        w.state = "idle"
        w.idle_since = time.monotonic()
        self._idle.append(w)

    def _destroy_worker(self, w: _Worker) -> None:
        """The seed's destroy_worker(): off the books, DIE, wake. Never waits. L held; the
        caller already took ``w`` off the idle list."""
        self._cm_set(w, False, False)
        del self._workers[w.id]
        self._dying.add(w)
        w.state = "dying"
        self._destroyed += 1
        assert self._table is not None
        self._table.set_flags(w.id, FLAG_DIE)
        try:
            w.conn.send_bytes(DIE)
        except OSError:
            pass  # already dead: the arbiter reaps it
        self._changed.notify_all()

    def _kill_worker(self, w: _Worker, error: type[Exception], why: str) -> None:
        """Kill a busy worker for its item's sake (timeout, cancel_running): off the books at
        once like _destroy_worker(), but by SIGKILL, and it keeps ``current`` so that _reap()
        fails the item with ``error``. L held; never waits. If its result beats the signal,
        the result wins (see _complete_answers)."""
        assert w.state == "busy" and w.current is not None
        self._cm_set(w, False, False)
        del self._workers[w.id]
        self._deadlines.pop(w, None)
        self._dying.add(w)
        w.state = "dying"
        w.kill_reason = (error, why)
        self._destroyed += 1
        self._killed += 1
        assert self._table is not None
        self._table.set_flags(w.id, FLAG_DIE)
        try:
            os.kill(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already dead: the arbiter reaps it
        self._changed.notify_all()

    def _after_item(self, w: _Worker, refill: bool = True) -> list[_Item]:
        """The worker ``w`` finished its item: it goes on with its prefetched items, or gets
        the next ones, or idles, or retires after max_tasks_per_child items (the parent
        decides, not the worker: a worker leaving by itself would free its id while this side
        still maps the id to it). Returns what to send it. ``refill=False``: more answers of
        the same read follow, so topping up its prefetch queue waits for the last. L held."""
        w.nr_done += 1
        if w.queued:
            self._start_item(w, w.queued.popleft())
            return self._prefetch(w) if refill else []
        if self._used_up(w):
            self._destroy_worker(w)
            return []
        nxt = self._next_item()
        if nxt is not None:
            self._start_item(w, nxt)
            return [nxt, *self._prefetch(w)]
        self._idle_or_retire(w)
        return []

    def _idle_or_retire(self, w: _Worker) -> None:
        """``w`` has nothing to run: idle, or, once the pool is closing, destroyed (a closing
        pool never gains an idle worker, or teardown would wait for it forever). L held."""
        if self._closing or self._broken is not None:
            self._destroy_worker(w)
        else:
            self._enter_idle(w)

    # -- sending --------------------------------------------------------------------------------

    def _send(self, w: _Worker, items: list[_Item]) -> None:
        # Only the thread that gave `w` these items sends them (the submitter for an idle
        # worker, else the arbiter); the worker cannot answer before it has all the bytes, so
        # two senders never interleave. No lock needed. If the worker is dead the send fails;
        # its sentinel makes the arbiter fail the item.
        if not items:
            return
        try:
            if len(items) == 1:
                w.conn.send_bytes(items[0].payload)
            else:
                write_all(w.conn.fileno(), b"".join([frame(it.payload) for it in items]))
        except OSError:
            pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (already awake) or closed (pool gone)

    # -- creation (arbiter thread, or __init__ before the arbiter starts) ------------------------

    def _create_workers(self, n: int) -> int:
        """Start up to ``n`` workers and put them to work. Returns how many started.

        Whatever goes wrong on the way (the OS refuses a process or descriptors, the Manager
        is gone and cannot be replaced, a fault point) is a creation failure, never more: the
        ids go back, and creation is retried after a cooldown (``_creation_failed``).

        LOCKING: takes M arb (one creator at a time, excluded from teardown), then M attach
        for the ids; starts processes holding only M arb; takes L to adopt them.
        """
        if n <= 0:
            return 0
        assert self._table is not None
        started: list[_Worker] = []
        ids: list[tuple[int, int]] = []
        try:
            with self._locks.held("arb"):
                if self._no_create:
                    return 0
                with self._locks.held("attach"):
                    for _ in range(n):
                        got = self._table.alloc()
                        if got is None:
                            break
                        ids.append(got)
                _faults.hit(self._faults, "create.after_alloc")
                for i, (wid, _gen) in enumerate(ids):
                    try:
                        _faults.hit(self._faults, "create.start", wid)
                    except Exception as exc:
                        failed, ids = ids[i:], ids[:i]
                        self._creation_failed(failed, exc)
                        break
                started = self._start_processes(ids)
                if started:
                    self._create_failing_since = None
        except Exception as exc:
            self._creation_failed([i for i in ids if i not in {(w.id, w.gen) for w in started}], exc)
            if not started:
                return 0
        sends = []
        with self._lock:
            for w in started:
                self._workers[w.id] = w
                self._created += 1
                self._sel.register(w.rfd, selectors.EVENT_READ, ("conn", w))
                self._sel.register(w.proc.sentinel, selectors.EVENT_READ, ("exit", w))
                nxt = self._next_item()
                if nxt is not None:
                    self._start_item(w, nxt)
                    sends.append((w, [nxt, *self._prefetch(w)]))
                else:
                    self._idle_or_retire(w)
        for w, items in sends:
            self._send(w, items)
        return len(started)

    def _start_processes(self, ids: list[tuple[int, int]]) -> list[_Worker]:
        """Have the spawner fork one worker per (id, gen), in one request. M arb held."""
        if not ids:
            return []
        # Per worker: a work pipe (we write) and a result pipe (we read); see worker.Channel.
        pairs = [(os.pipe(), os.pipe()) for _ in ids]
        specs = [
            WorkerSpec(
                pool_id=self.id,
                wid=wid,
                gen=gen,
                table_name=self.table_name,
                title_prefix=self.title_prefix,
                title=self.title,
                attach_lock=self._locks.attach,
                linger_dying=self.linger_dying,
                faults=self._faults,
                initializer=self._init_payload,
                nice=self.nice,
                cpus=self.cpus,
                spin=self.spin,
            )
            for wid, gen in ids
        ]
        try:
            results = get_spawner(self._ctx, self._allow_fork).spawn(
                specs,
                [(work[0], result[1]) for work, result in pairs],
                self._completion_w.fileno(),
                self._init_fds,
            )
        except Exception as exc:
            results = [exc] * len(ids)
        finally:
            for work, result in pairs:
                os.close(work[0])
                os.close(result[1])
        started, refused = [], []
        assert self._table is not None
        for (wid, gen), (work, result), res in zip(ids, pairs, results, strict=True):
            parent_end = Connection(work[1], readable=False)
            parent_rend = Connection(result[0], writable=False)
            if isinstance(res, BaseException):
                parent_end.close()
                parent_rend.close()
                refused.append(((wid, gen), res))
                continue
            self._table.set_pid(wid, res.pid)
            started.append(_Worker(wid, gen, res, parent_end, parent_rend))
        if refused:
            self._creation_failed([r[0] for r in refused], refused[0][1])
        return started

    def _creation_failed(self, ids: list[tuple[int, int]], exc: BaseException) -> None:
        """The OS (or a fault point, or a Manager that is gone) refused new workers: give the
        ids back, retry after a cooldown (the kernel's 1 s).

        A closing pool with no worker left whose creation failed twice in a row (the retry
        after the cooldown too) fails its waiting items with PoolBroken instead of waiting for
        creation to recover: close() must end."""
        assert self._table is not None
        try:
            with self._locks.held("attach"):
                for wid, gen in ids:
                    self._table.free(wid, gen)
        except LOST:
            # No Manager to be had: free them unguarded. They belong to no process, and a
            # worker only ever writes its own slot; at worst a detaching worker misses that it
            # was the last one out, which teardown repairs (_free_leftover_ids).
            for wid, gen in ids:
                self._table.free(wid, gen)
        now = time.monotonic()
        self._create_retry_at = now + CREATE_COOLDOWN
        self._create_error = exc
        if self._create_failing_since is None:
            self._create_failing_since = now
        with self._lock:
            give_up = self._closing and not self._workers and now - self._create_failing_since >= CREATE_COOLDOWN
            waiting = list(self._worklist) if give_up else []
            if give_up:
                self._worklist.clear()
                self._changed.notify_all()
        if waiting:
            err = PoolBroken(f"pool u{self.id} was closing and could not start a worker to run the item: {exc!r}")
            err.__cause__ = exc
            self._fail_items(waiting, err)

    # -- the arbiter thread ---------------------------------------------------------------------

    def _arbiter(self) -> None:
        """The arbiter thread: one loop, one small handler per event (gunicorn's arbiter).

        A handler that raises is contained (``_handler_failed``): the items it concerned fail
        with a named error and the loop goes on. Only a failure of the loop's own machinery
        (the selector, a second pool-wide handler failure) ends it, and then
        ``_arbiter_died`` kills every worker and fails every item, so nothing waits on a loop
        that is gone.
        """
        try:
            while not self._stop_arbiter:
                self._arbiter_pass()
        except BaseException as exc:  # noqa: BLE001 - whatever ended the loop, nothing may hang on it
            self._arbiter_died(exc)

    _stop_arbiter = False  # L (read without it by the arbiter): set by teardown once every process is reaped
    _arbiter_dead = False  # L: the arbiter loop ended by a failure; _arbiter_died cleaned up after it

    def _arbiter_pass(self) -> None:
        # Before it may block: what the last turn changed is in the table while it sleeps.
        self._contain(self._publish)
        for key, _ in self._sel.select(self._next_timeout()):
            kind, w = key.data
            if kind == "wake":
                self._drain_wake()
            elif not w.reaped:  # a worker reaped earlier in this batch: its pipes are closed
                self._contain(self._on_message if kind == "conn" else self._reap, w)
        if self._faults:
            _faults.hit(self._faults, "arbiter.loop")
        for step in (self._maybe_sample, self._grow, self._cull_idle, self._kill_overdue):
            self._contain(step)

    def _publish(self) -> None:
        """Counters and helper pids into the id table's header, for ``procpool monitor`` and
        ``procpool ps`` (other processes). Once per arbiter turn: cheap (one struct write),
        and an observer is never more than one turn behind."""
        from .manager import server_pid  # loaded with the pool's locks already

        helpers = spawner_pid() or 0, server_pid() or 0  # their own locks, taken before L
        with self._lock:
            c = PoolCounters(
                spawner_pid=helpers[0],
                manager_pid=helpers[1],
                created=self._created,
                destroyed=self._destroyed,
                lost=self._lost,
                killed=self._killed,
                started=self._started,
                done=self._items_done,
                pending=len(self._worklist),
                cpu_intensive=self._cpu_intensive,
                cm_wakeups=self._cm_wakeups,
                cpu_time=self._cpu_time,
            )
            # Under L: teardown sets _stop_arbiter under L before it unmaps the table, so no
            # write can start after (or be under way during) the unmapping.
            if self._table is not None and not self._stop_arbiter:
                self._table.publish(c)

    def _contain(self, handler: Callable[..., None], w: _Worker | None = None) -> None:
        try:
            if w is None:
                handler()
            else:
                handler(w)
        except Exception as exc:  # noqa: BLE001 - turned into the failure of what it concerned
            self._handler_failed(handler.__name__, w, exc)

    def _handler_failed(self, name: str, w: _Worker | None, exc: Exception) -> None:
        """A handler raised. One that concerned one worker (its message, its exit) costs
        that worker: it is SIGKILLed (if not gone already) and its item fails with WorkerLost
        naming the failure; its prefetched items go back to the worklist, as for any lost
        worker. A pool-wide step (growth, cull, sampling, timeouts) breaks the pool: waiting
        items fail and submit refuses (PoolBroken), running items finish; a second one ends
        the loop (``_arbiter_died``)."""
        if w is not None:
            why = f"after the pool's arbiter failed in {name}: {exc!r}"
            if name == "_reap" or w.reaped:
                self._finish_reap(w, (WorkerLost, why))
                return
            with self._lock:
                if w.kill_reason is None:
                    w.kill_reason = (WorkerLost, why)
            w.proc.kill()  # its sentinel brings it to _reap, which fails its item with that reason
            return
        err = PoolBroken(f"pool u{self.id} broke: its arbiter failed in {name}: {exc!r}")
        err.__cause__ = exc
        with self._lock:
            first = self._broken is None
        if not first:
            raise err
        self._break(err)

    def _break(self, err: BaseException) -> None:
        """The pool cannot take more work: fail what waits, refuse submits (``_broken``)."""
        with self._lock:
            if self._broken is not None:
                return
            self._broken = err
            waiting = list(self._worklist)
            self._worklist.clear()
            self._changed.notify_all()
        self._fail_items(waiting, err)

    def _fail_items(self, items: list[_Item], err: BaseException) -> None:
        """End each item's future with ``err`` (one not started is failed too, unless its
        caller cancelled it). Outside L: set_exception runs done-callbacks."""
        for item in items:
            if item.dropped:
                continue
            if item.started or item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_exception(err)
                except Exception:  # InvalidStateError: it ended meanwhile (cancel_running)
                    pass

    def _arbiter_died(self, exc: BaseException) -> None:
        """The arbiter loop is gone (a failure of its machinery). Nobody will read results or
        reap workers again, so do it all now, from this thread, bounded: the pool is broken
        (PoolBroken, ``exc`` as the cause), every worker is SIGKILLed and reaped, every item
        still in the pool fails, teardown finds nothing left to wait for."""
        err = PoolBroken(f"pool u{self.id} broke: its arbiter thread failed: {exc!r}")
        err.__cause__ = exc
        with self._lock:
            if self._arbiter_dead:
                return
            self._arbiter_dead = True
        self._break(err)
        with self._lock:
            victims = list(self._workers.values()) + list(self._dying)
            for w in victims:
                if w.kill_reason is None:
                    w.kill_reason = (PoolBroken, f"after the pool's arbiter thread failed: {exc!r}")
        for w in victims:
            w.proc.kill()
        for w in victims:
            if not w.reaped:
                try:
                    self._reap(w)
                except Exception:  # noqa: BLE001 - finished below, whatever failed
                    self._finish_reap(w, w.kill_reason)
        with self._lock:
            self._changed.notify_all()

    def _next_timeout(self) -> float | None:
        now = time.monotonic()
        with self._lock:
            waits = []
            if self._worklist and self._create_retry_at > now:
                waits.append(self._create_retry_at - now)
            if self._idle and self._too_many_workers():
                waits.append(self._idle[0].idle_since + self.idle_timeout - now)
            if self._deadlines:
                waits.append(min(self._deadlines.values()) - now)
            if self._may_grow():  # concurrency management samples while work waits
                waits.append(self._next_sample_at - now)
        return max(0.0, min(waits)) if waits else None

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _on_message(self, w: _Worker) -> None:
        try:
            messages = w.reader.read_ready()
        except (EOFError, OSError):
            # The worker is gone; its sentinel will say how. Stop watching its pipe.
            self._unregister(w.rfd)
            return
        self._handle_results(w, messages)

    def _handle_results(self, w: _Worker, messages: list[bytes]) -> None:
        """The answers of one read, in the order the worker sent them (often many: prefetched
        short items). One pass under L for all of them, one write of what to send next, then
        the futures, outside L."""
        answers: list[tuple[int, float, bool, Any]] = []
        for data in messages:
            head = data[:SEQ_BYTES]
            (cpu,) = CPU_TIME.unpack_from(data, SEQ_BYTES)
            try:
                ok, value, tb = pickle.loads(memoryview(data)[RESULT_HEAD:])
            except BaseException as exc:  # noqa: BLE001 - whatever a result's __reduce__ raises fails only its item
                ok, value, tb = False, ResultNotUnpicklable(f"the result could not be unpickled here: {exc!r}"), None
                value.__cause__ = exc
            if not ok and tb is not None and isinstance(value, BaseException):
                value.__cause__ = RemoteTraceback(tb)
            if head == INIT_FAILED:
                # Only ever a worker's first and last message (it then waits for DIE).
                self._complete_answers(w, answers)
                answers = []
                self._on_init_failed(w, value)
                continue
            answers.append((int.from_bytes(head, "little"), cpu, ok, value))
        self._complete_answers(w, answers)

    def _complete_answers(self, w: _Worker, answers: list[tuple[int, float, bool, Any]]) -> None:
        if not answers:
            return
        done: list[tuple[_Item, float, bool, Any]] = []
        nxt: list[_Item] = []
        last = len(answers) - 1
        with self._lock:
            for i, (seq, cpu, ok, value) in enumerate(answers):
                item = w.current
                if item is None and w.queued:
                    # Killed (item timeout, cancel_running) just as its item answered, and it
                    # went on to the next one before the signal landed: that one ran, so it
                    # keeps its result too.
                    item = w.queued.popleft()
                if item is None or seq != item.seq:  # pragma: no cover - protocol bug
                    raise AssertionError(f"worker {w.id} answered item {seq}, but runs {item and item.seq}")
                w.current = None
                self._deadlines.pop(w, None)
                self._items_done += 1
                self._cpu_time += cpu
                now = time.monotonic()
                self._service_ewma += (now - w.started_at - self._service_ewma) * SERVICE_EWMA_WEIGHT
                # A worker killed (item timeout, cancel_running) just as its result came is
                # already off the books: the item keeps the result it earned; the worker gets
                # nothing more.
                if w.state != "dying":
                    nxt += self._after_item(w, refill=i == last)
                done.append((item, cpu, ok, value))
        self._send(w, nxt)
        for item, cpu, ok, value in done:
            if item.account is not None:
                item.account.charge(cpu_time=cpu)
            if item.dropped:
                continue  # cancel_running() already ended it
            if ok:
                item.future.set_result(value)
            else:
                item.future.set_exception(value)

    def _on_init_failed(self, w: _Worker, exc: BaseException) -> None:
        """``w``'s initializer raised, and it waits for DIE. Destroy it, fail the item it was
        given, and break the pool: fail every waiting item and refuse new ones, since a failing
        initializer would most likely fail every worker started after it (and
        concurrent.futures breaks its pool too). Items running on other workers finish."""
        with self._lock:
            if w.kill_reason is None:
                item, w.current = w.current, None
            else:
                item = None  # being killed (cancel_running): _reap fails it with that reason
            # Prefetched items never ran either: they fail with the pool, below.
            prefetched = [it for it in w.queued if not it.dropped]
            w.queued.clear()
            self._deadlines.pop(w, None)
            if w.state != "dying":  # not already destroyed (close() while it started)
                if w.state == "idle":
                    self._idle.remove(w)
                self._destroy_worker(w)
            abandoned: list[_Item] = prefetched
            if self._broken is None:
                self._broken = exc
                abandoned += list(self._worklist)
                self._worklist.clear()
                self._changed.notify_all()
        if item is not None:
            err = InitializerFailed(
                f"worker {w.id} (pid {w.pid}) of pool u{self.id} could not run the item: "
                f"its initializer raised {exc!r}"
            )
            err.__cause__ = exc
            item.future.set_exception(err)
        for it in abandoned:
            if it.started or it.future.set_running_or_notify_cancel():
                err = InitializerFailed(
                    f"pool u{self.id} broke before the item ran: a worker's initializer raised {exc!r}"
                )
                err.__cause__ = exc
                it.future.set_exception(err)

    def _reap(self, w: _Worker) -> None:
        """A worker process exited. Reap it; if it was not destroyed, it crashed: fail its
        item and free its id on its behalf."""
        w.reaped = True  # first: an event of the same select() for its result pipe is stale now
        self._unregister(w.proc.sentinel)
        if self._faults:
            _faults.hit(self._faults, "reap", w.id)
        # A result it sent just before dying is still in the pipe: take it first, or a
        # finished item would be reported lost.
        try:
            while w.rconn.poll(0):
                self._handle_results(w, w.reader.read_ready())
        except (EOFError, OSError):
            pass
        w.proc.join(1.0)
        self._finish_reap(w, w.kill_reason)

    def _finish_reap(self, w: _Worker, reason: tuple[type[Exception], str] | None) -> None:
        """Settle a reaped worker: off the books (lost, if it was not destroyed), its item
        failed (``reason``: the error and why, if the pool killed it), the items prefetched
        behind it back to the worklist, its id freed on its behalf, its descriptors closed.
        Also what a failed ``_reap`` is finished with, so nothing here may raise; running it
        twice finds nothing left the second time."""
        w.reaped = True
        self._unregister(w.rfd)
        self._unregister(w.proc.sentinel)
        if w.proc.exitcode is None:  # _reap failed before it got there
            try:
                w.proc.join(1.0)
            except (OSError, ValueError):
                pass
        exitcode = w.proc.exitcode
        with self._lock:
            if w in self._dying:
                self._dying.discard(w)
            elif self._workers.get(w.id) is w:
                self._lost += 1
                self._cm_set(w, False, False)
                del self._workers[w.id]
                if w in self._idle:
                    self._idle.remove(w)
                w.state = "dying"
            # Destroyed workers have no item; a killed one (_kill_worker) still has its own.
            lost, w.current = w.current, None
            self._deadlines.pop(w, None)
            # Items prefetched behind the lost one never started (a worker answers in order):
            # they go back to the front of the worklist, for another worker to run.
            unstarted = [it for it in w.queued if not it.dropped]
            w.queued.clear()
            if not self._abandon and self._broken is None:
                self._worklist.extendleft(reversed(unstarted))
                self._requeued += len(unstarted)
                unstarted = []
            broken = self._broken
            self._changed.notify_all()
        try:
            self._detach_on_behalf(w)
        except Exception:  # noqa: BLE001 - the Manager is gone for good: teardown frees the id (_free_leftover_ids)
            pass
        if unstarted:  # a timed-out close() gave up on the pool, or the pool broke
            closed = PoolClosed(f"pool u{self.id} was closed (timed out) before this item ran")
            self._fail_items(unstarted, broken or closed)
        if lost is not None and not lost.dropped:
            how = _describe_exit(exitcode)
            if reason is not None:
                error, why = reason
                err: Exception = error(f"worker {w.id} (pid {w.pid}) of pool u{self.id} was {how} {why}")
            else:
                err = WorkerLost(
                    f"worker {w.id} (pid {w.pid}) of pool u{self.id} was lost: {how} while running the item"
                )
            self._fail_items([lost], err)
        for close in (w.conn.close, w.rconn.close, w.proc.close):
            try:
                close()
            except (OSError, ValueError):
                pass
        self._wake()  # re-evaluate growth: the pool may need a replacement

    def _detach_on_behalf(self, w: _Worker) -> None:
        """Free a dead worker's id if it did not get to detach itself (it may have died
        holding the attach lock: the Manager hands the lock over once it sees the owner
        gone, and the generation check makes a half-done detach safe to redo)."""
        assert self._table is not None
        if not self._table.owned_by(w.id, w.gen):
            return
        with self._locks.held("attach"):
            self._table.free(w.id, w.gen)
            self._maybe_complete()

    def _maybe_complete(self) -> None:
        """M attach held."""
        assert self._table is not None
        if self._table.should_complete():
            self._table.mark_completed()
            self._completion_w.send_bytes(b"p")

    def _cull_idle(self) -> None:
        """The seed's idle_worker_timeout(): destroy the longest-idle workers past the timeout."""
        now = time.monotonic()
        with self._lock:
            while self._idle and self._too_many_workers():
                w = self._idle[0]
                if now - w.idle_since < self.idle_timeout:
                    break
                self._idle.popleft()
                self._destroy_worker(w)

    def _kill_overdue(self) -> None:
        """Kill the workers whose item ran past its timeout (submit_with); _reap() then fails
        the item with ItemTimeout, and growth replaces the worker if work waits."""
        if not self._deadlines:
            # Read without L, to spare submitters the lock on every loop: a deadline added
            # meanwhile comes with a wake (see _submit), so the next loop sees it.
            return
        now = time.monotonic()
        with self._lock:
            for w in [w for w, deadline in self._deadlines.items() if deadline <= now]:
                assert w.current is not None
                self._kill_worker(w, ItemTimeout, f"after its item ran past its timeout of {w.current.timeout:g} s")

    def _unregister(self, fd: int) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass  # not registered (any more), or the selector is closed

    # -- hooks for tests and tools: read-only views of parts a test must see or steer ---------------

    @property
    def fault_spec(self) -> _faults.Spec:
        """For tests and tools: the pool's fault points, the live dict (I: set at init; a test
        may ``update`` or ``clear`` it to make the OS fail or "recover")."""
        return self._faults

    @property
    def manager_locks(self) -> PoolLocks:
        """For tests and tools: the pool's Manager locks (attach, arbiter), as the workers share them."""
        return self._locks

    @property
    def id_table(self) -> IdTable:
        """For tests and tools: the pool's shared-memory id table (what ``procpool ps`` reads)."""
        assert self._table is not None
        return self._table

    @property
    def closed(self) -> bool:
        """For tests and tools: True once teardown finished (every worker gone)."""
        return self._closed.is_set()

    @property
    def arbiter_alive(self) -> bool:
        """For tests and tools: whether the arbiter thread is running."""
        return self._arbiter_thread.is_alive()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "vanished (exit status unknown)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exited with status {exitcode}"
