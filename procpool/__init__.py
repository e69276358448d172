"""procpool: the Linux kernel's workqueue worker pools, with OS processes as workers."""

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
__version__ = "0.1.0"
