"""Workqueue pools: attributes (nice, CPU affinity) seen with psutil and validated, equal
attributes share one refcounted pool, apply_attrs moves new items and releases the old pool."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest
import tasks
from conftest import alive, wait_until

import procpool
from procpool import workqueue as wqmod


def test_pool_attributes_nice_and_affinity():
    base = psutil.Process().nice()
    cpu = min(os.sched_getaffinity(0))
    with procpool.WorkerPool(1, 1, nice=3, cpus={cpu}) as pool:
        pid = pool.submit(tasks.whoami).result(10)
        assert psutil.Process(pid).nice() == min(19, base + 3)
        assert psutil.Process(pid).cpu_affinity() == [cpu]
    with procpool.Workqueue("attrs", nice=5, cpus={cpu}) as wq:
        pid = wq.queue(tasks.whoami).result(10)
        assert psutil.Process(pid).nice() == min(19, base + 5)
        assert psutil.Process(pid).cpu_affinity() == [cpu]


def test_pool_attributes_validated():
    with pytest.raises(ValueError, match="4096"):
        procpool.WorkerPool(0, 1, cpus={0, 4096})
    with pytest.raises(ValueError, match="empty"):
        procpool.WorkerPool(0, 1, cpus=set())
    with pytest.raises(ValueError, match="nice"):
        procpool.WorkerPool(0, 1, nice=40)
    with pytest.raises(TypeError):
        procpool.Workqueue("x", nice=1.5)
    assert not wqmod.live_pools()


def test_equal_attributes_share_one_pool():
    cpu = min(os.sched_getaffinity(0))
    a = procpool.Workqueue("a")
    b = procpool.Workqueue("b", max_active=1)
    c = procpool.Workqueue("c", nice=2)
    d = procpool.Workqueue("d", cpus={cpu})
    try:
        assert a.pool is b.pool
        assert len({id(a.pool), id(c.pool), id(d.pool)}) == 3
        assert a.queue(tasks.square, 2).result(10) == 4
        a.destroy()
        assert not a.pool.closed  # b still uses it
        assert b.queue(tasks.square, 3).result(10) == 9
    finally:
        for wq in (a, b, c, d):
            wq.destroy()
    for wq in (a, b, c, d):
        assert wq.pool.closed
    assert not wqmod.live_pools()


def test_apply_attrs_moves_new_items_and_releases_the_old_pool(tmp_path):
    base = psutil.Process().nice()
    cpu = min(os.sched_getaffinity(0))
    mark, release = str(tmp_path / "mark"), str(tmp_path / "release")
    with procpool.Workqueue("moving", ordered=True) as wq:
        old = wq.pool
        running = wq.queue(tasks.touch_and_wait, mark, release)
        waiting = wq.queue(tasks.whoami)  # queued before apply_attrs, not yet handed to a pool
        wait_until(lambda: os.path.exists(mark), what="item running")
        (old_worker,) = [w.pid for w in old.workers()]
        wq.apply_attrs(nice=4, cpus={cpu})
        new = wq.pool
        assert new is not old and (0, None) in wqmod.live_pools() and (4, frozenset({cpu})) in wqmod.live_pools()
        # The old pool keeps its reference while our item runs there.
        assert not old.closed
        assert psutil.Process(old_worker).is_running()
        Path(release).touch()
        assert running.result(10) == old_worker
        for pid in (waiting.result(10), wq.queue(tasks.whoami).result(10)):
            assert pid != old_worker
            assert psutil.Process(pid).nice() == min(19, base + 4)
            assert psutil.Process(pid).cpu_affinity() == [cpu]
        # Its last item finished: the reference is dropped, the pool closes, its workers exit.
        wait_until(lambda: old.closed, what="old pool closed")
        wait_until(lambda: not alive(old_worker), what="old worker gone")
        assert (0, None) not in wqmod.live_pools()
        wq.apply_attrs(nice=4, cpus={cpu})  # the same attributes: nothing changes
        assert wq.pool is new
    assert new.closed
    assert not wqmod.live_pools()
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.apply_attrs(nice=1)


def test_apply_attrs_keeps_a_pool_other_workqueues_use():
    a = procpool.Workqueue("mover")
    b = procpool.Workqueue("stayer")
    try:
        old = a.pool
        assert b.pool is old
        assert a.queue(tasks.square, 3).result(10) == 9
        a.apply_attrs(nice=2)  # nothing of a's in flight: the reference is dropped at once
        assert a.pool is not old
        assert a.queue(tasks.square, 4).result(10) == 16
        assert not old.closed  # b still uses it
        assert b.queue(tasks.square, 5).result(10) == 25
        niced = a.pool
        a.apply_attrs()  # back to the shared pool
        assert a.pool is old
        wait_until(lambda: (2, None) not in wqmod.live_pools(), what="nice=2 pool released")
        wait_until(lambda: niced.closed, what="nice=2 pool closed")  # torn down off this thread
    finally:
        a.destroy()
        b.destroy()
    assert old.closed
    assert not wqmod.live_pools()


def test_apply_attrs_while_items_run_loses_nothing():
    with procpool.Workqueue("flipping", max_active=4) as wq:
        works = [wq.queue(tasks.sleep_then, 0.005, i) for i in range(60)]
        used = [wq.pool]
        for n in range(12):
            wq.apply_attrs(nice=n % 3)
            used.append(wq.pool)
            time.sleep(0.01)
        assert [w.result(20) for w in works] == list(range(60))
        wait_until(lambda: set(wqmod.live_pools()) == {wq.pool_key}, what="only the current pool referenced")
        wait_until(lambda: wqmod.live_pools()[wq.pool_key] == 1, what="one reference on the current pool")
    assert not wqmod.live_pools()
    for pool in used:  # the replaced ones close on teardown threads of their own
        wait_until(lambda p=pool: p.closed, what=f"pool u{pool.id} closed")
