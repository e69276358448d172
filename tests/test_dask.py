"""procpool and dask.distributed, against a real cluster on localhost: LocalCluster with
processes=True (scheduler in this process's event loop thread, each Dask worker a process of
its own under a Nanny), no dashboard. Both paths: the procpool.dask preload (tasks run in
procpool workers inside each Dask worker) and a Workqueue over the cluster's executor."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import time

import dask
import psutil
import pytest
from conftest import wait_until
from distributed import Client, LocalCluster

from procpool import WorkerLost, Workqueue

#: Every wait on the cluster ends: a Dask future that does not come back fails the test.
WAIT = 60


def segfault() -> None:
    ctypes.string_at(0)


def kill_me() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def square(x: int) -> int:
    return x * x


def pid_when_file(path: str) -> int:
    deadline = time.monotonic() + WAIT
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "the test never released the task"
        time.sleep(0.01)
    return os.getpid()


def cluster(**kwargs) -> LocalCluster:
    return LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0", **kwargs)


def dask_worker_pid(client: Client) -> int:
    (pid,) = client.run(os.getpid).values()
    return pid


def kworkers_under(pid: int) -> dict[int, str]:
    out = {}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            title = " ".join(p.cmdline()).strip()
        except psutil.Error:
            continue
        if re.fullmatch(r"kworker/u\d+:\d+", title):
            out[p.pid] = title
    return out


def test_preload_runs_tasks_in_procpool_workers(tmp_path):
    """Tasks run in kworker-titled procpool processes under the Dask worker; the config's
    procpool section reaches the pool; a segfaulting task fails only itself (WorkerLost), a
    task running beside it finishes, and the Dask worker lives on and runs the next tasks."""
    config = {"distributed.worker.daemon": False, "procpool": {"max-tasks-per-child": 2}}
    with dask.config.set(config), cluster(preload=["procpool.dask"]) as c, Client(c) as client:
        dask_pid = dask_worker_pid(client)
        release = str(tmp_path / "release")
        held = client.submit(pid_when_file, release, pure=False)
        titled = wait_until(lambda: kworkers_under(dask_pid), timeout=WAIT, what="a kworker under the Dask worker")
        crash = client.submit(segfault, pure=False)
        with pytest.raises(WorkerLost, match="SIGSEGV"):
            crash.result(WAIT)
        open(release, "w").close()
        task_pid = held.result(WAIT)
        assert task_pid in titled and task_pid != dask_pid
        assert dask_worker_pid(client) == dask_pid  # the Dask worker survived
        assert client.submit(square, 7, pure=False).result(WAIT) == 49
        # max-tasks-per-child 2 from Dask's config: 6 tasks one after another, no process
        # runs more than 2 of them.
        pids = [client.submit(os.getpid, pure=False).result(WAIT) for _ in range(6)]
        assert max(pids.count(p) for p in pids) <= 2 and dask_pid not in pids
    wait_until(lambda: not psutil.pid_exists(dask_pid), timeout=WAIT, what="the Dask worker gone")


def test_daemonic_worker_says_what_to_change():
    """Under a daemonic Dask worker procpool cannot start; tasks fail naming the Dask config
    that fixes it, rather than running in threads unisolated."""
    config = {"distributed.worker.daemon": True}
    with dask.config.set(config), cluster(preload=["procpool.dask"]) as c, Client(c) as client:
        with pytest.raises(RuntimeError, match=r"distributed\.worker\.daemon to False"):
            client.submit(square, 3, pure=False).result(WAIT)


def test_workqueue_over_the_cluster():
    """A Workqueue on client.get_executor(): max_active and delayed work are the workqueue's;
    with the preload, the item that kills its own process fails alone."""
    config = {"distributed.worker.daemon": False}
    with dask.config.set(config), cluster(preload=["procpool.dask"]) as c, Client(c) as client:
        dask_pid = dask_worker_pid(client)
        with Workqueue("on-dask", executor=client.get_executor(pure=False), max_active=2) as wq:
            works = [wq.queue(square, i) for i in range(10)]
            killed = wq.queue(kill_me)
            works += [wq.queue(square, i) for i in range(10, 20)]
            t0 = time.time()
            delayed = wq.queue_delayed(0.3, time.time)
            assert wq.drain(timeout=WAIT)
            assert [w.result() for w in works] == [i * i for i in range(20)]
            assert isinstance(killed.exception(), WorkerLost)
            assert delayed.result() >= t0 + 0.3
            st = wq.stats()
            assert (st.started, st.completed, st.in_flight) == (22, 22, 0)
            assert st.max_in_flight == 2
        assert dask_worker_pid(client) == dask_pid
