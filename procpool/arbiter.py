"""The arbiter: one thread per pool that owns the selector, and one small handler per event.

::

   loop (Arbiter.run)
     ├─ publish counters to the id table
     ├─ select(until the next timer) ─┬─ wake pipe     ─► drain it
     │                                ├─ result pipe   ─► on_message ─► decode_answers ─► complete
     │                                └─ sentinel      ─► reap ─► finish_reap (books.settle_gone)
     └─ timers: maybe_sample, grow, cull_idle, kill_overdue

Supervision: a handler that raises is contained (``contain`` ─► ``handler_failed``): one that
concerned one worker costs that worker (killed, its item fails with WorkerLost naming the
failure); a pool-wide one breaks the pool (PoolBroken), a second one ends the loop, and then
``arbiter_died`` kills and reaps everything, so nothing waits on a loop that is gone.

Fields are A (arbiter thread only) unless marked; the books are under L (procpool.books).
"""

from __future__ import annotations

import os
import selectors
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from . import faults as _faults
from .books import SERVICE_EWMA_WEIGHT, Books, Item, Worker, fail_items
from .concurrency import ConcurrencyManagement
from .creation import Creator
from .errors import (
    InitializerFailed,
    ItemTimeout,
    PoolBroken,
    PoolClosed,
    WorkerLost,
)
from .frames import frame, write_all
from .idtable import PoolCounters
from .locking import assert_held
from .procs import readable
from .protocol import decode_result
from .spawner import spawner_pid

#: A submitter that queued this many items behind busy workers since the loop last started
#: a pass lets go of the GIL for YIELD_SLEEP seconds (``Arbiter.yield_if_starved``): the
#: shortest sleep, which the kernel's timer slack makes ~50-60 µs on Linux.
YIELD_EVERY = 256
YIELD_SLEEP = 1e-6

#: One decoded answer: (seq, CPU seconds, ok, value); seq is None for INIT_FAILED.
Answer = tuple[int | None, float, bool, Any]


def decode_answers(messages: list[bytes]) -> list[Answer]:
    """A worker's answers, decoded (procpool.protocol owns the format). A result that cannot
    be unpickled here fails only its item (ResultNotUnpicklable)."""
    return [decode_result(data) for data in messages]


def send_items(w: Worker, items: list[Item]) -> None:
    """Send ``items`` to ``w`` in one write. Only the thread that gave ``w`` these items
    sends them (the submitter for an idle worker, else the arbiter); the worker cannot answer
    before it has all the bytes, so two senders never interleave. No lock needed. If the
    worker is dead the send fails; its sentinel makes the arbiter fail the item."""
    if not items:
        return
    try:
        if len(items) == 1:
            w.conn.send_bytes(items[0].payload)
        else:
            write_all(w.conn.fileno(), b"".join([frame(it.payload) for it in items]))
    except OSError:
        pass


