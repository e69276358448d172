"""Creation: starting workers (the seed's create_worker()), and backing off when the OS refuses.

::

   start_first()       [__init__] create_first: alloc n ids (no M attach: nobody else can
      reach the table yet) ─► spawner forks them (no Manager needed) ─► adopt each
      ─► reserve the ids of the rest of min_workers (same reason)
   start_filler()      [__init__, then its own thread] fork_reserved: the spawner forks the
      reserved ids, no Manager needed (under reserved_lock: never past teardown's point of
      no return) ─► PoolLocks.begin (the program's Manager server forked if it has none, not
      waited for) ─► PoolLocks.start (the locks made) ─► fill() until min_workers were
      reached
   create_workers(n)   [arbiter thread (growth, fill), or the filler thread (fill)]
      M arb ─► no_create? stop ─► at most max_workers - attached ─► M attach: alloc n ids
      ─► spawner forks them (one request) ─► L: adopt each (selector, books) and put it to
      work ─► send its first items ─► release M arb
      any failure ─► creation_failed(): ids back, retry after CREATE_COOLDOWN; a closing pool
                     with no worker whose creation failed twice fails its waiting items

The cooldown fields are written by the creating threads: the arbiter, and the filler while
it runs (it ends at its first failure). Their writes take turns under M arb, but for a
failure to reach the Manager at all; each field is one value, so a racy write or read only
sees the old or the new one, and a cooldown set by either thread holds back both.
``failing_since`` is also read, without a lock, by ``stalled_for`` from callers' threads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from . import faults as _faults
from .books import Books, Item, Worker, fail_items
from .errors import LOST, PoolBroken
from .frames import FrameReader
from .protocol import WorkerSpec
from .spawner import get_spawner

#: After the OS refuses a new process, wait this long before trying again (kernel: 1 s).
CREATE_COOLDOWN = 1.0
#: The constructor starts this many of ``min_workers`` itself and returns once they are up;
#: a filler thread starts the rest behind them (``fork_reserved``, then FILL_BATCH per spawner
#: request: ``fill``), so that a program's first item does not wait for the fork of every
#: worker of a large pool. Two, not one: a program's first items rarely come alone (first
#: result of a cold 32-worker pool 12.8 ms with 2, 15.1 with 4, median of 15: performance.md).
FIRST_BATCH = 2
FILL_BATCH = 32


class Creator:
    """Starts a pool's workers; see the module docstring."""

    def __init__(
        self,
        pool_id: int,
        books: Books,
        locks: Any,
        ctx: Any,
        allow_fork: bool,
        faults: dict,
        completion_fd: int,
        init_payload: bytes | None,
        init_fds: Callable[[], list[int]],
        adopt: Callable[[Worker], None],
        send: Callable[[Worker, list[Item]], None],
    ) -> None:
        self.pool_id = pool_id  # I
        self.books = books  # I
        self.locks = locks  # I: the pool's Manager locks (procpool.poollocks.PoolLocks)
        self.ctx = ctx  # I
        self.allow_fork = allow_fork  # I
        self.faults = faults  # I (tests arm and clear points in it)
        self.completion_fd = completion_fd  # I: workers' end of the detach completion pipe
        self.init_payload = init_payload  # I: pickled (initializer, initargs)
        self.init_fds = init_fds  # I: the descriptors initargs hold, for workers to inherit
        self.adopt = adopt  # I: registers a new worker with the arbiter's selector (L held)
        self.send = send  # I
        self.no_create = False  # M arb (and reserved_lock): teardown passed the point of no return
        # Ids the constructor allocated for the filler's first batch (fork_reserved); emptied
        # under L, where create_workers counts them against max_workers
        self.reserved: list[tuple[int, int]] = []
        # guards the reserved step (fork_reserved) against teardown's point of no return
        # (Teardown._install_completion takes it before M arb): the step forks without M arb,
        # which does not exist yet in a new program. Held across one spawner request.
        self.reserved_lock = threading.Lock()
        # Written by the thread that fills (the filler while it runs, then the arbiter), read
        # racily by the arbiter: min_workers not all started yet (see fill)
        self.filling = books.cfg.min_workers > FIRST_BATCH
        self.filler: threading.Thread | None = None  # I (set once by start_filler)
        # True from start_filler until the filler's last step, read racily by the arbiter:
        # cleared *before* the filler's final wake, so that the pass it wakes fills (the
        # thread itself is still alive then)
        self.filler_active = False
        # These three: written by the creating threads (module docstring), one value each
        self.retry_at = 0.0  # creation cooldown after the OS refused a process
        self.error: BaseException | None = None  # why the last creation failed
        # (also read racily by stalled_for) when creation started failing (first
        # failure of a row with no success), or None
        self.failing_since: float | None = None

    def stalled_for(self) -> float:
        """Seconds the pool has wanted a worker it failed to create; 0.0 when it does not."""
        since = self.failing_since
        with self.books.lock:
            if since is None or not self.books.policy.may_grow():
                return 0.0
        return max(0.0, time.monotonic() - since)

    def start_filler(self, wake: Callable[[], None]) -> None:
        """In a thread of its own: fork the reserved rest of ``min_workers`` (``fork_reserved``),
        have the program's Manager server forked if it has none, make the pool's locks, and
        fill any rest. The constructor returns without waiting for any of it, and the arbiter
        must not wait for the Manager or for forks while the first workers' results come in.
        The thread ends when the pool has had min_workers at once, when it closes, or at the
        first failure (making the locks or creating): the arbiter then goes on after the
        cooldown (``wake``s it, whose next pass calls ``fill``)."""

        def run() -> None:
            try:
                self.fork_reserved()
                self.locks.begin()
                try:
                    self.locks.start()
                except LOST as exc:
                    self.creation_failed([], exc)
                while self.filling and time.monotonic() >= self.retry_at:
                    self.fill()
            finally:
                self.filler_active = False
                wake()

        self.filler = threading.Thread(target=run, name=f"procpool-filler-{self.pool_id}", daemon=True)
        self.filler_active = True
        try:
            self.filler.start()
        except BaseException:
            self.filler_active = False
            raise

    def abandon(self, timeout: float) -> None:
        """The constructor failed (after the filler started: its arbiter thread could not):
        start no more workers, and wait up to ``timeout`` for the filler to end, so that the
        workers it started before that are on the books, where the constructor kills them."""
        self.no_create, self.filling = True, False
        if self.filler is not None:
            self.filler.join(timeout)

    def filler_running(self) -> bool:
        return self.filler_active

    def fill(self) -> None:
        """Start up to FILL_BATCH more of ``min_workers``: the filler thread's step, and the
        arbiter's once that thread is gone (after a creation failure: retried after the
        cooldown). A closing pool stops."""
        if not self.filling or time.monotonic() < self.retry_at:
            return
        if self.filler_running() and threading.current_thread() is not self.filler:
            return
        b = self.books
        with b.lock:
            missing = 0 if b.closing else b.cfg.min_workers - len(b.workers)
        if missing <= 0:
            self.filling = False
            return
        made = self.create_workers(min(missing, FILL_BATCH))
        if self.no_create or (not made and time.monotonic() >= self.retry_at):
            # Closing; or no id to be had (the table full of dying workers), which is no
            # failure: growth starts workers as work needs them from here.
            self.filling = False

    def create_workers(self, n: int) -> int:
        """Start up to ``n`` workers and put them to work. Returns how many started.

        Whatever goes wrong on the way (the OS refuses a process or descriptors, the Manager
        is gone and cannot be replaced, a fault point) is a creation failure, never more: the
        ids go back, and creation is retried after a cooldown (``creation_failed``).

        LOCKING: takes M arb (one creator at a time, excluded from teardown), then M attach
        for the ids; starts processes holding only M arb; takes L (under M arb) to adopt them.
        """
        b = self.books
        with b.lock:
            room = b.cfg.max_workers - len(b.workers) - len(self.reserved)
        if n <= 0 or room <= 0:
            # No room (checked again under M arb): no Manager round trip for nothing, nor a
            # wait for the locks while the program's server starts (growth asks every pass).
            return 0
        table = self.books.table
        assert table is not None
        started: list[Worker] = []
        ids: list[tuple[int, int]] = []
        adopted = False
        try:
            with self.locks.held("arb"):
                if self.no_create:
                    return 0
                # Two threads create (the arbiter, the filler while it runs): M arb makes them
                # take turns, and the workers of a turn are on the books before it ends, so the
                # next one counts them and max_workers holds.
                with b.lock:
                    n = min(n, b.cfg.max_workers - len(b.workers) - len(self.reserved))
                if n <= 0:
                    return 0
                with self.locks.held("attach"):
                    for _ in range(n):
                        got = table.alloc()
                        if got is None:
                            break
                        ids.append(got)
                _faults.hit(self.faults, "create.after_alloc")
                for i, (wid, _gen) in enumerate(ids):
                    try:
                        _faults.hit(self.faults, "create.start", wid)
                    except Exception as exc:  # noqa: BLE001 - a fault point: a creation failure
                        failed, ids = ids[i:], ids[:i]
                        self.creation_failed(failed, exc)
                        break
                started, refused = self.start_processes(ids)
                if refused:
                    self.creation_failed([r[0] for r in refused], refused[0][1])
                if started:
                    self.failing_since = None
                adopted = True
                self._put_to_work(started)
        except Exception as exc:  # noqa: BLE001 - any failure to create is a creation failure
            self.creation_failed([i for i in ids if i not in {(w.id, w.gen) for w in started}], exc)
            if not started:
                return 0
        if not adopted:
            self._put_to_work(started)
        return len(started)

    def _put_to_work(self, started: list[Worker]) -> None:
        b = self.books
        sends = []
        with b.lock:
            for w in started:
                b.workers[w.id] = w
                b.created += 1
                self.adopt(w)
                items = b.put_to_work(w)
                if items:
                    sends.append((w, items))
        for w, items in sends:
            self.send(w, items)

    def start_first(self) -> None:
        """The constructor's start: its first batch of workers (``create_first``), before the
        pool's locks exist and, in a new program, before its Manager server does; the filler
        thread (``start_filler``) makes the locks and starts the rest of min_workers after
        the constructor. Raises OSError if the first batch could not start."""
        first = min(self.books.cfg.min_workers, FIRST_BATCH)
        self.create_first(first)
        if len(self.books.workers) < first:
            raise OSError(f"procpool: could not start {first} workers") from self.error
        table = self.books.table
        assert table is not None
        # The rest of min_workers, for the filler to fork before the Manager server even
        # exists (fork_reserved); allocated here, unlocked, for create_first's reason.
        while len(self.reserved) < self.books.cfg.min_workers - first and (got := table.alloc()) is not None:
            self.reserved.append(got)
        _faults.hit(self.faults, "create.before_locks")

    def fork_reserved(self) -> None:
        """The filler's first step: fork the workers whose ids the constructor reserved, in
        one spawner request, before the program's Manager server is even forked (the ids need
        no M attach, they are allocated already; the server's start, ~11 ms of CPU, then
        overlaps the new workers' start rather than the spawner's forks). M arb, which would
        keep teardown and other creators out, may not exist yet: ``reserved_lock`` does the
        former (teardown takes it before its point of no return), and create_workers counts
        the reserved ids against max_workers until they are on the books. A closing pool past
        that point (or a constructor that failed) forks none and gives the ids back."""
        b = self.books
        with self.reserved_lock:
            ids = self.reserved
            if not ids:
                return
            started: list[Worker] = []
            refused: list[tuple[tuple[int, int], BaseException]] = []
            try:
                _faults.hit(self.faults, "create.reserved")
                if not self.no_create:
                    started, refused = self.start_processes(ids, self.locks.manager_follows)
            except Exception as exc:  # noqa: BLE001 - any failure to create is a creation failure
                refused = [(i, exc) for i in ids]
            with b.lock:
                self.reserved = []
            if refused:
                self.creation_failed([i for i, _why in refused], refused[0][1])
            elif not started:
                self.free_ids(ids)
            self._put_to_work(started)

    def create_first(self, n: int) -> None:
        """The constructor's first batch, forked before the pool's locks exist (and before
        the program's Manager server, if it has none yet). Their ids are allocated without M
        attach, which is safe here and only here: until the constructor returns, no other
        thread or process can reach this pool's id table (no worker of it exists yet, the
        arbiter and the filler have not started), so nothing allocates or frees an id
        meanwhile; the workers forked here free theirs on their way out, under the lock (made
        on that first use if need be: docs/design.md, "Pool start"). A failure leaves
        ``error`` set and fewer workers on the books."""
        table = self.books.table
        assert table is not None
        # The spawner first, outside the failure handling: one that cannot start is the
        # program's error (NOT_BOOTSTRAPPED), raised as is; and from now on a program that
        # dies has a spawner to unlink its id table.
        get_spawner(self.ctx, self.allow_fork)
        ids: list[tuple[int, int]] = []
        started: list[Worker] = []
        refused: list[tuple[tuple[int, int], BaseException]] = []
        try:
            while len(ids) < n and (got := table.alloc()) is not None:
                ids.append(got)
            _faults.hit(self.faults, "create.after_alloc")
            for wid, _gen in ids:
                _faults.hit(self.faults, "create.start", wid)
            # No server yet? The spawner keeps its ends of their Manager connections for
            # the server it will fork (procpool.spawner, "pending" handovers).
            started, refused = self.start_processes(ids, self.locks.manager_follows)
        except Exception as exc:  # noqa: BLE001 - any failure to create is a creation failure
            refused = [(i, exc) for i in ids]
        for (wid, gen), why in refused:
            table.free(wid, gen)  # unlocked, as allocated
            self.error = why
        self._put_to_work(started)

    def start_processes(
        self,
        ids: list[tuple[int, int]],
        manager_follows: bool = False,
    ) -> tuple[list[Worker], list[tuple[tuple[int, int], BaseException]]]:
        """Have the spawner fork one worker per (id, gen), in one request. M arb held, or the
        constructor's first batch (create_first). Returns the workers started, and the ids the
        spawner refused with why (the caller gives those back)."""
        if not ids:
            return [], []
        table = self.books.table
        assert table is not None
        cfg = self.books.cfg
        # Per worker: a work pipe (we write) and a result pipe (we read); see worker.Channel.
        pairs = [(os.pipe(), os.pipe()) for _ in ids]
        specs = [
            WorkerSpec(
                pool_id=self.pool_id,
                wid=wid,
                gen=gen,
                table_name=table.name,
                title_prefix=cfg.title_prefix,
                title=cfg.title,
                attach_lock=self.locks.attach_name(),
                linger_dying=cfg.linger_dying,
                faults=self.faults,
                initializer=self.init_payload,
                nice=cfg.nice,
                cpus=cfg.cpus,
                spin=cfg.spin,
            )
            for wid, gen in ids
        ]
        try:
            results = get_spawner(self.ctx, self.allow_fork).spawn(
                specs,
                [(work[0], result[1]) for work, result in pairs],
                self.completion_fd,
                self.init_fds(),
                manager_follows,
            )
        except Exception as exc:  # noqa: BLE001 - the spawner refused: each worker of the batch failed
            results = [exc] * len(ids)
        finally:
            for work, result in pairs:
                os.close(work[0])
                os.close(result[1])
        started, refused = [], []
        for (wid, gen), (work, result), res in zip(ids, pairs, results, strict=True):
            parent_end = Connection(work[1], readable=False)
            parent_rend = Connection(result[0], writable=False)
            if isinstance(res, BaseException):
                parent_end.close()
                parent_rend.close()
                refused.append(((wid, gen), res))
                continue
            table.set_pid(wid, res.pid)
            started.append(Worker(wid, gen, res, parent_end, parent_rend, FrameReader(parent_rend.fileno())))
        return started, refused

    def free_ids(self, ids: list[tuple[int, int]]) -> None:
        """Give back ids no process got, under M attach."""
        table = self.books.table
        assert table is not None
        try:
            if ids:
                with self.locks.held("attach"):
                    for wid, gen in ids:
                        table.free(wid, gen)
        except LOST:
            # No Manager to be had: free them unguarded. They belong to no process, and a
            # worker only ever writes its own slot; at worst a detaching worker misses that it
            # was the last one out, which teardown repairs (free_leftover_ids).
            for wid, gen in ids:
                table.free(wid, gen)

    def creation_failed(self, ids: list[tuple[int, int]], exc: BaseException) -> None:
        """The OS (or a fault point, or a Manager that is gone) refused new workers: give the
        ids back, retry after a cooldown (the kernel's 1 s).

        A closing pool with no worker left whose creation failed twice in a row (the retry
        after the cooldown too) fails its waiting items with PoolBroken instead of waiting for
        creation to recover: close() must end."""
        self.free_ids(ids)
        now = time.monotonic()
        self.retry_at = now + CREATE_COOLDOWN
        self.error = exc
        if self.failing_since is None:
            self.failing_since = now
        b = self.books
        with b.lock:
            give_up = b.closing and not b.workers and now - self.failing_since >= CREATE_COOLDOWN
            waiting = list(b.worklist) if give_up else []
            if give_up:
                b.worklist.clear()
                b.changed.notify_all()
        if waiting:
            err = PoolBroken(f"pool u{self.pool_id} was closing and could not start a worker to run the item: {exc!r}")
            err.__cause__ = exc
            fail_items(waiting, err)
