"""Concurrency management (issue 3 §2): busy workers that block, or that keep the CPU past
the CPU-intensive threshold, stop counting as running, and only then does the pool start
workers beyond its concurrency target. Real processes; facts proved with files and counters,
never with timings."""

from __future__ import annotations

import os
import time

import pytest
import tasks
from conftest import wait_until

import procpool
from procpool import workqueue as wqmod


def test_blocked_workers_get_company_and_cpu_item_runs_meanwhile(tmp_path):
    release = tmp_path / "release"
    marks = [tmp_path / f"mark{i}" for i in range(4)]
    with procpool.WorkerPool(1, 8, concurrency=1) as pool:
        blockers = [pool.submit(tasks.touch_and_wait, str(m), str(release)) for m in marks]
        cpu_done = tmp_path / "cpu_done"
        cpu = pool.submit(tasks.burn_cpu, 0.05, str(cpu_done))
        # The CPU item finishes while every blocker still waits for the release file: the
        # pool started workers for it although one busy worker already met the target.
        cpu.result(timeout=30)
        assert cpu_done.exists() and not release.exists()
        wait_until(lambda: all(m.exists() for m in marks), what="every blocker running")
        assert not any(f.done() for f in blockers)
        s = pool.stats()
        assert s.concurrency == 1
        assert s.created >= 5 and s.nr_workers <= 8
        assert s.cm_wakeups > 0
        release.touch()
        pids = {f.result(timeout=30) for f in blockers}
        assert len(pids) == 4  # each blocker had a worker of its own


def test_cpu_burning_items_are_marked_cpu_intensive():
    with procpool.WorkerPool(1, 8, concurrency=1, cpu_intensive_threshold=0.01) as pool:
        futs = [pool.submit(tasks.burn_cpu, 0.2) for _ in range(6)]
        assert all(f.result(timeout=60) >= 0.2 for f in futs)
        s = pool.stats()
        assert s.cpu_intensive > 0
        assert s.cm_samples > 0
        assert s.nr_workers <= 8


def test_no_sampling_when_no_work_waits(tmp_path):
    with procpool.WorkerPool(2, 4, concurrency=1) as pool:
        # One item at a time always finds an idle worker (once the two have started: before,
        # an item waits for them): nothing ever waits, so nothing is sampled.
        wait_until(lambda: pool.stats().nr_idle == 2, timeout=30, what="two idle workers")
        samples = pool.stats().cm_samples
        for i in range(20):
            assert pool.submit(tasks.square, i).result(timeout=30) == i * i
        assert pool.stats().cm_samples == samples
        # Work that waits is sampled ...
        release = tmp_path / "release"
        futs = [pool.submit(tasks.wait_for_file, str(release), i) for i in range(4)]
        wait_until(lambda: pool.stats().cm_samples > samples, what="sampling while work waits")
        release.touch()
        assert [f.result(timeout=30) for f in futs] == list(range(4))
        # ... and sampling stops once nothing waits.
        before = pool.stats()
        assert before.nr_pending == 0
        time.sleep(0.2)
        assert pool.stats().cm_samples == before.cm_samples


def test_concurrency_defaults_and_validation():
    with procpool.WorkerPool(0, 2) as pool:
        assert pool.concurrency == len(os.sched_getaffinity(0))
        assert pool.cpu_intensive_threshold == pytest.approx(0.010)
    cpu = min(os.sched_getaffinity(0))
    with procpool.WorkerPool(0, 2, cpus={cpu}) as pool:
        assert pool.concurrency == 1
    for bad in (0, -1):
        with pytest.raises(ValueError):
            procpool.WorkerPool(0, 2, concurrency=bad)
    with pytest.raises(TypeError):
        procpool.WorkerPool(0, 2, concurrency=1.5)
    with pytest.raises(ValueError):
        procpool.WorkerPool(0, 2, cpu_intensive_threshold=-1)


def test_workqueue_pools_have_generous_worker_limits():
    ncpu = len(os.sched_getaffinity(0))
    assert wqmod.default_max_workers(None) == max(32, 4 * ncpu)
    assert wqmod.default_max_workers(frozenset({0})) == 32
    with procpool.Workqueue("cmtest", nice=3) as wq:
        assert wq.pool.max_workers == max(32, 4 * ncpu)
        assert wq.pool.concurrency == ncpu
        assert wq.queue(tasks.square, 3).result(timeout=30) == 9
        s = wq.stats()
        assert s.cm_wakeups == wq.pool.stats().cm_wakeups
