"""The Manager server: cross-process locks served by a multiprocessing Manager server,
``pool->manager_arb`` and the attach mutex. Loaded only in the server's process (a bare fork
of the spawner: ``serve_forked``); clients use procpool.manager, which speaks the stock
server's request protocol without ``multiprocessing.managers``.

One Manager server process per program serves the locks of all its pools. What the stock
``SyncManager.Lock()`` and a stock server do not give us, and why:

* **A SIGKILLed holder must not block the next acquirer forever.** A stock Manager lock is
  a plain ``threading.Lock`` in the server: if the process holding it dies, it stays held.
  ``RobustLock`` records its owner as (pid, start time); a waiter that finds the owner gone
  (no such process, a different process with a recycled pid, or a zombie) takes the lock
  over and counts the takeover in ``broken``. Releases wake waiters at once through a
  condition; only a dead owner is discovered by polling (every ``OWNER_POLL`` s).
* **The server must not outlive its program.** A Manager server started by a program that
  is SIGKILLed keeps running forever. Ours watches its parent's sentinel and exits when it
  becomes readable.
* **A worker must not pay a connection on its way out.** Every worker takes the attach lock
  once, to detach, and a stock proxy connects on first use: a socket connect, an
  authentication handshake both ways and a new server thread, ~1 ms of CPU between the two
  sides, sixty-four at once when a pool of 64 is torn down (that was most of its teardown).
  So the spawner, which forked the server, keeps a private channel to it (a socket pair)::

      spawner ──fork──► worker i          (keeps end A_i of a new socket pair)
         └── A_i's peer, B_i, over the handover channel (SCM_RIGHTS) ──► Manager server
      Manager: one "handover" thread holds every B_i in a selector and answers their
               lock requests itself

  The worker keeps A_i with its attach lock's name (``procpool.lockname.LockName``). Workers
  forked before the server (a program's first, see procpool.poollocks) have their B_i kept
  by the spawner until it forks the server, then handed over; a lock the program named but
  has not made yet is made on its first use by such a connection (``_Server._planned_object``).
  No handshake: only the spawner can hand a connection over, and only to its own children,
  which would otherwise get the authkey. A spawner that cannot hand over (a replacement
  started after the first one died) forks workers that connect the stock way. The program's
  threads get theirs the same way, through a second channel (the program's *link*, made by
  the spawner when it forks the server, the program's end sent back with its answer): the
  program makes a socket pair and hands one end over (procpool.manager).
* **A detach must not cost two thread wake-ups per lock handoff.** With a server thread per
  connection, a release wakes the next waiter's thread, which then answers its worker. The
  handover thread instead *parks* a worker's ``acquire`` in the lock (no thread), and a
  release hands the lock straight to the first parked waiter by sending it the answer; a
  worker whose connection closes while parked is forgotten, and one that dies holding the
  lock is taken over at once (its connection's EOF), not at the next poll. The program's own
  threads park the same way; a connection made the stock way waits in a server thread, and
  parked waiters go first. Anything else asked on a handed-over connection (a timed acquire,
  the program's ``create_locks``) gets a server thread of its own.
  (Teardown of 64 idle workers: 67-88 → 55-68 ms in an A/B against thread per connection.)
* **A stranger must not cost the server a thread.** The stock server starts a thread for
  every connection it accepts, before the authkey handshake, and that thread waits for the
  client with no time limit: any local process could make it grow without bound. Ours
  (``_Server.accepter``) first asks the kernel who connected (``SO_PEERCRED``) and closes at
  once, before any thread or byte, a connection from another uid. Then a connection gets
  ``HANDSHAKE_TIMEOUT`` seconds per read to authenticate and send its first request, and at
  most ``HANDSHAKE_MAX`` connections do so at a time: past that, the oldest one pending for
  more than ``HANDSHAKE_GRACE`` is closed, and accepting waits for a slot meanwhile.

  The socket stays in the abstract namespace (Linux), rather than a socket file in a 0700
  directory. Both admit only this uid (a directory's permissions through the file system,
  ``SO_PEERCRED`` through the kernel's record of the connecting process), but the abstract
  name leaves nothing behind when the program, its spawner and the server are SIGKILLed
  together, and creates nothing in the way of the program's first pool. Root can connect
  either way; a process of the same uid could read the authkey from the program anyway.
* **A teardown must not pass the attach lock through 64 processes one at a time.** A worker
  on a handed-over connection asks for its whole detach at once (``LockName.detach``):
  the Manager takes the attach lock *on behalf of* every detach request that arrived in the
  same round (or that queued behind a holder), frees their ids in the pool's id table itself,
  checks once whether the last of them completes the detach completion, marks it completed if
  so, releases the lock, and answers each worker whether it is the one to send the completion
  byte. The invariants are those of a worker's own detach: ids are freed under the attach
  lock, with the generation check; at most one detacher is told to complete, under the lock.
  A worker that dies after asking is detached all the same (its slot freed on its behalf);
  one that dies after being told to complete leaves the completion to teardown's reaping
  fallback, as a worker killed between marking and sending did before.
  The request is the last thing a worker does before ``_exit``, in a process that pays a
  copy-on-write fault for every page it touches first: it is written and its answer read
  with ``os.write``/``os.read`` and the plain pickle module (``procpool.lockname.ask``), not
  through a proxy (same bytes on the wire), and the answer closes the connection, a worker's
  last request, so the handover thread is not woken again by its EOF.
"""

