"""The races DESIGN.md lists, made to happen on purpose."""

from __future__ import annotations

import os
import signal
import threading
import time

import tasks
from conftest import alive, live_titles, wait_until

import procpool
from procpool.idtable import IdTable


def test_idle_cull_racing_new_work_loses_nothing():
    # Workers go idle and are culled (timeout 10 ms) while bursts keep arriving: an idle worker
    # is either handed an item or destroyed, never both, and no item is dropped in between.
    with procpool.WorkerPool(min_workers=0, max_workers=4, idle_timeout=0.01) as pool:
        futs = []
        for burst in range(15):
            futs += [pool.submit(tasks.identity, (burst, i)) for i in range(6)]
            time.sleep(0.015 * (burst % 3))
        assert [f.result(timeout=20) for f in futs] == [(b, i) for b in range(15) for i in range(6)]
        st = pool.stats()
        assert st.destroyed > 0 and st.lost == 0
        assert st.created - st.destroyed == st.nr_workers


def test_completion_completes_exactly_once_while_workers_die_during_teardown():
    # Teardown of 6 workers, each delayed in its exit path, while two of them are SIGKILLed
    # mid-exit: the parent detaches the dead on their behalf; one completion, no more.
    pool = procpool.WorkerPool(min_workers=6, max_workers=6, faults="detach.before_lock=delay:0.3")
    pids = [w.pid for w in pool.workers()]

    def kill_two():
        wait_until(lambda: sum(1 for p in pids if alive(p)) == 6)
        time.sleep(0.1)
        for p in pids[:2]:
            os.kill(p, signal.SIGKILL)

    t = threading.Thread(target=kill_two)
    t.start()
    pool.close()
    t.join()
    assert pool.completions == 1
    assert not any(alive(p) for p in pids)


def test_close_wait_false_returns_at_once_and_finishes_in_the_background():
    pool = procpool.WorkerPool(min_workers=2, max_workers=2, faults="detach.after=delay:0.5")
    pids = [w.pid for w in pool.workers()]
    pool.close(wait=False)
    assert any(alive(p) for p in pids)  # returned before the workers could finish exiting
    pool.close()  # a second close waits for the first teardown
    assert not any(alive(p) for p in pids)


def test_id_reuse_while_dying_under_churn_never_shows_two_equal_titles():
    # Dying workers linger after freeing their ids; new ones take those ids at once.
    with procpool.WorkerPool(min_workers=0, max_workers=3, linger_dying=0.3) as pool:
        table = IdTable.attach(pool.table_name, writable=False)
        try:
            for _ in range(6):
                [f.result(timeout=10) for f in [pool.submit(tasks.sleep_then, 0.02) for _ in range(3)]]
                pool.destroy_idle(3)
                wait_until(lambda: table.nr_allocated() == 0, what="all detached")
                [f.result(timeout=10) for f in [pool.submit(tasks.sleep_then, 0.02) for _ in range(3)]]
                titles = [t for t in live_titles(pool).values() if t != "kworker/dying"]
                assert len(titles) == len(set(titles))
                assert {s.id for s in table.slots() if s.state_name != "free"} == set(range(3))
                pool.destroy_idle(3)
        finally:
            table.close()
