"""Functions the tests submit. Kept in a light module: workers import it by reference, and
importing the test modules themselves (and pytest with them) in every worker would be slow."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def square(x: int) -> int:
    return x * x


def identity(x):
    return x


def sleep_then(seconds: float, value=None):
    time.sleep(seconds)
    return value


def whoami() -> int:
    return os.getpid()


def fail(msg: str) -> None:
    raise ValueError(msg)


def maybe_fail(i: int) -> int:
    if i % 7 == 3:
        raise KeyError(i)
    return i


def exit_hard(code: int) -> None:
    os._exit(code)


def forever() -> None:
    while True:
        time.sleep(1)


def wait_for_file(path: str, value=None, timeout: float = 30.0):
    """Block until ``path`` exists: lets a test decide exactly when an item finishes."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return value


def wait_for_fifo(path: str, value=None, timeout: float = 60.0):
    """Block until the FIFO at ``path`` holds data, asleep in the kernel: unlike
    wait_for_file, it burns no CPU however long it waits or however loaded the machine, so
    the pool always samples it as blocked. It only looks (select), never reads, so one byte
    written releases every waiter, early or late, while the writer keeps the FIFO open."""
    import select

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a read end opens without a writer
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        raise TimeoutError(path)
    return value


def touch_and_wait(mark: str, release: str):
    """Say 'I am running' (create ``mark``), then wait for ``release``."""
    Path(mark).touch()
    return wait_for_file(release, os.getpid())


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable refuses to be pickled")


def return_unpicklable():
    return Unpicklable()


# -- for test_executor.py ----------------------------------------------------------------------

_init_calls = 0  # in a worker: how often the pool's initializer ran in this process
_init_value = None


def remember_init(value, log_dir: str) -> None:
    """An initializer: remember ``value`` in this process and leave one file per call."""
    global _init_calls, _init_value
    _init_calls += 1
    _init_value = value
    Path(log_dir, f"{os.getpid()}-{_init_calls}").touch()


def init_state(_=None):
    return os.getpid(), _init_calls, _init_value


def add(a, b):
    return a + b


def echo_kwargs(**kwargs):
    return kwargs


def pid_and(x):
    return os.getpid(), x


def kill_self() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def write_pid_and_wait(mark: str, release: str):
    """Write this worker's pid to ``mark`` (atomically), then wait for ``release``."""
    Path(mark + ".tmp").write_text(str(os.getpid()))
    os.replace(mark + ".tmp", mark)
    return wait_for_file(release, os.getpid())


def _refuse_to_load(msg: str):
    raise ValueError(msg)


class FailsToUnpickle:
    """Pickles fine; unpickling it raises, wherever that happens."""

    def __reduce__(self):
        return (_refuse_to_load, ("FailsToUnpickle refuses to be unpickled",))


def return_fails_to_unpickle():
    return FailsToUnpickle()


class ExitsOnUnpickle:
    """Unpickling it ends the process at once (a crash in the middle of loading a call)."""

    def __reduce__(self):
        return (os._exit, (7,))


# -- for the test_workqueue_*.py files -------------------------------------------------------


def record_span(log_dir: str, name, seconds: float):
    """Sleep ``seconds``, leaving ``log_dir/name`` = "start end" (CLOCK_MONOTONIC, which all
    processes share): the tests measure concurrency from inside the workers."""
    start = time.monotonic()
    time.sleep(seconds)
    end = time.monotonic()
    Path(log_dir, f"{name}.tmp").write_text(f"{start} {end}")
    os.replace(Path(log_dir, f"{name}.tmp"), Path(log_dir, str(name)))
    return name


def ran_at(path: str | None = None) -> float:
    """When this item started (CLOCK_MONOTONIC); also written to ``path`` if given."""
    now = time.monotonic()
    if path is not None:
        Path(path).write_text(str(now))
    return now


def burn_cpu(seconds: float, mark: str | None = None) -> float:
    """Keep the CPU busy for ``seconds`` of this process's CPU time (a busy loop), then
    create ``mark`` if given. Returns the CPU time burnt."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    if mark is not None:
        Path(mark).touch()
    return time.process_time() - start


def sleep_then_write(seconds: float, path: str) -> None:
    """Sleep, then write when it finished (CLOCK_MONOTONIC) to ``path``."""
    time.sleep(seconds)
    Path(path).write_text(str(time.monotonic()))


class Counter:
    """A picklable object whose state changes between submits of its bound method."""

    def __init__(self) -> None:
        self.value = 0

    def get(self) -> int:
        return self.value


class Payload:
    """A result that can be weakly referenced (the leak tests watch when it is freed)."""

    def __init__(self, i: int) -> None:
        self.i = i


def make_object(i: int) -> Payload:
    return Payload(i)


def configure_logging_to(queue, lock, counter) -> None:
    """The logging cookbook's initializer: records go to a queue the program reads; the lock
    and shared counter ride along as the cookbook's other inherited objects do."""
    import logging.handlers

    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(queue)]
    root.setLevel(logging.INFO)
    global _SHARED
    _SHARED = (lock, counter)


_SHARED: Any = None  # (lock, counter), set in each worker by its initializer


def log_and_count(i: int) -> int:
    import logging

    lock, counter = _SHARED
    with lock:
        counter.value += 1
    logging.getLogger().info("item %d from %d", i, os.getpid())
    return os.getpid()


_QUEUE: Any = None  # set in each worker by remember_queue


def remember_queue(queue) -> None:
    global _QUEUE
    _QUEUE = queue


def put_on_remembered(value) -> None:
    _QUEUE.put(value)
