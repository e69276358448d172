"""procpool: the Linux kernel's workqueue worker pools, with OS processes as workers.

``import procpool`` loads nothing but this file: the public names below are looked up on
first use (PEP 562 ``__getattr__``), so a program that imports procpool and never makes a
pool, or makes one later, does not pay for multiprocessing, concurrent.futures and the rest
at import time. ``from procpool import WorkerPool`` loads what a pool needs, and no more:
the Manager's client (procpool.manager) and psutil wait for the first pool.
Submodules (``procpool.pool``, ``procpool.manager``, ...) are reachable as attributes too.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (its cost: docs/performance.md)
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
# A literal list, not sorted(_PUBLIC): linters and type checkers read __all__ without running
# the module. The assert keeps the two the same.
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
    if not name.startswith("__") and name.isidentifier() and _is_submodule(name):
        return importlib.import_module(f".{name}", __name__)  # sets the attribute itself
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_submodule(name: str) -> bool:
    """Is there a module or package ``procpool.<name>``? (Read off the package directory, so
    a new module needs no list of its own here.)"""
    import os

    here = os.path.dirname(__file__)
    return os.path.isfile(os.path.join(here, f"{name}.py")) or os.path.isfile(os.path.join(here, name, "__init__.py"))


def __dir__() -> list[str]:
    import os

    here = os.path.dirname(__file__)
    mods = {n.removesuffix(".py") for n in os.listdir(here) if n.endswith(".py") and not n.startswith("__")}
    mods |= {n for n in os.listdir(here) if os.path.isfile(os.path.join(here, n, "__init__.py"))}
    return sorted({*globals(), *_PUBLIC, *mods})
