"""The named errors a work item can end with, besides its function's own exception.

Invariant 5 of DESIGN.md: every submitted item ends as a result, its function's exception,
or one of these. They are all ``ProcpoolError`` so one ``except`` catches "procpool gave up
on this item", and ``WorkerLost`` is also a ``BrokenProcessPool`` so code written against
``concurrent.futures`` keeps catching it.
"""

from __future__ import annotations

import pickle
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback

#: The errors a Manager request raises when the server is gone (refused, reset, EOF). Here,
#: not in procpool.manager, so that the parent's modules can catch them without importing
#: the Manager's client before the first pool needs it.
LOST = (EOFError, OSError)


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
    """The call or its result could not cross the process boundary. Always one of the four
    subclasses below, which say which side failed and on what (``side``: 'parent' or
    'worker'; ``what``: 'call' or 'result'), and are each also an instance of what
    ``concurrent.futures`` raises in that case, so code written against it catches them. The
    underlying error is in the message and is the ``__cause__`` (for a failure in the worker,
    the worker's traceback is the cause's ``__cause__``, or the cause when the error itself
    could not travel). Unlike the standard library, only the item fails: the pool goes on."""

    side = ""
    what = ""


class CallNotPicklable(TransferError, pickle.PicklingError, TypeError):
    """The call (function or an argument) could not be pickled in the submitting process.
    ``concurrent.futures`` fails the future with the pickling error itself (usually a
    TypeError, a ``pickle.PicklingError`` for functions it cannot find): this is both.
    ``ProcessPoolExecutor.submit`` returns a future failed with it; ``WorkerPool.submit``
    raises it."""

    side, what = "parent", "call"


class CallNotUnpicklable(TransferError, BrokenProcessPool):
    """The call could not be unpickled in the worker (a ``__reduce__`` that raises there, a
    module the worker cannot import). ``concurrent.futures`` breaks its pool for this
    (``BrokenProcessPool``); procpool fails only this item, its worker goes on."""

    side, what = "worker", "call"


class ResultNotPicklable(TransferError, pickle.PicklingError, TypeError):
    """The function returned a value the worker could not pickle. As in
    ``concurrent.futures``, the future fails with a pickling error (a TypeError too)."""

    side, what = "worker", "result"


class ResultNotUnpicklable(TransferError, BrokenProcessPool):
    """The worker's result could not be unpickled here. ``concurrent.futures`` breaks its
    pool for this (``BrokenProcessPool``); procpool fails only this item."""

    side, what = "parent", "result"


class FaultInjected(ProcpoolError):
    """Raised at a fault point armed with the ``raise`` action (tests only)."""


class RemoteTraceback(_RemoteTraceback):
    """Carries the worker-side traceback text; set as ``__cause__`` of a re-raised exception.
    A subclass of ``concurrent.futures.process._RemoteTraceback`` (private, but code checks
    ``type(exc.__cause__)`` against it), so such checks hold for procpool's futures too."""

    def __init__(self, tb: str) -> None:
        Exception.__init__(self, tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
