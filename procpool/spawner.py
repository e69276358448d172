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
to the server over a private channel (see procpool.lockserver), so no worker ever connects or
authenticates on its way out. A program's first workers are forked before its server (the
request says so: ``manager_follows``): their server ends wait here (``pending``) and are
handed over when the server is forked, or closed if it cannot be. The spawner warms up (loads
and looks up what every worker runs) as it starts, before the program's first request.

**Program death takes everything with it.** The spawner outlives the program on purpose: it is
the one left to clean up. It learns of the program's death from its request socket (EOF, or
EPIPE/ECONNRESET on an answer: the program holds the only other end), and then, in this order
(``_program_gone``): SIGKILLs every worker it forked and has not reaped — busy ones included:
their main thread is in user code and would never look at a pipe again before the item ends,
and their results have nobody to go to — unlinks the program's id tables from /dev/shm,
removes the program's multiprocessing temporary directory (``pymp-*``: a threaded program's
fork server listens there; the program's normal exit would have removed it, and told us to
leave it alone when it stopped us: ``Spawner.stop``), SIGKILLs the Manager server, reaps them
all and exits. Any other error in the spawner's loop leaves through the same door; only if
the program is demonstrably alive (its end of the socket has not hung up) does the spawner
leave its tables and Manager alone: the program then sees its workers' status pipes close and
starts a new spawner, which will clean up in its turn.
Workers also set PR_SET_PDEATHSIG(SIGKILL) with the spawner as the parent they watch, so a
spawner killed together with the program (OOM killer, a supervisor's SIGKILL to both) still
takes its workers with it; the program already treats the workers of a dead spawner as lost.
(Not PDEATHSIG on the program: the spawner, the workers' parent, must outlive the program.)

**Signals to the process group** (``timeout``, a closed terminal, a supervisor stopping a job)
reach the spawner and the Manager too. Both *ignore* SIGINT, SIGTERM, SIGHUP and SIGQUIT: their
life is the program's; they leave when the program is gone, whatever killed it, and a
program that survives the signal (it has a handler) keeps its helpers. SIGPIPE is ignored as
well (a program that reset it to default must not kill the spawner on an answer it cannot
send). Workers keep the default dispositions, as a stock pool's workers do: a group SIGTERM
ends them with the program. So that a worker never *inherits* an ignored SIGTERM (a signal
sent to it between its fork and its own reset would be discarded, and the worker would
survive it), the spawner does not ignore SIGTERM, SIGHUP and SIGQUIT but *blocks* them
(WORKER_DEFAULTS, default disposition): they stay pending, never delivered, in the spawner;
a worker unblocks them once it is set up and dies of any that came meanwhile. SIGKILL still
ends a helper at once; that is the tool to stop one by hand.

**Helpers hold only what they need.** A spawner forked from the program starts with a copy of
every descriptor the program had: the read end of its pipes, its listening sockets, its pipes to
the fork server and the resource tracker. Held here, they would keep a reader from ever seeing
EOF, a port bound, and a helper's stop at exit waiting forever. So right after its fork the
spawner keeps 0, 1, 2 (where tracebacks and the workers' prints go, as with a stock pool) and
its socket, and points every other inherited descriptor at /dev/null (``_let_go_of``). Why
/dev/null rather than ``close``: the program's objects copied into the spawner (a logging
handler, a socket object) still hold those *numbers*; were they closed, the next descriptor
the spawner creates or receives (a worker's result pipe, say) could reuse one, and a copied
handler writing from user code in a worker would then write into procpool's protocol. A
number kept on /dev/null can never be reused; what is written there is lost, what is read is
EOF. A spawner started through multiprocessing (the program runs threads) did not inherit the
program's descriptors, only the two multiprocessing hands every child: the fork server's
"alive" pipe and the resource tracker's; it lets go of those the same way. Either way the
spawner then forgets multiprocessing's handles on the program's fork server and resource
tracker, so a worker that needs one starts its own instead of writing into /dev/null. The
Manager server, forked by the spawner, closes the spawner's own descriptors in its turn (see
procpool.lockserver).

If the spawner dies, every status pipe closes: the program treats the workers as lost (and
kills any that survive), then starts a new spawner.
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
from collections.abc import Callable
from multiprocessing import connection
from typing import Any

from . import _compat, faults
from .lockname import HANDOVER_MAX
from .procs import HELPER_IGNORES, WORKER_DEFAULTS, close_quietly, kill_quietly, readable, reset_signals

_LEN = struct.Struct("<I")
_STATUS = struct.Struct("<i")
#: SCM_RIGHTS carries at most 253 descriptors per message; each worker needs 3 (its two
#: pipe ends and its status pipe), and a batch one more (the completion pipe).
MAX_BATCH = 80
FDS_PER_WORKER = 3
#: ... and a batch may carry this many more, inherited by every worker of the batch (a pool
#: initializer's arguments': see procpool.calls.MAX_INHERITED_FDS).
MAX_INHERITED = 12
#: How long ``Spawner.stop`` waits for the socket (seconds) to tell the spawner to leave the
#: program's temporary directory alone; past that it stops it without a word.
STOP_TELL_TIMEOUT = 1.0
#: The spawner's first word to a program that started it through multiprocessing.
READY = b"ready"
NOT_BOOTSTRAPPED = (
    "procpool's spawner exited before it was ready. This program runs threads, so the spawner "
    "is started through multiprocessing, which imports the main module again in the new "
    "process; if that import makes a pool (or starts a process) itself, it does so before the "
    "process is ready, and fails (the new process prints its traceback). "
    'Put the main module\'s code that makes pools under `if __name__ == "__main__":` '
    "(and call multiprocessing.freeze_support() there first in a frozen executable)."
)


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
        if not readable(self.sentinel, timeout):
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
            kill_quietly(self.pid)
            self.exitcode = -signal.SIGKILL

    def kill(self) -> None:
        kill_quietly(self.pid)

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
        kill_quietly(self.pid)


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
        if _compat.is_inheriting():
            # We are the main module being imported again by multiprocessing in a new process
            # (the fork server, or a spawner it started): a pool made here would start
            # processes from a process that is not ready, and its parent would only see a
            # connection reset. Say what is wrong where it happens.
            raise RuntimeError(NOT_BOOTSTRAPPED)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if allow_fork and fork_is_safe():
            self._proc: Any = self._fork(ours, theirs)
        else:
            # The spawner gets its end as a multiprocessing Connection (fd passing is built
            # into its start); it uses the raw socket underneath.
            theirs_conn = connection.Connection(theirs.detach())
            _preload_into_forkserver(ctx)
            self._proc = ctx.Process(target=_spawner_main, args=(theirs_conn, os.getpid()), name="procpool-spawner")
            try:
                self._proc.start()
            finally:
                theirs_conn.close()
            self._wait_ready(ours)
        self._sock = ours
        self._lock = threading.Lock()  # guards self._sock: one request/answer at a time
        self._lost = False  # a request failed on the socket: the spawner is gone (see _request)
        self.pid: int = self._proc.pid
        self._told_temp_dir = False  # the spawner knows a temp dir of ours to remove (set once here)
        self._tell_temp_dir(_compat.own_temp_dir())

    def _wait_ready(self, ours: socket.socket) -> None:
        """Wait for the first word of a spawner started through multiprocessing. Such a start
        imports the program's main module again in the new process; a main module without
        ``if __name__ == "__main__":`` makes a pool there, which fails, and the spawner dies
        before it says anything. That is reported here, in the program, as what it is.
        (Bounded: the spawner's death closes its end, and this read ends with EOF.)"""
        try:
            ready = _recv_frame(ours)
        except (EOFError, OSError):
            ready = b""
        if ready != READY:
            ours.close()
            self._proc.join(5)
            raise RuntimeError(NOT_BOOTSTRAPPED)

    @staticmethod
    def _fork(ours: socket.socket, theirs: socket.socket) -> _ForkedSpawner:
        # Read before the fork: a program that dies right after it would make the spawner's
        # getppid() a reaper's pid, and the spawner would clean up after the wrong program.
        program = os.getpid()
        pid = os.fork()
        if pid == 0:  # the spawner: never returns into the program's code
            try:
                import gc

                # The program's objects copied here are never collected: their finalizers are
                # the program's business (and untouched pages stay shared).
                gc.freeze()
                reset_signals()
                ours.close()
                # Every descriptor of the program but stdio goes to /dev/null (module
                # docstring: "Helpers hold only what they need").
                _let_go_of(_open_fds() - {0, 1, 2, theirs.fileno()})
                _compat.forget_program_helpers()
                _spawner_loop(theirs, program)
            finally:
                os._exit(1)
        theirs.close()
        return _ForkedSpawner(pid)

    def is_alive(self) -> bool:
        return not self._lost and self._proc.is_alive()

    def _tell_temp_dir(self, path: str | None) -> None:
        """Tell the spawner which multiprocessing temporary directory (``pymp-*``) to remove
        should this program die without its normal exit (module docstring, "Program death
        takes everything with it"): the program's own when the spawner starts (its fork
        server's address is there when the spawner was started through one). Nothing is said
        when there is none. A request like any other, answered (one request in flight at a
        time, as every request)."""
        if path is None:
            return
        try:
            self._request(pickle.dumps(("tempdir", path, None), pickle.HIGHEST_PROTOCOL), [])
        except (EOFError, OSError):
            return  # the spawner is gone (marked lost): nothing to tell
        self._told_temp_dir = True

    def _request(self, payload: bytes, fds: list[int]) -> Any:
        """One request and its answer. A socket that fails (the spawner died, perhaps so
        recently that it is not even a zombie yet) marks this spawner lost, so that the next
        get_spawner() starts a new one instead of handing this one out again."""
        return self._request_fds(payload, fds, 0)[0]

    def _request_fds(self, payload: bytes, fds: list[int], maxfds: int) -> tuple[Any, list[int]]:
        """``_request`` whose answer may carry up to ``maxfds`` descriptors (returned too)."""
        got: list[int] = []
        with self._lock:
            try:
                _send_frame(self._sock, payload, fds)
                if not maxfds:
                    answer = pickle.loads(_recv_frame(self._sock))
                else:
                    data, got = _recv_frame_fds(self._sock, maxfds)
                    answer = pickle.loads(data)
            except (EOFError, OSError):
                self._lost = True
                raise
            return answer, got

    def start_manager(self, alive_fd: int, address: str) -> tuple[Any, int, int, int]:
        """Have the spawner fork the program's Manager server, listening at ``address``
        (chosen by the program, so that it can name the server's locks before it exists);
        returns its address, its pid, the read end of the pipe on which it says it listens
        (the spawner does not wait for that: it goes on forking workers meanwhile), and the
        program's end of its link to the server (procpool.manager).
        ``alive_fd`` is the read end of a pipe only the program writes to: the server exits
        when it reads EOF there, i.e. when the program is gone, whatever became of us."""
        payload = pickle.dumps(("manager", None, address), pickle.HIGHEST_PROTOCOL)
        answer, fds = self._request_fds(payload, [alive_fd], 2)
        if isinstance(answer, BaseException) or len(fds) != 2:
            close_quietly(fds)
            raise answer if isinstance(answer, BaseException) else OSError("the spawner sent no Manager pipe and link")
        return (*answer, fds[0], fds[1])

    def spawn(
        self,
        specs: list[Any],
        conn_fds: list[tuple[int, int]],
        completion_fd: int,
        inherited: list[int] = (),  # type: ignore[assignment]
        manager_follows: bool = False,
    ) -> list[WorkerProcess | BaseException]:
        """Fork one worker per spec; ``conn_fds[i]`` (the read end of its work pipe, the
        write end of its result pipe) become worker i's channel; every worker also gets the
        ``inherited`` descriptors (its pool's initargs', at most MAX_INHERITED), as
        ``spec.inherited_fds``. ``manager_follows``: the program has no Manager server yet and
        will have this spawner fork one (the workers' connections to it are kept pending until
        then). Returns a handle, or the exception that refused it, per spec."""
        out: list[WorkerProcess | BaseException] = []
        for start in range(0, len(specs), MAX_BATCH):
            out += self._spawn_batch(
                specs[start : start + MAX_BATCH],
                conn_fds[start : start + MAX_BATCH],
                completion_fd,
                list(inherited),
                manager_follows,
            )
        return out

    def _spawn_batch(
        self,
        specs: list[Any],
        conn_fds: list[tuple[int, int]],
        completion_fd: int,
        inherited: list[int],
        manager_follows: bool,
    ) -> list[WorkerProcess | BaseException]:
        pipes = [os.pipe() for _ in specs]
        try:
            request = ("spawn", specs, list(sys.path), len(inherited), manager_follows)
            payload = pickle.dumps(request, pickle.HIGHEST_PROTOCOL)
            fds = [completion_fd]
            for (rx, tx), (_, status_w) in zip(conn_fds, pipes, strict=True):
                fds += [rx, tx, status_w]
            fds += inherited
            answer = self._request_fds(payload, fds, 0)[0]
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

    def drop_pending(self) -> None:
        """Have the spawner close the Manager connections it keeps for a server it was to
        fork (see ``_SpawnerState.drop_pending``)."""
        self._request(pickle.dumps(("drop", None, None), pickle.HIGHEST_PROTOCOL), [])

    def stop(self) -> None:
        """Ask the spawner to exit (it exits when its socket closes) and reap it."""
        try:
            # The program is alive and stops its spawner in order: its own exit removes its
            # temporary directory (later, and it may still need it); the spawner must not.
            # Bounded: a request stuck on a hung spawner must not hold the program's exit.
            if self._told_temp_dir and self._lock.acquire(timeout=STOP_TELL_TIMEOUT):
                try:
                    # The socket's last frame, unanswered: it closes right behind it.
                    _send_frame(self._sock, pickle.dumps(("tempdir", None, None), pickle.HIGHEST_PROTOCOL))
                except OSError:
                    pass  # the spawner is gone: nothing to tell
                finally:
                    self._lock.release()
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
    """One frame and the descriptors sent with it, reading nothing past the frame: the
    header first (the descriptors come with its first byte), then exactly the payload. (A
    first read of up to 64 KiB kept only the first of two frames that arrived together.)"""
    data, fds, _flags, _addr = socket.recv_fds(sock, _LEN.size, maxfds)
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
    # What multiprocessing handed us of the program's: the fork server's "alive" pipe and the
    # resource tracker's. Held here they would keep the program's stop of either waiting.
    # (The other descriptors were opened in the fork server or in this process: not the
    # program's to miss.)
    theirs = _compat.program_helper_fds()
    _let_go_of({fd for fd in theirs if fd > 2} - {sock.fileno()})
    _compat.forget_program_helpers()
    # What the fork server (or the main module it imported) installed: a worker resets only
    # the spawner's own handler (_worker_signals), so none other may be left here.
    reset_signals()
    _send_frame(sock, READY)
    _spawner_loop(sock, program)


def _open_fds() -> set[int]:
    """This process's open descriptors (its /proc/self/fd, less the one listing it)."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)  # the listing's own descriptor is closed by now
        except OSError:
            continue
        out.add(fd)
    return out


def _let_go_of(fds: set[int]) -> None:
    """Point each of ``fds`` at /dev/null: whatever it held (a pipe, a socket, a file) is
    released here, and the number stays taken, so nothing opened later can reuse it under a
    copied object that still writes to it (module docstring)."""
    if not fds:
        return
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in fds:
            if fd != null:
                os.dup2(null, fd, inheritable=False)
    finally:
        if null not in fds:
            os.close(null)


def _spawner_loop(sock: socket.socket, program: int) -> None:
    """Single-threaded loop: fork workers on request, reap them, report their exit status.
    Never returns: whatever ends the loop (the program gone, an error) ends in
    ``_program_gone`` (module docstring: "Program death takes everything with it")."""
    try:
        import setproctitle

        setproctitle.setproctitle("procpool: spawner")
    except Exception:  # noqa: BLE001 - cosmetic
        pass
    # The program's death is what ends us, not a signal to its process group: we must live
    # to clean up after it (module docstring). SIGPIPE: an answer the program can no longer
    # read is an EPIPE, handled like its socket's EOF.
    # WORKER_DEFAULTS: blocked first, then at their default, so no moment lets one through.
    signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_DEFAULTS)
    for sig in HELPER_IGNORES + (signal.SIGPIPE,):
        signal.signal(sig, signal.SIG_DFL if sig in WORKER_DEFAULTS else signal.SIG_IGN)
    state = _SpawnerState(sock)
    try:
        state.serve()
    except BaseException:  # noqa: BLE001 - any end of the loop runs the clean-up below
        if not _program_hung_up(sock):
            import traceback

            traceback.print_exc()  # a bug of ours, with the program alive: say so
            _kill_workers(state.status_w)
            os._exit(1)
    _program_gone(program, state.status_w, state.servers, state.temp_dir)


class _SpawnerState:
    """The spawner process's state and its request handlers (one thread: no lock)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.status_w: dict[int, int] = {}  # pid -> write end of that worker's status pipe (unreaped workers)
        # Our end of the channel that hands workers' connections to the Manager we forked; None
        # when we did not fork it (a replacement spawner): workers then connect themselves.
        self.handover: socket.socket | None = None
        self.servers: list[int] = []  # the Manager servers we forked (pids; the last one is live)
        self.pdeathsig: Callable[[int], None] | None = None  # set by warm_up, before the first fork
        # The server's ends of the Manager connections of workers forked before we forked the
        # server (the program's first workers: docs/design.md, "Pool start"), for start_manager
        self.pending: list[int] = []
        self.wake_r = self.wake_w = -1  # SIGCHLD wakes select() through this pipe
        self.pid = os.getpid()  # what a new worker checks its parent against (pdeathsig)
        self.temp_dir: str | None = None  # the program's multiprocessing temp dir (Spawner._tell_temp_dir)

    def serve(self) -> None:
        """The spawner's loop proper; returns when the program's socket closes, raises on any
        error (an EPIPE on an answer, say)."""
        self.warm_up()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select() through wake_w
        while True:
            try:
                watched: list[Any] = [self.sock, self.wake_r]
                ready, _, _ = select.select(watched, [], [])
            except InterruptedError:
                continue
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
                self.reap()
            if self.sock in ready and not self.one_request():
                return  # the program closed its socket: it exited, or was killed

    def reap(self) -> None:
        """Reap every worker that exited; write each one's exit status to its status pipe."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            fd = self.status_w.pop(pid, None)
            if fd is None:
                continue
            try:
                os.write(fd, _STATUS.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass
            os.close(fd)

    def warm_up(self) -> None:
        """At the spawner's start, before its first request (the program's first pool asks
        for its first workers, and prepares that request meanwhile): imports and looks up,
        once, what every worker runs (~3-4 ms, most of it ctypes for the pdeathsig setter),
        so that no new worker pays an import."""
        import psutil

        from . import protocol, worker

        global _worker_entry
        _worker_entry = (protocol.worker_title, worker.Channel, worker._set_title, worker.worker_main)
        import setproctitle

        worker._setproctitle = setproctitle  # (what _set_title would import in each worker)
        _compat.raw_signal()  # looked up here, once, for every worker (_worker_signals)
        _compat.note_inherited_temp_dir()
        psutil.boot_time()
        self.pdeathsig = _pdeathsig_setter()

    def one_request(self) -> bool:
        """Read and answer one request; False at the program's EOF."""
        try:
            payload, fds = _recv_frame_fds(self.sock, 1 + FDS_PER_WORKER * MAX_BATCH + MAX_INHERITED)
        except EOFError:
            return False
        kind, specs, sys_path, *more = pickle.loads(payload)
        if kind == "tempdir":
            self.temp_dir = specs
            if specs is not None:  # (None: a stopping program's last word, nobody reads an answer)
                _send_frame(self.sock, pickle.dumps(True, pickle.HIGHEST_PROTOCOL))
        elif kind == "manager":
            self.start_manager(fds[0], sys_path)  # (that slot has the address)
        elif kind == "drop":
            self.drop_pending()
        else:
            n_inherited, manager_follows = more
            inherited = fds[len(fds) - n_inherited :] if n_inherited else []
            self.spawn(specs, sys_path, fds, inherited, manager_follows)
        return True

    def start_manager(self, alive_fd: int, address: str) -> None:
        answer: Any
        ready: list[int] = []
        try:
            answer, ready = self._fork_server(alive_fd, address)
        except Exception as exc:  # noqa: BLE001 - answered to the program, which raises it
            answer = exc
        # The connections of workers forked before this server: handed over now, or, with
        # no server, closed (those workers then connect the stock way).
        pending, self.pending = self.pending, []
        self._hand_over(pending)
        close_quietly(pending)
        os.close(alive_fd)
        try:
            _send_frame(self.sock, pickle.dumps(answer, pickle.HIGHEST_PROTOCOL), ready)
        finally:
            close_quietly(ready)

    def _fork_server(self, alive_fd: int, address: str) -> tuple[tuple[str, int], list[int]]:
        """Fork the Manager server, listening at ``address``, with a bare fork: the child
        loads the Manager's machinery itself (procpool.lockserver.serve_forked), so that this
        process never does: its forks of the next workers do not wait ~15-20 ms for that
        import, and it stays small (so do the workers forked after it). Returns (address,
        pid), and for the program the read end of the pipe on which the server says it
        listens and its end of its link to the server; the server ends of workers'
        connections go to it over ``self.handover`` from now on."""
        mine: list[int] = []
        try:
            for _ in range(2):  # the handover channel, the program's link: [ours, the server's]
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                mine += [a.detach(), b.detach()]
            ready_r, ready_w = os.pipe()
            mine += [ready_r, ready_w]
            # What the server closes at its start: ours, not its own.
            old = [self.handover.fileno()] if self.handover is not None else []
            spawner_fds = [self.sock.fileno(), self.wake_r, self.wake_w, *old, *self.status_w.values(), *self.pending]
            pid = os.fork()
        except BaseException:
            close_quietly(mine)
            raise
        handover_fd, server_handover, link_fd, server_link = mine[:4]
        if pid == 0:
            theirs = [*spawner_fds, handover_fd, link_fd, ready_r]
            _become_server(alive_fd, theirs, [server_handover, server_link], ready_w, address)
        close_quietly([server_handover, server_link, ready_w])
        handover = socket.socket(fileno=handover_fd)
        handover.setblocking(False)  # a server that stopped reading must not stall the spawner
        if self.handover is not None:
            self.handover.close()
        self.handover = handover
        self.servers.append(pid)
        return (address, pid), [ready_r, link_fd]

    def drop_pending(self) -> None:
        """The program gave up on starting its Manager (``drop_pending`` below): close the
        pending connections, so that the workers waiting on them for their detach read EOF
        and leave the other way (procpool.worker.exit_path) instead of waiting forever."""
        pending, self.pending = self.pending, []
        close_quietly(pending)
        _send_frame(self.sock, pickle.dumps(True, pickle.HIGHEST_PROTOCOL))

    def _manager_pairs(self, n: int, manager_follows: bool) -> list[int]:
        """A Manager connection per worker (both ends, flat), to hand over to the server (see
        procpool.lockserver); none when we have no server and will fork none, or are out of
        descriptors (these workers then connect the stock way)."""
        ours: list[int] = []
        will_have = self.handover is not None or (manager_follows and not self.servers)
        try:
            for _ in range(n if will_have else 0):
                a, b = socket.socketpair()
                ours += [a.detach(), b.detach()]
        except OSError:
            close_quietly(ours)
            ours = []
        return ours

    def spawn(
        self, specs: list[Any], sys_path: list[str], fds: list[int], inherited: list[int], manager_follows: bool
    ) -> None:
        """Fork one worker per spec; answer a pid, or the exception that refused it, per spec."""
        completion_fd, rest = fds[0], fds[1 : len(fds) - len(inherited)]
        answer: list[int | BaseException] = []
        ours = self._manager_pairs(len(specs), manager_follows)
        if not ours:
            _warm_for_stock_connections()  # these workers will connect the stock way
        given: list[int] = []  # the server's ends of the workers that were forked
        # What every worker of the batch closes but its own: the spawner's descriptors, the
        # request's and the Manager pairs', as runs of consecutive numbers (worked out once
        # here, not in each child: ~0.2 ms of each worker's start, measured)
        extra = [self.handover.fileno()] if self.handover is not None else []
        spawner_fds = [self.sock.fileno(), self.wake_r, self.wake_w, *extra, *self.status_w.values(), *self.pending]
        runs = _runs(spawner_fds + fds + ours)
        for i, spec in enumerate(specs):
            rx, tx, sw = rest[FDS_PER_WORKER * i : FDS_PER_WORKER * (i + 1)]
            mgr = ours[2 * i] if ours else -1
            try:
                pid = os.fork()
            except OSError as exc:
                answer.append(exc)  # its descriptors are closed with the rest below
                continue
            if pid == 0:
                self._in_child(spec, (rx, tx, completion_fd, mgr), inherited, runs, sys_path)
            self.status_w[pid] = sw
            answer.append(pid)
            if ours:
                given.append(ours[2 * i + 1])
        if self.handover is None:
            self.pending += given  # handed over when the server is forked (start_manager)
            close_quietly(fd for fd in ours if fd not in set(given))
        else:
            self._hand_over(given)
            close_quietly(ours)
        live = set(self.status_w.values())
        close_quietly(fd for fd in fds if fd not in live)
        if specs:
            faults.hit(specs[0].faults, "spawner.answer")
        _send_frame(self.sock, pickle.dumps(answer, pickle.HIGHEST_PROTOCOL))
        self.reap()

    def _in_child(
        self,
        spec: Any,
        own: tuple[int, int, int, int],
        inherited: list[int],
        runs: list[tuple[int, int]],
        sys_path: list[str],
    ) -> None:
        """In a just-forked worker: keep its own descriptors, close the spawner's (``runs``:
        see spawn), become it."""
        rx, tx, completion_fd, mgr = own
        assert self.pdeathsig is not None  # (warm_up ran before the first fork)
        self.pdeathsig(self.pid)
        spec.inherited_fds = inherited
        _close_runs_but(runs, {rx, tx, completion_fd, mgr, *inherited})
        _child(spec, rx, tx, completion_fd, sys_path, mgr)

    def _hand_over(self, given: list[int]) -> None:
        """Pass the server's ends of new workers' connections to the Manager server."""
        if not given or self.handover is None:
            return
        try:
            for start in range(0, len(given), HANDOVER_MAX):
                socket.send_fds(self.handover, [b"h"], given[start : start + HANDOVER_MAX])
        except OSError:
            # The server is gone (so is the program, soon): the workers' requests fail
            # and their exit paths handle that as with any lost Manager.
            self.handover.close()
            self.handover = None


def _warm_for_stock_connections() -> None:
    """Before forking workers that will connect to the Manager themselves on their way out
    (no connection to hand over: a replacement spawner, say): the handshake imports hmac (and
    OpenSSL with it) on first use, ~1-2 ms of CPU per worker at the worst moment, a teardown
    of many at once; imported here once instead (a no-op after the first time)."""
    import hashlib  # noqa: F401
    import hmac  # noqa: F401


def _runs(fds: list[int]) -> list[tuple[int, int]]:
    """``fds`` (any order, repeats) as runs [lo, hi) of consecutive numbers, ascending."""
    runs: list[tuple[int, int]] = []
    for fd in sorted(set(fds)):
        if fd < 0:
            continue
        if runs and runs[-1][1] == fd:
            runs[-1] = (runs[-1][0], fd + 1)
        else:
            runs.append((fd, fd + 1))
    return runs


def _close_runs_but(runs: list[tuple[int, int]], keep: set[int]) -> None:
    """Close every descriptor of ``runs`` (see ``_runs``) not in ``keep``: a close_range(2)
    per stretch between kept ones (``os.closerange`` ignores those already closed)."""
    kept = sorted(keep)
    for lo, hi in runs:
        for fd in kept:
            if lo <= fd < hi:
                os.closerange(lo, fd)
                lo = fd + 1
        os.closerange(lo, hi)


def _pdeathsig_setter() -> Callable[[int], None]:
    """A function a freshly forked worker calls with its parent's pid: "SIGKILL me when the
    spawner dies" (prctl PR_SET_PDEATHSIG), then exit if that already happened between the
    fork and the prctl. Looked up once here, not in each worker. A no-op where prctl is not
    to be had (the program still kills the workers of a dead spawner)."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
        return lambda parent: None
    pr_set_pdeathsig = 1

    def set_pdeathsig(parent: int) -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return set_pdeathsig


def _program_hung_up(sock: socket.socket) -> bool:
    """Has the program closed its end of our socket (it holds the only one)? A closed peer
    shows as POLLHUP on a Unix stream socket, even with unread data before it."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in poller.poll(0))


def _kill_workers(status_w: dict[int, int]) -> None:
    """SIGKILL every worker not reaped yet: they belong to a dead program (or to one whose
    spawner is leaving; it treats them as lost either way)."""
    for pid in status_w:
        kill_quietly(pid)


def _program_gone(program: int, status_w: dict[int, int], servers: list[int], temp_dir: str | None = None) -> None:
    """The program is gone (its socket closed; we got EOF or an EPIPE): kill its workers,
    unlink any id table of its that teardown did not (a killed program's), remove the
    multiprocessing temporary directory it told us of (``_remove_temp_dir``), stop the Manager
    servers this process forked, reap them all (our children: nobody else would) and leave.
    Every wait here is bounded: os._exit comes whatever happens."""
    try:
        _kill_workers(status_w)
        _unlink_tables_of(program)
        _remove_temp_dir(temp_dir)
    finally:
        try:
            # SIGKILL: a server ignores SIGTERM (procpool.manager) and has nothing to save.
            for pid in servers:
                kill_quietly(pid)
            _reap_killed([*status_w, *servers], timeout=2.0)
        finally:
            os._exit(0)


def _unlink_tables_of(program: int) -> None:
    """Unlink what ``program`` left in /dev/shm under its prefix (id tables, its workqueue
    segment): only files of our own, since anyone may plant a name under our prefix (as root
    we could remove it, but it is not ours to remove)."""
    from .shmfile import SHM_DIR, segment_prefix

    prefix = f"{segment_prefix()}{program}-"
    for name in os.listdir(SHM_DIR):
        if not name.startswith(prefix):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            if os.lstat(path).st_uid == os.geteuid():
                os.unlink(path)
        except FileNotFoundError:
            pass


def _remove_temp_dir(path: str | None) -> None:
    """Remove the program's multiprocessing temporary directory (``pymp-*``, made by
    ``util.get_temp_dir``; a threaded program's fork server listens there, the one that started
    this spawner), which its normal exit would have removed: a program killed, or gone through
    ``os._exit``, never runs that. Only a real directory (not a symlink: never followed) owned
    by our uid; ``shutil.rmtree`` does not follow symlinks inside it either. If the program
    stopped us in order it told us None first (``Spawner.stop``): its exit removes it then."""
    if not path:
        return
    import shutil
    import stat

    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass  # gone already (the program's exit removed it), or not ours to look at


def _reap_killed(pids: list[int], timeout: float) -> None:
    """Reap the children just SIGKILLed (a process in uninterruptible sleep dies when it
    wakes: give up after ``timeout``; the spawner's exit hands them to init)."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    left.discard(pid)
            except ChildProcessError:
                left.discard(pid)
        if left:
            time.sleep(0.005)


def _become_server(alive_fd: int, close_fds: list[int], channels: list[int], ready_fd: int, address: str) -> None:
    """In a bare fork of the spawner: become the program's Manager server (never returns).
    Imported here, after the fork, not before it (see ``_fork_server``); procpool.lockserver
    does not import this module, so that makes no cycle."""
    try:
        from . import lockserver

        lockserver.serve_forked(alive_fd, close_fds, channels, ready_fd, address)
    except BaseException:  # noqa: BLE001 - (serve_forked leaves through os._exit: only its import fails here)
        import traceback

        traceback.print_exc()
    os._exit(1)


def _child(spec: Any, rx: int, tx: int, completion_fd: int, sys_path: list[str], mgr: int) -> None:
    """In a freshly forked worker: undo the spawner's signal set-up, then become the worker."""
    code = 1
    try:
        # What warm_up looked up: no import statement here (each costs a new worker ~30-70
        # µs of copy-on-write faults in the import machinery).
        worker_title, Channel, _set_title, worker_main = _worker_entry or _load_worker_entry()
        if spec.faults:
            faults.hit(spec.faults, "worker.forked", spec.wid)
        # Named first, microseconds after the fork: until now ps shows the spawner's title.
        _set_title(spec.title or worker_title(spec.title_prefix, spec.pool_id, spec.wid))
        _worker_signals()
        sys.path[:] = sys_path

        spec.conn = Channel(rx, tx)
        spec.completion = connection.Connection(completion_fd, readable=False)
        if mgr >= 0:
            spec.attach_lock.adopt_connection(mgr)
        worker_main(spec)
        code = 0
    except BaseException:  # noqa: BLE001 - printed, then the worker exits with status 1
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


#: What a new worker runs (``_child``), looked up by ``warm_up`` before the first fork.
_worker_entry: tuple[Any, ...] | None = None


def _load_worker_entry() -> tuple[Any, ...]:
    from .protocol import worker_title
    from .worker import Channel, _set_title, worker_main

    return worker_title, Channel, _set_title, worker_main


def _worker_signals() -> None:
    """A new worker's signal set-up, from the spawner's (``_spawner_loop``): its only Python
    handler, SIGCHLD's, and its wakeup fd are not the worker's; the spawner already holds
    WORKER_DEFAULTS at their default disposition, blocked, and a worker unblocks them, as a
    stock pool's worker takes them (close() escalates with SIGTERM), dying here of one sent
    since its fork. SIGINT stays ignored: Ctrl-C is the program's to handle, and SIGPIPE is
    Python's usual SIG_IGN. Through ``_signal`` (no enum wrapping), and no scan of every
    signal: the spawner reset the ones it inherited when it started (~0.25 ms of each
    worker's start, measured, with the scan and ``signal``'s wrappers)."""
    raw = _compat.raw_signal()
    raw.set_wakeup_fd(-1)
    raw.signal(_SIGCHLD, raw.SIG_DFL)
    raw.pthread_sigmask(raw.SIG_UNBLOCK, _UNBLOCKED)


# (plain ints: an enum member's lookup in a new worker costs copy-on-write faults)
_SIGCHLD = int(signal.SIGCHLD)
_UNBLOCKED = [int(sig) for sig in WORKER_DEFAULTS]


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
    return ctx


def _preload_into_forkserver(ctx: Any) -> None:
    # Importing procpool once in the fork server, not in the spawner it starts, is most of
    # that start. Keep whatever preload list the program set (default: ['__main__']). Done
    # when a spawner is to start through it, not when a pool is made: most programs fork
    # their spawner and never load multiprocessing.forkserver (~1 ms of the first pool).
    if ctx.get_start_method() == "forkserver":
        _compat.forkserver_preload(ctx, "procpool.worker")


_spawner: Spawner | None = None
_spawner_pid = 0
_spawner_lock = threading.Lock()  # guards _spawner and _spawner_pid


def _fresh_lock_in_child() -> None:
    """A fork of the program gets a fresh ``_spawner_lock`` (a fork copies a lock held by
    another thread, a pool's starting its spawner, as held, forever); it starts a spawner of
    its own (the pid check in get_spawner)."""
    global _spawner_lock
    _spawner_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_in_child)


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


def spawner_pid() -> int | None:
    """The pid of this program's spawner, if it has a live one (for observers: a pool
    publishes it in its id table, so ``procpool ps`` can list the spawner and its children,
    every worker from its fork until it is reaped). Read without ``_spawner_lock``, which a
    spawner's start holds: the arbiter publishes this every turn and must not wait."""
    spawner, pid = _spawner, _spawner_pid
    if spawner is None or pid != os.getpid() or spawner._lost:
        return None
    return spawner.pid


def drop_pending() -> None:
    """The program's Manager could not be started: its live spawner, if any, lets go of the
    first workers' Manager connections it kept for that server (a dead spawner's went with
    it; no new spawner is started for this)."""
    spawner, pid = _spawner, _spawner_pid
    if spawner is None or pid != os.getpid() or not spawner.is_alive():
        return
    try:
        spawner.drop_pending()
    except (EOFError, OSError):
        pass  # it died meanwhile: so did what it kept


def stop_spawner() -> None:
    global _spawner
    with _spawner_lock:
        if _spawner is not None and _spawner_pid == os.getpid():
            _spawner.stop()
        _spawner = None
