"""The books: which workers a pool has, what each runs, what waits, and the counters.

Everything here is under the pool lock L (``Books.lock``) unless its comment says otherwise
(legend: procpool.locking). A worker's way through the books::

   adopt() ─► idle ⇄ busy ─► take_off() ─► dying ─► settle_gone() ─► gone
                 (start_item / enter_idle)   │                        ▲
                                             └── lost (crashed) ──────┘

``take_off`` is the one way off the books: ``destroy_worker`` (DIE, the normal exit path),
``kill_worker`` (SIGKILL for its item's sake) and ``settle_gone`` (a worker reaped while
still attached: lost) all go through it. Nothing here waits or calls a future's callbacks;
``fail_items`` is for callers outside L.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

from .config import PoolConfig
from .errors import InitializerFailed, ItemCancelled, PoolBroken
from .idtable import FLAG_DIE, IdTable
from .locking import assert_held, new_lock
from .policy import Policy
from .protocol import DIE, dying_title, worker_title
from .stats import Account, PoolStats, WorkerInfo

#: Prefetch: items whose recent service time (EWMA, seconds) is below PREFETCH_BELOW are sent
#: to a busy worker when the worklist is deep, up to PREFETCH_MAX at a time and about
#: PREFETCH_WINDOW seconds of work by that service time (so an item queued behind the others
#: waits at most about that long while another worker could have taken it) ...
PREFETCH_BELOW = 0.0005
PREFETCH_MAX = 512
PREFETCH_WINDOW = 0.002
#: ... and while the calls sent to it and not answered yet add up to at most this many bytes:
#: well under a pipe's 64 KiB, so the arbiter's write never waits for the worker to read.
#: (A worker blocked sending a large result while the arbiter is blocked writing it more
#: work would be a deadlock.)
PREFETCH_BYTES = 32 * 1024
SERVICE_EWMA_WEIGHT = 0.1


class Item:
    __slots__ = ("seq", "future", "payload", "timeout", "started", "dropped", "account")

    def __init__(
        self, seq: int, future: Future, payload: bytes, timeout: float | None = None, account: Account | None = None
    ) -> None:
        self.seq = seq  # I
        self.future = future  # I
        self.payload = payload  # I
        self.timeout = timeout  # I: seconds it may run once a worker has it (submit_with)
        self.account = account  # I: whose counters its CPU time and marks go to, besides the pool's
        self.started = False  # L: its future is RUNNING (set when first given to a worker)
        self.dropped = False  # L: ended by cancel_running() while prefetched; ignore its answer


class Worker:
    """The parent's handle on one worker process."""

    __slots__ = (
        "id", "gen", "proc", "conn", "rconn", "rfd", "reader", "pid", "state", "current", "queued", "started_at",
        "idle_since", "kill_reason", "nr_done", "ps", "cm_seq", "cm_cpu0", "cm_blocked", "cm_intensive", "reaped",
    )  # fmt: skip

    def __init__(self, wid: int, gen: int, proc: Any, conn: Any, rconn: Any, reader: Any) -> None:
        self.id = wid  # I
        self.gen = gen  # I
        self.proc = proc  # I
        self.conn = conn  # I: write end of its work pipe (only this process has it)
        self.rconn = rconn  # I: read end of its result pipe
        # I: its number, what the selector knows it by (a closed Connection has no fileno())
        self.rfd: int = rconn.fileno()
        # A: _reap() ran: its pipes are closed, and any event of the same select() for it is stale
        self.reaped = False
        self.reader = reader  # A: buffered reads of its results
        self.pid: int = proc.pid  # I
        self.state = "new"  # L: new (until adopted), idle, busy, dying
        self.current: Item | None = None  # L: the item it runs
        # L: items sent to it behind ``current`` (prefetched short items), in the order it
        # runs them; each becomes ``current`` when the result before it arrives.
        self.queued: deque[Item] = deque()
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


def worker_infos(rows: list[tuple[int, int, str]], pool_id: int, cfg: PoolConfig) -> list[WorkerInfo]:
    """``WorkerPool.workers()``: (id, pid, state) rows with each process's title as ps shows
    it (or the title it would have, if it is gone already). Outside L: reads /proc."""
    import psutil

    out = []
    for wid, pid, state in sorted(rows, key=lambda r: (r[2] == "dying", r[0], r[1])):
        try:
            title = " ".join(psutil.Process(pid).cmdline()).strip()
        except psutil.Error:
            if state == "dying":
                title = dying_title(cfg.title_prefix)
            else:
                title = cfg.title or worker_title(cfg.title_prefix, pool_id, wid)
        out.append(WorkerInfo(wid, pid, state, title))
    return out