class Wakeup:
    """The self-pipe that wakes the arbiter's select()."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()  # I (closed by teardown)
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def wake(self) -> None:
        try:
            os.write(self.w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (already awake) or closed (pool gone)

    def drain(self) -> None:
        try:
            while os.read(self.r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


class Reaper:
    """The per-worker event handlers: results and exits. Arbiter thread (and ``arbiter_died``)."""

    def __init__(
        self, pool_id: int, books: Books, faults: dict, locks: Any, completion_w: Any, wakeup: Wakeup, sel: Any
    ) -> None:
        self.pool_id = pool_id  # I
        self.books = books  # I
        self.faults = faults  # I
        self.locks = locks  # I
        self.completion_w = completion_w  # I: the detach completion's write end
        self.wakeup = wakeup  # I
        self.sel = sel  # A

    def unregister(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass  # not registered (any more), or the selector is closed

    def _on_message(self, w: Worker) -> None:
        try:
            messages = w.reader.read_ready()
        except (EOFError, OSError):
            # The worker is gone; its sentinel will say how. Stop watching its pipe.
            self.unregister(w.rfd)
            return
        self.handle_results(w, messages)

    def handle_results(self, w: Worker, messages: list[bytes]) -> None:
        """The answers of one read, in the order the worker sent them (often many: prefetched
        short items). One pass under L for all of them, one write of what to send next, then
        the futures, outside L."""
        answers: list[Answer] = []
        for answer in decode_answers(messages):
            if answer[0] is None:
                # INIT_FAILED: only ever a worker's first and last message (it then waits for DIE).
                self.complete_answers(w, answers)
                answers = []
                self.on_init_failed(w, answer[3])
                continue
            answers.append(answer)
        self.complete_answers(w, answers)

    def complete_answers(self, w: Worker, answers: list[Answer]) -> None:
        if not answers:
            return
        b = self.books
        done: list[Item] = []
        nxt: list[Item] = []
        last = len(answers) - 1
        # One clock reading for the whole read: its answers came together, and every item
        # started here starts now.
        now = time.monotonic()
        cpu_sum = 0.0
        with b.lock:
            assert_held(b.lock)  # (what after_item's callees rely on)
            for i, (seq, cpu, _ok, _value) in enumerate(answers):
                item = w.current
                if item is None and w.queued:
                    # Killed (item timeout, cancel_running) just as its item answered, and it
                    # went on to the next one before the signal landed: that one ran, so it
                    # keeps its result too.
                    item = w.queued.popleft()
                if item is None or seq != item.seq:  # pragma: no cover - protocol bug
                    raise AssertionError(f"worker {w.id} answered item {seq}, but runs {item and item.seq}")
                w.current = None
                if item.timeout is not None:
                    b.deadlines.pop(w, None)
                cpu_sum += cpu
                b.service_ewma += (now - w.started_at - b.service_ewma) * SERVICE_EWMA_WEIGHT
                # A worker killed just as its result came is already off the books: the item
                # keeps the result it earned; the worker gets nothing more.
                if w.state != "dying":
                    nxt += b.after_item(w, i == last, now)
                done.append(item)
            b.items_done += len(answers)
            b.cpu_time += cpu_sum
        send_items(w, nxt)
        for item, (_seq, cpu, ok, value) in zip(done, answers, strict=True):
            if item.account is not None:
                item.account.charge(cpu_time=cpu)
            if item.dropped:
                continue  # cancel_running() already ended it
            if ok:
                item.future.set_result(value)
            else:
                item.future.set_exception(value)

    def on_init_failed(self, w: Worker, exc: BaseException) -> None:
        """``w``'s initializer raised, and it waits for DIE. Destroy it, fail the item it was
        given, and break the pool: fail every waiting item and refuse new ones, since a failing
        initializer would most likely fail every worker started after it (and
        concurrent.futures breaks its pool too). Items running on other workers finish."""
        b = self.books
        with b.lock:
            if w.kill_reason is None:
                item, w.current = w.current, None
            else:
                item = None  # being killed (cancel_running): the reaper fails it with that reason
            # Prefetched items never ran either: they fail with the pool, below.
            abandoned = [it for it in w.queued if not it.dropped]
            w.queued.clear()
            if w.state != "dying":  # not already destroyed (close() while it started)
                b.destroy_worker(w)
            abandoned += b.break_pool(exc)
        if item is not None:
            err = InitializerFailed(
                f"worker {w.id} (pid {w.pid}) of pool u{self.pool_id} could not run the item: "
                f"its initializer raised {exc!r}"
            )
            err.__cause__ = exc
            item.future.set_exception(err)
        for it in abandoned:
            if it.started or it.future.set_running_or_notify_cancel():
                err = InitializerFailed(
                    f"pool u{self.pool_id} broke before the item ran: a worker's initializer raised {exc!r}"
                )
                err.__cause__ = exc
                it.future.set_exception(err)

    def _reap(self, w: Worker) -> None:
        """A worker process exited. Reap it; if it was not destroyed, it crashed: fail its
        item and free its id on its behalf."""
        w.reaped = True  # first: an event of the same select() for its result pipe is stale now
        self.unregister(w.proc.sentinel)
        if self.faults:
            _faults.hit(self.faults, "reap", w.id)
        # A result it sent just before dying is still in the pipe: take it first, or a
        # finished item would be reported lost.
        try:
            while readable(w.rfd, 0):
                self.handle_results(w, w.reader.read_ready())
        except (EOFError, OSError):
            pass
        w.proc.join(1.0)
        self.finish_reap(w, w.kill_reason)

    def finish_reap(self, w: Worker, reason: tuple[type[Exception], str] | None) -> None:
        """Settle a reaped worker: off the books (``settle_gone``), its item failed
        (``reason``: the error and why, if the pool killed it), its id freed on its behalf,
        its descriptors closed. Also what a failed ``_reap`` is finished with, so nothing
        here may raise; running it twice finds nothing left the second time."""
        w.reaped = True
        self.unregister(w.rfd)
        self.unregister(w.proc.sentinel)
        if w.proc.exitcode is None:  # _reap failed before it got there
            try:
                w.proc.join(1.0)
            except (OSError, ValueError):
                pass
        exitcode = w.proc.exitcode
        with self.books.lock:
            lost, unstarted = self.books.settle_gone(w)
            broken = self.books.broken
        try:
            self.detach_on_behalf(w)
        except Exception:  # noqa: BLE001 - the Manager is gone for good: teardown frees the id
            pass
        if unstarted:  # a timed-out close() gave up on the pool, or the pool broke
            closed = PoolClosed(f"pool u{self.pool_id} was closed (timed out) before this item ran")
            fail_items(unstarted, broken or closed)
        if lost is not None and not lost.dropped:
            how = describe_exit(exitcode)
            where = f"worker {w.id} (pid {w.pid}) of pool u{self.pool_id}"
            if reason is not None:
                error, why = reason
                err: Exception = error(f"{where} was {how} {why}")
            else:
                err = WorkerLost(f"{where} was lost: {how} while running the item")
            fail_items([lost], err)
        for close in (w.conn.close, w.rconn.close, w.proc.close):
            try:
                close()
            except (OSError, ValueError):
                pass
        self.wakeup.wake()  # re-evaluate growth: the pool may need a replacement

    def detach_on_behalf(self, w: Worker) -> None:
        """Free a dead worker's id if it did not get to detach itself (it may have died
        holding the attach lock: the Manager hands the lock over once it sees the owner
        gone, and the generation check makes a half-done detach safe to redo)."""
        table = self.books.table
        assert table is not None
        if not table.owned_by(w.id, w.gen):
            return
        with self.locks.held("attach"):
            table.free(w.id, w.gen)
            if table.should_complete():  # M attach held
                table.mark_completed()
                self.completion_w.send_bytes(b"p")


class Arbiter:
    """The loop, its timers and its supervision; see the module docstring."""

    def __init__(
        self, pool_id: int, books: Books, faults: dict, reaper: Reaper, creator: Creator, cm: ConcurrencyManagement
    ) -> None:
        self.pool_id = pool_id  # I
        self.books = books  # I
        self.faults = faults  # I
        self.reaper = reaper  # I
        self.creator = creator  # I
        self.cm = cm  # I
        self.sel = reaper.sel  # A (and __init__ before the thread starts)
        self.wakeup = reaper.wakeup  # I
        self.sel.register(self.wakeup.r, selectors.EVENT_READ, ("wake", None))
        self.stop = False  # L (read without it by the loop): set by teardown once every process is reaped
        self.dead = False  # L: the loop ended by a failure; arbiter_died cleaned up after it
        self.passes = 0  # A (read by submitters without L: see yield_if_starved)
        self.passes_seen = 0  # any submitting thread, no lock: a heuristic's memory (see there)
        self.thread = threading.Thread(target=self.run, name=f"procpool-arbiter-{pool_id}", daemon=True)  # I

    def adopt(self, w: Worker) -> None:
        """Watch a new worker's result pipe and exit (L held, by the creator)."""
        self.sel.register(w.rfd, selectors.EVENT_READ, ("conn", w))
        self.sel.register(w.proc.sentinel, selectors.EVENT_READ, ("exit", w))

    def run(self) -> None:
        """The thread: passes until stopped; whatever ends the loop otherwise is cleaned up
        after (``arbiter_died``), so that nothing hangs on it."""
        try:
            while not self.stop:
                self.one_pass()
        except BaseException as exc:  # noqa: BLE001 - whatever ended the loop, nothing may hang on it
            self.arbiter_died(exc)

    def one_pass(self) -> None:
        self.passes += 1
        # Before it may block: what the last turn changed is in the table while it sleeps.
        self.contain("_publish", self.publish)
        for key, _ in self.sel.select(self.next_timeout()):
            kind, w = key.data
            if kind == "wake":
                self.wakeup.drain()
            elif not w.reaped:  # a worker reaped earlier in this batch: its pipes are closed
                if kind == "conn":
                    self.contain("_on_message", self.reaper._on_message, w)
                else:
                    self.contain("_reap", self.reaper._reap, w)
        if self.faults:
            _faults.hit(self.faults, "arbiter.loop")
        self.contain("_maybe_sample", self.cm.maybe_sample)
        self.contain("_fill", self.creator.fill)  # min_workers, once the filler thread is gone
        self.contain("_grow", self.cm.grow)
        self.contain("_cull_idle", self.cull_idle)
        self.contain("_kill_overdue", self.kill_overdue)

    def yield_if_starved(self) -> None:
        """A submitter calls this after every YIELD_EVERY-th item it queued behind busy
        workers. If the loop has not started a pass since the last call, sleep the shortest
        sleep, letting go of the GIL, so this thread can take it.

        Why: a thread that submits in a loop keeps the GIL until the interpreter's switch
        interval (5 ms) forces it out, while this thread, woken by answers, waits for it: the
        workers run dry behind their prefetched items and most of a burst is answered only
        after its last submit. A lost update of ``passes_seen`` by two submitters costs one
        sleep more or less; a loop with nothing to do costs one sleep per YIELD_EVERY items."""
        if self.starved():
            time.sleep(YIELD_SLEEP)

    def starved(self) -> bool:
        """yield_if_starved's question: no pass started since the last time it was asked
        (and the asker is not this thread, e.g. a done-callback that submits)."""
        passes, seen = self.passes, self.passes_seen
        self.passes_seen = passes
        return passes == seen and threading.get_ident() != self.thread.ident

    def publish(self) -> None:
        """Counters and helper pids into the id table's header, for ``procpool monitor`` and
        ``procpool ps`` (other processes). Once per turn: one struct write."""
        from .manager import server_pid  # (light: the Manager's client)

        helpers = spawner_pid() or 0, server_pid() or 0  # their own locks, taken before L
        b = self.books
        with b.lock:
            c = PoolCounters(
                spawner_pid=helpers[0],
                manager_pid=helpers[1],
                created=b.created,
                destroyed=b.destroyed,
                lost=b.lost,
                killed=b.killed,
                started=b.started,
                done=b.items_done,
                pending=len(b.worklist),
                cpu_intensive=b.cpu_intensive,
                cm_wakeups=b.cm_wakeups,
                cpu_time=b.cpu_time,
            )
            # Under L: teardown sets ``stop`` under L before it unmaps the table, so no
            # write can start after (or be under way during) the unmapping.
            if b.table is not None and not self.stop:
                b.table.publish(c)

    def contain(self, name: str, handler: Callable[..., None], w: Worker | None = None) -> None:
        try:
            if w is None:
                handler()
            else:
                handler(w)
        except Exception as exc:  # noqa: BLE001 - turned into the failure of what it concerned
            self.handler_failed(name, w, exc)

    def handler_failed(self, name: str, w: Worker | None, exc: Exception) -> None:
        """A handler raised. One that concerned one worker (its message, its exit) costs
        that worker: it is SIGKILLed (if not gone already) and its item fails with WorkerLost
        naming the failure; its prefetched items go back to the worklist, as for any lost
        worker. A pool-wide step (growth, cull, sampling, timeouts) breaks the pool: waiting
        items fail and submit refuses (PoolBroken), running items finish; a second one ends
        the loop (``arbiter_died``)."""
        if w is not None:
            why = f"after the pool's arbiter failed in {name}: {exc!r}"
            if name == "_reap" or w.reaped:
                self.reaper.finish_reap(w, (WorkerLost, why))
                return
            with self.books.lock:
                if w.kill_reason is None:
                    w.kill_reason = (WorkerLost, why)
            w.proc.kill()  # its sentinel brings it to _reap, which fails its item with that reason
            return
        err = PoolBroken(f"pool u{self.pool_id} broke: its arbiter failed in {name}: {exc!r}")
        err.__cause__ = exc
        with self.books.lock:
            first = self.books.broken is None
        if not first:
            raise err
        self.break_pool(err)

    def break_pool(self, err: BaseException) -> None:
        """The pool cannot take more work: fail what waits, refuse submits."""
        with self.books.lock:
            waiting = self.books.break_pool(err)
        fail_items(waiting, err)

    def arbiter_died(self, exc: BaseException) -> None:
        """The loop is gone (a failure of its machinery). Nobody will read results or reap
        workers again, so do it all now, from this thread, bounded: the pool is broken
        (PoolBroken, ``exc`` as the cause), every worker is SIGKILLed and reaped, every item
        still in the pool fails, teardown finds nothing left to wait for."""
        err = PoolBroken(f"pool u{self.pool_id} broke: its arbiter thread failed: {exc!r}")
        err.__cause__ = exc
        b = self.books
        with b.lock:
            if self.dead:
                return
            self.dead = True
        self.break_pool(err)
        with b.lock:
            victims = list(b.workers.values()) + list(b.dying)
            for w in victims:
                if w.kill_reason is None:
                    w.kill_reason = (PoolBroken, f"after the pool's arbiter thread failed: {exc!r}")
        for w in victims:
            w.proc.kill()
        for w in victims:
            if not w.reaped:
                try:
                    self.reaper._reap(w)
                except Exception:  # noqa: BLE001 - finished below, whatever failed
                    self.reaper.finish_reap(w, w.kill_reason)
        with b.lock:
            b.changed.notify_all()

    def next_timeout(self) -> float | None:
        now = time.monotonic()
        b = self.books
        with b.lock:
            waits = []
            filling = self.creator.filling and not self.creator.filler_running()
            if (b.worklist or filling) and self.creator.retry_at > now:
                waits.append(self.creator.retry_at - now)
            elif filling:
                waits.append(0.0)
            if b.idle and b.policy.too_many_workers():
                waits.append(b.idle[0].idle_since + b.cfg.idle_timeout - now)
            if b.deadlines:
                waits.append(min(b.deadlines.values()) - now)
            if b.policy.may_grow():  # concurrency management samples while work waits
                waits.append(self.cm.next_sample_at - now)
        return max(0.0, min(waits)) if waits else None

    def cull_idle(self) -> None:
        """The seed's idle_worker_timeout(): destroy the longest-idle workers past the timeout."""
        now = time.monotonic()
        b = self.books
        with b.lock:
            while b.idle and b.policy.too_many_workers():
                w = b.idle[0]
                if now - w.idle_since < b.cfg.idle_timeout:
                    break
                b.destroy_worker(w)

    def kill_overdue(self) -> None:
        """Kill the workers whose item ran past its timeout (submit_with); the reaper then
        fails the item with ItemTimeout, and growth replaces the worker if work waits."""
        b = self.books
        if not b.deadlines:
            # Read without L, to spare submitters the lock on every loop: a deadline added
            # meanwhile comes with a wake (see submit), so the next loop sees it.
            return
        now = time.monotonic()
        with b.lock:
            for w in [w for w, deadline in b.deadlines.items() if deadline <= now]:
                assert w.current is not None
                b.kill_worker(w, ItemTimeout, f"after its item ran past its timeout of {w.current.timeout:g} s")


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "vanished (exit status unknown)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exited with status {exitcode}"
