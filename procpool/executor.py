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
* a call or result that cannot cross fails only its item (``CallNotUnpicklable``,
  ``ResultNotUnpicklable``: ``BrokenProcessPool``s that do not break the pool); one that
  cannot be pickled here fails its future, as in the standard library (``CallNotPicklable``);
* initargs of the 'fork' context that must be inherited are refused (see procpool.calls);
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
import signal
import time
import types
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from typing import Any, TypeVar, cast

from . import _compat
from .errors import CallNotPicklable
from .future import new_future
from .pool import WorkerPool

T = TypeVar("T")

#: Set when the interpreter starts shutting down (before atexit handlers run), as the
#: standard library's executor does: a submit from then on (an atexit handler's, a daemon
#: thread's) is refused, since the pools it would feed are being closed. Written once.
_interpreter_shutdown = False


def _on_interpreter_shutdown() -> None:
    global _interpreter_shutdown
    _interpreter_shutdown = True


# threading's own exit hooks run when the main thread finishes, before atexit's: the moment
# concurrent.futures uses, so code that submits from an atexit handler sees the same error.
try:
    _compat.register_shutdown_hook(_on_interpreter_shutdown)
except RuntimeError:  # imported while the interpreter already shuts down
    _interpreter_shutdown = True


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
            whole = cast("Sequence[Any]", seq)
            for start in range(0, len(whole), size):
                yield whole[start : start + size]
            return
        it = iter(seq)
        while chunk := list(itertools.islice(it, size)):
            yield chunk
        return
    calls = zip(*iterables, strict=False)  # map() stops at the shortest iterable
    while calls_chunk := tuple(itertools.islice(calls, size)):
        yield calls_chunk


def _results(futures: list[Future], deadline: float | None) -> Generator[Any, None, None]:
    """Yield the futures' results in order, waiting until ``deadline`` at most. The list is
    reversed and popped, and no local names a result while it is yielded, so a result the
    caller drops is freed at once (a long map must not keep every result alive, nor the
    last one until the next ``next()``)."""
    futures.reverse()
    try:
        while futures:
            left = None if deadline is None else deadline - time.monotonic()
            # Wait (a negative wait still returns a result that is already there); on a
            # timeout or an error the future stays listed, to be cancelled below.
            futures[-1].result(left)
            # Done: taken off the list and its result handed over, nothing else keeps it.
            yield futures.pop().result()
    finally:
        # Timed out, raised, or the caller stopped iterating: what has not started never will.
        for fut in futures:
            fut.cancel()


def _chunk_iterators(
    futures: list[Future], deadline: float | None, current: list[Any]
) -> Generator[Iterator[Any], None, None]:
    """A chunked map's chunks, each as an iterator that pops its results one by one (all in C:
    ``map(chunk.pop, indexes)``), so a result the caller drops is freed at once rather than
    with the rest of its chunk. ``current``: the chunk being read and its index list, for
    _ChunkResults.close()."""
    results = _results(futures, deadline)
    try:
        for chunk in results:
            chunk.reverse()
            indexes = [-1] * len(chunk)
            current[:] = (chunk, indexes)
            yield map(chunk.pop, indexes)
    finally:
        results.close()


