"""Workqueue statistics (issue 3 §4): per workqueue, in the kernel's wq_monitor terms, reachable
from Python and, through the program's workqueue segment in /dev/shm, from ``procpool ps`` in
another process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import tasks
from conftest import wait_until

import procpool

PS = [sys.executable, "-m", "procpool.cli", "ps"]


def _ps_json() -> list[dict]:
    """The pools ``procpool ps --json`` lists, run as a separate process: what an observer
    outside sees."""
    out = subprocess.run([*PS, "--json"], capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)["pools"]


def _published(name: str) -> dict | None:
    for pool in _ps_json():
        if pool["owner_pid"] != os.getpid():
            continue
        for e in pool["workqueues"]:
            if e["name"] == name:
                return e
    return None


def test_cpu_time_is_counted_per_workqueue_and_seen_by_ps():
    with procpool.Workqueue("st-burn") as burn, procpool.Workqueue("st-idle") as idle:
        assert burn.pool is idle.pool  # shared pool, separate accounts
        works = [burn.queue(tasks.burn_cpu, 0.1) for _ in range(3)]
        naps = [idle.queue(tasks.sleep_then, 0.1, i) for i in range(3)]
        burnt = sum(w.result(timeout=60) for w in works)
        assert [w.result(timeout=60) for w in naps] == [0, 1, 2]
        s, t = burn.stats(), idle.stats()
        # The worker measures each call's CPU time: at least what the function burnt, and
        # not the other workqueue's sleeping items.
        assert burnt <= s.cpu_time < burnt + 0.5
        assert t.cpu_time < 0.1
        assert (s.started, s.in_flight, s.completed) == (3, 0, 3)
        assert burn.pool.stats().cpu_time >= s.cpu_time + t.cpu_time - 1e-9

        def seen() -> bool:
            e = _published("st-burn")
            return e is not None and e["started"] == 3 and e["in_flight"] == 0 and e["cpu_time"] >= burnt

        wait_until(seen, timeout=20, what="ps showing st-burn's numbers")
        e = _published("st-burn")
        assert e["pools"] == [burn.pool.id] and e["max_active"] == burn.max_active
        table = subprocess.run(PS, capture_output=True, text=True, timeout=60, check=True).stdout
        # Another program (a second suite running at once) may have an st-burn of its own.
        row = next(
            cells
            for cells in (line.split() for line in table.splitlines())
            if cells[:2] == ["st-burn", str(os.getpid())]
        )
        header = next(line.split() for line in table.splitlines() if line.startswith("WORKQUEUE"))
        cells = dict(zip(header, row, strict=True))
        assert cells["TOTAL"] == "3" and cells["INFL"] == "0" and float(cells["CPUTIME"]) >= burnt - 0.01
        assert cells["MAYDAY"] == "-"  # no rescuer
    assert _published("st-burn") is None  # destroyed: gone from the segment


def test_in_flight_is_published_while_items_run(tmp_path):
    release = tmp_path / "release"
    with procpool.Workqueue("st-infl", max_active=2) as wq:
        works = [wq.queue(tasks.wait_for_file, str(release), i) for i in range(5)]
        wait_until(
            lambda: (e := _published("st-infl")) is not None and e["in_flight"] == 2 and e["pending"] == 3,
            timeout=20,
            what="ps showing 2 in flight, 3 pending",
        )
        release.touch()
        assert [w.result(timeout=30) for w in works] == list(range(5))


def test_cpu_intensive_marks_go_to_the_workqueue_whose_item_burnt(tmp_path):
    # Concurrency target 1 on a pool of its own attributes (nice 2): the burning items keep
    # work waiting, so the pool samples its busy workers and marks them. The cold items wait
    # asleep in the kernel (a FIFO, not a polling loop: on a loaded machine a poller sits
    # runnable long enough to collect 10 ms of CPU between two samples, and is rightly marked).
    release = tmp_path / "release"
    os.mkfifo(release)
    with procpool.Workqueue("st-hot", nice=2) as hot, procpool.Workqueue("st-cold", nice=2) as cold:
        hot.pool.concurrency = 1
        try:
            sleepers = [cold.queue(tasks.wait_for_fifo, str(release), i) for i in range(2)]
            burners = [hot.queue(tasks.burn_cpu, 0.2) for _ in range(4)]
            assert all(w.result(timeout=60) >= 0.2 for w in burners)
        finally:
            writer = os.open(release, os.O_RDWR)  # a write end that never blocks, kept open
            os.write(writer, b"x")
        try:
            assert [w.result(timeout=60) for w in sleepers] == [0, 1]
        finally:
            os.close(writer)
        h, c = hot.stats(), cold.stats()
        assert h.cpu_intensive > 0
        assert c.cpu_intensive == 0
        assert h.cm_wakeups + c.cm_wakeups <= hot.pool.stats().cm_wakeups


def _worker_cpu(pool: procpool.WorkerPool) -> float:
    import psutil

    return sum(sum(psutil.Process(w.pid).cpu_times()[:2]) for w in pool.workers())


def test_cpu_time_of_short_items_is_what_the_worker_spent():
    # Short items are charged their wall time between two readings of the CPU clock, the
    # reading item the rest: the total still matches what the worker process spent (as the
    # kernel counts it, in 10 ms ticks), for items that compute and for items that sleep.
    with procpool.WorkerPool(1, 1, spin=0) as pool:
        assert pool.submit(tasks.square, 2).result(timeout=10) == 4
        for fn, arg in ((tasks.burn_cpu, 0.0004), (tasks.sleep_then, 0.0003)):
            before, reported = _worker_cpu(pool), pool.stats().cpu_time
            for f in [pool.submit(fn, arg) for _ in range(400)]:
                f.result(timeout=30)
            spent = _worker_cpu(pool) - before
            reported = pool.stats().cpu_time - reported
            # A sleeping item charged its wall time would add 400 x 0.3 ms = 0.12 s here.
            assert 0.8 * spent - 0.03 <= reported <= spent + 0.03, (fn.__name__, reported, spent)
