"""Functions the tests submit. Kept in a light module: workers import it by reference, and
importing the test modules themselves (and pytest with them) in every worker would be slow."""

from __future__ import annotations

import os
import time
from pathlib import Path


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


def touch_and_wait(mark: str, release: str):
    """Say 'I am running' (create ``mark``), then wait for ``release``."""
    Path(mark).touch()
    return wait_for_file(release, os.getpid())


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable refuses to be pickled")


def return_unpicklable():
    return Unpicklable()