from __future__ import annotations

import functools
import os
import pickle
import selectors
import signal
import socket
import struct
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from multiprocessing import connection
from multiprocessing.managers import BaseManager, Server
from typing import Any, cast

from . import _compat, faults
from .lockname import HANDOVER_MAX
from .manager import Owner, _identify, owner_alive
from .procs import HELPER_IGNORES, close_quietly, reset_signals

OWNER_POLL = 0.05

#: Sends a parked waiter its answer (the lock is its own now); False if its process is gone.
Grant = Callable[[], bool]


class _RobustLockServer:
    """Lives in the Manager server. ``_cond`` guards ``_owner``, ``_parked`` and ``broken``.

    Two kinds of waiter: a server thread blocked in ``acquire`` (the stock way, one thread per
    connection: the program's), and a *parked* request of a handed-over connection, which has
    no thread (see ``_Server``): it waits in ``_parked`` and whoever releases the lock sends
    it the answer. A release prefers parked waiters, in order; a thread is woken only when
    none is parked. (So the parent's next attach waits for the workers already queued to
    detach: never longer than one pool's worth of exits.)
    """

    def __init__(self, fault_spec: faults.Spec | None = None) -> None:
        self._cond = threading.Condition()
        self._owner: Owner | None = None
        self._parked: deque[tuple[Owner, Grant]] = deque()
        self.broken = 0
        self._faults = fault_spec or {}  # the pool's ``manager.*`` fault points (tests only)
        # Batched detaches (see detach()), _cond guards both: the requests waiting for the
        # lock, and whether a grant for them is parked already (one at a time).
        self._pending: list[Detach] = []
        self._batch_parked = False

    def acquire(self, pid: int, timeout: float | None = None) -> bool:
        faults.hit(self._faults, "manager.acquire")
        deadline = None if timeout is None else time.monotonic() + timeout
        # The start time is looked up here, in the long-lived server, while the caller is
        # certainly alive (it waits for this answer): in a freshly forked worker the same
        # psutil look-up costs far more (first use of that code, copy-on-write faults).
        me = _identify(int(pid))
        with self._cond:
            while self._owner is not None:
                wait = OWNER_POLL
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    wait = min(wait, left)
                held_by = self._owner
                if not self._cond.wait(wait) and self._owner == held_by and not owner_alive(held_by):
                    # The holder died inside its critical section. What it was protecting
                    # (an id-table slot) is repaired by whoever holds the lock next: the
                    # parent re-checks the dead worker's slot generation before trusting it.
                    # (Liveness is checked only after a quiet wait: a psutil look-up per
                    # waiter per wake-up would make the server the bottleneck of a teardown.)
                    self.broken += 1
                    break
            self._owner = me
            return True

    def park(self, pid: int, grant: Grant) -> bool:
        """Acquire for a handed-over connection, without blocking: True if acquired now;
        otherwise ``grant()`` is called once the lock is this caller's."""
        faults.hit(self._faults, "manager.acquire")
        me = _identify(int(pid))
        with self._cond:
            if self._owner is None:
                self._owner = me
                return True
            self._parked.append((me, grant))
            return False

    def unpark(self, grant: Grant) -> None:
        """A parked waiter's process is gone: forget its request."""
        with self._cond:
            self._parked = deque(w for w in self._parked if w[1] is not grant)

    def release(self, pid: int) -> None:
        with self._cond:
            if self._owner is None or self._owner[0] != pid:
                raise RuntimeError(f"lock released by pid {pid}, but held by {self._owner}")
            grant = self._pass_on()
        self._deliver(grant)

    def take_over_if_owner_died(self) -> None:
        """For parked waiters, which have no thread to poll the owner: if it died holding
        the lock, the next waiter gets it (counted in ``broken``, as a threaded waiter's
        takeover)."""
        with self._cond:
            if self._owner is None or not self._parked or owner_alive(self._owner):
                return
            self.broken += 1
            grant = self._pass_on()
        self._deliver(grant)

    def has_parked(self) -> bool:
        return bool(self._parked)

    def _pass_on(self) -> Grant | None:
        # Under _cond, the owner gone: the first parked waiter becomes the owner (its answer
        # is sent outside _cond), or else one waiting thread is woken.
        if self._parked:
            self._owner, grant = self._parked.popleft()
            return grant
        self._owner = None
        self._cond.notify()
        return None

    def _deliver(self, grant: Grant | None) -> None:
        while grant is not None and not grant():
            # Its process died between parking and now: the lock passes on again.
            with self._cond:
                grant = self._pass_on()

    def detach(self, requests: list[Detach]) -> None:
        """Detach on behalf of handed-over workers (module docstring): each request frees its
        worker's id under this lock, and the last one out may complete the detach completion.
        Done now if the lock is free (in the caller's thread), else when a release hands the
        lock to the batch, which then also takes every request that arrived meanwhile."""
        faults.hit(self._faults, "manager.acquire")
        with self._cond:
            self._pending.extend(requests)
            if self._owner is not None:
                if not self._batch_parked:
                    self._batch_parked = True
                    self._parked.append((_self_owner(), self._grant_batch))
                return
            self._owner = _self_owner()
        self._run_batches()

    def _grant_batch(self) -> bool:
        # A Grant: called by whoever released the lock to our parked batch (owner: us now).
        with self._cond:
            self._batch_parked = False
        self._run_batches()
        return True

    def _run_batches(self) -> None:
        """The lock is ours (this server's): run the pending detaches, release, answer them.
        Should the release hand the lock straight to a batch parked meanwhile, run that one
        here too (a loop, not a recursion through _deliver)."""
        while True:
            with self._cond:
                batch, self._pending = self._pending, []
            try:
                answers = _perform_detaches(batch)
            except Exception as exc:  # noqa: BLE001 - whatever it was, the lock must not stay ours
                answers = [functools.partial(req.reply.fail, exc) for req in batch]
            with self._cond:
                grant = self._pass_on()
                again = grant is not None and grant == self._grant_batch
                if again:
                    self._batch_parked = False
            for answer in answers:
                answer()
            if not again:
                self._deliver(grant)
                return

    def owner(self) -> Owner | None:
        return self._owner

    def broken_count(self) -> int:
        return self.broken