class _ChunkResults(itertools.chain):
    """A chunked map's results: chunks flattened by itertools in C (a Python ``yield from``
    per item cost a quarter of the caller's time in a map of a million trivial calls), with
    the generator's ``close()``, which cancels what has not started, as the standard
    library's map iterator does. Dropping it drops the generator, to the same effect."""

    __slots__ = ("_chunks", "_current")
    _chunks: Generator[Iterator[Any], None, None]
    _current: list[Any]

    def __new__(cls, chunks: Generator[Iterator[Any], None, None], current: list[Any]) -> _ChunkResults:
        # from_iterable is a classmethod: called through super() it makes a _ChunkResults.
        self = cast("_ChunkResults", super().from_iterable(chunks))
        self._chunks, self._current = chunks, current
        return self

    def close(self) -> None:
        self._chunks.close()
        for part in self._current:
            # The rest of the chunk being read: nothing more, as after a generator's close()
            # (the emptied index list ends its map), and its results are freed.
            part.clear()
        self._current.clear()


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
        elif isinstance(max_workers, int) and not isinstance(max_workers, bool) and max_workers <= 0:
            # The standard library's words: code and tests in the wild match this text.
            raise ValueError("max_workers must be greater than 0")
        options: dict[str, Any] = {"min_workers": 0, **procpool_options}
        # WorkerPool validates the rest: TypeError for a non-int max_workers, and likewise for
        # max_tasks_per_child.
        self._pool = WorkerPool(
            max_workers=max_workers,
            mp_context=mp_context,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_child=max_tasks_per_child,
            **options,
        )
        # Compatibility only: the standard library's private attributes that code reads.
        self._max_workers = self._pool.max_workers
        self._mp_context = self._pool._ctx

    @property
    def pool(self) -> WorkerPool:
        """The underlying WorkerPool (``stats()``, ``workers()``, ``destroy_idle()``)."""
        return self._pool

    @property
    def _processes(self) -> Mapping[int, WorkerHandle]:
        """Compatibility only (the standard library's private ``_processes``, which code reads
        to list worker pids or to terminate workers on a timeout): a read-only snapshot, pid ->
        ``WorkerHandle``, of the worker processes alive now, dying ones included. Terminating
        one fails only the item it runs (``WorkerLost``); the pool replaces it. Use
        ``pool.workers()`` and ``cancel_running()`` in new code."""
        return types.MappingProxyType({w.pid: WorkerHandle(self._pool, w) for w in self._pool._live_workers()})

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``. As in the standard library, a call that cannot be
        pickled returns a future failed with ``CallNotPicklable`` (a ``pickle.PicklingError``
        and a TypeError, naming the part that failed), so code that submits a batch and then
        looks at each result is not cut short half-way."""
        if _interpreter_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        try:
            return self._pool.submit(fn, *args, **kwargs)
        except CallNotPicklable as exc:
            fut: Future[T] = new_future()
            fut.set_running_or_notify_cancel()
            fut.set_exception(exc)
            return fut

    def submit_with(
        self, fn: Callable[..., T], /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Future[T]:
        """``submit`` with a per-item ``timeout``: seconds the call may run once a worker has
        it. Past that its worker is killed and replaced, and the future fails with
        ``procpool.ItemTimeout``, a builtin ``TimeoutError``. (A function that itself takes
        a ``timeout`` keyword can be given one through ``functools.partial``.) Unlike
        ``submit``, a call that cannot be pickled raises ``CallNotPicklable`` here: this is
        procpool's own API, fail-fast like ``WorkerPool.submit``."""
        if _interpreter_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
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
        as one item. Iterating raises a call's exception at its place (``CallNotPicklable``
        for a call that could not be pickled, for its whole chunk), or TimeoutError once
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
            # Shut down in between (or interrupted): leave nothing behind.
            for fut in futures:
                fut.cancel()
            raise
        if chunksize == 1:
            return _results(futures, deadline)
        current: list[Any] = []
        return _ChunkResults(_chunk_iterators(futures, deadline, current), current)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; idempotent. Pending calls still run unless ``cancel_futures``,
        and even with ``wait=False`` the program waits for them at exit, as in the standard
        library. With ``wait``, returns once every worker process is gone."""
        self._pool.close(wait=wait, cancel_futures=cancel_futures)

    def __repr__(self) -> str:
        return f"<procpool.ProcessPoolExecutor max_workers={self._max_workers} pool={self._pool!r}>"


class WorkerHandle:
    """Compatibility only: what ``ProcessPoolExecutor._processes`` maps a pid to, the part of
    ``multiprocessing.Process`` that code reading ``_processes`` uses. The worker is a child of
    procpool's spawner, not of this process, so "alive" means: the pool has not reaped it yet
    (it learns of an exit from the spawner as soon as the kernel reports it)."""

    __slots__ = ("_pool", "_worker", "pid")

    def __init__(self, pool: WorkerPool, worker: Any) -> None:
        self._pool = pool
        self._worker = worker
        self.pid: int = worker.pid

    def is_alive(self) -> bool:
        return self._pool._is_live_worker(self._worker)

    @property
    def exitcode(self) -> int | None:
        """The exit status once reaped (negative: the signal), else None."""
        return None if self.is_alive() else self._worker.proc.exitcode

    def _signal(self, sig: int) -> None:
        # Only while the pool has not reaped it: after that the pid may be another process's.
        # (The spawner reaps it, then the pool hears of it, so a live entry is a live pid or,
        # for a moment, a zombie of the spawner: never a reused pid.)
        if self.is_alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """SIGTERM: the item it runs fails with ``WorkerLost``; the pool replaces it."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, likewise."""
        self._signal(signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the pool has reaped it, or ``timeout`` seconds."""
        self._pool._wait_worker_reaped(self._worker, timeout)

    def __repr__(self) -> str:
        return f"<procpool.WorkerHandle pid={self.pid} {'alive' if self.is_alive() else 'exited'}>"
