"""The program's side of its Manager: the server's start and replacement, and the locks'
client (``ManagerLock``), without ``multiprocessing.managers``.

The server itself (the ``RobustLock``s, the handover thread, batched detaches) is
``procpool.lockserver``, loaded only in the server's process. A client speaks the stock
server's request protocol (``(ident, method, args, kwds)`` answered by ``("#RETURN", value)``,
``("#ERROR", exc)`` or ``("#TRACEBACK", text)``, framed as ``multiprocessing.connection`` frames
them) on a connection of its own thread, made one of three ways::

   program   _Link (one per server, made by the spawner when it forks the server: a socket
             pair, one end in the server's handover thread)
               connect(): a new socket pair; one end over the link (SCM_RIGHTS) ─► the server
               registers it with the workers' connections: no handshake, no server thread,
               an acquire parks in the lock until a release hands it over
   worker    the connection the spawner handed over at its fork (procpool.lockname), on the
             rare path where it takes the attach lock itself
   anyone    else: connect to the server's address, the authkey handshake both ways, then
             ``accept_connection`` (the stock server's thread per connection)

Why not the stock proxies: ``multiprocessing.managers`` pulls in ``shared_memory``, ``secrets``,
``hmac`` and OpenSSL's ``_hashlib`` (~8 ms to import, measured), which every program paid with
its first pool, on the way to its first result, and every proxy connection paid a handshake.
The link needs neither: only the spawner (which forked the server) and the program (which the
spawner gave the link to) can hand the server a connection.

Lifecycle of the program's server::

   get_manager() ──none yet, or dead──► _start_manager: the spawner forks it (not waited for)
                                        ─► _Link, ready pipe, (pid, start time)
   make_locks()  ──► wait_manager_ready (the server says it listens) ─► create_locks
   a request finds it dead (EOFError/OSError: LOST) ──► replace_dead_manager: a new one
   free_locks()  ──► decref, not waited for (a pool's teardown)
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing import connection
from typing import Any

from . import faults, lockname
from .lockname import LockName

Owner = tuple[int, float]


def _round_ct(ct: float) -> float:
    return round(ct, 2)


def _identify(pid: int) -> Owner:
    """(pid, start time) of a live process: a pid alone could be recycled by a new process."""
    import psutil  # here, not at the top: a program pays for it with its first pool, not its import

    try:
        return (pid, _round_ct(psutil.Process(pid).create_time()))
    except psutil.NoSuchProcess:
        return (pid, 0.0)


def owner_alive(owner: Owner) -> bool:
    import psutil

    pid, ct = owner
    try:
        p = psutil.Process(pid)
        return _round_ct(p.create_time()) == ct and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ManagerError(RuntimeError):
    """The Manager server failed a request with an error it could not send as an exception
    (the stock server's ``#TRACEBACK`` answer); the server's traceback is the message."""


# -- connections ------------------------------------------------------------------------------


def _call(conn: connection.Connection, ident: Any, method: str, args: tuple) -> Any:
    """One request and its answer on ``conn``. EOFError/OSError (LOST) if the server is gone."""
    conn.send((ident, method, args, {}))
    kind, result = conn.recv()
    if kind == "#RETURN":
        return result
    if kind == "#ERROR" and isinstance(result, BaseException):
        raise result
    raise ManagerError(f"the Manager failed {method!r}: {result}")


class _Link:
    """The program's channel to its server's handover thread (module docstring): what it
    sends there are connections, one per thread that asks the server something."""

    def __init__(self, address: str, fd: int) -> None:
        self.address = address  # I
        self.sock = socket.socket(fileno=fd)  # I (sendmsg is atomic on a SEQPACKET socket)

    def connect(self) -> connection.Connection:
        """A new connection to the server, registered by its handover thread (a request sent
        at once waits in the socket until then). OSError if the server is gone."""
        ours, theirs = socket.socketpair()
        try:
            socket.send_fds(self.sock, [b"c"], [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return connection.Connection(ours.detach())

    def close(self) -> None:
        self.sock.close()


def _connect_stock(address: str) -> connection.Connection:
    """A connection the stock way (no link, no handed-over connection): the authkey handshake,
    then ``accept_connection`` to have a server thread serve it."""
    from multiprocessing import current_process

    conn = connection.Client(address, authkey=bytes(current_process().authkey))
    try:
        _call(conn, None, "accept_connection", (threading.current_thread().name,))
    except BaseException:
        conn.close()
        raise
    return conn


def _new_connection(address: str, stock: bool = True) -> connection.Connection | None:
    """A new connection to the server at ``address``: through the program's link to it if it
    is the program's server, else the stock way (or None if not ``stock``)."""
    link = _link if _link is not None and _manager_pid == os.getpid() and _link.address == address else None
    if link is not None:
        return link.connect()
    return _connect_stock(address) if stock else None


class _PerThread(threading.local):
    """This thread's connections, by server address (made in this process: a fork's child
    starts with none of them)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.conns: dict[str, connection.Connection] = {}


_per_thread = _PerThread()


def _thread_connection(address: str) -> connection.Connection:
    mine = _per_thread
    if mine.pid != os.getpid():
        mine.pid, mine.conns = os.getpid(), {}
    conn = mine.conns.get(address)
    if conn is None:
        conn = mine.conns[address] = _new_connection(address)  # type: ignore[assignment]
    assert conn is not None
    return conn


def _drop_thread_connection(address: str) -> None:
    conn = _per_thread.conns.pop(address, None) if _per_thread.pid == os.getpid() else None
    if conn is not None:
        conn.close()


# -- the lock ---------------------------------------------------------------------------------


class ManagerLock:
    """A ``RobustLock`` of the Manager server, as a client holds it (procpool.lockserver).

    Use as a context manager. Acquiring from a second thread of the same process while held
    is a deadlock, exactly as with ``threading.Lock``. Pickles as its name (a worker's
    ``LockName``): the program keeps the server's reference (``make_locks``, ``free_locks``).
    """

    def __init__(self, address: str, ident: str, name: str) -> None:
        self.address = address  # I: the server's
        self.ident = ident  # I: the lock's, there
        self.name = name  # I
        self._adopted: connection.Connection | None = None  # a worker's handed-over connection
        self._adopted_pid = 0

    def _request(self, method: str, args: tuple) -> Any:
        if self._adopted is not None and self._adopted_pid == os.getpid():
            try:
                return _call(self._adopted, self.ident, method, args)
            except (EOFError, OSError):
                # It never reached the server (the spawner died before passing it on), so
                # the request was not seen: connect the other way and ask again.
                self._adopted.close()
                self._adopted = None
        try:
            return _call(_thread_connection(self.address), self.ident, method, args)
        except (EOFError, OSError):
            _drop_thread_connection(self.address)
            raise

    def acquire(self, timeout: float | None = None) -> bool:
        return bool(self._request("acquire", (os.getpid(), timeout)))

    def release(self) -> None:
        self._request("release", (os.getpid(),))

    def owner(self) -> Owner | None:
        return self._request("owner", ())

    @property
    def broken(self) -> int:
        """How many times a waiter took this lock over from a dead owner."""
        return int(self._request("broken_count", ()))

    def adopt_connection(self, fd: int) -> None:
        """Use ``fd``, a connection the spawner handed over to the server, for this lock's
        requests from this process."""
        self._adopted, self._adopted_pid = connection.Connection(fd), os.getpid()

    def __enter__(self) -> ManagerLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<ManagerLock {self.name}>"

    def __reduce__(self) -> tuple:
        return (LockName, (self.address, self.ident, self.name))


def lock_for(name: LockName) -> ManagerLock:
    """The lock ``name`` names: the program's own (``make_locks`` then makes it on the server,
    if it is a new name), or a worker's, to acquire and release (the rare path; with the
    handed-over connection ``name`` still holds)."""
    lock = ManagerLock(os.fsdecode(name.address), name.ident, name.name)
    fd = name.take_connection()
    if fd >= 0:
        lock.adopt_connection(fd)  # a worker's handed-over connection, still unused
    return lock


# -- the program's server ---------------------------------------------------------------------

_address = ""  # the program's server's address ("" until it has one)
_manager_pid = 0  # the process _address and the rest belong to (a fork's child has none)
_link: _Link | None = None  # the program's link to its server (belongs to _manager_pid too)
_manager_ready: connection.Connection | None = None  # the started server says here it listens
_manager_alive_w = -1  # the program's end of the Manager's "program alive" pipe
_server: Owner = (0, 0.0)  # the Manager server process: (pid, start time)
# guards _address, _manager_pid, _link, _manager_alive_w, _server, _manager_ready
_manager_lock = threading.Lock()


def _fresh_lock_in_child() -> None:
    """A fork of the program gets a fresh ``_manager_lock``: a fork copies a lock held by
    another thread as held, forever, and a pool's filler holds this one across a round trip
    to the spawner while the program's server starts (right after the first pool's
    constructor). The fork's own first pool starts a server of its own (the pid checks)."""
    global _manager_lock
    _manager_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_in_child)


