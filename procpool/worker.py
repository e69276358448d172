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

Wire format on the worker's two pipes (work in, results out; the parent's ends stay in the parent):

* parent → worker: ``DIE`` (one byte), or a work message: 8-byte little-endian item sequence
  number + 4-byte length of the function's pickle + the function's pickle + pickle of
  ``(args, kwargs)``, or of ``(args, kwargs, tag)`` for a workqueue's item (the tag goes in the
  title, see Titles), all made in the submitting thread. The function travels apart so both
  sides can cache it: the parent the pickle of a module-level function (a reference), the
  worker the function loaded from those bytes;
* worker → parent: the same 8 bytes + the item's CPU time in the worker (seconds, 8-byte
  little-endian double: the workqueue statistics' CPU time; estimated for tiny items, see
  CPU_ESTIMATE_BELOW) + pickle of ``(ok, value,
  traceback_text)``. The sequence number stays outside the pickle so the parent knows which
  item a message answers even when the rest cannot be unpickled; ``INIT_FAILED`` in its place
  says the initializer raised.

The initializer (``WorkerSpec.initializer``) runs once, before the first item. If it raises,
the worker sends ``INIT_FAILED`` + the error, ignores work until the parent's ``DIE`` (the
parent must take it off its books before its id is freed: an id freed earlier could be handed
to a new worker while the parent still maps it to this one), then takes the exit path.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import faults
from .errors import CallNotUnpicklable, ProcpoolError, ResultNotPicklable
from .frames import FrameReader
from .idtable import BUSY, DYING, IDLE, IdTable

if TYPE_CHECKING:  # the spawner loads procpool.manager for its workers; the parent, for its first pool
    from .manager import ManagerLock

DIE = b"D"
SEQ_BYTES = 8
#: Sequence-number field of the message that reports a failed initializer (never an item's).
INIT_FAILED = b"\xff" * SEQ_BYTES
#: After the sequence number of a result: the CPU time its call took in the worker.
CPU_TIME = struct.Struct("<d")
#: The CPU clock is a system call (~0.6 µs here, a tenth of what a trivial item costs a
#: worker); the wall clock is not. An item that took less wall time than CPU_ESTIMATE_BELOW is
#: charged its wall time as CPU time (it had no time to sleep much); after any other item,
#: and at least every CPU_READ_EVERY seconds, the worker reads its CPU clock and charges that
#: item what was measured since the last reading minus the estimates given out in between.
CPU_ESTIMATE_BELOW = 50e-6
CPU_READ_EVERY = 0.01
RESULT_HEAD = SEQ_BYTES + CPU_TIME.size
_NO_CPU = CPU_TIME.pack(0.0)
PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL


def worker_title(prefix: str, pool_id: int, wid: int) -> str:
    return f"{prefix}/u{pool_id}:{wid}"


def dying_title(prefix: str) -> str:
    return f"{prefix}/dying"


@dataclass
class WorkerSpec:
    """Everything a worker process is started with (pickled into it by multiprocessing)."""

    pool_id: int
    wid: int
    gen: int
    table_name: str
    title_prefix: str
    attach_lock: ManagerLock
    # Set in the worker by the spawner from the descriptors it was handed:
    conn: Any = None  # Channel: the worker's ends of its work and result pipes
    completion: Any = None  # write end of the pool's detach completion pipe
    linger_dying: float = 0.0
    faults: faults.Spec = field(default_factory=dict)
    # Pickle of (initializer, initargs), made once in the parent (with cloudpickle if plain
    # pickle cannot): bytes, so the spawner, which unpickles specs, never imports user code.
    initializer: bytes | None = None
    # Set in the worker by the spawner: the descriptors the initializer's arguments refer to.
    inherited_fds: list[int] = field(default_factory=list)
    nice: int = 0  # added to the worker's niceness at start
    cpus: frozenset[int] | None = None  # CPUs the worker binds itself to at start
    title: str | None = None  # the whole title instead of worker_title() (a workqueue's rescuer)
    spin: float = 0.0  # seconds to poll for the next item before sleeping (procpool.pool.SPIN)


#: Descriptors this worker inherited for its pool's initializer (see procpool.calls
#: _Inheritance), by index; set by the spawner as it forks the worker.
_inherited_fds: list[int] = []


class InheritedFd:
    """In the pickle of an initializer's arguments, one descriptor the worker inherits: what
    multiprocessing's ``reduction.DupFd`` becomes under procpool's stand-in for a Popen."""

    def __init__(self, ind: int) -> None:
        self.ind = ind

    def detach(self) -> int:
        """The inherited descriptor; the caller (a Connection being rebuilt) owns it now."""
        fd = _inherited_fds[self.ind]
        _inherited_fds[self.ind] = -1
        if fd < 0:
            raise ValueError(f"inherited descriptor {self.ind} was already taken")
        return fd


def _close_untaken_inherited() -> None:
    """After the initializer: descriptors nothing took are closed, so a pipe end the
    initializer dropped does not stay open in every worker."""
    for i, fd in enumerate(_inherited_fds):
        if fd >= 0:
            _inherited_fds[i] = -1
            try:
                os.close(fd)
            except OSError:
                pass


def _set_title(title: str) -> None:
    import setproctitle

    setproctitle.setproctitle(title)  # command line (ps, htop)
    setproctitle.setthreadtitle(title)  # comm (ps -o comm, /proc/PID/comm), ≤ 15 bytes