class Detach:
    """One worker's detach request, performed by the Manager on its behalf: free id ``wid``
    of allocation ``gen`` in the id table ``table`` (created at ``created``: a table of a
    later pool may have the same name), then ``reply.send(complete)``."""

    __slots__ = ("table", "created", "wid", "gen", "reply")

    def __init__(self, table: str, created: float, wid: int, gen: int, reply: _Reply) -> None:
        self.table, self.created, self.wid, self.gen, self.reply = table, created, wid, gen, reply


#: In the Manager server: id tables mapped for batched detaches, by name: (created, table).
#: Bounded: a table whose pool is gone is dropped once TABLES_KEPT newer ones were used.
_tables: dict[str, tuple[float, Any]] = {}
TABLES_KEPT = 16


def _table_for(name: str, created: float) -> Any:
    from .idtable import IdTable  # loaded in the server already (the spawner preloads the worker)

    known = _tables.pop(name, None)
    if known is not None and known[0] == created:
        _tables[name] = known  # most recently used last
        return known[1]
    if known is not None:
        known[1].close()
    table = IdTable.attach(name)
    if table.created != created:  # not the table the worker knew: its pool is gone
        table.close()
        return None
    _tables[name] = (created, table)
    while len(_tables) > TABLES_KEPT:
        _tables.pop(next(iter(_tables)))[1].close()
    return table


