"""Floors: what the machine allows, no pool involved. A 1-byte ping-pong between two processes
over a pipe, a socketpair and multiprocessing Connections (procpool's own transport); and n
processes forked, blocked on a pipe, woken at once by closing it, exiting and reaped (the floor
under any pool's teardown)."""

from __future__ import annotations

import contextlib
import functools
import gc
import multiprocessing
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

FLOOR_PROCS = 64


def _fork_child(body: Callable[[], None]) -> int:
    """Fork a child that runs ``body`` and leaves with os._exit (never returns in the child)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException:  # noqa: BLE001 - a failed child exits with status 1
            code = 1
        finally:
            os._exit(code)
    return pid


def _reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"floor child {pid} failed: status {status}")


def floor_pingpong(kind: str, items: int) -> float:
    """Median round trip of one byte between this process and a forked child, in seconds."""
    send: Callable[[], object]
    recv: Callable[[], object]
    theirs: list[Any]  # closed here once the child has them
    ours: list[Any]  # closed when done: the child sees EOF and exits
    if kind == "pipe":
        down_r, down_w = os.pipe()  # parent -> child
        up_r, up_w = os.pipe()  # child -> parent
        send, recv = functools.partial(os.write, down_w, b"x"), functools.partial(os.read, up_r, 1)

        def body() -> None:
            os.close(down_w)
            os.close(up_r)
            while os.read(down_r, 1):
                os.write(up_w, b"y")

        theirs, ours = [down_r, up_w], [down_w, up_r]
    elif kind == "socketpair":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        send, recv = functools.partial(a.send, b"x"), functools.partial(a.recv, 1)

        def body() -> None:
            a.close()
            while b.recv(1):
                b.send(b"y")

        theirs, ours = [b], [a]
    elif kind == "connection":
        ca, cb = multiprocessing.Pipe(duplex=True)  # a socketpair, as procpool's workers have
        send, recv = functools.partial(ca.send_bytes, b"x"), ca.recv_bytes

        def body() -> None:
            ca.close()
            with contextlib.suppress(EOFError):
                while True:
                    cb.send_bytes(cb.recv_bytes())

        theirs, ours = [cb], [ca]
    else:
        raise ValueError(kind)
    try:
        pid = _fork_child(body)
    except BaseException:
        _close_all(theirs + ours)
        raise
    try:
        _close_all(theirs)
        pc = time.perf_counter
        samples = []
        for i in range(items + 50):
            t0 = pc()
            send()
            recv()
            if i >= 50:
                samples.append(pc() - t0)
    finally:
        _close_all(ours)  # the child sees EOF and exits
        _reap(pid)
    return statistics.median(samples)


def _close_all(objs: list[Any]) -> None:
    for o in objs:
        os.close(o) if isinstance(o, int) else o.close()


def floor_exit(n: int) -> dict[str, float]:
    """Fork n children of this process that block on a pipe; close it (all wake at once); time
    until every one exited and was reaped. Also the fork time (n forks, until all are ready)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pids: list[int] = []

    def body() -> None:
        os.close(go_w)
        os.close(ready_r)
        os.write(ready_w, b"r")
        os.read(go_r, 1)  # EOF when the parent closes go_w

    try:
        t0 = time.perf_counter()
        for _ in range(n):
            pids.append(_fork_child(body))
        os.close(ready_w)
        ready_w = -1
        got = 0
        while got < n:
            chunk = os.read(ready_r, n)
            if not chunk:
                raise RuntimeError("floor: a child died before it was ready")
            got += len(chunk)
        forked = time.perf_counter() - t0
        gc.collect()
        t0 = time.perf_counter()
        os.close(go_w)
        go_w = -1
        while pids:
            _reap(pids.pop())
        teardown = time.perf_counter() - t0
    finally:
        for fd in (ready_r, ready_w, go_r, go_w):
            if fd >= 0:
                os.close(fd)
        for pid in pids:  # error path: the closed pipe wakes them; reap them all
            with contextlib.suppress(Exception):
                os.waitpid(pid, 0)
    return {"fork": forked, "teardown": teardown, "rss_mb": rss_mb()}


@contextlib.contextmanager
def manager_alongside() -> Any:
    """A multiprocessing Manager server starting alongside whatever the block does, as the
    brief's Manager does beside procpool's first workers: a bare fork that loads
    ``multiprocessing.managers`` and serves on an abstract socket until it is killed on the
    way out. The cold start of cf fork inside this block is the floor under procpool's own
    cold start that the Manager alone sets (procpool adds its spawner to it)."""
    pid = os.fork()
    if pid == 0:
        try:
            from multiprocessing.managers import BaseManager

            server = BaseManager(address=f"\0procpool-bench-floor-{os.getpid()}", authkey=os.urandom(16)).get_server()
            server.serve_forever()
        finally:
            os._exit(0)
    try:
        yield
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def rss_mb() -> float:
    """Resident set size now (ru_maxrss would not do: Linux keeps it across exec)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
