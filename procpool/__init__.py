"""procpool: the Linux kernel's workqueue worker pools, with OS processes as workers."""

from .errors import FaultInjected, PoolClosed, ProcpoolError, RemoteTraceback, TeardownTimeout, WorkerLost
from .pool import PoolStats, WorkerInfo, WorkerPool

__all__ = [
    "FaultInjected",
    "PoolClosed",
    "PoolStats",
    "ProcpoolError",
    "RemoteTraceback",
    "TeardownTimeout",
    "WorkerInfo",
    "WorkerLost",
    "WorkerPool",
]
__version__ = "0.1.0"
