"""procpool inside each Dask worker (``procpool[dask]``): a Dask *preload* module.

::

    dask worker tcp://scheduler:8786 --preload procpool.dask
    LocalCluster(preload=["procpool.dask"])          # or Nanny/Worker(preload=[...])

The worker's default executor (where Dask runs tasks; a thread pool) is replaced by a
``procpool.ProcessPoolExecutor``: each task runs in a procpool worker process, so

* tasks get process isolation (no GIL shared between them, no state leaking from one to the
  next beyond what a worker process keeps);
* a task that crashes its process (segfault, ``os._exit``, the OOM killer) fails only itself,
  with ``procpool.WorkerLost``; the Dask worker survives, keeps its data and replaces the
  process;
* every node shows the workers as ``kworker/u<pool>:<id>`` in ps/htop (``procpool ps`` too).

Dask runs a task on a process-pool executor through its simple path (no contextvars, no
``get_worker()`` inside the task): tasks that talk back to the cluster (``worker_client``,
``get_worker``) belong on a thread executor, e.g. with ``dask.annotate(executor=...)``.

**Options**, through Dask's configuration (the ``procpool`` section, read in the worker: set it
where the workers start, e.g. ``dask.config.set`` before ``LocalCluster``, a YAML file, or
``DASK_PROCPOOL__MAX_WORKERS=4``)::

    procpool:
      max-workers: 4          # default: the Dask worker's nthreads (it runs that many tasks at once)
      max-tasks-per-child: 100
      idle-timeout: 300
      # ... any ProcessPoolExecutor / WorkerPool option, with '-' for '_'

**Daemonic workers.** A Nanny starts its worker as a *daemonic* multiprocessing process by
default, and multiprocessing forbids a daemonic process to start children of its own (a
daemon's parent terminates it at exit, which would orphan them). procpool needs that child:
its spawner, started through multiprocessing because a Dask worker runs threads (forking a
threaded process is unsafe). The sound way is Dask's own switch, made for exactly this::

    distributed.worker.daemon: False        # or DASK_DISTRIBUTED__WORKER__DAEMON=False

set where the Nanny runs (``dask.config.set`` around ``LocalCluster``, the environment of
``dask worker``). Nothing is orphaned without the daemon flag: procpool's spawner watches its
program and, when the Dask worker dies however it dies, kills its workers, unlinks their
tables and exits (procpool.spawner); workers also die with the spawner (PDEATHSIG).

A Dask worker that is daemonic anyway, or whose ``procpool`` options are wrong, does not fall
back to threads silently (Dask only logs a failed preload): every task it is given fails with
a ``RuntimeError`` that says what to change.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import Executor, Future
from typing import Any

import dask.config

from .executor import ProcessPoolExecutor

logger = logging.getLogger("procpool.dask")

DAEMONIC = (
    "procpool.dask: this Dask worker is a daemonic process, which may not start procpool's "
    "spawner; set the Dask config distributed.worker.daemon to False where the workers are "
    "started (dask.config.set({'distributed.worker.daemon': False}) around LocalCluster, or "
    "DASK_DISTRIBUTED__WORKER__DAEMON=False for `dask worker`)"
)


class RefusingExecutor(Executor):
    """Fails every task with the reason procpool could not run this worker's tasks: loud, where
    a silent fall-back to threads would lose the isolation the preload was asked for."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        fut.set_exception(RuntimeError(self.reason))
        return fut


def pool_options(nthreads: int) -> dict[str, Any]:
    """The executor's options: Dask's ``procpool`` config section, '-' read as '_', with
    ``max_workers`` defaulting to the worker's ``nthreads``."""
    section = dask.config.get("procpool", default=None) or {}
    if not isinstance(section, dict):
        raise ValueError(f"the Dask config 'procpool' must be a mapping of options, got {section!r}")
    options = {str(k).replace("-", "_"): v for k, v in section.items()}
    options.setdefault("max_workers", nthreads)
    return options


def make_executor(nthreads: int) -> Executor:
    """The executor a Dask worker runs its tasks on: procpool's, or a refusing one that says
    why procpool cannot run here."""
    if multiprocessing.current_process().daemon:
        return RefusingExecutor(DAEMONIC)
    try:
        return ProcessPoolExecutor(**pool_options(nthreads))
    except (TypeError, ValueError) as exc:
        return RefusingExecutor(f"procpool.dask: bad options in the Dask config 'procpool': {exc}")


def dask_setup(worker: Any) -> None:
    """Preload hook (run in the worker when it starts): tasks run on procpool from now on. The
    worker shuts the executor down when it closes, with its other executors."""
    executor = make_executor(worker.state.nthreads)
    if isinstance(executor, RefusingExecutor):
        logger.error("%s", executor.reason)
    old = worker.executors.get("default")
    worker.executors["default"] = executor
    # The thread pool it replaces has run nothing yet; an executor also registered under
    # another name (the "offload" one) is not ours to stop.
    if old is not None and not any(old is e for e in worker.executors.values()):
        old.shutdown(wait=False)
