"""The spawner: procpool's kthreadd.

Workers are not started one by one through multiprocessing (a fork-server round trip of
several milliseconds each, measured ~5.5 ms here). Each program has one *spawner*: a small
single-threaded process, started once through multiprocessing (forkserver by default, so it
is safe when the program runs threads) with procpool already imported. A pool asks it for a
batch of workers in one message; it forks them — a fork of a single-threaded process is
safe — and answers with their pids. Workers are the spawner's children::

    program (any threads) ──request: specs + fds──► spawner (one thread) ──fork×N──► workers
            ◄──────────── pids ─────────────────────┘        │ reaps them (SIGCHLD)
            ◄──── exit status, on each worker's status pipe ──┘

Each worker gets a *status pipe*: the read end stays in the program (the worker's sentinel:
readable once the worker is gone), the write end stays in the spawner, which writes the exit
status there when it reaps the worker. So a crash is noticed as soon as the kernel reports
it, and no worker ever stays a zombie.

The spawner also forks the program's Manager server, and makes each worker's connection to
it as it forks the worker: one end of a new socket pair stays in the worker, the other goes
to the server over a private channel (see procpool.manager), so no worker ever connects or
authenticates on its way out.

If the program dies, the spawner sees its request socket close and exits; the workers see
their own sockets close and exit. If the spawner dies, every status pipe closes: the program
treats the workers as lost (and kills any that survive), then starts a new spawner.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
from multiprocessing import connection
from typing import Any

_LEN = struct.Struct("<I")
_STATUS = struct.Struct("<i")
#: SCM_RIGHTS carries at most 253 descriptors per message; each worker needs 3 (its two
#: pipe ends and its status pipe), and a batch one more (the completion pipe).
MAX_BATCH = 80
FDS_PER_WORKER = 3
#: ... and a batch may carry this many more, inherited by every worker of the batch (a pool
#: initializer's arguments': see procpool.calls.MAX_INHERITED_FDS).
MAX_INHERITED = 12


class WorkerProcess:
    """The program's handle on a worker the spawner forked (the subset of
    ``multiprocessing.Process`` the pool uses)."""

    def __init__(self, pid: int, sentinel: int) -> None:
        self.pid = pid
        self.sentinel = sentinel  # read end of the status pipe
        self.exitcode: int | None = None
        self._closed = False

    def join(self, timeout: float | None = None) -> None:
        if self.exitcode is not None or self._closed:
            return
        if not connection.wait([self.sentinel], timeout):
            return
        data = b""
        try:
            data = os.read(self.sentinel, _STATUS.size)
        except OSError:
            pass
        if len(data) == _STATUS.size:
            self.exitcode = _STATUS.unpack(data)[0]
        else:
            # The spawner died before it could reap this worker: the worker may even be
            # alive, now an orphan. It has no future in this pool; make sure of that.
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.exitcode = -signal.SIGKILL

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.sentinel)


class _ForkedSpawner:
    """Handle on a spawner this program forked itself (the subset of Process used here)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        self.join(0)
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.exitcode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG if deadline is not None else 0)
            if pid:
                self.exitcode = os.waitstatus_to_exitcode(status)
            elif deadline is None or time.monotonic() >= deadline:
                return
            else:
                time.sleep(0.005)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def reset_signals() -> None:
    """Back to the default disposition for every signal that has a Python handler, and no
    wakeup fd: a process forked from the program (or from the spawner) must not run the
    program's handlers — a worker that merely *records* SIGTERM would survive close()'s
    escalation, and a Manager that does would outlive its stop."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # pragma: no cover - not the main thread
        return
    for sig in signal.valid_signals():
        try:
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass


def fork_is_safe() -> bool:
    """Is this process single-threaded, as the kernel sees it (native threads included)?
    Only then is a fork free of locks held by some other thread."""
    import psutil

    return psutil.Process().num_threads() == 1


class Spawner:
    """Client side, in the program. Thread-safe: one request at a time on the socket.

    How the spawner itself starts: when the program is single-threaded (the common case at
    the first pool), by a plain fork — a millisecond or two, and the spawner then holds the
    program's ``__main__`` as it is. Otherwise through the multiprocessing context
    (forkserver by default), which is safe whatever threads the program runs.
    """

    def __init__(self, ctx: Any, allow_fork: bool = True) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if allow_fork and fork_is_safe():
            self._proc: Any = self._fork(ours, theirs)
        else:
            # The spawner gets its end as a multiprocessing Connection (fd passing is built
            # into its start); it uses the raw socket underneath.
            theirs_conn = connection.Connection(theirs.detach())
            self._proc = ctx.Process(
                target=_spawner_main, args=(theirs_conn, os.getpid()), name="procpool-spawner"
            )
            try:
                self._proc.start()
            finally:
                theirs_conn.close()
        self._sock = ours
        self._lock = threading.Lock()  # guards self._sock: one request/answer at a time
        self.pid: int = self._proc.pid

    @staticmethod
    def _fork(ours: socket.socket, theirs: socket.socket) -> _ForkedSpawner:
        pid = os.fork()
        if pid == 0:  # the spawner: never returns into the program's code
            try:
                import gc

                # The program's objects copied here are never collected: their finalizers are
                # the program's business (and untouched pages stay shared).
                gc.freeze()
                reset_signals()
                # The program's descriptors stay open, as in any fork (closing them would let
                # a later open() reuse a number that the program's copied objects, a logging
                # handler say, still write to). This is why only the first spawner, forked
                # before any pool has pipes of its own, may be a fork (see get_spawner).
                ours.close()
                _spawner_loop(theirs, os.getppid())
            finally:
                os._exit(1)
        theirs.close()
        return _ForkedSpawner(pid)

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def start_manager(self, alive_fd: int) -> tuple[Any, int]:
        """Have the spawner fork the program's Manager server; returns its address and pid.
        ``alive_fd`` is the read end of a pipe only the program writes to: the server exits
        when it reads EOF there, i.e. when the program is gone, whatever became of us."""
        payload = pickle.dumps(("manager", None, None), pickle.HIGHEST_PROTOCOL)
        with self._lock:
            _send_frame(self._sock, payload, [alive_fd])
            answer = pickle.loads(_recv_frame(self._sock))
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def spawn(
        self,
        specs: list[Any],
        conn_fds: list[tuple[int, int]],
        completion_fd: int,
        inherited: list[int] = (),  # type: ignore[assignment]
    ) -> list[WorkerProcess | BaseException]:
        """Fork one worker per spec; ``conn_fds[i]`` (the read end of its work pipe, the
        write end of its result pipe) become worker i's channel; every worker also gets the
        ``inherited`` descriptors (its pool's initargs', at most MAX_INHERITED), as
        ``spec.inherited_fds``. Returns a handle, or the exception that refused it, per spec."""
        out: list[WorkerProcess | BaseException] = []
        for start in range(0, len(specs), MAX_BATCH):
            out += self._spawn_batch(
                specs[start : start + MAX_BATCH], conn_fds[start : start + MAX_BATCH], completion_fd, list(inherited)
            )
        return out

    def _spawn_batch(
        self, specs: list[Any], conn_fds: list[tuple[int, int]], completion_fd: int, inherited: list[int]
    ) -> list[WorkerProcess | BaseException]:
        pipes = [os.pipe() for _ in specs]
        try:
            payload = pickle.dumps(("spawn", specs, list(sys.path), len(inherited)), pickle.HIGHEST_PROTOCOL)
            fds = [completion_fd]
            for (rx, tx), (_, status_w) in zip(conn_fds, pipes, strict=True):
                fds += [rx, tx, status_w]
            fds += inherited
            with self._lock:
                _send_frame(self._sock, payload, fds)
                answer = pickle.loads(_recv_frame(self._sock))
        except BaseException:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            raise
        handles: list[WorkerProcess | BaseException] = []
        for (r, w), res in zip(pipes, answer, strict=True):
            os.close(w)  # the spawner holds its own copy now
            if isinstance(res, int):
                handles.append(WorkerProcess(res, r))
            else:
                os.close(r)
                handles.append(res)
        return handles

    def stop(self) -> None:
        """Ask the spawner to exit (it exits when its socket closes) and reap it."""
        try:
            self._sock.close()
        finally:
            self._proc.join(5)
            if self._proc.exitcode is None:
                self._proc.kill()
                self._proc.join(5)


def _send_frame(sock: socket.socket, payload: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
    data = _LEN.pack(len(payload)) + payload
    first = socket.send_fds(sock, [data[:65536]], list(fds)) if fds else sock.send(data[:65536])
    if first < len(data):
        sock.sendall(data[first:])


def _recv_exact(sock: socket.socket, n: int, buf: bytes = b"") -> bytes:
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("spawner socket closed")
        buf += chunk
    return buf


def _recv_frame(sock: socket.socket) -> bytes:
    head = _recv_exact(sock, _LEN.size)
    return _recv_exact(sock, _LEN.unpack(head)[0])


def _recv_frame_fds(sock: socket.socket, maxfds: int) -> tuple[bytes, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, 65536 + _LEN.size, maxfds)
    if not data:
        raise EOFError("program socket closed")
    data = _recv_exact(sock, _LEN.size, data)
    (length,) = _LEN.unpack(data[: _LEN.size])
    return _recv_exact(sock, _LEN.size + length, data)[_LEN.size :], fds


# -- the spawner process -------------------------------------------------------------------------


def _spawner_main(conn: connection.Connection, program: int) -> None:
    """Entry point when started through multiprocessing (a threaded program)."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    _spawner_loop(sock, program)