def _perform_detaches(batch: list[Detach]) -> list[Callable[[], None]]:
    """The attach lock held by the Manager for ``batch``: free each worker's id (generation-
    checked, as a worker's own detach), then, per table, complete the detach completion if
    the teardown waits and nothing is attached any more: at most one request is told to
    send the completion byte, the last of its table in the batch. Returns the answers to
    send once the lock is released."""
    last: dict[str, tuple[Any, Detach]] = {}
    for req in batch:
        try:
            table = _table_for(req.table, req.created)
        except OSError:
            table = None  # unlinked: the pool is gone, nobody waits for this detach
        if table is not None:
            table.free(req.wid, req.gen)
            last[req.table] = (table, req)
    complete: set[int] = set()
    for table, req in last.values():
        if table.should_complete():
            table.mark_completed()
            complete.add(id(req))
    return [functools.partial(req.reply.send, id(req) in complete) for req in batch]


def _self_owner() -> Owner:
    """This process as a lock owner: the Manager server holding a lock for a detach batch."""
    global _SELF
    if _SELF is None or _SELF[0] != os.getpid():
        _SELF = _identify(os.getpid())
    return _SELF


_SELF: Owner | None = None


#: In the Manager server: its ends of the channels connections are handed over on (the
#: spawner's, for its workers; the program's link, for the program's threads).
_channels: list[int] = []


#: Connections that may be authenticating at once (each has a thread while it does).
HANDSHAKE_MAX = 16
#: Seconds each read of an unauthenticated connection may wait (the handshake is three
#: messages of under 100 bytes and then the first request: the program's own clients send
#: them at once).
HANDSHAKE_TIMEOUT = 2.0
#: A connection pending this long may be closed to make room for a new one.
HANDSHAKE_GRACE = 0.25

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _socket_timeouts(conn: connection.Connection, seconds: float) -> bool:
    """Set ``conn``'s receive and send timeouts (0: none). Returns False if its peer is not of
    this uid (then nothing is set). The timeouts make a blocking read fail with EAGAIN, which
    ``Connection`` raises as an OSError: a silent client cannot hold its thread."""
    s = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        _pid, uid, _gid = _PEERCRED.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid != os.geteuid():
            return False
        tv = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        return True
    finally:
        s.close()  # the dup only: conn stays open


def _shut(conn: connection.Connection) -> None:
    """Wake whatever thread reads ``conn`` with EOF (it closes it)."""
    s = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()


