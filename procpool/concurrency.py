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
      grow(): need_more_worker = work waits, nobody idle, room to grow, and
               nr_running (busy − blocked − CPU-intensive) < concurrency ─► create workers

A new item counts as running until a sample says otherwise, so extra workers come one
sampling period after the items that block. Workers created only because busy ones did not
count are ``cm_wakeups``, charged to the client (a workqueue's Account) of the waiting item
each was created for.

A composed part of WorkerPool: it reads and writes the pool's books (procpool.books) under
L, keeps its sampling clock (A: arbiter thread only), and asks the creator for workers.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from .books import Books
from .config import CPU_INTENSIVE_THRESHOLD
from .stats import Account

__all__ = ["CM_SAMPLE_INTERVAL", "CPU_INTENSIVE_THRESHOLD", "ConcurrencyManagement"]

#: While work waits and the pool may grow, the arbiter samples its busy workers' process
#: states this often (seconds), and marks a worker CPU-intensive once its item kept the CPU
#: this long (the kernel's wq_cpu_intensive_thresh_us: 10 ms).
CM_SAMPLE_INTERVAL = 0.010


class ConcurrencyManagement:
    """The sampler and growth; see the module docstring."""

    def __init__(
        self, books: Books, create_workers: Callable[[int], int], create_retry_at: Callable[[], float]
    ) -> None:
        self.books = books  # I
        self.create_workers = create_workers  # I: the creator's (arbiter thread)
        self.create_retry_at = create_retry_at  # I: when creation may be tried again (A)
        self.next_sample_at = 0.0  # A

    def maybe_sample(self) -> None:
        """Concurrency management (the kernel's wq_worker_sleeping() and CPU-intensive
        detection, by sampling): while work waits and the pool may grow, every
        CM_SAMPLE_INTERVAL read each busy worker's process state and CPU time with psutil.
        Blocked (sleeping, disk-sleep) workers and those whose item kept the CPU past
        ``cpu_intensive_threshold`` stop counting in nr_running. Nothing is read when no
        work waits. Arbiter thread; psutil calls happen outside L."""
        now = time.monotonic()
        if now < self.next_sample_at:
            return
        b = self.books
        with b.lock:
            if not b.policy.may_grow():
                return
            busy = [(w, w.current.seq) for w in b.workers.values() if w.state == "busy" and w.current is not None]
            b.cm_samples += 1
        self.next_sample_at = now + CM_SAMPLE_INTERVAL
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
        with b.lock:
            for w, seq, blocked, cpu in seen:
                if w.state != "busy" or w.current is None or w.current.seq != seq:
                    continue  # moved on meanwhile: its new item counts as running
                intensive = w.cm_intensive
                # As the kernel's worker->current_at, the CPU clock restarts when the item
                # starts (here: its first sample) and whenever it is seen blocked: only a
                # stretch of CPU without sleeping makes it CPU-intensive.
                if w.cm_seq != seq or blocked:
                    w.cm_seq, w.cm_cpu0 = seq, cpu
                elif not intensive and cpu - w.cm_cpu0 >= b.cfg.cpu_intensive_threshold:
                    intensive = True
                    b.cpu_intensive += 1
                    if w.current.account is not None:
                        marked.append(w.current.account)
                b.cm_set(w, blocked, intensive)
        for account in marked:
            account.charge(cpu_intensive=1)

    def grow(self) -> None:
        """Create the workers the rule asks for (arbiter thread; not during a creation
        cooldown), counting those created only because busy workers did not count."""
        b = self.books
        with b.lock:
            grow = b.policy.nr_to_create()
            # Workers the pool would not start if every busy one counted as running; each is
            # charged to the client of a waiting item it was started for.
            by_cm = max(0, min(grow, len(b.workers) - len(b.idle) + grow - b.cfg.concurrency))
            waiting = [it.account for it in itertools.islice(b.worklist, by_cm)]
        if not grow or time.monotonic() < self.create_retry_at():
            return
        made = self.create_workers(grow)
        if by_cm and made:
            with b.lock:
                b.cm_wakeups += min(by_cm, made)
            for account in waiting[: min(by_cm, made)]:
                if account is not None:
                    account.charge(cm_wakeups=1)