def _spawner_loop(sock: socket.socket, program: int) -> None:
    """Single-threaded loop: fork workers on request, reap them, report their exit status."""
    try:
        import setproctitle

        setproctitle.setproctitle("procpool: spawner")
    except Exception:  # pragma: no cover - cosmetic
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the program's to handle
    # Import here, once, what a worker needs on its way out when it has to connect to the
    # Manager itself (a replacement spawner hands no connections over): the handshake imports
    # hmac (and OpenSSL with it) on first use, ~1-2 ms of CPU per worker at the worst moment,
    # a teardown of many at once. (Usually no-ops: the program imported them already.)
    import hashlib  # noqa: F401
    import hmac  # noqa: F401

    import psutil

    from . import worker  # noqa: F401 - what every worker runs
    from .manager import hand_over

    psutil.boot_time()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select() through wake_w
    status_w: dict[int, int] = {}  # pid -> write end of that worker's status pipe
    # Our end of the channel that hands workers' connections to the Manager we forked; None
    # when we did not fork it (a replacement spawner): workers then connect themselves.
    handover: socket.socket | None = None

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            fd = status_w.pop(pid, None)
            if fd is not None:
                try:
                    os.write(fd, _STATUS.pack(os.waitstatus_to_exitcode(status)))
                except OSError:
                    pass
                os.close(fd)

    while True:
        try:
            ready, _, _ = select.select([sock, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
            reap()
        if sock not in ready:
            continue
        try:
            payload, fds = _recv_frame_fds(sock, 1 + FDS_PER_WORKER * MAX_BATCH + MAX_INHERITED)
        except (EOFError, OSError):
            _program_gone(program)
        kind, specs, sys_path, *more = pickle.loads(payload)
        inherited = fds[len(fds) - more[0] :] if more and more[0] else []
        if kind == "manager":
            from .manager import start_server

            answer: Any
            try:
                answer, handover = start_server(fds[0], [sock.fileno(), wake_r, wake_w])
            except Exception as exc:
                answer = exc
            os.close(fds[0])
            _send_frame(sock, pickle.dumps(answer, pickle.HIGHEST_PROTOCOL))
            continue
        completion_fd, rest = fds[0], fds[1 : len(fds) - len(inherited)]
        answer = []
        # A Manager connection per worker, handed over to the server (see procpool.manager).
        ours: list[int] = []
        try:
            for _ in specs if handover is not None else ():
                a, b = socket.socketpair()
                ours += [a.detach(), b.detach()]
        except OSError:  # out of descriptors: these workers connect the stock way
            for fd in ours:
                os.close(fd)
            ours = []
        given: list[int] = []  # the server's ends of the workers that were forked
        for i, spec in enumerate(specs):
            rx, tx, sw = rest[FDS_PER_WORKER * i : FDS_PER_WORKER * (i + 1)]
            mgr = ours[2 * i] if ours else -1
            try:
                pid = os.fork()
            except OSError as exc:
                answer.append(exc)  # its descriptors are closed with the rest below
                continue
            if pid == 0:
                keep = {rx, tx, completion_fd, mgr, *inherited}
                spec.inherited_fds = inherited
                extra = [handover.fileno()] if handover is not None else []
                for fd in [sock.fileno(), wake_r, wake_w, *extra, *status_w.values(), *fds, *ours]:
                    if fd not in keep:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                _child(spec, rx, tx, completion_fd, sys_path, mgr)
            status_w[pid] = sw
            answer.append(pid)
            if ours:
                given.append(ours[2 * i + 1])
        if given:
            try:
                hand_over(handover, given)
            except OSError:
                # The server is gone (so is the program, soon): the workers' requests fail
                # and their exit paths handle that as with any lost Manager.
                handover.close()
                handover = None
        for fd in ours:
            os.close(fd)
        live = set(status_w.values())
        for fd in fds:
            if fd not in live:
                os.close(fd)
        _send_frame(sock, pickle.dumps(answer, pickle.HIGHEST_PROTOCOL))
        reap()


def _program_gone(program: int) -> None:
    """The program closed its socket: it exited, or was killed. Clean up after it and leave:
    unlink any id table of its that teardown did not (a killed program's), stop the Manager
    server this process forked, and reap it (our child: nobody else would)."""
    from .idtable import SHM_DIR, segment_prefix
    from .manager import stop_servers

    prefix = f"{segment_prefix()}{program}-"
    try:
        for name in os.listdir(SHM_DIR):
            if name.startswith(prefix):
                try:
                    os.unlink(os.path.join(SHM_DIR, name))
                except FileNotFoundError:
                    pass
    finally:
        stop_servers()
        os._exit(0)


def _child(spec: Any, rx: int, tx: int, completion_fd: int, sys_path: list[str], mgr: int) -> None:
    """In a freshly forked worker: undo the spawner's signal set-up, then become the worker."""
    code = 1
    try:
        reset_signals()  # the spawner's SIGCHLD handler and wakeup fd are not the worker's
        sys.path[:] = sys_path
        from .worker import Channel, worker_main

        spec.conn = Channel(rx, tx)
        spec.completion = connection.Connection(completion_fd, readable=False)
        if mgr >= 0:
            spec.attach_lock.adopt_connection(mgr)
        worker_main(spec)
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


# -- the start method of a spawner in a threaded program ------------------------------------------


def resolve_context(mp_context: Any) -> Any:
    """The multiprocessing context that starts the program's spawner when the program runs
    threads (see procpool.spawner; a single-threaded program forks its spawner directly):
    forkserver unless told otherwise.

    forkserver is the default because it is safe when the parent runs threads (a fork of a
    threaded parent can copy a lock held by another thread) while each new worker is still
    only a fork of a small single-threaded server, with procpool already imported there.
    """
    if mp_context is None:
        mp_context = "forkserver"
    if isinstance(mp_context, str):
        try:
            ctx = multiprocessing.get_context(mp_context)
        except ValueError:
            raise ValueError(f"mp_context: unknown start method {mp_context!r}") from None
    else:
        ctx = mp_context
    method = ctx.get_start_method()
    if method == "fork":
        raise ValueError(
            "mp_context: procpool does not start workers with 'fork' (unsafe in a threaded parent, "
            "and every worker would inherit every other worker's pipes); use 'forkserver' (the "
            "default) or 'spawn'"
        )
    if method == "forkserver":
        _preload_into_forkserver(ctx)
    return ctx


def _preload_into_forkserver(ctx: Any) -> None:
    # Importing procpool once in the fork server, not in the spawner it starts, is most of
    # that start. Keep whatever preload list the program set (default: ['__main__']).
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is not None:
        return  # already running; too late to change what it preloaded
    mods = list(getattr(server, "_preload_modules", ["__main__"]))
    if "procpool.worker" not in mods:
        ctx.set_forkserver_preload(mods + ["procpool.worker"])


_spawner: Spawner | None = None
_spawner_pid = 0
_spawner_lock = threading.Lock()  # guards _spawner and _spawner_pid


def get_spawner(ctx: Any, allow_fork: bool = True) -> Spawner:
    """The program's spawner, (re)started on demand. ``allow_fork``: may it be a plain fork
    of this program (when single-threaded)? The first pool of the program decides."""
    global _spawner, _spawner_pid
    with _spawner_lock:
        if _spawner is None or _spawner_pid != os.getpid() or not _spawner.is_alive():
            # A replacement (the first one died) never forks: by now the program holds pipes
            # to workers and the Manager whose EOFs a forked copy would hide.
            first = _spawner is None or _spawner_pid != os.getpid()
            _spawner, _spawner_pid = Spawner(ctx, allow_fork and first), os.getpid()
        return _spawner


def stop_spawner() -> None:
    global _spawner
    with _spawner_lock:
        if _spawner is not None and _spawner_pid == os.getpid():
            _spawner.stop()
        _spawner = None