class _Server(Server):
    """The stock server, plus the connections the spawner hands over, bounded
    unauthenticated connections (module docstring), and locks named by the client."""

    listener: Any  # I: set by Server.__init__ (typeshed does not declare these)
    authkey: bytes  # I
    mutex: Any  # I: guards id_to_obj and id_to_refcount (the stock server's)
    id_to_refcount: dict[str, int]
    public = [*Server.public, "create_locks", "free_locks"]
    #: What the program asks on a handed-over connection of its own, one request per
    #: connection (``_serve``), as on an authenticated one (``_dispatch``).
    ON_HANDED_OVER = ("create_locks", "free_locks")

    def create_locks(self, c: connection.Connection, idents: list[str], fault_spec: faults.Spec | None) -> None:
        """Make a RobustLock under each of ``idents`` (chosen by the client: it may have handed
        them to workers already), each with one reference, which the client's proxy owns."""
        for ident in idents:
            if not _lock_name(ident):
                raise ValueError(f"create_locks: {ident!r} is not a lock name")
        faults.hit(fault_spec or {}, "manager.create")
        made = [(ident, _RobustLockServer(fault_spec)) for ident in idents]
        with self.mutex:
            for ident, _ in made:
                if self.id_to_refcount.get(ident, 0):
                    raise ValueError(f"create_locks: {ident!r} exists already")
            for ident, obj in made:
                # One made on first use by a worker (``_planned_object``) is kept: it may be
                # held, or have freed ids under it, already.
                if ident in self.id_to_obj:
                    self.id_to_obj[ident][0]._faults = obj._faults
                else:
                    self._register(ident, obj)
                self.id_to_refcount[ident] = 1

    def free_locks(self, c: connection.Connection, idents: list[str]) -> None:
        """Drop the program's reference to each lock of ``idents`` (a closed pool's): a lock
        nobody else counts is forgotten. Names that are not locks, or unknown, are ignored."""
        with self.mutex:
            for ident in idents:
                if not _lock_name(ident) or ident not in self.id_to_refcount:
                    continue
                self.id_to_refcount[ident] -= 1
                if self.id_to_refcount[ident] <= 0:
                    del self.id_to_refcount[ident]
                    self.id_to_obj.pop(ident, None)

    def _register(self, ident: str, obj: _RobustLockServer) -> None:
        """self.mutex held."""
        exposed = {name for name in dir(obj) if name[0] != "_" and callable(getattr(obj, name))}
        cast(Any, self.id_to_obj)[ident] = (obj, exposed, None)

    def _planned_object(self, ident: Any) -> Any:
        """The object ``ident`` names, for a request on a handed-over connection (one of our
        spawner's workers). A lock the program named but has not made yet is made now, with
        no reference counted (``create_locks`` then counts the program's): a pool's first
        workers are forked, and may exit, before the program made its locks (docs/design.md,
        "Pool start"). KeyError for anything else unknown."""
        with self.mutex:
            entry = self.id_to_obj.get(ident)
            if entry is not None:
                return entry[0]
            if not _lock_name(ident):
                raise KeyError(ident)
            obj = _RobustLockServer()
            self._register(ident, obj)
            return obj

    def accepter(self) -> None:
        """Replaces the stock accepter (a thread per connection, no time limit): only this
        uid, at most HANDSHAKE_MAX authenticating at once, each read timed out."""
        # _pending_lock guards _pending: connection -> when accepted, oldest first, for
        # those still authenticating. _slots counts their threads (released when one ends
        # its handshake, whichever way).
        self._pending_lock = threading.Lock()
        self._pending: dict[connection.Connection, float] = {}
        self._slots = threading.BoundedSemaphore(HANDSHAKE_MAX)
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                continue
            try:
                admitted = _socket_timeouts(conn, HANDSHAKE_TIMEOUT)
            except OSError:
                admitted = False
            if not admitted:
                conn.close()  # another uid (or already gone): no thread, not a byte
                continue
            while not self._slots.acquire(timeout=self._evict_oldest()):
                pass
            with self._pending_lock:
                self._pending[conn] = time.monotonic()
            try:
                threading.Thread(target=self._authenticate_then_serve, args=(conn,), daemon=True).start()
            except BaseException:  # noqa: BLE001 - no thread (out of memory?): drop that connection only
                with self._pending_lock:
                    self._pending.pop(conn, None)
                conn.close()
                self._slots.release()

    def _evict_oldest(self) -> float:
        """All slots taken: close the oldest pending connection if it had its grace period.
        Returns how long to wait for a slot before looking again."""
        with self._pending_lock:
            if not self._pending:
                return 0.01  # the slots' threads are just leaving
            conn, since = next(iter(self._pending.items()))
            left = since + HANDSHAKE_GRACE - time.monotonic()
            if left > 0:
                return left
            del self._pending[conn]
            _shut(conn)  # under the lock: its thread closes it only after leaving _pending
            return HANDSHAKE_TIMEOUT  # its thread wakes with EOF and frees its slot

    def _authenticate_then_serve(self, conn: connection.Connection) -> None:
        """The stock ``handle_request``, with the handshake and first request under the
        timeouts set at accept; authenticated, the connection waits without a limit (a
        proxy's connection idles between requests)."""
        first = None
        try:
            connection.deliver_challenge(conn, self.authkey)
            connection.answer_challenge(conn, self.authkey)
            first = conn.recv()
            _socket_timeouts(conn, 0)
        except Exception:  # noqa: BLE001 - a failed handshake, a timeout, EOF, garbage: just close it
            first = None
        finally:
            with self._pending_lock:
                self._pending.pop(conn, None)
            if first is None:
                conn.close()
            self._slots.release()
        if first is not None:
            self._dispatch(conn, first)

    def _dispatch(self, conn: connection.Connection, request: Any) -> None:
        """Answer an authenticated connection's first request, as the stock server does."""
        try:
            try:
                _ignore, funcname, args, kwds = request
                if funcname not in self.public:
                    raise ValueError(f"{funcname!r} is not a request the Manager answers")
                msg = ("#RETURN", getattr(self, funcname)(conn, *args, **kwds))
            except SystemExit:
                return  # serve_client (behind accept_connection) leaves so at EOF
            except Exception:  # noqa: BLE001 - answered to the client as the stock server does
                msg = ("#TRACEBACK", traceback.format_exc())
            try:
                conn.send(msg)
            except Exception:  # noqa: BLE001 - the client left
                pass  # the client left
        finally:
            conn.close()

    def serve_forever(self) -> None:
        if _channels:
            threading.Thread(
                target=self._serve_handed_over, args=(_channels,), name="procpool-handover", daemon=True
            ).start()
        super().serve_forever()

    def _serve_handed_over(self, fds: list[int]) -> None:
        """One thread serves every handed-over connection (the workers', the program's
        threads'): it takes the lock requests off them as they come, answers at once, or
        parks an ``acquire`` in the lock until a release hands the lock over (no thread per
        connection, no thread wake-up per handoff). Anything else asked goes to a server
        thread of its own, as usual."""
        channels = [socket.socket(fileno=fd) for fd in fds]
        sel = selectors.DefaultSelector()
        try:
            for channel in channels:
                sel.register(channel, selectors.EVENT_READ)
            self._handed_over_loop(channels, sel)
        except BaseException:  # noqa: BLE001 - a bug of ours: say so, and end the server
            # Without this thread the program's own requests go unanswered (they come on
            # handed-over connections): a server that cannot serve them must not look alive.
            # Its death is what the program and the workers handle (a new server, new locks).
            traceback.print_exc()
            os._exit(1)
        finally:
            # Normally the spawner and the program are gone (both channels at EOF) and
            # nothing is held.
            for key in list(sel.get_map().values()):
                cast(Any, key.fileobj).close()  # every one registered is a socket or Connection
            sel.close()

    def _handed_over_loop(self, channels: list[socket.socket], sel: selectors.BaseSelector) -> None:
        """Serve until no connection (nor the channel) is left: one round per wake-up."""
        parked_in: dict[connection.Connection, tuple[_RobustLockServer, Grant]] = {}
        while sel.get_map():
            # Only while someone is parked do we look at owners on our own (their deaths).
            waiting = {lock for lock, _ in parked_in.values() if lock.has_parked()}
            events = sel.select(OWNER_POLL if waiting else None)
            # The detach requests of this round, by lock: performed together (one pass under
            # the lock) once every ready connection was read.
            detaches: dict[_RobustLockServer, list[Detach]] = {}
            for key, _ in events:
                if key.fileobj in channels:
                    self._take_handed_over(key.fileobj, sel)
                else:
                    self._on_request(key.fileobj, sel, parked_in, detaches)  # type: ignore[arg-type]
            _perform_detach_round(detaches)
            if not events:
                for lock in waiting:
                    lock.take_over_if_owner_died()

    @staticmethod
    def _take_handed_over(channel: socket.socket, sel: selectors.BaseSelector) -> None:
        """Register the connections handed over on ``channel``; at its EOF (the spawner or
        the program is gone), stop listening to it."""
        try:
            msg, fds, _flags, _addr = socket.recv_fds(channel, 16, HANDOVER_MAX)
        except OSError:
            msg, fds = b"", []
        for i, conn_fd in enumerate(fds):
            try:
                sel.register(connection.Connection(conn_fd), selectors.EVENT_READ)
            except BaseException:
                close_quietly(fds[i + 1 :])
                raise
        if not msg:  # its sender is gone: serve what we hold, take no more from it
            sel.unregister(channel)
            channel.close()

    def _on_request(
        self,
        conn: connection.Connection,
        sel: selectors.BaseSelector,
        parked_in: dict[connection.Connection, tuple[_RobustLockServer, Grant]],
        detaches: dict[_RobustLockServer, list[Detach]],
    ) -> None:
        """Read one request of a handed-over connection and answer it (or park it, or take
        it off the selector: see ``_answer``)."""
        parked = parked_in.pop(conn, None)
        try:
            request = conn.recv()
        except (EOFError, OSError):
            # The worker is gone. If it waited, forget its request; if it held a
            # lock, the next waiter takes over now rather than at the next poll.
            sel.unregister(conn)
            conn.close()
            if parked is not None:
                parked[0].unpark(parked[1])
            for lock in {lock for lock, _ in parked_in.values()}:
                lock.take_over_if_owner_died()
            return
        self._answer(conn, request, sel, parked_in, detaches)

    def _answer(
        self, conn: connection.Connection, request: Any, sel: selectors.BaseSelector, parked_in: dict, detaches: dict
    ) -> None:
        """Answer (or park) one request of a handed-over connection, or add a detach to this
        round's ``detaches``. A connection that goes to a server thread of its own, or that
        asked for its detach (a worker's last request: the answer closes it), is taken off
        ``sel`` first: whoever owns it now may close it at once."""
        try:
            ident, methodname, args, kwds = request
            obj = self._planned_object(ident)
        except (TypeError, ValueError, KeyError):
            obj, methodname, args, kwds = None, None, (), {}
        if isinstance(obj, _RobustLockServer) and not kwds:
            if methodname == "detach" and len(args) == 4:
                # A worker's last request: its answer closes the connection (``_Reply``), so
                # we are not woken again by its EOF when the worker exits.
                table, created, wid, gen = args
                sel.unregister(conn)
                detaches.setdefault(obj, []).append(Detach(table, created, wid, gen, reply=_Reply(conn)))
                return
            if methodname == "acquire" and len(args) == 2 and args[1] is None:
                grant = _grant(conn)
                try:
                    acquired = obj.park(args[0], grant)
                except Exception as exc:  # noqa: BLE001 - a bad pid, a fault point: that request fails, not this thread
                    _send_quietly(conn, ("#ERROR", exc))
                    return
                if acquired:
                    grant()
                else:
                    parked_in[conn] = (obj, grant)
                return
            if methodname in ("release", "owner", "broken_count"):
                try:
                    msg = ("#RETURN", getattr(obj, methodname)(*args))
                except Exception as exc:  # noqa: BLE001 - answered to the client as an error
                    msg = ("#ERROR", exc)
                _send_quietly(conn, msg)
                return
        sel.unregister(conn)
        try:
            threading.Thread(target=self._serve, args=(conn, request), daemon=True).start()
        except BaseException:  # noqa: BLE001 - no thread (out of memory?): drop that connection only
            conn.close()

    def _serve(self, conn: connection.Connection, first: Any) -> None:
        """A stock server thread for a handed-over connection, from its request ``first``."""
        try:
            # serve_client reads its requests itself, and this one is read already: answer
            # it here, the way serve_client would, then let serve_client carry on.
            ident, methodname, args, kwds = first
            if ident is None and methodname in self.ON_HANDED_OVER:
                try:
                    msg = ("#RETURN", getattr(self, methodname)(conn, *args, **kwds))
                except Exception as exc:  # noqa: BLE001 - answered to the client as an error
                    msg = ("#ERROR", exc)
                conn.send(msg)
                return  # one request per such connection: the client closes it
            try:
                obj, exposed, _ = self.id_to_obj[ident]
                if methodname not in exposed:
                    raise AttributeError(f"method {methodname!r} of {type(obj)} is not exposed")
                msg = ("#RETURN", getattr(obj, methodname)(*args, **kwds))
            except Exception as exc:  # noqa: BLE001 - answered to the client as an error
                msg = ("#ERROR", exc)
            conn.send(msg)
            self.serve_client(conn)  # ends by raising SystemExit at EOF
        except (EOFError, OSError, ValueError, TypeError):
            pass
        finally:
            # Closed here, not when the thread's frames are freed: a program's threading
            # excepthook (pytest installs one) can keep those alive, and the worker's socket
            # with them.
            conn.close()


