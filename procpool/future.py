"""The futures a pool hands out: ``concurrent.futures.Future`` with one plain lock each.

Why: a standard Future builds a ``threading.Condition`` (an RLock, five bound methods and a
deque) and two lists for every item: about ten objects the garbage collector tracks, alive
until the caller drops the future. At tens of thousands of submits a second, creating them
and the collections they trigger were a large share of ``submit()``, and taking the
condition through Python-level ``__enter__``/``__exit__`` a large share of completing an
item (the measurements are in docs/performance.md).

A ``PoolFuture`` is a Future in everything callers use: ``isinstance``, every method, and
``concurrent.futures.wait``/``as_completed``, which reach for ``f._condition`` and
``f._waiters`` themselves. Its ``_condition`` is one plain lock (not tracked by the
collector): all concurrent.futures does with it is acquire and release it (``with``, or its
methods); waiting for the result is this class's own (``result``, ``exception``), through a
list of sleeping threads' locks. The lists of waiters, callbacks and sleepers are made on
first use: most futures never need any of them, as their result is set before anyone waits.
The lock is not reentrant: nothing here calls out (callbacks, ``repr``, logging) while
holding it. A sleeper wakes only when woken or timed out, never spuriously: ``result`` waits
once and reads a wake-up without a result as a timeout.

If a Python version adds fields to ``Future.__init__``, ``new_future`` falls back to the
standard Future rather than guess.
"""

from __future__ import annotations

import _thread
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError, _base
from typing import Any

PENDING, RUNNING, FINISHED = _base.PENDING, _base.RUNNING, _base.FINISHED
CANCELLED, CANCELLED_AND_NOTIFIED = _base.CANCELLED, _base.CANCELLED_AND_NOTIFIED
_ENDED = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)
_CANCELLED = (CANCELLED, CANCELLED_AND_NOTIFIED)


class PoolFuture(Future):
    """A ``concurrent.futures.Future`` with one plain lock (see the module).

    Guards: ``_condition`` (the lock) guards every field: ``_state``, ``_result``,
    ``_exception``, ``_w`` (the waiters of concurrent.futures.wait/as_completed, or None),
    ``_cb`` (done-callbacks, or None) and ``_sleepers`` (locks of the threads blocked in
    result()/exception(), oldest first, or None). A field read alone is read without it (one
    attribute, under the GIL)."""

    def __init__(self) -> None:
        # Not Future.__init__: its Condition and lists are what this class saves.
        self._condition: Any = _thread.allocate_lock()
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._w: list[Any] | None = None
        self._cb: list[Callable[[Future], object]] | None = None
        self._sleepers: list[Any] | None = None

    # -- what concurrent.futures reaches for (with the lock held, or taking it) ---------------

    def _get_waiters(self) -> list[Any]:
        """concurrent.futures.wait's waiters; it appends and removes them holding the lock."""
        w = self._w
        if w is None:
            w = self._w = []
        return w

    def _get_callbacks(self) -> list[Callable[[Future], object]]:
        cb = self._cb
        if cb is None:
            cb = self._cb = []
        return cb

    # Properties where Future has plain lists (made in its __init__, which is not called).
    _waiters = property(_get_waiters)
    _done_callbacks = property(_get_callbacks)

    # -- waiting and waking (``_condition`` held) ---------------------------------------------

    def _sleep(self, timeout: float | None) -> bool:
        waiter = _thread.allocate_lock()
        waiter.acquire()
        if self._sleepers is None:
            self._sleepers = []
        self._sleepers.append(waiter)
        self._condition.release()
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
            self._condition.acquire()
            if not notified:
                # Timed out (or interrupted). A notifier may have taken us off the list in
                # between, which is harmless: we report what we saw, a timeout.
                try:
                    self._sleepers.remove(waiter)
                except ValueError:
                    pass

    def _wake(self) -> None:
        sleepers = self._sleepers
        if sleepers:
            for waiter in sleepers:
                waiter.release()
            sleepers.clear()

    def _invoke_callbacks(self) -> None:
        if self._cb:
            for callback in self._cb:
                try:
                    callback(self)
                except Exception:  # noqa: BLE001 - a callback's failure is logged, as Future does
                    _base.LOGGER.exception("exception calling callback for %r", self)

    # -- the Future API ----------------------------------------------------------------------

    def __repr__(self) -> str:
        # Without the lock: repr may be asked for while it is held (an error message).
        state, exc, result = self._state, self._exception, self._result
        what = f"<{type(self).__name__} at {id(self):#x} state={_base._STATE_TO_DESCRIPTION_MAP[state]}"
        if state == FINISHED:
            return f"{what} raised {type(exc).__name__}>" if exc else f"{what} returned {type(result).__name__}>"
        return what + ">"

    def cancel(self) -> bool:
        with self._condition:
            state = self._state
            if state == RUNNING or state == FINISHED:
                return False
            if state in _CANCELLED:
                return True
            self._state = CANCELLED
            self._wake()
        self._invoke_callbacks()
        return True

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def running(self) -> bool:
        return self._state == RUNNING

    def done(self) -> bool:
        return self._state in _ENDED

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        with self._condition:
            if self._state not in _ENDED:
                self._done_callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:  # noqa: BLE001 - a callback's failure is logged, as Future does
            _base.LOGGER.exception("exception calling callback for %r", self)

    def _outcome(self, want_exception: bool) -> Any:
        """Lock held, state ended: the result (or raise), or the exception; None if not ended."""
        state = self._state
        if state == FINISHED:
            if want_exception:
                return self._exception
            if self._exception is not None:
                raise self._exception
            return self._result
        if state in _CANCELLED:
            raise CancelledError()
        return None

    def _wait_for(self, timeout: float | None, want_exception: bool) -> Any:
        try:
            with self._condition:
                if self._state in _ENDED:
                    return self._outcome(want_exception)
                self._sleep(timeout)
                if self._state in _ENDED:
                    return self._outcome(want_exception)
                raise TimeoutError()
        finally:
            self = None  # type: ignore[assignment]  # no cycle through a raised exception's frame

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED and self._exception is None:
            return self._result  # set before the state, under the lock
        return self._wait_for(timeout, False)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._wait_for(timeout, True)

    def set_running_or_notify_cancel(self) -> bool:
        with self._condition:
            state = self._state
            if state == PENDING:
                self._state = RUNNING
                return True
            if state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._w or ():
                    waiter.add_cancelled(self)
                return False
        _base.LOGGER.critical("Future %s in unexpected state: %s", id(self), state)
        raise RuntimeError("Future in unexpected state")

    def set_result(self, result: Any) -> None:
        with self._condition:
            state = self._state
            if state not in _ENDED:
                self._result = result
                self._state = FINISHED
                for waiter in self._w or ():
                    waiter.add_result(self)
                self._wake()
        if state in _ENDED:
            raise InvalidStateError(f"{state}: {self!r}")
        self._invoke_callbacks()

    def set_exception(self, exception: BaseException | None) -> None:
        with self._condition:
            state = self._state
            if state not in _ENDED:
                self._exception = exception
                self._state = FINISHED
                for waiter in self._w or ():
                    waiter.add_exception(self)
                self._wake()
        if state in _ENDED:
            raise InvalidStateError(f"{state}: {self!r}")
        self._invoke_callbacks()


_FIELDS = {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}

#: What pools create for each item: a PoolFuture, unless this Python's Future has fields
#: PoolFuture does not know.
new_future: Callable[[], Future] = PoolFuture if set(vars(Future())) == _FIELDS else Future
