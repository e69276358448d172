"""The contenders: one adapter class per pool, all behind one small interface, and the table
``CONTENDERS`` (name -> class) that the runner picks them from.

An adapter owns one pool of ``n`` workers. ``submit`` (untimed paths: barrier rounds, the mixed
and scale benchmarks) returns anything with ``done()`` and ``result(timeout)``. The timed loops
(``submit_all``, ``round_trips``) are methods of each adapter that call the pool's own bound
method directly (``submit``, ``apply_async`` or ``schedule``), so the adapter costs nobody
anything in the timed section. ``close`` is the graceful teardown that the teardown benchmark
times; ``abort`` the bounded one of an error path.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

#: Seconds an aborting pool gives its busy workers before they are killed.
ABORT_GRACE = 1.0


class Contender:
    """One contender's pool. Subclasses set the class attributes and ``_make``."""

    #: The name ``--peers`` and the report use.
    name: ClassVar[str]
    #: The module that has the pool class, and the class's name: a fresh interpreter measuring a
    #: cold start loads both before its clock starts (import time is the import benchmark's).
    module: ClassVar[str]
    pool_class: ClassVar[str]
    #: Not a dependency of procpool: skipped, with the reason, when it cannot be imported.
    optional: ClassVar[bool] = False

    def __init__(self, n: int, **kw: Any) -> None:
        self.n, self.closed = n, False
        self.raw = self._make(n, **kw)

    def _make(self, n: int, **kw: Any) -> Any:
        raise NotImplementedError

    # -- untimed ---------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Anything with ``done()`` and ``result(timeout)``."""
        return self.raw.submit(fn, *args)

    def map_list(self, fn: Callable[..., Any], items: int, chunksize: int) -> list:
        return list(self.raw.map(fn, range(items), chunksize=chunksize))

    def nr_processes(self) -> int | None:
        """How many worker processes the pool itself counts (None: it does not tell)."""
        return None

    # -- timed -----------------------------------------------------------------------------------

    def submit_all(self, fn: Callable[[int], Any], items: int) -> list[Any]:
        """Submit ``fn(i)`` for i in range(items), one call each, and wait for all of them."""
        sub = self.raw.submit
        hs = [sub(fn, i) for i in range(items)]
        cf.wait(hs)
        return hs

    def value(self, handle: Any) -> Any:
        """The result of a handle ``submit_all`` returned (it is done)."""
        return handle.result(0)

    def round_trips(self, fn: Callable[[int], Any], items: int) -> list[float]:
        """Seconds per item, one item at a time: submit, wait for its result."""
        sub, pc = self.raw.submit, time.perf_counter
        samples = []
        for i in range(items):
            t0 = pc()
            sub(fn, i).result()
            samples.append(pc() - t0)
        return samples

    # -- teardown --------------------------------------------------------------------------------

    def close(self) -> None:
        """The graceful teardown: pending items run, then every worker is waited for."""
        if not self.closed:
            self.closed = True
            self._close()

    def _close(self) -> None:
        self.raw.shutdown(wait=True)

    def abort(self) -> None:
        """Teardown on an error path, bounded: pending items are dropped, busy workers killed."""
        if not self.closed:
            self.closed = True
            self._abort()

    def _abort(self) -> None:
        raise NotImplementedError


class Procpool(Contender):
    """procpool's ``WorkerPool`` (forkserver workers), or with ``executor=True`` its
    ``ProcessPoolExecutor`` (the map benchmark: WorkerPool has no ``map``)."""

    name, module, pool_class = "procpool", "procpool", "WorkerPool"

    def _make(self, n: int, *, executor: bool = False, **kw: Any) -> Any:
        import procpool  # imported lazily: a peer's fork server preloads the main module

        if executor:
            return procpool.ProcessPoolExecutor(max_workers=n, **kw)
        return procpool.WorkerPool(min_workers=n, max_workers=n, **kw)

    @property
    def worker_pool(self) -> Any:
        """The WorkerPool (the executor's own when this is the executor)."""
        return getattr(self.raw, "pool", self.raw)

    def nr_processes(self) -> int | None:
        return self.worker_pool.stats().nr_workers

    def _abort(self) -> None:
        # SIGTERM, then SIGKILL after ABORT_GRACE.
        self.worker_pool.close(cancel_futures=True, timeout=ABORT_GRACE)


class _StdlibExecutor(Contender):
    """concurrent.futures.ProcessPoolExecutor with the start method ``start_method``."""

    module, pool_class = "concurrent.futures", "ProcessPoolExecutor"
    start_method: ClassVar[str]

    def _make(self, n: int, **kw: Any) -> Any:
        return cf.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context(self.start_method))

    def nr_processes(self) -> int | None:
        return len(self.raw._processes or {})

    def _abort(self) -> None:
        # Running items cannot be cancelled, only killed; shutdown() forgets the processes.
        procs = list((self.raw._processes or {}).values())
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.terminate()
        self.raw.shutdown(wait=True, cancel_futures=True)  # the pool is broken now: returns at once
        for proc in procs:
            proc.join(ABORT_GRACE * 10)