def _lock_name(ident: Any) -> bool:
    """Is ``ident`` a name the program gives a lock (``planned_lock``)? Never a stock
    ident, which is all hex digits."""
    return isinstance(ident, str) and bool(ident) and not all(ch in "0123456789abcdef" for ch in ident)


def _perform_detach_round(detaches: dict[_RobustLockServer, list[Detach]]) -> None:
    """Perform one round's detach requests, lock by lock (one pass under each lock)."""
    for lock, requests in detaches.items():
        try:
            lock.detach(requests)
        except Exception as exc:  # noqa: BLE001 - a fault point, say: those requests fail, not this thread
            for req in requests:
                req.reply.fail(exc)


def _send_quietly(conn: connection.Connection, msg: Any) -> None:
    try:
        conn.send(msg)
    except OSError:
        pass  # gone: its EOF comes next


class _Reply:
    """The answer to a detach request, sent once the Manager performed it (by whichever
    thread ran the batch). The worker asks nothing after its detach, so the answer also
    closes the connection: the handover thread, which stopped watching it when the request
    came, is not woken once more by each exiting worker's EOF. (Data sent on a Unix stream
    socket before it closes is still read by the peer, then EOF.)"""

    __slots__ = ("conn",)

    def __init__(self, conn: connection.Connection) -> None:
        self.conn = conn

    def send(self, complete: bool) -> None:
        try:
            self.conn.send_bytes(_DETACHED[complete])
        except OSError:
            pass  # the worker is gone; its detach was performed all the same
        finally:
            self.conn.close()

    def fail(self, exc: Exception) -> None:
        try:
            _send_quietly(self.conn, ("#ERROR", exc))
        finally:
            self.conn.close()