def same_address(a: str | bytes, b: str | bytes) -> bool:
    """Addresses of Unix sockets compared (a server reports its abstract name as bytes)."""
    return os.fsencode(a) == os.fsencode(b)


#: Gives the program's spawner (procpool.spawner.get_spawner with the pool's context): the
#: Manager's server is forked by it. Passed in by the caller (procpool.poollocks), so that this
#: module does not import the spawner's, which loads the worker's, which may load this one.
SpawnerOf = Callable[[], Any]


def get_manager(spawner: SpawnerOf) -> str:
    """The address of the program's Manager server, started on first use (shared by every
    pool of the program), without waiting for it to listen (``wait_manager_ready``).

    The spawner forks it, so that starting it costs a fork, not a process start through
    multiprocessing; it lives as long as the program, even if the spawner is replaced, unless
    it dies (see ``replace_dead_manager``).
    """
    with _manager_lock:
        # A dead server is replaced here for new pools; pools that hold its locks find out
        # on their next request (PoolLocks).
        if not _address or _manager_pid != os.getpid() or not owner_alive(_server):
            _start_manager(spawner)
        return _address


def _start_manager(spawner: SpawnerOf) -> None:
    """_manager_lock held. Listens at the planned address (lockname.plan_address), once."""
    global _address, _manager_pid, _link, _manager_alive_w, _server, _manager_ready
    address = lockname.take_planned()
    alive_r, alive_w = os.pipe()
    try:
        for attempt in range(2):
            try:
                # The spawner may have died since it was last asked: then the request
                # fails, marks it lost, and a new one is started for the second attempt.
                address, pid, ready, link = spawner().start_manager(alive_r, address)
                break
            except (EOFError, OSError):
                if attempt:
                    raise
    except BaseException:
        os.close(alive_w)
        raise
    finally:
        os.close(alive_r)
    mine = _manager_pid == os.getpid()
    if mine and _manager_alive_w >= 0:
        os.close(_manager_alive_w)  # a dead server's: nobody reads it any more
    if mine and _link is not None:
        _link.close()
    if mine and _manager_ready is not None:
        _manager_ready.close()  # a server that died before it listened
    _address, _manager_pid, _manager_alive_w = os.fsdecode(address), os.getpid(), alive_w
    _link = _Link(_address, link)
    lockname.set_live(_address)
    _manager_ready = connection.Connection(ready, writable=False)
    _server = _identify(pid)


