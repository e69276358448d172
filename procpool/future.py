"""The futures a pool hands out: ``concurrent.futures.Future`` with a lighter condition.

Why: a standard Future builds a ``threading.Condition`` (an RLock, five bound methods and a
deque: about ten objects the garbage collector tracks) for every item. At tens of thousands
of submits a second, creating them and the collections they trigger were a large share of
``submit()`` (the measurement is in the README, Performance).

A ``PoolFuture`` is a Future in everything callers use: ``isinstance``, every method, and
``concurrent.futures.wait``/``as_completed``, which take ``f._condition`` themselves. Only
that condition differs: ``_Condition``, a small non-reentrant condition variable with the
methods concurrent.futures uses (acquire/release, ``with``, wait, notify_all); nothing there
acquires one future's condition twice. It wakes a waiter only when notified or timed out,
never spuriously: ``Future.result`` waits once and reads a wake-up without a result as a
timeout.

If a Python version adds fields to ``Future.__init__``, ``new_future`` falls back to the
standard Future rather than guess.
"""

from __future__ import annotations

import _thread
from collections.abc import Callable
from concurrent.futures import Future, _base
from typing import Any


class _Condition:
    """A condition variable on a plain lock, for one future. Guards: ``_lock`` guards
    ``_waiters`` (the locks of the threads blocked in wait(), oldest first; made on first wait)."""

    __slots__ = ("_lock", "_waiters")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._waiters: list[Any] | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, block until notified or ``timeout`` passed, take the lock back.
        True if notified. The caller holds the lock."""
        waiter = _thread.allocate_lock()
        waiter.acquire()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        self._lock.release()
        notified = False
        try:
            if timeout is None:
                notified = waiter.acquire()
            elif timeout > 0:
                notified = waiter.acquire(True, timeout)
            else:
                notified = waiter.acquire(False)
            return notified
        finally:
            self._lock.acquire()
            if not notified:
                # Timed out (or interrupted). A notifier may have taken us off the list in
                # between, which is harmless: we report what we saw, a timeout.
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass

    def notify_all(self) -> None:
        waiters = self._waiters
        if waiters:
            for waiter in waiters:
                waiter.release()
            waiters.clear()


class PoolFuture(Future):
    """A ``concurrent.futures.Future`` whose condition is a ``_Condition`` (see the module)."""

    def __init__(self) -> None:
        # The fields of Future.__init__, set here rather than there: only the condition differs.
        self._condition = _Condition()  # type: ignore[assignment]
        self._state = _base.PENDING
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []


_FIELDS = {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}

#: What pools create for each item: a PoolFuture, unless this Python's Future has fields
#: PoolFuture does not set.
new_future: Callable[[], Future] = PoolFuture if set(vars(Future())) == _FIELDS else Future
