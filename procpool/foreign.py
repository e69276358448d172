"""A foreign ``concurrent.futures.Executor`` (a Dask cluster's ``client.get_executor()``, a
thread pool, ...) behind the part of the ``WorkerPool`` interface a ``Workqueue`` uses.

The workqueue keeps everything that is its own (its queue, ``max_active``, ordering, delayed
items, flush/drain/destroy, cancelling items that have not started); the executor only runs
what the workqueue hands it. What needs procpool's own pools (process titles, pools shared by
attributes, concurrency management, the rescuer, CPU-time accounting) is refused or left at zero
by the workqueue (see ``Workqueue``).

Each item the workqueue hands over gets a future of our own (*outer*) relayed from the
executor's (*inner*): ``take_unstarted`` must be able to take an item back so that its outer
future is never completed (the workqueue then cancels the ``Work`` itself), which the executor's
own future cannot promise once its ``cancel()`` has run its callbacks.

What "not started" means is the executor's: ``take_unstarted`` succeeds when its future's
``cancel()`` does. A thread or process pool says no once the call runs; Dask's
``client.get_executor()`` never marks its futures running, so there ``cancel_work`` of an item
handed over cancels the Dask task (which may have run already) and the ``Work`` ends cancelled.

Guards: ``_lock`` (an RLock: ``inner.cancel()`` runs the relay callback on the same thread)
guards ``_inner`` and ``_taken``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class ForeignExecutor:
    """The workqueue's pool stand-in for a foreign executor. Never closes the executor: it
    belongs to the caller."""

    #: Not a procpool pool: the workqueue publishes no pool, and ``procpool ps`` (which lists
    #: workqueues under their pools) does not show it.
    id = -1
    #: No arbiter thread: completions run wherever the executor runs its callbacks.
    _arbiter_thread = None

    def __init__(self, executor: Executor) -> None:
        if not isinstance(executor, Executor):
            raise TypeError(
                f"executor must be a concurrent.futures.Executor (for a Dask cluster: client.get_executor()), "
                f"got {type(executor).__name__}: {executor!r}"
            )
        self.executor = executor  # I
        self._lock = threading.RLock()
        self._inner: dict[Future, Future] = {}  # outer -> inner, while the inner one runs
        self._taken: set[Future] = set()  # outer futures take_unstarted is taking back now

    def _submit(
        self, fn: Callable[..., Any], args: tuple, kwargs: dict, timeout: Any, tag: Any, account: Any
    ) -> Future:
        """WorkerPool._submit's signature; ``timeout``, ``tag`` and ``account`` are procpool's
        own (the workqueue passes None, its name and its Account) and unused here."""
        outer: Future = Future()
        inner = self.executor.submit(fn, *args, **kwargs)
        with self._lock:
            self._inner[outer] = inner
        inner.add_done_callback(lambda f: self._relay(outer, f))
        return outer

    def _relay(self, outer: Future, inner: Future) -> None:
        with self._lock:
            self._inner.pop(outer, None)
            if outer in self._taken:
                return  # take_unstarted cancelled it: the workqueue completes the Work itself
        # Outside the lock: completing runs the workqueue's callback, which submits more.
        if inner.cancelled():
            outer.cancel()
        elif inner.exception() is not None:
            outer.set_exception(inner.exception())
        else:
            outer.set_result(inner.result())

    def take_unstarted(self, outer: Future) -> bool:
        """Take an item back if the executor has not started it (its ``Future.cancel()``
        succeeds). True: ``outer`` is never completed. Under the lock with the relay, so an
        item cannot both be taken back and have its result delivered."""
        with self._lock:
            inner = self._inner.get(outer)
            if inner is None:
                return False
            self._taken.add(outer)
            try:
                if inner.cancel():
                    self._inner.pop(outer, None)
                    return True
                return False
            finally:
                self._taken.discard(outer)

    def creation_stalled_for(self) -> float:
        return 0.0

    def __repr__(self) -> str:
        return f"<ForeignExecutor {self.executor!r}>"