def wait_manager_ready() -> None:
    """Wait until the program's newly started Manager server listens (it sends its address
    on the pipe ``_start_manager`` was given): before the program's first request to it. The
    server started while the program did something else (forked a pool's workers).
    Bounded: a server that dies first closes the pipe, and this raises EOFError (LOST)."""
    global _manager_ready
    with _manager_lock:
        ready, _manager_ready = _manager_ready, None
        if ready is None or _manager_pid != os.getpid():
            return
        try:
            ready.recv()
        finally:
            ready.close()


#: How long a server whose connection just broke may still look alive: the kernel closes a
#: killed process's sockets (its peers read EOF) before the process becomes a zombie, so the
#: first look after an EOF can find it still running (seen: a pool's start failing with the
#: server SIGKILLed, under load).
DEATH_GRACE = 1.0


def _gone_within(owner: Owner, grace: float) -> bool:
    """Is ``owner`` dead, or dead within ``grace`` seconds? (A live server, whose failure was
    something else, costs the caller that long: an error path only.)"""
    deadline = time.monotonic() + grace
    while owner_alive(owner):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def replace_dead_manager(spawner: SpawnerOf, address: Any) -> bool:
    """The Manager server at ``address`` stopped answering. If it is dead, start a new one
    (unless another pool already did); True if the program's Manager is now a live one other
    than ``address``'s, False if that server is still alive (the failure was something else:
    out of descriptors, say) or no new one could be started."""
    with _manager_lock:
        current = bool(_address) and _manager_pid == os.getpid()
        if current and not same_address(_address, address):
            return True  # replaced already, by another pool
        if current and not _gone_within(_server, DEATH_GRACE):
            return False
        try:
            _start_manager(spawner)
        except Exception:  # noqa: BLE001 - no new server: the caller treats it as a creation failure
            return False
        return True


def server_pid() -> int | None:
    """The pid of this program's Manager server process, if it has one (to watch it from
    outside: ps, psutil, tests). Read without ``_manager_lock``, which a server's start holds
    across a round trip to the spawner: the arbiter publishes this every turn and must not
    wait for that; a value one start old is what any observer may see anyway."""
    address, pid, server = _address, _manager_pid, _server
    return server[0] if address and pid == os.getpid() else None


def new_lock(spawner: SpawnerOf, name: str, fault_spec: faults.Spec | None = None) -> ManagerLock:
    """A new lock on the program's Manager (started if need be)."""
    lock = lock_for(lockname.name_lock(get_manager(spawner), name))
    make_locks([lock], fault_spec)
    return lock


def make_locks(locks: list[ManagerLock], fault_spec: faults.Spec | None = None) -> None:
    """Make the planned ``locks`` (all at one server's address) in one request, each with one
    reference on the server, the program's (``free_locks`` gives it back)."""
    if not locks:
        return
    wait_manager_ready()
    conn = _new_connection(locks[0].address)
    assert conn is not None
    try:
        _call(conn, None, "create_locks", ([lock.ident for lock in locks], fault_spec))
    finally:
        conn.close()


def free_locks(locks: list[ManagerLock]) -> None:
    """Give the server back the program's references to ``locks`` (a closed pool's): it drops
    them. Not waited for (a server that is gone or stuck must not hold up a teardown): the
    request is sent and the connection closed; the server answers into the void. Only
    through the program's link: a stock connect could wait on a stuck server's handshake."""
    if not locks:
        return
    try:
        conn = _new_connection(locks[0].address, stock=False)
        if conn is None:
            return  # not the program's current server: a dead one, whose locks died with it
    except (EOFError, OSError):
        return
    try:
        conn.send((None, "free_locks", ([lock.ident for lock in locks],), {}))
    except OSError:
        pass
    finally:
        conn.close()