class CfFork(_StdlibExecutor):
    name, start_method = "cf-fork", "fork"


class CfForkserver(_StdlibExecutor):
    name, start_method = "cf-forkserver", "forkserver"


class Loky(Contender):
    """loky.ProcessPoolExecutor, its default "loky" start method."""

    name, module, pool_class, optional = "loky", "loky", "ProcessPoolExecutor", True

    def _make(self, n: int, **kw: Any) -> Any:
        import loky

        return loky.ProcessPoolExecutor(max_workers=n)

    def nr_processes(self) -> int | None:
        return len(self.raw._processes or {})

    def _abort(self) -> None:
        self.raw.shutdown(wait=True, kill_workers=True)


class _AsyncResult:
    """An mp-pool / billiard AsyncResult seen as a future (for the untimed paths)."""

    __slots__ = ("_r",)

    def __init__(self, r: Any) -> None:
        self._r = r

    def done(self) -> bool:
        return self._r.ready()

    def result(self, timeout: float | None = None) -> Any:
        return self._r.get(timeout)


class MpPool(Contender):
    """multiprocessing.Pool (fork): ``apply_async(fn, args)`` returns an AsyncResult."""

    name, module, pool_class = "mp-pool", "multiprocessing", "Pool"

    def _make(self, n: int, **kw: Any) -> Any:
        return multiprocessing.get_context("fork").Pool(n)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return _AsyncResult(self.raw.apply_async(fn, args))

    def map_list(self, fn: Callable[..., Any], items: int, chunksize: int) -> list:
        return self.raw.map(fn, range(items), chunksize)

    def nr_processes(self) -> int | None:
        return sum(p.is_alive() for p in self.raw._pool)

    def submit_all(self, fn: Callable[[int], Any], items: int) -> list[Any]:
        sub = self.raw.apply_async
        hs = [sub(fn, (i,)) for i in range(items)]
        for h in hs:
            h.wait()
        return hs

    def value(self, handle: Any) -> Any:
        return handle.get(0)

    def round_trips(self, fn: Callable[[int], Any], items: int) -> list[float]:
        sub, pc = self.raw.apply_async, time.perf_counter
        samples = []
        for i in range(items):
            t0 = pc()
            sub(fn, (i,)).get()
            samples.append(pc() - t0)
        return samples

    def _close(self) -> None:
        self.raw.close()
        self.raw.join()

    def _abort(self) -> None:
        self.raw.terminate()
        self.raw.join()


class Billiard(MpPool):
    """billiard.Pool (fork), Celery's fork of multiprocessing.Pool."""

    name, module, pool_class, optional = "billiard", "billiard", "Pool", True

    def _make(self, n: int, **kw: Any) -> Any:
        import billiard

        return billiard.Pool(n)


class Pebble(Contender):
    """pebble.ProcessPool (fork): ``schedule(fn, args)`` returns a Future."""

    name, module, pool_class, optional = "pebble", "pebble", "ProcessPool", True

    def _make(self, n: int, **kw: Any) -> Any:
        import pebble

        return pebble.ProcessPool(max_workers=n, context=multiprocessing.get_context("fork"))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.raw.schedule(fn, args)

    def map_list(self, fn: Callable[..., Any], items: int, chunksize: int) -> list:
        return list(self.raw.map(fn, range(items), chunksize=chunksize).result())

    def nr_processes(self) -> int | None:
        return len(self.raw._pool_manager.worker_manager.workers)

    def submit_all(self, fn: Callable[[int], Any], items: int) -> list[Any]:
        sub = self.raw.schedule
        hs = [sub(fn, (i,)) for i in range(items)]
        cf.wait(hs)
        return hs

    def round_trips(self, fn: Callable[[int], Any], items: int) -> list[float]:
        sub, pc = self.raw.schedule, time.perf_counter
        samples = []
        for i in range(items):
            t0 = pc()
            sub(fn, (i,)).result()
            samples.append(pc() - t0)
        return samples

    def _close(self) -> None:
        self.raw.close()
        self.raw.join()

    def _abort(self) -> None:
        self.raw.stop()
        self.raw.join(ABORT_GRACE * 10)


#: Every contender, procpool first; the rest are its peers, in the report's order.
CONTENDERS: dict[str, type[Contender]] = {
    c.name: c for c in (Procpool, CfFork, CfForkserver, MpPool, Loky, Billiard, Pebble)
}
ALL_PEERS = tuple(name for name in CONTENDERS if name != "procpool")


@contextlib.contextmanager
def managed(contender: str, n: int, **kw: Any) -> Iterator[Any]:
    """The contender's pool of n workers; aborted on an error, closed in any case."""
    pool = CONTENDERS[contender](n, **kw)
    try:
        yield pool
    except BaseException:
        pool.abort()
        raise
    finally:
        pool.close()  # a no-op once closed or aborted


def check_processes(pool: Contender, n: int) -> None:
    got = pool.nr_processes()
    if got is not None and got != n:
        raise RuntimeError(f"{pool.name}: {got} processes, wanted {n}")