def fail_items(items: list[Item], err: BaseException) -> None:
    """End each item's future with ``err`` (one not started is failed too, unless its caller
    cancelled it). Outside L: set_exception runs done-callbacks."""
    for item in items:
        if item.dropped:
            continue
        if item.started or item.future.set_running_or_notify_cancel():
            try:
                item.future.set_exception(err)
            except Exception:  # noqa: BLE001 - InvalidStateError: it ended meanwhile (cancel_running)
                pass


class Books:
    """One pool's workers, items and counters (all L unless marked)."""

    def __init__(self, cfg: PoolConfig) -> None:
        self.cfg = cfg  # L (written only by WorkerPool.concurrency's setter; else I)
        self.lock = new_lock()  # L itself
        self.changed = threading.Condition(self.lock)  # notified when workers or items go away
        self.policy = Policy(cfg, self)  # I
        self.table: IdTable | None = None  # I until teardown frees it (then None, under L)
        self.workers: dict[int, Worker] = {}  # L: attached workers by id (idle + busy)
        self.idle: deque[Worker] = deque()  # L: most recently idle at the right; cull from the left
        self.dying: set[Worker] = set()  # L: off the books, not reaped yet
        self.worklist: deque[Item] = deque()  # L: items waiting for a worker
        self.deadlines: dict[Worker, float] = {}  # L: busy workers whose item has a timeout
        self.closing = False  # L: close() was called; submit refuses
        # L: what broke the pool: the initializer's exception, or a PoolBroken
        self.broken: BaseException | None = None
        self.abandon = False  # L: a timed-out close() gave up: fail, do not requeue, unstarted items
        # L: recent time an item takes from its start to its result, as seen here. Starts
        # high: nothing is prefetched until items have shown they are short.
        self.service_ewma = 1.0
        # Counters (L)
        self.created = self.destroyed = self.items_done = self.lost = self.killed = 0
        self.prefetched = self.requeued = 0
        self.started = 0  # items that went RUNNING (sent to a worker), each counted once
        self.cpu_time = 0.0
        self.nr_cm_out = 0  # busy workers excluded from nr_running (blocked or CPU-intensive)
        self.cm_wakeups = self.cpu_intensive = self.cm_samples = 0

    # -- items -----------------------------------------------------------------------------

    def cm_set(self, w: Worker, blocked: bool, intensive: bool) -> None:
        """Update ``w``'s concurrency flags and the count of excluded workers. L held."""
        before = w.cm_blocked or w.cm_intensive
        w.cm_blocked, w.cm_intensive = blocked, intensive
        self.nr_cm_out += (blocked or intensive) - before

    def start_item(self, w: Worker, item: Item, now: float | None = None) -> None:
        """``item`` is already RUNNING (see next_item); ``w`` is off the idle list. ``now``:
        the monotonic clock, if the caller read it already. L held (on the item path: the
        callers check it, once per batch)."""
        w.state = "busy"
        w.current = item
        if w.cm_blocked or w.cm_intensive:
            self.cm_set(w, False, False)  # a new item counts as running until sampled otherwise
        w.started_at = now = time.monotonic() if now is None else now
        if item.timeout is not None:
            self.deadlines[w] = now + item.timeout

    def next_item(self) -> Item | None:
        """The next item of the worklist, made RUNNING. L held."""
        while self.worklist:
            item = self.worklist.popleft()
            # An item taken back from a lost worker's prefetch queue is RUNNING already.
            if item.started:
                return item
            if item.future.set_running_or_notify_cancel():
                item.started = True
                self.started += 1
                return item
        return None

    def prefetch(self, w: Worker) -> list[Item]:
        """Items to send ``w`` behind its current one, into ``w.queued``. L held.

        Only when items are short (the pool's recent service time under PREFETCH_BELOW) and
        the worklist is deep: then one write carries many items and one read many results,
        which is most of the cost of a short item. A long item never waits behind another
        in a worker while a different worker could take it, and an item with a timeout is
        never prefetched (its clock starts when it starts)."""
        if self.service_ewma >= PREFETCH_BELOW or not self.worklist:
            return []
        depth = min(
            PREFETCH_MAX,
            int(PREFETCH_WINDOW / max(self.service_ewma, 1e-6)),
            len(self.worklist) // max(1, len(self.workers)),
        )
        if self.cfg.max_tasks_per_child is not None:
            depth = min(depth, self.cfg.max_tasks_per_child - w.nr_done - 1 - len(w.queued))
        if len(w.queued) > depth // 2:
            # Still well fed: top it up later, many items in one write, rather than one
            # write (and maybe one wake-up of the worker) per item answered.
            return []
        sent = sum(len(it.payload) for it in w.queued)
        if w.current is not None:
            sent += len(w.current.payload)
        out: list[Item] = []
        while len(w.queued) < depth and self.worklist and self.worklist[0].timeout is None:
            if sent + len(self.worklist[0].payload) > PREFETCH_BYTES:
                break
            item = self.next_item()
            if item is None:
                break
            sent += len(item.payload)
            w.queued.append(item)
            out.append(item)
        self.prefetched += len(out)
        return out

    def put_to_work(self, w: Worker) -> list[Item]:
        """``w`` has nothing to run: give it the next items, or idle (or retire) it. Returns
        what to send it. L held."""
        assert_held(self.lock)
        nxt = self.next_item()
        if nxt is not None:
            self.start_item(w, nxt)
            return [nxt, *self.prefetch(w)]
        self.idle_or_retire(w)
        return []

    def after_item(self, w: Worker, refill: bool = True, now: float | None = None) -> list[Item]:
        """``w`` finished its item: it goes on with its prefetched items, or gets the next
        ones, or idles, or retires after max_tasks_per_child items (the parent decides, not
        the worker: a worker leaving by itself would free its id while this side still maps
        the id to it). Returns what to send it. ``refill=False``: more answers of the same
        read follow, so topping up its prefetch queue waits for the last. ``now``: the
        monotonic clock, read once for a read's answers. L held."""
        w.nr_done += 1
        if w.queued:
            self.start_item(w, w.queued.popleft(), now)
            return self.prefetch(w) if refill else []
        if self.policy.used_up(w):
            self.destroy_worker(w)
            return []
        return self.put_to_work(w)

    def enter_idle(self, w: Worker) -> None:
        self.cm_set(w, False, False)
        w.state = "idle"
        w.idle_since = time.monotonic()
        self.idle.append(w)

    def idle_or_retire(self, w: Worker) -> None:
        """``w`` has nothing to run: idle, or, once the pool is closing, destroyed (a closing
        pool never gains an idle worker, or teardown would wait for it forever). L held."""
        assert_held(self.lock)
        if self.closing or self.broken is not None:
            self.destroy_worker(w)
        else:
            self.enter_idle(w)

    # -- off the books -----------------------------------------------------------------------

    def take_off(self, w: Worker, *, lost: bool = False) -> None:
        """The one way off the books: no longer attached (nor idle, nor timed), dying until
        reaped (``settle_gone``). ``lost``: it went by itself (crashed) rather than being
        destroyed or killed. L held; never waits."""
        assert_held(self.lock)
        self.cm_set(w, False, False)
        if self.workers.get(w.id) is w:
            del self.workers[w.id]
        if w.state == "idle":
            self.idle.remove(w)
        self.deadlines.pop(w, None)
        w.state = "dying"
        if lost:
            self.lost += 1
        else:
            self.destroyed += 1
            self.dying.add(w)
        self.changed.notify_all()

    def destroy_worker(self, w: Worker) -> None:
        """The seed's destroy_worker(): off the books, DIE, wake. Never waits. L held."""
        self.take_off(w)
        assert self.table is not None
        self.table.set_flags(w.id, FLAG_DIE)
        try:
            w.conn.send_bytes(DIE)
        except OSError:
            pass  # already dead: the arbiter reaps it

    def kill_worker(self, w: Worker, error: type[Exception], why: str) -> None:
        """Kill a busy worker for its item's sake (timeout, cancel_running): off the books at
        once like destroy_worker(), but by SIGKILL, and it keeps ``current`` so that the
        reaper fails the item with ``error``. L held; never waits. If its result beats the
        signal, the result wins."""
        assert w.state == "busy" and w.current is not None
        self.take_off(w)
        w.kill_reason = (error, why)
        self.killed += 1
        assert self.table is not None
        self.table.set_flags(w.id, FLAG_DIE)
        try:
            os.kill(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already dead: the arbiter reaps it

    def settle_gone(self, w: Worker) -> tuple[Item | None, list[Item]]:
        """``w`` was reaped: off the books for good (lost, if it was still attached). Returns
        its item (a killed or lost one's; destroyed workers have none) and the items
        prefetched behind it that must fail (the rest go back to the front of the worklist:
        a worker answers in order, so they never started). L held; idempotent."""
        assert_held(self.lock)
        if self.workers.get(w.id) is w:
            self.take_off(w, lost=True)
        self.dying.discard(w)
        lost, w.current = w.current, None
        self.deadlines.pop(w, None)
        unstarted = [it for it in w.queued if not it.dropped]
        w.queued.clear()
        if not self.abandon and self.broken is None:
            self.worklist.extendleft(reversed(unstarted))
            self.requeued += len(unstarted)
            unstarted = []
        self.changed.notify_all()
        return lost, unstarted

    # -- lookups -----------------------------------------------------------------------------

    def is_live(self, w: Worker) -> bool:
        """Attached or dying (not reaped yet). L held."""
        return self.workers.get(w.id) is w or w in self.dying

    def drop_prefetched(self, future: Future) -> bool:
        """cancel_running() of an item already sent to a worker behind its current one: the
        bytes cannot be called back, so it may still run there, but its future ends now with
        ItemCancelled and its answer is ignored. L held."""
        assert_held(self.lock)
        for w in self.workers.values():
            for item in w.queued:
                if item.future is future and not item.dropped:
                    item.dropped = True
                    item.future.set_exception(ItemCancelled("cancelled by cancel_running() before it started"))
                    return True
        return False

    def running_on(self, future: Future) -> Worker | None:
        """The worker whose current item is ``future``'s: attached, or being killed. L held."""
        assert_held(self.lock)
        for ws in (self.workers.values(), self.dying):
            for w in ws:
                if w.current is not None and w.current.future is future:
                    return w
        return None

    def take_unstarted(self, future: Future) -> bool:
        """Take ``future``'s item out of the worklist if no worker started it. L held."""
        assert_held(self.lock)
        for item in self.worklist:
            if item.future is future:
                if item.started:
                    return False
                self.worklist.remove(item)
                return True
        return False

    def break_pool(self, err: BaseException) -> list[Item]:
        """The pool cannot take more work: refuse submits; returns the waiting items for the
        caller to fail outside L (none if it was broken already). L held."""
        assert_held(self.lock)
        if self.broken is not None:
            return []
        self.broken = err
        waiting = list(self.worklist)
        self.worklist.clear()
        self.changed.notify_all()
        return waiting

    def broken_error(self, pool_id: int) -> Exception:
        """What submit raises on a broken pool: a new error each time (raising one instance
        again and again would pile every caller's traceback onto it). L held."""
        cause = self.broken
        if isinstance(cause, PoolBroken):
            err: Exception = PoolBroken(str(cause))
            err.__cause__ = cause.__cause__
        else:
            err = InitializerFailed(f"pool u{pool_id} is broken: a worker's initializer raised {cause!r}")
            err.__cause__ = cause
        return err

    def stats(self) -> PoolStats:
        """L held."""
        assert_held(self.lock)
        nr_idle = len(self.idle)
        return PoolStats(
            nr_workers=len(self.workers),
            nr_idle=nr_idle,
            nr_busy=len(self.workers) - nr_idle,
            nr_dying=len(self.dying),
            nr_pending=len(self.worklist),
            created=self.created,
            destroyed=self.destroyed,
            items_done=self.items_done,
            lost=self.lost,
            killed=self.killed,
            prefetched=self.prefetched,
            requeued=self.requeued,
            concurrency=self.cfg.concurrency,
            nr_running=self.policy.nr_running(),
            cm_wakeups=self.cm_wakeups,
            cpu_intensive=self.cpu_intensive,
            cm_samples=self.cm_samples,
            cpu_time=self.cpu_time,
        )
