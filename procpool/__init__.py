"""procpool: the Linux kernel's workqueue worker pools, with OS processes as workers.

``import procpool`` loads nothing but this file: the public names below are looked up on
first use (PEP 562 ``__getattr__``), so a program that imports procpool and never makes a
pool, or makes one later, does not pay for multiprocessing, concurrent.futures and the rest
at import time. ``from procpool import WorkerPool`` loads what a pool needs, and no more:
the Manager's machinery (multiprocessing.managers, psutil) waits for the first pool.
Submodules (``procpool.pool``, ``procpool.manager``, ...) are reachable as attributes too.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (its cost: README, Performance)
if TYPE_CHECKING:  # what the names resolve to, for type checkers and readers
    from .errors import (
        CallNotPicklable,
        CallNotUnpicklable,
        FaultInjected,
        InitializerFailed,
        ItemCancelled,
        ItemTimeout,
        PoolBroken,
        PoolClosed,
        ProcpoolError,
        RemoteTraceback,
        ResultNotPicklable,
        ResultNotUnpicklable,
        TeardownTimeout,
        TransferError,
        WorkerLost,
    )
    from .executor import ProcessPoolExecutor
    from .pool import WorkerPool
    from .stats import PoolStats, WorkerInfo
    from .workqueue import Work, Workqueue, WorkqueueStats

#: public name -> the submodule that defines it
_PUBLIC = {
    **dict.fromkeys(
        (
            "CallNotPicklable",
            "CallNotUnpicklable",
            "FaultInjected",
            "InitializerFailed",
            "ItemCancelled",
            "ItemTimeout",
            "PoolBroken",
            "PoolClosed",
            "ProcpoolError",
            "RemoteTraceback",
            "ResultNotPicklable",
            "ResultNotUnpicklable",
            "TeardownTimeout",
            "TransferError",
            "WorkerLost",
        ),
        "errors",
    ),
    "ProcessPoolExecutor": "executor",
    "WorkerPool": "pool",
    "PoolStats": "stats",
    "WorkerInfo": "stats",
    "Work": "workqueue",
    "Workqueue": "workqueue",
    "WorkqueueStats": "workqueue",
}
_SUBMODULES = frozenset(
    (
        "calls",
        "checks",
        "cli",
        "concurrency",
        "errors",
        "executor",
        "faults",
        "frames",
        "future",
        "idtable",
        "manager",
        "pool",
        "spawner",
        "stats",
        "teardown",
        "worker",
        "workqueue",
    )
)

__all__ = [
    "CallNotPicklable",
    "CallNotUnpicklable",
    "FaultInjected",
    "InitializerFailed",
    "ItemCancelled",
    "ItemTimeout",
    "PoolBroken",
    "PoolClosed",
    "PoolStats",
    "ProcessPoolExecutor",
    "ProcpoolError",
    "RemoteTraceback",
    "ResultNotPicklable",
    "ResultNotUnpicklable",
    "TeardownTimeout",
    "TransferError",
    "WorkerInfo",
    "WorkerLost",
    "WorkerPool",
    "Work",
    "Workqueue",
    "WorkqueueStats",
]
assert sorted(__all__) == sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    mod = _PUBLIC.get(name)
    if mod is not None:
        value = getattr(importlib.import_module(f".{mod}", __name__), name)
        globals()[name] = value  # later look-ups are plain attribute reads
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # sets the attribute itself
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC, *_SUBMODULES})
