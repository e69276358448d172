"""``procpool.ProcessPoolExecutor``: the ``concurrent.futures`` process pool API on a WorkerPool.

A drop-in for ``concurrent.futures.ProcessPoolExecutor`` where callers rely on its
semantics, with procpool's pool underneath (workers started on demand, titled
``kworker/u<pool>:<id>``, destroyed without waiting). Data flow::

    submit(fn, *a)  ─► WorkerPool.submit: pickle in the caller's thread ─► a worker ─► Future
    map(fn, *its)   ─► zip the iterables at once, one submit per call (chunksize=1) or per
                       chunk of calls (_run_chunk in the worker, one item, one list back)
                    ─► a generator that waits on each Future in order, until ``timeout``
                       seconds after the map() call; on timeout, an error or close(),
                       cancels the calls that have not started; chunks are flattened by
                       itertools.chain (a range, list or tuple is chunked by slicing)

Where it differs from the standard library, deliberately (the README has the full list):

* a worker that dies fails only the item it was running (``WorkerLost``, a
  ``BrokenProcessPool``); the executor replaces it and stays usable;
* an initializer that raises fails the item its worker was given and every waiting item
  with ``InitializerFailed`` (a ``BrokenProcessPool``), and ``submit`` raises it from then
  on; items already running on other workers finish;
* a call that cannot be pickled raises ``TypeError`` from ``submit``/``map`` at once;
* ``mp_context`` may be 'forkserver' (the default) or 'spawn': it chooses how procpool's
  spawner starts when the program runs threads (workers are always forks of that
  single-threaded spawner). A 'fork' context is refused with ``ValueError``, as by WorkerPool:
  forking a threaded program is unsafe, and code that asks for fork usually relies on what
  each fork inherits at that moment, which a silent switch to forkserver would break.

Beyond the standard library: ``submit_with(fn, *args, timeout=...)`` (the item's worker is
killed when it runs too long), ``cancel_running(future)``, and ``pool`` (the WorkerPool, for
``stats()`` and ``workers()``).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from .pool import WorkerPool

T = TypeVar("T")


def default_max_workers() -> int:
    """The CPUs this process may run on, as the standard library's default (3.13 counts
    only the CPUs of the affinity mask; earlier versions count all of them: we count the
    mask everywhere, since a worker per unusable CPU only adds contention)."""
    process_cpu_count = getattr(os, "process_cpu_count", None)
    if process_cpu_count is not None:
        return process_cpu_count() or 1
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _run_chunk(fn: Callable[..., T], chunk: tuple[tuple[Any, ...], ...]) -> list[T]:
    """Worker side of ``map(chunksize=n)``: n calls as one item, so one round trip and one
    pickle carry them. A call that raises fails the whole chunk, as in the standard library."""
    return [fn(*args) for args in chunk]


def _run_chunk1(fn: Callable[..., T], chunk: Iterable[Any]) -> list[T]:
    """``_run_chunk`` for the common one-iterable map: the arguments travel bare, not as
    1-tuples (a third of the pickle, and the worker's loop is map() in C)."""
    return list(map(fn, chunk))


def _chunks(iterables: tuple[Iterable[Any], ...], size: int) -> Iterator[Any]:
    if len(iterables) == 1:
        seq = iterables[0]
        if type(seq) in (range, list, tuple):
            # Slicing is C work and keeps a range a range: a chunk of range(n) travels as
            # three numbers instead of `size` ints, and no int objects are made here.
            for start in range(0, len(seq), size):
                yield seq[start : start + size]
            return
        it = iter(seq)
        while chunk := list(itertools.islice(it, size)):
            yield chunk
        return
    calls = zip(*iterables, strict=False)  # map() stops at the shortest iterable
    while chunk := tuple(itertools.islice(calls, size)):
        yield chunk


def _results(futures: list[Future], deadline: float | None, last: list[Any] | None = None) -> Iterator[Any]:
    """Yield the futures' results in order, waiting until ``deadline`` at most. The list is
    reversed and popped so a long map does not keep every result alive once yielded.
    ``last[0]``: the value yielded last (see _ChunkResults.close)."""
    futures.reverse()
    try:
        while futures:
            left = None if deadline is None else deadline - time.monotonic()
            # A negative wait still returns a result that is already there.
            value = futures[-1].result(left)
            futures.pop()
            if last is not None:
                last[0] = value
            yield value
    finally:
        # Timed out, raised, or the caller stopped iterating: what has not started never will.
        for fut in futures:
            fut.cancel()


class _ChunkResults(itertools.chain):
    """A chunked map's results: chunks flattened by itertools in C (a Python ``yield from``
    per item cost a quarter of the caller's time in a map of a million trivial calls), with
    the generator's ``close()``, which cancels what has not started, as the standard
    library's map iterator does. Dropping it drops the generator, to the same effect."""

    __slots__ = ("_chunks", "_last")

    def __new__(cls, chunks: Iterator[list[Any]], last: list[Any]) -> _ChunkResults:
        self = super().from_iterable(chunks)
        self._chunks, self._last = chunks, last
        return self

    def close(self) -> None:
        self._chunks.close()  # type: ignore[attr-defined]
        if isinstance(self._last[0], list):
            self._last[0].clear()  # the rest of the chunk being read: nothing more, as after a generator's close()


class ProcessPoolExecutor(Executor):
    """A ``concurrent.futures.Executor`` running calls in procpool worker processes.

    ``max_workers`` defaults to the usable CPU count; ``<= 0`` raises ValueError. Workers
    start on demand (``min_workers=0``) and idle ones beyond need are culled after
    ``idle_timeout`` (300 s). ``initializer(*initargs)`` runs in each worker before its first
    item. ``max_tasks_per_child`` makes a worker retire after that many items (a ``map``
    chunk is one); a new one replaces it when work waits. ``mp_context``: None or
    'forkserver' (default), 'spawn', or a context of those; 'fork' raises ValueError.
    ``procpool_options`` go to ``WorkerPool`` (``idle_timeout``, ``title_prefix``,
    ``min_workers``, ``faults``, ...).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        *,
        max_tasks_per_child: int | None = None,
        **procpool_options: Any,
    ) -> None:
        if max_workers is None:
            max_workers = default_max_workers()
        options: dict[str, Any] = {"min_workers": 0, **procpool_options}
        # WorkerPool validates everything: ValueError for max_workers <= 0 as the standard
        # library, TypeError for a non-int, and likewise for max_tasks_per_child.
        self._pool = WorkerPool(
            max_workers=max_workers,
            mp_context=mp_context,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_child=max_tasks_per_child,
            **options,
        )
        self._max_workers = self._pool.max_workers  # the name some callers read

    @property
    def pool(self) -> WorkerPool:
        """The underlying WorkerPool (``stats()``, ``workers()``, ``destroy_idle()``)."""
        return self._pool

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; a call that cannot be pickled raises TypeError
        here (the standard library fails the future later instead)."""
        return self._pool.submit(fn, *args, **kwargs)

    def submit_with(
        self, fn: Callable[..., T], /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Future[T]:
        """``submit`` with a per-item ``timeout``: seconds the call may run once a worker has
        it. Past that its worker is killed and replaced, and the future fails with
        ``procpool.ItemTimeout``, a builtin ``TimeoutError``. (A function that itself takes
        a ``timeout`` keyword can be given one through ``functools.partial``.)"""
        return self._pool.submit_with(fn, *args, timeout=timeout, **kwargs)

    def cancel_running(self, future: Future) -> bool:
        """Cancel ``future`` even while it runs (``future.cancel()`` returns False then, by
        the Future contract). A running call has its worker killed and replaced; the future
        fails with ``procpool.ItemCancelled``, a ``concurrent.futures.CancelledError``. A
        pending one is cancelled. False if it already finished."""
        return self._pool.cancel_running(future)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """``map(fn, *iterables)`` in worker processes; results come in order, lazily.

        The iterables are consumed and every call submitted now; ``chunksize`` calls travel
        as one item. Iterating raises a call's exception at its place, or TimeoutError once
        ``timeout`` seconds have passed since this call; either way the calls that have not
        started are cancelled.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        deadline = None if timeout is None else time.monotonic() + timeout
        futures: list[Future] = []
        try:
            if chunksize == 1:
                for args in zip(*iterables, strict=False):
                    futures.append(self.submit(fn, *args))
            else:
                runner = _run_chunk1 if len(iterables) == 1 else _run_chunk
                for chunk in _chunks(iterables, chunksize):
                    futures.append(self.submit(runner, fn, chunk))
        except BaseException:
            # A call that cannot be pickled (or shutdown in between): leave nothing behind.
            for fut in futures:
                fut.cancel()
            raise
        if chunksize == 1:
            return _results(futures, deadline)
        last: list[Any] = [None]
        return _ChunkResults(_results(futures, deadline, last), last)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; idempotent. Pending calls still run unless ``cancel_futures``,
        and even with ``wait=False`` the program waits for them at exit, as in the standard
        library. With ``wait``, returns once every worker process is gone."""
        self._pool.close(wait=wait, cancel_futures=cancel_futures)

    def __repr__(self) -> str:
        return f"<procpool.ProcessPoolExecutor max_workers={self._max_workers} pool={self._pool!r}>"
