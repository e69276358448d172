"""The worker process, and the parent's handle on it.

A worker runs ``worker_main`` in its own OS process. Its whole life, from its own side::

    start ─► title kworker/u<pool>:<id> ─► slot: pid ─► initializer, if any (raised? report it,
          wait for DIE, exit path) ─► idle ─► loop: recv ─► busy ─► run ─► send result ─► idle
                                                    │
                      DIE message ◄─────────────────┘  (or EOF: the parent is gone)
                                        │
    exit path: title kworker/dying ─► slot: dying ─► M attach lock: free id; last one out and a
               teardown waiting? complete the detach completion ─► (linger_dying) ─► os._exit(0)

Nothing essential follows the detach, so the exit skips interpreter finalization: a dying
worker costs the system one ``_exit``. The kworker/dying rename comes *before* the id is
freed, so a new worker that takes the id at once never shares a title with a live process.

The wire format on the worker's two pipes is procpool.protocol's.

The initializer (``WorkerSpec.initializer``) runs once, before the first item. If it raises,
the worker sends ``INIT_FAILED`` + the error, ignores work until the parent's ``DIE`` (the
parent must take it off its books before its id is freed: an id freed earlier could be handed
to a new worker while the parent still maps it to this one), then takes the exit path.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from . import faults
from ._compat import raw_signal, remove_own_temp_dir, run_exit_finalizers
from .frames import FrameReader, write_all
from .idtable import BUSY, DYING, IDLE, IdTable
from .lockname import LockName
from .protocol import (
    DIE,
    SEQ_BYTES,
    WorkerSpec,
    decode_call,
    encode_result,
    error_answer,
    frame,
    inherited_fds,
    init_failed,
    unpicklable_call_answer,
    value_answer,
    worker_title,
)
from .protocol import dying_title as dying_title

#: The CPU clock is a system call (~0.6 µs here, a tenth of what a trivial item costs a
#: worker); the wall clock is not. An item that took less wall time than CPU_ESTIMATE_BELOW is
#: charged its wall time as CPU time (it had no time to sleep much); after any other item,
#: and at least every CPU_READ_EVERY seconds, the worker reads its CPU clock and charges that
#: item what was measured since the last reading minus the estimates given out in between.
CPU_ESTIMATE_BELOW = 50e-6
CPU_READ_EVERY = 0.01
_SIGINT = int(signal.SIGINT)  # (a plain int: see worker_main)


def _close_untaken_inherited() -> None:
    """After the initializer: descriptors nothing took are closed, so a pipe end the
    initializer dropped does not stay open in every worker."""
    for i, fd in enumerate(inherited_fds):
        if fd >= 0:
            inherited_fds[i] = -1
            try:
                os.close(fd)
            except OSError:
                pass


_setproctitle: Any = None  # the module, once loaded (see _set_title)


def _set_title(title: str) -> None:
    # The module is looked up once (in the spawner, before its first fork: warm_up), not
    # with an import statement in each new worker (~30 µs of copy-on-write faults each).
    global _setproctitle
    spt = _setproctitle
    if spt is None:
        import setproctitle as spt

        _setproctitle = spt
    spt.setproctitle(title)  # command line (ps, htop)
    spt.setthreadtitle(title)  # comm (ps -o comm, /proc/PID/comm), ≤ 15 bytes


class Channel:
    """A worker's two pipe ends, used like one duplex Connection.

    Two pipes rather than a socket pair: a pipe round trip between two processes measured
    ~6 µs here against ~38 µs for a UNIX socket pair, and a round trip per item is what a
    one-at-a-time caller waits for."""

    def __init__(self, rx: int, tx: int) -> None:
        self.rx = Connection(rx, writable=False)
        self.tx = Connection(tx, readable=False)
        self.recv_bytes = self.rx.recv_bytes
        self.send_bytes = self.tx.send_bytes
        self.fileno = self.rx.fileno


class Titles:
    """This worker's title, set only when it changes (setproctitle is on the hot path).

    A tagged item (a workqueue's) shows as ``kworker/u3:1+name`` while it runs and
    ``kworker/u3:1-name`` after it, like the kernel's comm naming the last workqueue."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.current = base

    def set(self, title: str) -> None:
        if title != self.current:
            _set_title(title)
            self.current = title


def _run_item(payload: memoryview, titles: Titles | None = None) -> bytes:
    """Unpickle and run one call; the answer, pickled. Three separate steps, so a failure to
    unpickle the call or to pickle the result ends as a TransferError subclass saying which
    (CallNotUnpicklable, ResultNotPicklable), not as a bare pickling error that would look like
    the function's own."""
    try:
        fn, args, kwargs, tag = decode_call(payload)
    except BaseException as exc:  # noqa: BLE001 - whatever a __reduce__ raises ends the item only
        return unpicklable_call_answer(exc)
    shown = titles if tag is not None else None  # a tagged item shows in the title
    if shown is not None:
        shown.set(f"{shown.base}+{tag}")
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - SystemExit in fn ends the item, not the worker
        return error_answer(exc)
    finally:
        if shown is not None:
            shown.set(f"{shown.base}-{tag}")
    return value_answer(fn, value)


def send_frame(fd: int, msg: bytes) -> None:
    """Send one message framed as ``Connection.send_bytes`` frames it, with less Python
    around the write (this runs once per item: 1.46 -> ~0.6 µs here): one ``os.write``, and
    more only after a partial one."""
    data = frame(msg)
    n = os.write(fd, data)
    if n < len(data):
        write_all(fd, data[n:])


def _apply_attrs(spec: WorkerSpec) -> bytes | None:
    """Apply the pool's attributes to this process, before it runs anything; None if done,
    else the ``INIT_FAILED`` message to send (e.g. a negative nice without the privilege)."""
    try:
        if spec.nice:
            os.nice(spec.nice)
        if spec.cpus is not None:
            os.sched_setaffinity(0, spec.cpus)
    except OSError as exc:
        return init_failed(exc)
    return None


def _run_initializer(payload: bytes | None) -> bytes | None:
    """Run the pool's initializer; None if it succeeded (or there is none), else the
    ``INIT_FAILED`` message to send. Unpickling it counts as part of it."""
    if payload is None:
        return None
    try:
        fn, args = pickle.loads(payload)
        pickle.loads(fn)(*pickle.loads(args))
    except BaseException as exc:  # noqa: BLE001 - even SystemExit: the worker must report it
        return init_failed(exc)
    return None


def _wait_for_die(recv: Any) -> None:
    """After a failed initializer: drop work messages (the parent fails those items itself)
    until DIE; leave at once if the parent is gone."""
    while True:
        try:
            if recv() == DIE:
                return
        except (EOFError, OSError):
            _exit(0)


def _ignore_sigint() -> None:
    raw = raw_signal()  # (``_signal``: no enum wrapping)
    raw.signal(_SIGINT, raw.SIG_IGN)


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a worker process. Never returns: the process ends in ``os._exit``."""
    # Ctrl-C in a terminal signals the whole process group; the parent decides what a
    # Ctrl-C means for the pool, so a worker must not die of it in the middle of an item.
    _ignore_sigint()
    wid, fspec = spec.wid, spec.faults
    titles = Titles(spec.title or worker_title(spec.title_prefix, spec.pool_id, wid))  # (set by spawner._child)
    faults.hit(fspec, "worker.start", wid)
    table = IdTable.attach(spec.table_name)
    table.set_pid(wid, os.getpid())
    conn = spec.conn
    recv, send = conn.recv_bytes, conn.send_bytes
    # Slot still 'starting' while these run; attributes first, so the initializer runs with them.
    inherited_fds[:] = spec.inherited_fds
    init_failed = _apply_attrs(spec) or _run_initializer(spec.initializer)
    _close_untaken_inherited()
    if init_failed is not None:
        try:
            send(init_failed)
        except OSError:
            _exit(0)
        _wait_for_die(recv)
        exit_path(spec, table)
    table.set_state(wid, IDLE)
    reader, tx = FrameReader(conn.fileno()), conn.tx.fileno()  # tx: the result pipe (send_frame)
    process_time, clock = time.process_time, time.perf_counter
    spin, spin_now = spec.spin, False
    # CPU accounting (see CPU_ESTIMATE_BELOW): the last clock reading and when it was taken,
    # and the CPU time given out since then as estimates (to items, or to spinning).
    cpu_mark, wall_mark, given = process_time(), clock(), 0.0
    while True:
        try:
            # Adaptive spinning: poll only while items come within the spin time of the last
            # answer; after one miss (a longer gap) sleep at once until they come quickly again.
            t0 = clock()
            spun = spin if spin_now else 0.0
            batch = reader.next_batch(spun)
            t_prev = clock()
            spin_now = t_prev - t0 <= spin
            # Spinning burns CPU that is nobody's item; a blocking wait burns none.
            given += min(spun, t_prev - t0)
        except (EOFError, OSError):
            # The parent is gone (or closed us): there is no teardown to report to, and its
            # spawner will unlink the table. Leave at once.
            _exit(0)
        # Several items may come in one read (the parent prefetches short items). They run
        # in order, each result sent as soon as it exists: the parent counts on that order
        # to know which item was running if this process dies.
        # The slot says busy from the first item of a batch to the last (one state write per
        # batch, not two per item), and idle before the last answer goes out, so a caller that
        # has its result sees the worker idle.
        last = len(batch) - 1
        for i, msg in enumerate(batch):
            if msg == DIE:
                exit_path(spec, table)
            if i == 0:
                table.set_state(wid, BUSY)
            if fspec:
                faults.hit(fspec, "worker.busy", wid)
            answer = _run_item(memoryview(msg)[SEQ_BYTES:], titles)
            now = clock()
            used = now - t_prev
            if used < CPU_ESTIMATE_BELOW and now - wall_mark < CPU_READ_EVERY:
                given += used
            else:
                cpu_now = process_time()
                used = max(0.0, cpu_now - cpu_mark - given)
                cpu_mark, wall_mark, given = cpu_now, now, 0.0
            t_prev = now
            out = encode_result(msg, used, answer)
            table.add_done(wid)
            if i == last:
                table.set_state(wid, IDLE)
            try:
                send_frame(tx, out)
            except OSError:
                _exit(0)
            if fspec:
                faults.hit(fspec, "worker.idle", wid)


#: How long a worker on its way out waits for multiprocessing Queues it used to hand over
#: what they buffered (seconds): a reader that stopped reading must not stall a teardown.
QUEUE_FLUSH_TIMEOUT = 5.0


def _flush_queues() -> None:
    """Before a worker detaches: let the multiprocessing Queues it was given (a logging
    QueueHandler's, say) write what their feeder threads still buffer, as a process exiting
    the normal way does, since our ``os._exit`` skips that. Bounded by QUEUE_FLUSH_TIMEOUT,
    unlike multiprocessing's own join, which waits for a reader forever."""
    import threading

    try:
        run_exit_finalizers()  # Queue's close: the feeder's sentinel
    except Exception:  # noqa: BLE001 - best effort: the flush below is bounded anyway
        pass
    deadline = time.monotonic() + QUEUE_FLUSH_TIMEOUT
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread":
            thread.join(max(0.0, deadline - time.monotonic()))


def exit_path(spec: WorkerSpec, table: IdTable) -> None:
    """The seed's exit path: rename, detach (maybe completing the teardown), exit."""
    wid, fspec = spec.wid, spec.faults
    if spec.initializer is not None:
        _flush_queues()
    _set_title(dying_title(spec.title_prefix))
    table.set_state(wid, DYING)
    faults.hit(fspec, "detach.before_lock", wid)
    lock = spec.attach_lock
    # On a handed-over connection the Manager does the critical section for us, batched with
    # the other workers leaving at the same time (procpool.manager, "A teardown must not pass
    # the attach lock through 64 processes one at a time"). The fault point detach.locked
    # needs a worker that holds the lock itself: the classic path below.
    if lock.batched and "detach.locked" not in fspec:
        try:
            if lock.detach(table.name, table.created, wid, spec.gen):
                # Last one out while a teardown waits: the Manager marked the completion
                # completed under the lock (for one detacher at most); we send it.
                spec.completion.send_bytes(b"c")
            detached = True
        except (EOFError, OSError):
            detached = False  # the connection never reached the server: the classic way
    else:
        detached = False
    if not detached:
        _locked_detach(spec, table, lock)
    faults.hit(fspec, "detach.after", wid)
    if spec.linger_dying > 0:
        time.sleep(spec.linger_dying)
    _exit(0)


def _locked_detach(spec: WorkerSpec, table: IdTable, name: LockName) -> None:
    """Detach holding the attach lock ourselves (the rare path: no handed-over connection,
    or the fault point detach.locked): free our id, maybe complete the teardown."""
    from .manager import lock_for  # the Manager's machinery, only on this path

    lock = lock_for(name)
    try:
        lock.acquire()
    except (EOFError, OSError):
        _exit(0)  # the Manager is gone: so is the parent; nobody waits for us
    try:
        faults.hit(spec.faults, "detach.locked", spec.wid)
        table.free(spec.wid, spec.gen)
        if table.should_complete():
            # Last one out while a teardown waits: complete the detach completion. The flag
            # is set under the same lock, so exactly one process ever gets here.
            table.mark_completed()
            spec.completion.send_bytes(b"c")
    finally:
        lock.release()


def _exit(code: int) -> None:
    try:
        # What an item made through multiprocessing.util.get_temp_dir (a Listener's socket, a
        # fork server's address): a stock worker's exit removes it, and our os._exit skips that.
        remove_own_temp_dir()
    except Exception:  # noqa: BLE001 - best effort: nothing may stop the exit
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream must not stop the exit
            pass
    os._exit(code)