class Channel:
    """A worker's two pipe ends, used like one duplex Connection.

    Two pipes rather than a socket pair: a pipe round trip between two processes measured
    ~6 µs here against ~38 µs for a UNIX socket pair, and a round trip per item is what a
    one-at-a-time caller waits for."""

    def __init__(self, rx: int, tx: int) -> None:
        from multiprocessing.connection import Connection

        self.rx = Connection(rx, writable=False)
        self.tx = Connection(tx, readable=False)
        self.recv_bytes = self.rx.recv_bytes
        self.send_bytes = self.tx.send_bytes
        self.fileno = self.rx.fileno


class RemoteError(ProcpoolError):
    """A worker-side exception that could not be pickled back; carries its repr."""


def _error_message(exc: BaseException, origin: BaseException | None = None) -> bytes:
    """``(False, exc, traceback)`` pickled; the traceback is ``origin``'s when ``exc`` wraps it."""
    tb = "".join(traceback.format_exception(origin or exc))
    try:
        return pickle.dumps((False, exc, tb), PICKLE_PROTOCOL)
    except Exception:
        # The exception itself (or something it holds) cannot cross the process boundary:
        # send its repr instead, so the item still ends in an error that says what happened.
        return pickle.dumps((False, RemoteError(repr(exc)), tb), PICKLE_PROTOCOL)


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


FN_LEN = struct.Struct("<I")
#: Functions loaded from their pickles, by those bytes (a worker runs few distinct functions;
#: the cache starts over when it holds this many).
FN_CACHE_MAX = 256
_functions: dict[bytes, Any] = {}


def _load_function(payload: memoryview) -> tuple[Any, int]:
    """The function of a work message's body, and where the rest of the body starts."""
    (n,) = FN_LEN.unpack_from(payload)
    end = FN_LEN.size + n
    key = bytes(payload[FN_LEN.size : end])
    fn = _functions.get(key)
    if fn is None:
        fn = pickle.loads(key)
        if len(_functions) >= FN_CACHE_MAX:
            _functions.clear()
        _functions[key] = fn
    return fn, end


def _run_item(payload: memoryview, titles: Titles | None = None) -> bytes:
    """Unpickle and run one call; the answer, pickled. Three separate steps, so a failure to
    unpickle the call or to pickle the result ends as a TransferError subclass saying which
    (CallNotUnpicklable, ResultNotPicklable), not as a bare pickling error that would look like
    the function's own."""
    try:
        fn, start = _load_function(payload)
        call = pickle.loads(payload[start:])
        args, kwargs = call[:2]
    except BaseException as exc:  # noqa: BLE001 - whatever a __reduce__ raises ends the item only
        return _error_message(CallNotUnpicklable(f"the call could not be unpickled in the worker: {exc!r}"), exc)
    tag = call[2] if len(call) > 2 and titles is not None else None
    if tag is not None:
        titles.set(f"{titles.base}+{tag}")
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - SystemExit in fn ends the item, not the worker
        return _error_message(exc)
    finally:
        if tag is not None:
            titles.set(f"{titles.base}-{tag}")
    try:
        return pickle.dumps((True, value, None), PICKLE_PROTOCOL)
    except BaseException as exc:  # noqa: BLE001
        name = getattr(fn, "__qualname__", None) or repr(fn)
        err = ResultNotPicklable(f"the result of {name} could not be pickled in the worker: {exc!r}")
        return _error_message(err, exc)


def _apply_attrs(spec: WorkerSpec) -> bytes | None:
    """Apply the pool's attributes to this process, before it runs anything; None if done,
    else the ``INIT_FAILED`` message to send (e.g. a negative nice without the privilege)."""
    try:
        if spec.nice:
            os.nice(spec.nice)
        if spec.cpus is not None:
            os.sched_setaffinity(0, spec.cpus)
    except OSError as exc:
        return INIT_FAILED + _NO_CPU + _error_message(exc)
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
        return INIT_FAILED + _NO_CPU + _error_message(exc)
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


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a worker process. Never returns: the process ends in ``os._exit``."""
    # Ctrl-C in a terminal signals the whole process group; the parent decides what a
    # Ctrl-C means for the pool, so a worker must not die of it in the middle of an item.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wid, fspec = spec.wid, spec.faults
    titles = Titles(spec.title or worker_title(spec.title_prefix, spec.pool_id, wid))
    _set_title(titles.base)
    faults.hit(fspec, "worker.start", wid)
    table = IdTable.attach(spec.table_name)
    table.set_pid(wid, os.getpid())
    conn = spec.conn
    recv, send = conn.recv_bytes, conn.send_bytes
    # Slot still 'starting' while these run; attributes first, so the initializer runs with them.
    _inherited_fds[:] = spec.inherited_fds
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
    reader = FrameReader(conn.fileno())
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
            out = msg[:SEQ_BYTES] + CPU_TIME.pack(used) + answer
            table.add_done(wid)
            if i == last:
                table.set_state(wid, IDLE)
            try:
                send(out)
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
    from multiprocessing import util

    try:
        util._run_finalizers(0)  # type: ignore[attr-defined] - Queue's close: the feeder's sentinel
    except Exception:
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


def _locked_detach(spec: WorkerSpec, table: IdTable, lock: ManagerLock) -> None:
    """Detach holding the attach lock ourselves: free our id, maybe complete the teardown."""
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
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
