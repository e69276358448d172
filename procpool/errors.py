"""The named errors a work item can end with, besides its function's own exception.

Invariant 5 of DESIGN.md: every submitted item ends as a result, its function's exception,
or one of these. They are all ``ProcpoolError`` so one ``except`` catches "procpool gave up
on this item", and ``WorkerLost`` is also a ``BrokenProcessPool`` so code written against
``concurrent.futures`` keeps catching it.
"""

from __future__ import annotations

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


class FaultInjected(ProcpoolError):
    """Raised at a fault point armed with the ``raise`` action (tests only)."""


class RemoteTraceback(Exception):
    """Carries the worker-side traceback text; set as ``__cause__`` of a re-raised exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
