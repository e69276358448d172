"""The named errors a work item can end with, besides its function's own exception.

Invariant 5 of DESIGN.md: every submitted item ends as a result, its function's exception,
or one of these. They are all ``ProcpoolError`` so one ``except`` catches "procpool gave up
on this item", and ``WorkerLost`` is also a ``BrokenProcessPool`` so code written against
``concurrent.futures`` keeps catching it.
"""

from __future__ import annotations

from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool


class ProcpoolError(Exception):
    """Base class of every error procpool itself raises for a work item."""


class WorkerLost(ProcpoolError, BrokenProcessPool):
    """The worker process running this item died before returning its result.

    Only the item that worker was running fails; the pool replaces the worker and carries on.
    """


class TeardownTimeout(WorkerLost):
    """``close(timeout=...)`` ran out while this item was still running; its worker was killed."""


class PoolClosed(ProcpoolError):
    """The item was still waiting when a timed-out ``close()`` gave up on the pool."""


class InitializerFailed(ProcpoolError, BrokenProcessPool):
    """A worker's ``initializer`` raised; the initializer's exception is the ``__cause__``.

    The item that worker was given fails with this, and so does every item still waiting: the
    pool is *broken* (a failing initializer would fail every worker started after it), and
    ``submit`` raises this too from then on. Items already running on other workers finish.
    A ``BrokenProcessPool``, as ``concurrent.futures`` callers expect from a broken pool.
    """


class PoolBroken(ProcpoolError, BrokenProcessPool):
    """The pool could not go on: its arbiter thread failed, its teardown failed, or it was
    closing and could not start a worker to run the item. The failure is the ``__cause__``.

    Every item still in the pool then ends with this (none is left waiting), ``submit`` raises
    it, and ``close()`` still runs to the end, killing what is left. A ``BrokenProcessPool``,
    as ``concurrent.futures`` callers expect from a pool that broke.
    """


class ItemTimeout(ProcpoolError, TimeoutError):
    """The item ran longer than its ``timeout`` (``submit_with``); its worker was killed and is
    replaced. A builtin ``TimeoutError``, so ``except TimeoutError`` catches it."""


class ItemCancelled(ProcpoolError, CancelledError):
    """``cancel_running()`` cancelled the item while it ran; its worker was killed and is
    replaced. A ``concurrent.futures.CancelledError``, but the future itself is *finished*
    with this exception, not cancelled (a running future cannot be, by the Future contract)."""


class TransferError(ProcpoolError):
    """The call or its result could not cross the process boundary: the call could not be
    unpickled in the worker, or the result could not be pickled there or unpickled here.
    The underlying error is in the message and in the ``__cause__`` chain."""


class FaultInjected(ProcpoolError):
    """Raised at a fault point armed with the ``raise`` action (tests only)."""


class RemoteTraceback(Exception):
    """Carries the worker-side traceback text; set as ``__cause__`` of a re-raised exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
