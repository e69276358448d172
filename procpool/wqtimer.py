"""A workqueue's delayed-work timer (the kernel's ``delayed_work`` timers): the delayed
items, their deadline heap, and the one thread that moves each item to the workqueue's queue
at its deadline, never before it.

It shares the workqueue's lock L (its condition ``cv`` is on that lock): an item's state
changes under one lock, so a timer firing, a cancel and a ``mod_delayed`` cannot both win.
The thread starts with the first delayed item and ends when the workqueue stops it.

Guards:  L = the owning Workqueue's _lock (docs/design.md, lock legend)   I = set in __init__
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

from .wqwork import Work


class DelayedTimer:
    """The delayed items of one workqueue and the thread that fires them.

    ``due(works)`` is called with L held for the items whose deadline passed: it queues them
    and returns what to hand to the pool, which ``submit(works)`` then does with L released
    (a pool call is never made under the workqueue's lock)."""

    def __init__(
        self,
        lock: threading.Lock,
        name: str,
        due: Callable[[list[Work]], list[Work]],
        submit: Callable[[list[Work]], None],
    ) -> None:
        self._lock = lock  # I: the workqueue's L
        self._name = name  # I
        self._due = due  # I
        self._submit = submit  # I
        self.cv = threading.Condition(lock)  # the heap changed, or the timer is stopped
        self.delayed: set[Work] = set()  # L: items waiting for their deadline
        self._heap: list[tuple[float, int, Work]] = []  # L: (deadline, tiebreak, work); stale entries skipped
        self._tiebreak = itertools.count()  # L
        self._thread: threading.Thread | None = None  # L: started on the first arm()
        self._stopped = False  # L

    def __len__(self) -> int:
        return len(self.delayed)

    def arm(self, work: Work, delay: float) -> None:
        """Fire ``work`` ``delay`` seconds from now (re-arming it if it was armed). L held."""
        work.deadline = time.monotonic() + delay
        work.where = "delayed"
        self.delayed.add(work)
        heapq.heappush(self._heap, (work.deadline, next(self._tiebreak), work))
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"procpool-wq-{self._name}", daemon=True)
            self._thread.start()
        self.cv.notify_all()

    def disarm(self, work: Work) -> None:
        """``work`` no longer waits for its deadline (its heap entry goes stale). L held."""
        self.delayed.discard(work)
        work.deadline = None
        self.cv.notify_all()

    def stop(self) -> None:
        """The workqueue is destroyed: the thread ends. L held."""
        self._stopped = True
        self.cv.notify_all()

    def join(self) -> None:
        """After stop(), with L released: wait for the thread to end (unless it is this one)."""
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _loop(self) -> None:
        with self._lock:
            while not self._stopped:
                now = time.monotonic()
                fired = []
                while self._heap and (self._heap[0][2].deadline != self._heap[0][0] or self._heap[0][0] <= now):
                    deadline, _, work = heapq.heappop(self._heap)
                    if work.where != "delayed" or work.deadline != deadline:
                        continue  # stale: re-armed (mod_delayed) or cancelled
                    self.delayed.discard(work)
                    work.deadline = None
                    fired.append(work)
                sends = self._due(fired)
                if sends:
                    self._lock.release()
                    try:
                        self._submit(sends)
                    finally:
                        self._lock.acquire()
                    continue
                wait = self._heap[0][0] - now if self._heap else None
                self.cv.wait(wait)
