"""The functions the benchmarks run in the workers, and the barrier round that proves a pool has
its N workers. Module level, in a module of their own, so that every start method can pickle
them by name (``bench.items.noop``): the workers import this module, never the runner."""

from __future__ import annotations

import os
import select
import shutil
import tempfile
import time
from typing import Any, Protocol

#: Upper bound for a barrier round, and for any one result the benchmarks wait for.
BARRIER_TIMEOUT = 60.0


def noop(x: Any) -> Any:
    return x


def block_item(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def burn_item(seconds: float) -> float:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return seconds


def barrier_item(dirpath: str, timeout: float) -> int:
    """Check in (a file named after this pid), then hold this worker until the parent writes one
    byte to the FIFO ``go``; returns this worker's pid."""
    fd = os.open(os.path.join(dirpath, "go"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.close(os.open(os.path.join(dirpath, f"w{os.getpid()}"), os.O_CREAT | os.O_WRONLY, 0o600))
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("barrier: the parent never released the workers")
            poller.poll(left * 1000)
            try:
                if os.read(fd, 1):
                    return os.getpid()
            except BlockingIOError:
                pass  # another worker took the byte; wait for the next one
    finally:
        os.close(fd)


class _Handle(Protocol):
    def done(self) -> bool: ...

    def result(self, timeout: float | None = None) -> Any: ...


class _Submitter(Protocol):
    def submit(self, fn: Any, *args: Any) -> _Handle: ...


def barrier_round(pool: _Submitter, n: int) -> set[int]:
    """Run n items that hold their worker until all n checked in; returns their pids. n check-ins
    means n distinct live workers, each of which started and ran an item."""
    d = tempfile.mkdtemp(prefix="procpool-bench-")
    wfd = -1
    try:
        os.mkfifo(os.path.join(d, "go"), 0o600)
        wfd = os.open(os.path.join(d, "go"), os.O_RDWR)  # a writer exists from now on
        futs = [pool.submit(barrier_item, d, BARRIER_TIMEOUT) for _ in range(n)]
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while sum(name.startswith("w") for name in os.listdir(d)) < n:
            if time.monotonic() > deadline or any(f.done() for f in futs):
                break
            time.sleep(0.0002)
        os.write(wfd, b"x" * n)
        pids = {f.result(BARRIER_TIMEOUT + 5) for f in futs}
    finally:
        if wfd >= 0:
            os.close(wfd)
        shutil.rmtree(d, ignore_errors=True)
    if len(pids) != n:
        raise RuntimeError(f"barrier round: {len(pids)} distinct workers ran the {n} items")
    return pids