#: The two answers to a detach, pickled once (``Connection.send`` would pickle each anew,
#: copying the reducer table every time: sixty-four times in a teardown of 64).
_DETACHED = {flag: pickle.dumps(("#RETURN", flag), pickle.HIGHEST_PROTOCOL) for flag in (False, True)}


def _grant(conn: connection.Connection) -> Grant:
    def grant() -> bool:
        try:
            conn.send(("#RETURN", True))
            return True
        except OSError:
            return False

    return grant


class _Manager(BaseManager):
    _Server = _Server


def _server_init(alive_fd: int, close_fds: list[int], channels: list[int]) -> None:
    """Runs in the Manager server process (a fork of the spawner) before it serves."""
    global _channels
    _channels = channels
    threading.excepthook = threading.__excepthook__  # the program's hook (pytest's, say) is not ours

    reset_signals()  # the spawner's SIGCHLD handler and wakeup fd are not ours
    # Like the spawner, we live exactly as long as the program: a signal to its process group
    # must not take the program's locks away from it if it survives, and we leave by
    # ourselves when it is gone (watch() below) or when the spawner SIGKILLs us.
    for sig in HELPER_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    try:
        import setproctitle

        setproctitle.setproctitle("procpool: manager")
    except Exception:  # noqa: BLE001 - the title is cosmetic
        pass
    # The spawner's own descriptors (its socket to the program, its wake-up pipe, the status
    # pipes of the workers it forked already): not ours to keep open. Everything else we
    # inherited is our own (multiprocessing's pipes to the spawner, the handover channel,
    # alive_fd), stdio, or /dev/null standing in for a descriptor of the program the spawner
    # let go of (see procpool.spawner): nothing of the program's is held here.
    close_quietly(close_fds)

    def watch() -> None:
        # The program holds the only write end: EOF means it is gone (even SIGKILLed).
        connection.wait([alive_fd])
        os._exit(0)

    threading.Thread(target=watch, name="procpool-program-watch", daemon=True).start()


def serve_forked(alive_fd: int, close_fds: list[int], channels: list[int], ready_fd: int, address: str) -> None:
    """In a bare fork of the spawner (procpool.spawner's ``_fork_server``; a fork of a
    single-threaded process is safe): serve as the program's Manager server, listening at
    ``address``; say so on ``ready_fd`` (the program reads it: ``wait_manager_ready``).
    ``channels``: our ends of the spawner's handover channel and of the program's link.
    Never returns: the server's stop (or the program's death, ``_server_init``) ends the
    process with os._exit."""
    code = 1
    try:
        m = _Manager(address=address)  # (the registry, the program's authkey and serializer)
        ready = connection.Connection(ready_fd, readable=False)
        _compat.run_manager_server(m, ready, _server_init, (alive_fd, close_fds, channels))
        code = 0
    except SystemExit as exc:  # how a stopped server leaves serve_forever
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:  # noqa: BLE001 - a bug of ours: say so, then leave
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)
