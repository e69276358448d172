"""A pool's configuration: every argument of ``WorkerPool()`` checked once, then frozen.

``PoolConfig.build(...)`` applies the defaults that depend on the machine (``max_workers``: the
CPU count; ``concurrency``: the CPUs the workers may use) and raises ValueError/TypeError
naming the argument that is wrong. Nothing here starts a process or opens a descriptor, so a
bad argument leaves nothing behind. All fields are I (set at init, read-only after).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .checks import check_attrs, check_name, check_number
from .idtable import MAX_WORKERS

#: Idle workers kept regardless of load, and busy workers per extra idle one kept
#: (the kernel's ``too_many_workers()``: 2 idle plus 1 per MAX_IDLE_WORKERS_RATIO busy).
KEEP_IDLE = 2
MAX_IDLE_WORKERS_RATIO = 4
#: A worker that has just answered keeps polling its pipe for the next item this long (seconds)
#: before it sleeps, as long as its previous item came within that time: waking a sleeper on
#: another CPU is most of a one-at-a-time round trip (measured in the README, under ``spin``).
SPIN = 0.0002
#: The kernel's wq_cpu_intensive_thresh_us (10 ms); see procpool.concurrency.
CPU_INTENSIVE_THRESHOLD = 0.010
#: Most a worker may spin (it burns CPU while it lasts).
SPIN_MAX = 0.01


@dataclass(frozen=True)
class PoolConfig:
    """What ``WorkerPool`` was asked for, validated (see WorkerPool's docstring)."""

    min_workers: int
    max_workers: int
    idle_timeout: float
    title_prefix: str
    title: str | None  # every worker's whole title, or None for worker_title()
    linger_dying: float
    max_tasks_per_child: int | None
    nice: int  # niceness every worker adds to its own at start (os.nice)
    cpus: frozenset[int] | None  # CPUs every worker is bound to at start, or None (inherit)
    concurrency: int  # target number of running workers
    cpu_intensive_threshold: float
    spin: float  # see SPIN

    @classmethod
    def build(
        cls,
        min_workers: int | None,
        max_workers: int | None,
        idle_timeout: float,
        *,
        title_prefix: str,
        title: str | None,
        linger_dying: float,
        max_tasks_per_child: int | None,
        nice: int,
        cpus: set[int] | frozenset[int] | None,
        concurrency: int | None,
        cpu_intensive_threshold: float,
        spin: float,
    ) -> PoolConfig:
        """Check every argument (in the order a reader meets them) and apply the defaults."""
        if max_workers is None:
            max_workers = max(min(os.cpu_count() or 1, MAX_WORKERS), (min_workers or 0))
        check_number("max_workers", max_workers, minimum=1, integer=True)
        if max_workers > MAX_WORKERS:
            raise ValueError(
                f"max_workers must be at most {MAX_WORKERS} (procpool.pool.MAX_WORKERS: each worker is a process), "
                f"got {max_workers}"
            )
        if min_workers is None:
            min_workers = min(KEEP_IDLE, max_workers)
        check_number("min_workers", min_workers, minimum=0, integer=True)
        if min_workers > max_workers:
            raise ValueError(f"min_workers ({min_workers}) must not exceed max_workers ({max_workers})")
        check_number("idle_timeout", idle_timeout, minimum=0)
        check_number("linger_dying", linger_dying, minimum=0)
        if max_tasks_per_child is not None:
            check_number("max_tasks_per_child", max_tasks_per_child, minimum=1, integer=True)
        nice, checked_cpus = check_attrs(nice, cpus)
        if concurrency is None:
            concurrency = len(checked_cpus) if checked_cpus is not None else len(os.sched_getaffinity(0))
        check_number("concurrency", concurrency, minimum=1, integer=True)
        check_number("cpu_intensive_threshold", cpu_intensive_threshold, minimum=0)
        check_number("spin", spin, minimum=0)
        if spin > SPIN_MAX:
            raise ValueError(f"spin must be at most {SPIN_MAX} s (it burns CPU while it lasts), got {spin!r}")
        check_name("title_prefix", title_prefix)
        if title is not None:
            check_name("title", title)
        return cls(
            min_workers=min_workers,
            max_workers=max_workers,
            idle_timeout=float(idle_timeout),
            title_prefix=title_prefix,
            title=title,
            linger_dying=float(linger_dying),
            max_tasks_per_child=max_tasks_per_child,
            nice=nice,
            cpus=checked_cpus,
            concurrency=concurrency,
            cpu_intensive_threshold=float(cpu_intensive_threshold),
            spin=float(spin),
        )
