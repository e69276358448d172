"""A workqueue's hand-off to its pools and back: items go to the pool they were pumped for,
and each pool future's end completes the item, takes it off the books and pumps the next.

Completions usually run on a pool's arbiter thread; nothing here waits, and the workqueue's
lock L is never held around a pool call (``pool.submit`` pickles and may run callbacks). While
an item's done-callbacks run, ``chained.wq`` names its workqueue, so that queueing from them is
allowed during drain (chained queueing).

Guards:  L = the owning Workqueue's _lock (docs/design.md, lock legend)   I = set in __init__
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import TYPE_CHECKING, Any

from .stats import Account
from .wqbooks import Books, Held
from .wqwork import Work

if TYPE_CHECKING:
    from .pool import WorkerPool

chained = threading.local()  # .wq: the workqueue whose item's completion this thread runs


class Handoff:
    """Hands ``owner``'s pumped items to their pools and completes them.

    ``pump()`` (L held) takes the next items off the queue; ``changed`` is notified (L held)
    whenever an item leaves the books; ``release(held)`` drops a pool reference, without
    waiting (it may run on the old pool's arbiter thread)."""

    def __init__(
        self,
        owner: object,
        name: str,
        lock: threading.Lock,
        changed: threading.Condition,
        books: Books,
        account: Account,
        pump: Callable[[], list[Work]],
        release: Callable[[Held], None],
    ) -> None:
        self._owner = owner  # I
        self._name = name  # I
        self._lock = lock  # I: the workqueue's L
        self._changed = changed  # I
        self._books = books  # I (its state: L)
        self._account = account  # I
        self._pump = pump  # I
        self._release = release  # I

    def submit(self, works: list[Work]) -> None:
        """Hand ``works`` to the pool. L not held. A loop, not recursion: each item that fails
        at once frees a slot for the next."""
        todo = deque(works)
        while todo:
            work = todo.popleft()
            try:
                assert work.pool is not None
                fut = work.pool._submit(work.fn, work.args, work.kwargs, None, self._name, self._account)
            except BaseException as exc:  # noqa: BLE001 - unpicklable call, pool broken: ends the item
                todo.extend(self._complete(work, None, exc))
                continue
            work.pool_future = fut
            fut.add_done_callback(functools.partial(self._on_pool_done, work))

    def finish(self, work: Work, value: Any, exc: BaseException | None) -> None:
        """``work`` ended with ``value`` or ``exc``: complete it, hand over the next. L not held."""
        self.submit(self._complete(work, value, exc))

    def after_leaving(self, release: Held | None, sends: list[Work]) -> None:
        """L not held. Off L and without waiting: this may be the old pool's arbiter thread."""
        if release is not None:
            self._release(release)
        self.submit(sends)

    def refuse_on_arbiter(self, what: str, pools: list[WorkerPool]) -> None:
        """RuntimeError if this thread is the arbiter of one of ``pools``: the thread that
        runs completions must not wait for them (``what`` would wait forever)."""
        me = threading.current_thread()
        if any(me is p._arbiter_thread for p in pools):
            raise RuntimeError(
                f"workqueue {self._name!r}: {what}() from a done-callback would deadlock: callbacks run on "
                "the pool's arbiter thread, which delivers the results it would wait for (queue more work "
                "instead, or wait from another thread)"
            )

    def _on_pool_done(self, work: Work, fut: Future) -> None:
        """The pool's future ended (arbiter thread, usually). L not held."""
        if fut.cancelled():
            self.finish(work, None, CancelledError(f"the pool of workqueue {self._name!r} cancelled the item"))
        else:
            exc = fut.exception()
            self.finish(work, fut.result() if exc is None else None, exc)

    def _complete(self, work: Work, value: Any, exc: BaseException | None) -> list[Work]:
        """Complete ``work``, then take it off the books; returns what to submit next (the
        pump's take). L not held.

        The Work is completed *before* it leaves in-flight: a flusher woken by its removal
        must find it done, and an item chained from its done-callbacks is queued while it
        still counts, so drain() cannot see the workqueue empty in between."""
        prev = getattr(chained, "wq", None)
        chained.wq = self._owner
        try:
            if exc is None:
                work.set_result(value)
            else:
                work.set_exception(exc)
        finally:
            chained.wq = prev
        # Cancelled in the pool's worklist (the pool closed with cancel_futures): never ran.
        ran = work.pool_future is None or not work.pool_future.cancelled()
        with self._lock:
            work.where = "done"
            del self._books.active[work.seq]
            release = self._books.leave_inflight(work, ran)
            sends = self._pump()
            self._changed.notify_all()
        self.after_leaving(release, [])
        return sends
