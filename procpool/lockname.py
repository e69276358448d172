"""What a worker holds of its pool's attach lock: the lock's name, not a connection.

A worker takes its pool's attach lock once, on its way out, and then almost always through
the connection the spawner handed over to the Manager server (``detach``: one request, one
answer, see procpool.lockserver). So what it is forked with is only the lock's *name* (the
server's address and the lock's ident) and, once forked, that connection's descriptor::

    program: ManagerLock  ──pickle──►  LockName(address, ident)  ──► spawner ──► worker
    worker on its way out:  detach ──► raw request on the handed-over connection (``ask``)
                            (rare: no handed-over connection, or the fault point
                            detach.locked) ──► procpool.manager.lock_for(name): a
                            ManagerLock, to acquire and release

Why a name: it is all a worker needs to carry, nothing of the Manager's client is loaded to
unpickle it (in the spawner, which unpickles every spec, nor in the worker), and the spawner
can fork a program's first workers before the program has started its server (docs/design.md,
"Pool start").
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
from typing import Any

#: Descriptors per handover message (the server's ends of new workers' Manager connections,
#: see procpool.lockserver): a spawner batch's worth (SCM_RIGHTS allows 253).
HANDOVER_MAX = 128


# -- naming locks before the server exists ------------------------------------------------------

# guards _planned and _live (a leaf: procpool.manager takes it under its _manager_lock)
_plan_lock = threading.Lock()


def _fresh_lock_in_child() -> None:
    """A fork of the program gets a fresh ``_plan_lock`` (a fork copies a lock held by
    another thread as held, forever); the pid in every planned address keeps the fork's
    plans apart from the program's."""
    global _plan_lock
    _plan_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_in_child)
_planned = ""  # the address the program's next Manager server will listen at
_live: tuple[int, str] | None = None  # (program pid, address) of the program's current server


def _prefix() -> str:
    return f"\0procpool-manager-{os.getpid()}-"


def new_address() -> str:
    """An address for a new Manager server of this program. An abstract-namespace socket
    (Linux): no temporary directory to create (and no tempfile import) in the way of the
    program's first pool, nothing left if everything is SIGKILLed. Any local process can
    connect to it; the server closes every connection of another uid at once
    (SO_PEERCRED), and the authkey handshake admits the rest."""
    return f"{_prefix()}{os.urandom(6).hex()}"


def plan_address() -> tuple[str, bool]:
    """The address of the program's Manager server as it will be when a pool's locks are
    made: the current one's, or the one the next server started will listen at; and whether
    it is the latter (no server yet). A pool names its locks with it before the server
    exists, so that workers forked meanwhile already carry them. No Manager contact, no
    process started, and nothing of procpool.manager loaded."""
    global _planned
    with _plan_lock:
        if _live is not None and _live[0] == os.getpid():
            return _live[1], False
        if not _planned.startswith(_prefix()):
            _planned = new_address()
        return _planned, True


def take_planned() -> str:
    """For procpool.manager, starting a server: the planned address (once: a server that
    fails to start leaves its address to no other), or a new one."""
    global _planned
    with _plan_lock:
        address = _planned if _planned.startswith(_prefix()) else new_address()
        _planned = ""
        return address


def set_live(address: str) -> None:
    """For procpool.manager: the program's server now listens (or will) at ``address``."""
    global _live
    with _plan_lock:
        _live = (os.getpid(), address)


def name_lock(address: str, name: str) -> LockName:
    """A new lock's name at the server at ``address``: never a stock ident (hex digits only),
    never one of another program's (the pid) or an earlier pool's (random)."""
    return LockName(address, f"{name}-{os.getpid()}-{os.urandom(6).hex()}", name)


# -- a worker's requests ----------------------------------------------------------------------

#: multiprocessing.connection's frame header: the payload's length, big-endian (for payloads
#: under 2 GiB, which is all a lock request or its answer ever is).
FRAME = struct.Struct("!i")


def ask(fd: int, payload: bytes) -> bytes:
    """Send one request frame (as ``Connection.send_bytes`` frames it) and read exactly one
    answer frame (nothing past it); EOFError if the peer closed first. One function, with
    its loops inline: every Python function a freshly woken worker calls for the first time
    costs it a copy-on-write fault or two (its function and code objects' reference counts)."""
    out = FRAME.pack(len(payload)) + payload
    while out:
        out = out[os.write(fd, out) :]
    data, need, size = b"", FRAME.size, -1
    while len(data) < need:
        chunk = os.read(fd, need - len(data))
        if not chunk:
            raise EOFError("the Manager closed the connection")
        data += chunk
        if size < 0 and len(data) == FRAME.size:
            size = FRAME.unpack(data)[0]
            need += size
    return data[FRAME.size :]


class LockName:
    """A Manager lock as a worker holds it (module docstring): the server's ``address``, the
    lock's ``ident`` there, and the handed-over connection once ``adopt_connection`` gave it.
    To hold the lock itself (acquire, release), a worker builds the lock's client from it
    (``procpool.manager.lock_for``)."""

    __slots__ = ("address", "ident", "name", "_fd")

    def __init__(self, address: Any, ident: str, name: str) -> None:
        self.address = address
        self.ident = ident
        self.name = name
        self._fd = -1  # the handed-over connection, while it is usable

    def __reduce__(self) -> tuple:
        return (LockName, (self.address, self.ident, self.name))

    def __repr__(self) -> str:
        return f"<LockName {self.name}>"

    def adopt_connection(self, fd: int) -> None:
        """Use ``fd``, a connection the spawner handed over to the server, for this lock's
        requests from this process."""
        self._fd = fd

    @property
    def batched(self) -> bool:
        """Can ``detach`` be asked (a handed-over connection)?"""
        return self._fd >= 0

    def detach(self, table: str, created: float, wid: int, gen: int) -> bool:
        """Have the Manager free id ``wid`` (allocation ``gen``) of id table ``table`` under
        this lock on our behalf (procpool.lockserver, "A teardown must not pass the attach lock
        through 64 processes one at a time"); True if we are the last one out of a teardown
        and must send the detach completion. Only where ``batched``; raises EOFError or
        OSError if the connection fails (``acquire`` then connects anew).

        The request is the stock server's own message in multiprocessing's framing, written
        and read with ``os.write``/``os.read`` and the plain pickle module: a freshly woken
        worker pays a copy-on-write fault for every object it touches first, and the proxy's
        way touched ~50 pages and cost ~0.3 ms of CPU per worker, against 8-10 pages and
        ~0.14 ms this way (docs/performance.md)."""
        if self._fd < 0:
            raise OSError("no handed-over connection to detach on")
        request = pickle.dumps((self.ident, "detach", (table, created, wid, gen), {}), pickle.HIGHEST_PROTOCOL)
        try:
            kind, result = pickle.loads(ask(self._fd, request))
        except (EOFError, OSError):
            self._drop()
            raise
        if kind == "#RETURN":
            return bool(result)
        raise result if isinstance(result, BaseException) else RuntimeError(f"detach: {kind} {result!r}")

    def _drop(self) -> None:
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        except OSError:
            pass

    def take_connection(self) -> int:
        """The handed-over connection's descriptor, now the caller's (-1 if none): for the
        lock a worker builds on the rare path (``procpool.manager.lock_for``)."""
        fd, self._fd = self._fd, -1
        return fd
