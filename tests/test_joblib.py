"""The joblib backend: real joblib.Parallel calls on procpool workers, observed from outside."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import psutil
import pytest
from conftest import wait_until
from joblib import Parallel, delayed, parallel_config

import procpool.joblib
from procpool import WorkerLost


@pytest.fixture(autouse=True)
def _fresh_executors():
    yield
    procpool.joblib.shutdown_executors()


def pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def square(x: int) -> int:
    return x * x


def fail_at_once() -> None:
    raise ValueError("the first item fails")


def mark_then_wait(mark_dir: str, i: int, release: str) -> int:
    open(os.path.join(mark_dir, str(i)), "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return i


def crash_if(crash: bool, x: int) -> int:
    if crash:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def _kept() -> list:
    return list(procpool.joblib._executors.values())


def test_parallel_config_runs_on_procpool_workers():
    """parallel_config(backend="procpool") runs the calls in kworker-titled processes, and
    joblib's auto-batching packs many short calls into few pool items."""
    with parallel_config(backend="procpool", n_jobs=2):
        out = Parallel()(delayed(pid_and_square)(i) for i in range(20))
        assert [v for _, v in out] == [i * i for i in range(20)]
        pids = {pid for pid, _ in out}
        assert os.getpid() not in pids
        titles = {" ".join(psutil.Process(p).cmdline()) for p in pids}
        assert all(t.startswith("kworker/u") for t in titles), titles
        (ex,) = _kept()
        before = ex.pool.stats().items_done
        n = 3000
        assert Parallel(batch_size="auto")(delayed(square)(i) for i in range(n)) == [i * i for i in range(n)]
        assert _kept() == [ex]  # the same executor, kept between calls
        items = ex.pool.stats().items_done - before
        assert items < n / 4, f"{n} calls took {items} pool items: not batched"


def test_generator_and_timeout(tmp_path):
    with parallel_config(backend="procpool", n_jobs=2):
        gen = Parallel(return_as="generator")(delayed(square)(i) for i in range(10))
        assert not isinstance(gen, list)
        assert list(gen) == [i * i for i in range(10)]
        release = str(tmp_path / "release")
        started = time.monotonic()
        try:
            with pytest.raises(multiprocessing.TimeoutError):  # what joblib raises
                Parallel(timeout=0.3)(delayed(mark_then_wait)(str(tmp_path), i, release) for i in range(4))
        finally:
            open(release, "w").close()
        assert time.monotonic() - started < 20
        # Still usable after the timeout.
        assert Parallel()(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]


def test_first_error_cancels_what_has_not_started(tmp_path):
    """The first item fails while the others wait on a file: joblib aborts, and of the 20
    queued calls only those a worker had already taken ever run."""
    release = str(tmp_path / "release")
    marks = tmp_path / "marks"
    marks.mkdir()
    calls = [delayed(fail_at_once)()] + [delayed(mark_then_wait)(str(marks), i, release) for i in range(20)]
    with parallel_config(backend="procpool", n_jobs=2):
        with pytest.raises(ValueError, match="the first item fails"):
            Parallel(batch_size=1, pre_dispatch="all")(calls)
        open(release, "w").close()
        (ex,) = _kept()
        wait_until(lambda: ex.pool.stats().nr_busy == 0 and ex.pool.stats().nr_pending == 0, what="pool idle")
    ran = os.listdir(marks)
    assert len(ran) <= 2, f"calls ran after the abort: {sorted(ran)}"


def test_crashed_worker_fails_its_task_and_the_next_call_works():
    with parallel_config(backend="procpool", n_jobs=2):
        with pytest.raises(WorkerLost) as info:
            Parallel(batch_size=1)(delayed(crash_if)(i == 3, i) for i in range(8))
        assert "SIGKILL" in str(info.value) or "signal 9" in str(info.value), str(info.value)
        (ex,) = _kept()
        assert Parallel(batch_size=1)(delayed(crash_if)(False, i) for i in range(8)) == list(range(8))
        assert _kept() == [ex]  # not broken, not replaced
        assert ex.pool.stats().lost == 1


def test_n_jobs():
    backend = procpool.joblib.ProcpoolBackend()
    assert backend.effective_n_jobs(-1) == len(os.sched_getaffinity(0))
    assert backend.effective_n_jobs(3) == 3
    with pytest.raises(ValueError, match="n_jobs == 0"):
        backend.effective_n_jobs(0)
    # n_jobs=1 runs in this process, as every joblib process backend does.
    with parallel_config(backend="procpool", n_jobs=1):
        assert Parallel()(delayed(os.getpid)() for _ in range(2)) == [os.getpid()] * 2
    assert _kept() == []
