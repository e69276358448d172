"""The ``"procpool"`` backend for joblib (``procpool[joblib]``): ``import procpool.joblib``
registers it, then::

    from joblib import Parallel, delayed, parallel_config
    import procpool.joblib  # noqa: F401

    with parallel_config(backend="procpool", n_jobs=4):
        results = Parallel()(delayed(f)(x) for x in xs)

Everything that is joblib's own stays joblib's: auto-batching (the backend reports each
batch's duration and joblib sizes the next ones), ``return_as="generator"`` and
``"generator_unordered"``, ``timeout``, ``pre_dispatch``, nested calls. The backend submits
each batch to a ``procpool.ProcessPoolExecutor``.

Why it behaves better than joblib's process backends when things go wrong:

* **A crashed worker fails only its batch.** A worker killed by a signal, a segfault or the
  OOM killer fails the batch it ran with ``procpool.WorkerLost`` (naming the pid and the
  signal); joblib aborts the call and raises it. The executor is not broken: procpool replaces
  the worker, so the next ``Parallel`` call runs on the same warm executor (loky's backend
  breaks its executor and restarts every worker).
* **Abort on the first error cancels what has not started**: batches still waiting in the
  pool's worklist are cancelled and never run. Batches already running finish on their
  workers (their results are dropped); no worker is killed, so no other state is lost.

Executors are kept between calls, one per (n_jobs, options), as joblib keeps loky's, so a loop
of short ``Parallel`` calls does not pay worker start-up each time; procpool closes them at
interpreter exit, or at ``shutdown_executors()``. Options given to
``parallel_config(backend="procpool", **options)`` go to the executor
(``max_tasks_per_child``, ``initializer``, ``initargs``, ``idle_timeout``, ``title_prefix``,
...). joblib's memmapping options (``max_nbytes``, ``mmap_mode``, ``temp_folder``) do not
apply: arguments are pickled to the worker as with any procpool call.

``n_jobs=1`` runs in the calling process (joblib's sequential backend), as every joblib
process backend does; ``n_jobs=-1`` means every usable CPU, ``-2`` all but one, and so on.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from typing import Any

from joblib import register_parallel_backend
from joblib._parallel_backends import AutoBatchingMixin, FallbackToBackend, ParallelBackendBase, SequentialBackend

from .executor import ProcessPoolExecutor

__all__ = ["ProcpoolBackend", "shutdown_executors"]

_executors_lock = threading.Lock()  # guards _executors
_executors: dict[tuple, ProcessPoolExecutor] = {}  # (n_jobs, options) -> kept executor


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def _executor_for(n_jobs: int, options: dict[str, Any]) -> ProcessPoolExecutor:
    """The kept executor for these settings; a new one if there is none or it is broken
    (its initializer failed) or was shut down."""
    try:
        key = (n_jobs, tuple(sorted(options.items())))
        hash(key)
    except TypeError:
        key = None  # unhashable options (a list in initargs): not kept, a new executor per call
    with _executors_lock:
        ex = _executors.get(key) if key is not None else None
        if ex is not None and (ex.pool.broken or ex.pool._closing):
            ex = None
        if ex is None:
            ex = ProcessPoolExecutor(max_workers=n_jobs, **options)
            if key is not None:
                _executors[key] = ex
        return ex


def shutdown_executors(wait: bool = True) -> None:
    """Shut down the executors kept between calls (their workers exit); the next call makes
    new ones. For tests that check nothing is left, and programs that want the workers gone
    before exit."""
    with _executors_lock:
        kept = list(_executors.values())
        _executors.clear()
    for ex in kept:
        ex.shutdown(wait=wait)


class ProcpoolBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ParallelBackendBase on a procpool ``ProcessPoolExecutor`` (module docstring)."""

    supports_retrieve_callback = True  # and so, in joblib, timeout and return_as generators
    uses_threads = False
    supports_sharedmem = False

    def __init__(self, nesting_level: int | None = None, inner_max_num_threads: int | None = None, **options: Any):
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **options)
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()  # guards _futures (callbacks run on the pool's arbiter thread)
        self._futures: set[Future] = set()  # this call's batches not finished yet

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if not isinstance(n_jobs, int) or isinstance(n_jobs, bool):
            raise TypeError(f"n_jobs must be an int, got {n_jobs!r}")
        if n_jobs < 0:
            return max(_usable_cpus() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None, require: Any = None, **_: Any):
        n = self.effective_n_jobs(n_jobs)
        if n == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self._executor = _executor_for(n, self.backend_kwargs)
        return n

    def submit(self, func: Any, callback: Any = None) -> Future:
        assert self._executor is not None, "configure() first"
        fut = self._executor.submit(func)
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._forget)
        if callback is not None:
            fut.add_done_callback(callback)
        return fut

    def _forget(self, fut: Future) -> None:
        with self._lock:
            self._futures.discard(fut)

    def retrieve_result_callback(self, out: Future) -> Any:
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """The call failed (or timed out, or its generator was dropped): cancel its batches that
        no worker has started. The executor stays as it is, ready for the next call."""
        with self._lock:
            futures = list(self._futures)
        for fut in futures:
            fut.cancel()  # True only for a batch still in the pool's worklist

    def terminate(self) -> None:
        # The executor is kept for the next call (see _executor_for); only this call's
        # bookkeeping ends here.
        self._executor = None
        with self._lock:
            self._futures.clear()
        self.reset_batch_stats()


register_parallel_backend("procpool", ProcpoolBackend)
