"""Lock checking: ``assert_held(lock)`` where a docstring says "L held".

The package's lock legend (what a guard comment on a field means):

   L = the pool lock (``Books.lock``, parent process only)
   M = the Manager locks (``PoolLocks``: ``arb``, ``attach``; any process)
   I = set at init, read-only after
   A = the arbiter thread only
   W = written by the worker itself

``new_lock()`` makes L. Normally a plain ``threading.Lock`` and ``assert_held`` costs one
attribute test. With ``PROCPOOL_DEBUG_LOCKS=1`` in the environment when the pool is made, L is
an ``OwnedLock`` that records its holder, and ``assert_held`` fails (AssertionError) when the
calling thread does not hold it. The test suite runs with it on (tests/conftest.py).
"""

from __future__ import annotations

import os
import threading
from typing import Any

ENV = "PROCPOOL_DEBUG_LOCKS"


class OwnedLock:
    """A non-reentrant lock that knows which thread holds it (debug builds of L)."""

    __slots__ = ("_lock", "_owner")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None  # the holder's thread ident; written only by the holder

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got:
            self._owner = threading.get_ident()
        return got

    def release(self) -> None:
        self._owner = None
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def held_by_me(self) -> bool:
        return self._owner == threading.get_ident()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def new_lock() -> Any:
    """The pool lock L: checked (``OwnedLock``) under PROCPOOL_DEBUG_LOCKS=1, else plain."""
    if os.environ.get(ENV) == "1":
        return OwnedLock()
    return threading.Lock()


def assert_held(lock: Any) -> None:
    """Check that the calling thread holds ``lock`` (only a checked lock can tell; a plain
    one is at least checked to be held by someone)."""
    if isinstance(lock, OwnedLock):
        assert lock.held_by_me(), "the pool lock (L) must be held here"
    else:
        assert lock.locked(), "the pool lock (L) must be held here"
