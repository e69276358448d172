"""The races DESIGN.md lists, made to happen on purpose."""

from __future__ import annotations

import os
import signal
import threading
import time

import tasks
from conftest import alive, live_titles, named_workers, started_workers, title_of, wait_until

import procpool
from procpool.idtable import IdTable


def test_idle_cull_racing_new_work_loses_nothing():
    # Workers go idle and are culled (timeout 10 ms) while bursts keep arriving: an idle worker
    # is either handed an item or destroyed, never both, and no item is dropped in between.
    # Each item holds its worker 50 ms (a fault point, not a sleep in the test), so a burst
    # of 6 keeps work waiting and the pool grows past the 2 idle workers it keeps. After every
    # other burst the test waits for the pool to drain, then sends the next burst 0-20 ms
    # later: around the idle timeout, so it lands before, during or after a cull. Bursts go
    # on until culls did happen among them, however late the machine runs the arbiter.
    with procpool.WorkerPool(min_workers=0, max_workers=4, idle_timeout=0.01, faults="worker.busy=delay:0.05") as pool:
        futs = []
        deadline = time.monotonic() + 90
        burst = 0
        while burst < 12 or pool.stats().destroyed < 2:
            assert time.monotonic() < deadline, f"no idle worker culled in {burst} bursts: {pool.stats()}"
            futs += [pool.submit(tasks.identity, (burst, i)) for i in range(6)]
            if burst % 2:
                [f.result(timeout=60) for f in futs[-12:]]
                time.sleep(0.005 * (burst % 5))  # pacing the next burst, not waiting for a fact
            burst += 1
        assert [f.result(timeout=60) for f in futs] == [(b, i) for b in range(burst) for i in range(6)]
        st = pool.stats()
        assert st.lost == 0 and st.items_done == 6 * burst
        assert st.created == st.destroyed + st.lost + st.nr_workers  # the books add up


def test_completion_completes_exactly_once_while_workers_die_during_teardown():
    # Teardown of 6 workers while two of them are SIGKILLed mid-exit: the parent detaches the
    # dead on their behalf; one completion, no more. The two victims are held in their exit
    # path (renamed dying, before the attach lock) far longer than the test needs, and are
    # killed only once the teardown has installed its completion: so the completion is
    # certainly waited for, and someone (a survivor or the parent freeing a victim's id) must
    # complete it, once.
    hold = ",".join(f"detach.before_lock@{i}=delay:60" for i in (0, 1))
    pool = procpool.WorkerPool(min_workers=6, max_workers=6, faults=f"detach.before_lock=delay:0.3,{hold}")
    pids = [w.pid for w in started_workers(pool)]
    victims = [w.pid for w in pool.workers() if w.id in (0, 1)]
    table = IdTable.attach(pool.table_name, writable=False)
    errors: list[BaseException] = []

    def kill_two():
        try:
            wait_until(lambda: completion_installed(table), timeout=60, what="the detach completion installed")
            wait_until(lambda: all(title_of(p) == "kworker/dying" for p in victims), what="victims in their exit path")
        except BaseException as e:  # noqa: BLE001 - reported by the test thread; the victims die regardless
            errors.append(e)
        finally:
            for p in victims:
                os.kill(p, signal.SIGKILL)

    t = threading.Thread(target=kill_two)
    t.start()
    try:
        pool.close()
    finally:
        t.join()
        table.close()
    assert not errors, errors
    assert pool.completions == 1
    assert not any(alive(p) for p in pids)


def completion_installed(table: IdTable) -> bool:
    """Read from the pool's id table in /dev/shm: does a teardown wait on the detach completion?"""
    return bool(table.completion_waiting)


def test_close_wait_false_returns_at_once_and_finishes_in_the_background():
    # Worker 0 stays alive 3 s after detaching: a close(wait=False) that waited for it would
    # take that long, far beyond what returning "at once" takes even on a loaded machine.
    pool = procpool.WorkerPool(min_workers=2, max_workers=2, faults="detach.after@0=delay:3")
    pids = [w.pid for w in pool.workers()]
    pool.close(wait=False)
    assert any(alive(p) for p in pids)  # returned before the workers could finish exiting
    pool.close()  # a second close waits for the first teardown
    assert not any(alive(p) for p in pids)


def test_id_reuse_while_dying_under_churn_never_shows_two_equal_titles(tmp_path):
    # Dying workers linger after freeing their ids; new ones take those ids at once. Each
    # round's second batch is three items that wait for a file, so three new workers certainly
    # exist at once (however fast a worker could have taken two short items), while the three
    # just destroyed may still linger.
    with procpool.WorkerPool(min_workers=0, max_workers=3, linger_dying=0.3) as pool:
        table = IdTable.attach(pool.table_name, writable=False)
        try:
            for round_ in range(6):
                [f.result(timeout=30) for f in [pool.submit(tasks.sleep_then, 0.02) for _ in range(3)]]
                pool.destroy_idle(3)
                wait_until(lambda: table.nr_allocated() == 0, what="all detached")
                release = tmp_path / f"release-{round_}"
                futs = [pool.submit(tasks.wait_for_file, str(release), i) for i in range(3)]
                wait_until(lambda: pool.stats().nr_busy == 3, timeout=30, what="three busy workers")
                # A worker names itself after its fork, asynchronously to the pool (which may
                # have handed it its item already): wait for the names, then compare them.
                wait_until(lambda: named_workers(pool) >= 3, what="the workers named")
                titles = [t for t in live_titles(pool).values() if t != "kworker/dying"]
                assert len(titles) == len(set(titles)), titles
                assert {s.id for s in table.slots() if s.state_name != "free"} == set(range(3))
                release.touch()
                assert [f.result(timeout=30) for f in futs] == [0, 1, 2]
                assert pool.destroy_idle(3) == 3  # each went idle before its result was set
        finally:
            table.close()
