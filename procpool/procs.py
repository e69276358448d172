"""Small process helpers shared by the program, the spawner, the Manager server and workers:
signal dispositions of procpool's helper processes, and the "quiet" operations that tolerate
a process or descriptor already gone (kill, close, unlink).

Quiet means: the one error that says "already done" (the process is gone, the descriptor is
closed, the file is unlinked) is swallowed; any other error still raises, except where a
helper says otherwise. Nothing here imports another procpool module but ``_compat`` (which
imports none), so every module may import this one without a cycle; and that one only in
``reset_signals``, since ``procpool ps`` loads this module and ``_compat`` loads typing.
"""

from __future__ import annotations

import math
import os
import select
import signal
from collections.abc import Iterable

#: Signals the spawner and the Manager ignore: sent to the whole process group (Ctrl-C,
#: Ctrl-backslash, ``timeout``, a closed terminal, a supervisor), they must not end a helper
#: before it has cleaned up after the program (procpool.spawner's docstring).
HELPER_IGNORES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
#: ... of which these a worker takes at their defaults: the spawner blocks them instead of
#: ignoring them, so that its workers inherit no ignored disposition (procpool.spawner).
WORKER_DEFAULTS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def reset_signals() -> None:
    """Back to the default disposition for every signal that has a Python handler, and no
    wakeup fd: a process forked from the program (or from the spawner) must not run the
    program's handlers — a worker that merely *records* SIGTERM would survive close()'s
    escalation, and a Manager that does would outlive its stop."""
    from . import _compat

    raw = _compat.raw_signal()  # (signal's own functions, without their enum wrapping)
    try:
        raw.set_wakeup_fd(-1)
    except ValueError:  # pragma: no cover - not the main thread
        return
    for sig in raw.valid_signals():
        try:
            if callable(raw.getsignal(sig)):
                raw.signal(sig, raw.SIG_DFL)
        except (OSError, ValueError):
            pass


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` (SIGKILL by default) to ``pid``, unless it is gone already."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def close_quietly(fds: Iterable[int]) -> None:
    """Close each of ``fds``; one already closed (or never valid) is skipped."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def unlink_quietly(path: str) -> None:
    """Remove ``path``, unless it is gone already."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def readable(fd: int, timeout: float | None) -> bool:
    """Is ``fd`` readable (data or EOF) within ``timeout`` seconds (None: no limit)? One
    poll(2): the arbiter asks it of every worker it reaps (sixty-four times in a teardown of
    64), where ``Connection.poll`` and ``multiprocessing.connection.wait`` build and close a
    selector object each time."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else min(max(0, math.ceil(timeout * 1000)), 2**31 - 1)))
