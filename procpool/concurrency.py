"""Concurrency management: the kernel's ``nr_running`` rule, for processes.

The kernel keeps a pool's running workers near its CPU count without a fixed size: a worker
that goes to sleep inside an item (wq_worker_sleeping) stops counting as running, so another
is woken or created for the waiting work; one that keeps the CPU past a threshold is marked
CPU-intensive and stops counting too, so it does not hold the rest up. procpool's parent
cannot be told when a worker process sleeps, so it *samples*::

   arbiter loop ─► work waits and the pool may grow? ──no──► nothing is read
                          │ yes, every CM_SAMPLE_INTERVAL
                          ▼
      psutil: each busy worker's state and CPU time (outside L)
                          ▼
      L: sleeping / disk-sleep ─► blocked          CPU since its item started (or since it
         (does not count)                          was last seen blocked) ≥ threshold ─►
                                                   CPU-intensive (does not count, counted once)
                          ▼
      _grow(): need_more_worker = work waits, nobody idle, room to grow, and
               nr_running (busy − blocked − CPU-intensive) < concurrency ─► create workers

A new item counts as running until a sample says otherwise, so extra workers come one
sampling period after the items that block. Workers created only because busy ones did not
count are ``cm_wakeups``, charged to the client (a workqueue's Account) of the waiting item
each was created for.

This is a mixin of WorkerPool: the fields it uses are the pool's (see its __init__), under
the pool lock L unless marked A (arbiter thread only).
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .stats import Account

#: While work waits and the pool may grow, the arbiter samples its busy workers' process
#: states this often (seconds), and marks a worker CPU-intensive once its item kept the CPU
#: this long (the kernel's wq_cpu_intensive_thresh_us: 10 ms).
CM_SAMPLE_INTERVAL = 0.010
CPU_INTENSIVE_THRESHOLD = 0.010


class ConcurrencyManagement:
    """Policy predicates and the sampler; see the module docstring."""

    # Declared for readers and type checkers; set in WorkerPool.__init__.
    _lock: Any
    _workers: dict
    _idle: Any
    _worklist: Any
    concurrency: int
    max_workers: int
    cpu_intensive_threshold: float
    _nr_cm_out: int  # L: busy workers excluded from nr_running (blocked or CPU-intensive)
    _cm_wakeups: int  # L
    _cpu_intensive: int  # L
    _cm_samples: int  # L
    _next_sample_at: float  # A
    _create_retry_at: float  # A

    def _may_grow(self) -> bool:  # pragma: no cover - WorkerPool's
        raise NotImplementedError

    def _create_workers(self, n: int) -> int:  # pragma: no cover - WorkerPool's
        raise NotImplementedError

    def _nr_running(self) -> int:
        """The kernel's nr_running: busy workers not blocked and not CPU-intensive."""
        return len(self._workers) - len(self._idle) - self._nr_cm_out

    def _need_more_worker(self) -> bool:
        """The kernel's rule: work waits, nobody idle to take it, room for another worker, and
        fewer workers running than the concurrency target (blocked and CPU-intensive busy
        workers do not count, so blocking items get extra workers and CPU-bound ones do not
        oversubscribe the CPUs)."""
        return self._may_grow() and self._nr_running() < self.concurrency

    def _cm_set(self, w: Any, blocked: bool, intensive: bool) -> None:
        """Update ``w``'s concurrency flags and the count of excluded workers. L held."""
        before = w.cm_blocked or w.cm_intensive
        w.cm_blocked, w.cm_intensive = blocked, intensive
        self._nr_cm_out += (blocked or intensive) - before

    def _nr_to_create(self) -> int:
        if not self._need_more_worker():
            return 0
        return min(
            len(self._worklist), self.max_workers - len(self._workers), self.concurrency - self._nr_running()
        )

    def _maybe_sample(self) -> None:
        """Concurrency management (the kernel's wq_worker_sleeping() and CPU-intensive
        detection, by sampling): while work waits and the pool may grow, every
        CM_SAMPLE_INTERVAL read each busy worker's process state and CPU time with psutil.
        Blocked (sleeping, disk-sleep) workers and those whose item kept the CPU past
        ``cpu_intensive_threshold`` stop counting in nr_running. Nothing is read when no
        work waits. Arbiter thread; psutil calls happen outside L."""
        now = time.monotonic()
        if now < self._next_sample_at:
            return
        with self._lock:
            if not self._may_grow():
                return
            busy = [(w, w.current.seq) for w in self._workers.values() if w.state == "busy" and w.current is not None]
            self._cm_samples += 1
        self._next_sample_at = now + CM_SAMPLE_INTERVAL
        import psutil

        seen = []
        for w, seq in busy:
            try:
                if w.ps is None:
                    w.ps = psutil.Process(w.pid)
                status = w.ps.status()
                t = w.ps.cpu_times()
            except psutil.Error:
                continue  # gone: the arbiter reaps it
            blocked = status in (psutil.STATUS_SLEEPING, psutil.STATUS_DISK_SLEEP)
            seen.append((w, seq, blocked, t.user + t.system))
        marked: list[Account] = []
        with self._lock:
            for w, seq, blocked, cpu in seen:
                if w.state != "busy" or w.current is None or w.current.seq != seq:
                    continue  # moved on meanwhile: its new item counts as running
                intensive = w.cm_intensive
                # As the kernel's worker->current_at, the CPU clock restarts when the item
                # starts (here: its first sample) and whenever it is seen blocked: only a
                # stretch of CPU without sleeping makes it CPU-intensive.
                if w.cm_seq != seq or blocked:
                    w.cm_seq, w.cm_cpu0 = seq, cpu
                elif not intensive and cpu - w.cm_cpu0 >= self.cpu_intensive_threshold:
                    intensive = True
                    self._cpu_intensive += 1
                    if w.current.account is not None:
                        marked.append(w.current.account)
                self._cm_set(w, blocked, intensive)
        for account in marked:
            account.charge(cpu_intensive=1)

    def _grow(self) -> None:
        """Create the workers the rule asks for (arbiter thread; not during a creation
        cooldown), counting those created only because busy workers did not count."""
        with self._lock:
            grow = self._nr_to_create()
            # Workers the pool would not start if every busy one counted as running; each is
            # charged to the client of a waiting item it was started for.
            by_cm = max(0, min(grow, len(self._workers) - len(self._idle) + grow - self.concurrency))
            waiting = [it.account for it in itertools.islice(self._worklist, by_cm)]
        if not grow or time.monotonic() < self._create_retry_at:
            return
        made = self._create_workers(grow)
        if by_cm and made:
            with self._lock:
                self._cm_wakeups += min(by_cm, made)
            for account in waiting[: min(by_cm, made)]:
                if account is not None:
                    account.charge(cm_wakeups=1)
