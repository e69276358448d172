"""Nothing hangs: the arbiter contains its handlers' failures, the Manager and the spawner are
replaced when they die, creation failures never kill anything, and close() always ends.

Each test bounds every wait and ends with the books of the closed pool adding up
(created == destroyed + lost) and, through the autouse fixture, nothing left behind.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time

import pytest
import tasks
from conftest import alive, assert_books_add_up, assert_program_left_nothing, run_bounded, run_program, wait_until

import procpool
from procpool import faults

#: How long a close() may take in these tests before it counts as a hang.
CLOSE_BOUND = 20.0


def close_within(pool, bound: float = CLOSE_BOUND, **kwargs) -> None:
    """pool.close(**kwargs), failing the test if it is still running after ``bound`` seconds."""
    run_bounded(lambda: pool.close(**kwargs), bound, f"close({kwargs})")


def ended_with_named_error(fut, *allowed: type[BaseException]) -> BaseException:
    exc = fut.exception(timeout=CLOSE_BOUND)
    assert isinstance(exc, allowed), repr(exc)
    return exc


def busy_pid(pool) -> int:
    return wait_until(lambda: next((w.pid for w in pool.workers() if w.state == "busy"), None), what="a busy worker")


# -- trigger 1: a map whose items crash their workers ---------------------------------------------


def test_map_over_crashing_items_then_shutdown_ends():
    ex = procpool.ProcessPoolExecutor(2)
    it = ex.map(tasks.exit_hard, [7] * 4)
    with pytest.raises(procpool.WorkerLost, match="exited with status 7"):
        list(it)
    # The generator cancelled what had not started; those items stay in the worklist until a
    # worker takes them off. A closing pool must not make that worker an idle one to wait for.
    close_within(ex.pool)
    assert_books_add_up(ex.pool.stats())


# -- trigger 2: the spawner SIGKILLed while short items stream -------------------------------------

SPAWNER_KILL = """
import json, os, signal, sys, time, procpool, tasks
from procpool import spawner
rounds, ended, named = 3, 0, 0
for r in range(rounds):
    pool = procpool.WorkerPool(min_workers=4, max_workers=4)
    futs = [pool.submit(tasks.sleep_then, 0.001, i) for i in range(300)]
    while sum(f.done() for f in futs) < 50:
        time.sleep(0.001)
    os.kill(spawner.spawner_pid(), signal.SIGKILL)  # every worker's status pipe closes at once
    for i, f in enumerate(futs):
        exc = f.exception(timeout=30)
        if exc is None:
            assert f.result() == i
        else:
            assert isinstance(exc, procpool.WorkerLost), repr(exc)
            named += 1
        ended += 1
    pool.close()
    st = pool.stats()
    assert st.created == st.destroyed + st.lost and st.nr_workers == st.nr_dying == 0, st
print(json.dumps({"ended": ended, "named": named, "items": 300 * rounds}))
"""


def test_spawner_killed_while_short_items_stream():
    # Workers' exits and their last results arrive in the same select() batch, in either order.
    proc, token = run_program(SPAWNER_KILL)
    assert proc.returncode == 0, proc.err
    counts = json.loads(proc.out)
    assert counts["ended"] == counts["items"]
    assert_program_left_nothing(proc, token)


# -- trigger 3: the Manager SIGKILLed, then the pool must grow and loses a worker --------------------

#: The end of the Manager-kill programs: close the pool, report its books as one JSON line.
CLOSE_AND_REPORT = """
t0 = time.monotonic()
pool.close()
st = pool.stats()
print(json.dumps({"created": st.created, "destroyed": st.destroyed, "lost": st.lost, "dying": st.nr_dying,
                  "replaced": pool.manager_locks.replaced, "completions": pool.completions,
                  "close_s": time.monotonic() - t0, "first": first}))
"""

MANAGER_KILL = """
import json, os, signal, time, psutil, procpool, tasks
from conftest import alive, wait_until
pool = procpool.WorkerPool(min_workers=1, max_workers=4, idle_timeout=60)
assert pool.submit(tasks.square, 3).result(timeout=10) == 9
pool.manager_locks  # made (the Manager started) behind the constructor
old = procpool.manager.server_pid()
first = [w.pid for w in pool.workers()]
os.kill(old, signal.SIGKILL)
wait_until(lambda: not alive(old))  # gone, or a zombie (reaped by the spawner at any moment)
# Growing needs the Manager: ids are allocated under its locks.
futs = [pool.submit(tasks.sleep_then, 0.3, i) for i in range(4)]
assert [f.result(timeout=20) for f in futs] == [0, 1, 2, 3]
new = procpool.manager.server_pid()
assert new != old and psutil.Process(new).is_running()
# A worker lost, and replaced, after the Manager changed.
victim = pool.submit(tasks.forever)
pid = wait_until(lambda: next((w.pid for w in pool.workers() if w.state == "busy"), None))
os.kill(pid, signal.SIGKILL)
lost = victim.exception(timeout=10)
assert isinstance(lost, procpool.WorkerLost), repr(lost)
assert pool.submit(tasks.square, 4).result(timeout=10) == 16
"""


def test_manager_killed_then_the_pool_grows_and_loses_a_worker():
    proc, token = run_program(MANAGER_KILL + CLOSE_AND_REPORT)
    assert proc.returncode == 0, proc.err
    r = json.loads(proc.out)
    assert r["replaced"] == 1  # one new Manager, new locks for new workers
    assert r["created"] == r["destroyed"] + r["lost"] and r["dying"] == 0
    assert r["lost"] == 1
    assert r["completions"] <= 1
    assert_program_left_nothing(proc, token)


# -- the Manager dies during the first pool's start, its first workers forked already -------------

MANAGER_DIES_AT_START = """
import json, os, sys, time, psutil, procpool, tasks
from conftest import started_workers
# A fresh program: its first pool forks its workers, then starts the Manager, whose server is
# SIGKILLed (manager.create=kill) while it makes the pool's locks.
pool = procpool.WorkerPool(min_workers=3, max_workers=3, idle_timeout=60, faults="manager.create=kill")
first = {w.id: w.pid for w in started_workers(pool)}
assert len(first) == 3, first
pool.manager_locks  # the filler makes them behind the constructor: the server is replaced then
server = procpool.manager.server_pid()
assert psutil.Process(server).is_running()
ids = [f.result(timeout=20) for f in [pool.submit(tasks.square, i) for i in range(12)]]
assert ids == [i * i for i in range(12)], ids
"""


def test_manager_killed_while_the_first_pool_starts_its_first_workers_running():
    # The window opened by forking the first workers before the Manager is up: their attach
    # lock names a server that died before it made the lock. The constructor replaces the
    # server (one new one, new locks); those workers serve, and on their way out, finding no
    # lock, exit without detaching: the parent frees their ids when it reaps them.
    proc, token = run_program(MANAGER_DIES_AT_START + CLOSE_AND_REPORT)
    assert proc.returncode == 0, proc.err
    r = json.loads(proc.out)
    assert r["replaced"] == 1, r
    assert r["created"] == r["destroyed"] + r["lost"] and r["dying"] == 0, r
    assert r["close_s"] < CLOSE_BOUND, r
    assert_program_left_nothing(proc, token)


FIRST_WORKER_LEAVES_EARLY = """
import json, os, time, procpool, tasks
from conftest import alive, title_of, wait_until
# The filler waits before it has the program's Manager server forked, and the server, once
# started, before it makes the pool's locks: the first worker runs its one item and leaves
# before either exists, and its detach reaches the server before the locks are made.
faults = "locks.begin=delay:3,manager.create=delay:2"
pool = procpool.WorkerPool(min_workers=1, max_workers=1, max_tasks_per_child=1, faults=faults)
first = pool.workers()[0].pid
assert pool.submit(tasks.square, 3).result(timeout=20) == 9
wait_until(lambda: title_of(first) == "kworker/dying", timeout=20, what="the first worker dying")
no_server_yet = procpool.manager.server_pid() is None
wait_until(lambda: not alive(first), timeout=30, what="the first worker gone")
assert pool.submit(tasks.square, 4).result(timeout=20) == 16  # its replacement
first = {"no_server_yet": no_server_yet}
"""


def test_a_worker_leaving_before_the_pools_locks_exist_detaches_itself_once_they_do():
    # Its detach request waits on its handed-over connection, which the spawner holds until
    # it forks the server; the server then makes the planned attach lock on that first use
    # (the program's request to make it comes later) and frees the id under it. Nothing is
    # lost, and the worker's exit is clean (an unknown lock would fail its detach: a
    # traceback, exit status 1, and the parent freeing the id on its behalf).
    proc, token = run_program(FIRST_WORKER_LEAVES_EARLY + CLOSE_AND_REPORT)
    assert proc.returncode == 0, proc.err
    assert "Traceback" not in proc.err, proc.err
    r = json.loads(proc.out)
    assert r["first"]["no_server_yet"], r  # the path under test was taken
    assert r["lost"] == 0 and r["created"] == r["destroyed"] == 2 and r["dying"] == 0, r
    assert r["replaced"] == 0, r
    assert_program_left_nothing(proc, token)


THREAD_REFUSED = """
import json, threading, procpool
from conftest import wait_until, worker_processes
# The arbiter's thread cannot start (what a program out of threads or memory sees), after the
# first workers were forked and the filler started.
real_start = threading.Thread.start
def start(self):
    if self.name.startswith("procpool-arbiter-"):
        raise RuntimeError("can't start new thread")
    return real_start(self)
threading.Thread.start = start
try:
    procpool.WorkerPool(min_workers=6, max_workers=6)
    err = None
except RuntimeError as exc:
    err = str(exc)
threading.Thread.start = real_start
try:
    wait_until(lambda: not worker_processes(), timeout=20, what="no worker left")
    gone = True
except AssertionError:
    gone = False
with procpool.WorkerPool(1, 1) as pool:  # the program goes on
    ok = pool.submit(abs, -2).result(timeout=20) == 2
print(json.dumps({"err": err, "gone": gone, "ok": ok}))
"""


def test_a_constructor_whose_thread_cannot_start_leaves_no_worker_behind():
    # The constructor fails with the thread's error and kills the workers it forked, those
    # the filler (started first) forked included; the program can make pools after it.
    proc, token = run_program(THREAD_REFUSED)
    assert proc.returncode == 0, proc.err
    r = json.loads(proc.out)
    assert r == {"err": "can't start new thread", "gone": True, "ok": True}, r
    assert_program_left_nothing(proc, token)


def test_min_workers_beyond_the_first_batch_start_behind_the_constructor():
    # The constructor returns with FIRST_BATCH workers up; the filler starts the rest in
    # batches, while the first ones already answer.
    from procpool.creation import FIRST_BATCH

    n = FIRST_BATCH + 9
    pool = procpool.WorkerPool(min_workers=n, max_workers=n)
    try:
        assert len(pool.workers()) >= FIRST_BATCH
        assert pool.submit(tasks.square, 5).result(timeout=20) == 25
        wait_until(lambda: pool.stats().nr_workers == n, timeout=30, what=f"{n} workers")
        pids = {w.pid for w in pool.workers()}
        assert len(pids) == n and all(map(alive, pids))
        assert sorted(w.id for w in pool.workers()) == list(range(n))  # lowest free ids
    finally:
        close_within(pool)
    assert_books_add_up(pool.stats())
    assert pool.stats().created == n


def test_growth_and_the_filler_together_never_pass_max_workers():
    # Work waits while the filler still starts min_workers: growth creates too, in turns
    # with the filler under M arb, each counting the other's workers.
    n = 20
    pool = procpool.WorkerPool(min_workers=n, max_workers=n)
    try:
        futs = [pool.submit(tasks.sleep_then, 0.05, i) for i in range(3 * n)]
        assert [f.result(timeout=60) for f in futs] == list(range(3 * n))
        wait_until(lambda: pool.stats().nr_workers == n, timeout=30, what=f"{n} workers")
        assert pool.stats().created == n  # none died: every worker ever created is still there
    finally:
        close_within(pool)
    assert_books_add_up(pool.stats())


def test_close_right_after_the_constructor_stops_the_filler():
    # Teardown takes M arb: the filler's next batch finds no_create and stops; whatever it
    # forked before is torn down with the rest.
    pool = procpool.WorkerPool(min_workers=40, max_workers=40)
    close_within(pool)
    st = pool.stats()
    assert_books_add_up(st)
    assert 0 < st.created <= 40
    # close() does not join the filler: it ends on its own once it sees the pool closing (it
    # may still be in its last wake() when close returns, on a loaded machine).
    wait_until(lambda: not pool._creator.filler_running(), timeout=10, what="the filler thread ended")


def test_growth_while_the_reserved_workers_are_forked_never_passes_max_workers():
    # The constructor reserves the ids of the rest of min_workers for the filler, which forks
    # them without M arb (the Manager may not exist yet). Held back here, the arbiter grows
    # for the waiting work meanwhile (it makes the locks itself): it must count the reserved
    # ids, or the pool ends with min_workers + what it grew.
    from procpool.creation import FIRST_BATCH

    n = FIRST_BATCH + 8
    pool = procpool.WorkerPool(min_workers=n, max_workers=n, faults="create.reserved=delay:0.5")
    try:
        futs = [pool.submit(tasks.sleep_then, 0.05, i) for i in range(3 * n)]
        assert [f.result(timeout=60) for f in futs] == list(range(3 * n))
        wait_until(lambda: pool.stats().nr_workers == n, timeout=30, what=f"{n} workers")
        assert pool.stats().created == n
        assert sorted(w.id for w in pool.workers()) == list(range(n))
    finally:
        close_within(pool)
    assert_books_add_up(pool.stats())


def test_close_during_the_reserved_step_waits_for_it_and_forks_none():
    # close() right after the constructor, the filler held back before its reserved step:
    # teardown waits for the step (reserved_lock) before it counts the ids still allocated; the step finds
    # the pool past its point of no return, forks nothing and gives the ids back. Only the
    # constructor's workers ever existed, and every id is free.
    from procpool.creation import FIRST_BATCH

    pool = procpool.WorkerPool(
        min_workers=FIRST_BATCH + 4, max_workers=FIRST_BATCH + 4, faults="create.reserved=delay:0.5"
    )
    close_within(pool)
    st = pool.stats()
    assert_books_add_up(st)
    assert st.created == FIRST_BATCH, st
    wait_until(lambda: not pool._creator.filler_running(), timeout=10, what="the filler thread ended")


def test_a_failed_reserved_step_is_a_creation_failure_and_the_pool_fills_later():
    # The reserved ids go back; the arbiter retries after the cooldown and reaches min_workers
    # with the lowest ids; the work submitted meanwhile runs.
    from procpool.creation import FIRST_BATCH

    n = FIRST_BATCH + 3
    pool = procpool.WorkerPool(min_workers=n, max_workers=n, faults="create.reserved=raise")
    try:
        assert [pool.submit(tasks.square, i).result(timeout=20) for i in range(5)] == [i * i for i in range(5)]
        wait_until(lambda: pool.stats().nr_workers == n, timeout=30, what=f"{n} workers")
        assert sorted(w.id for w in pool.workers()) == list(range(n))
        assert pool.stats().created == n
    finally:
        close_within(pool)
    assert_books_add_up(pool.stats())


# -- trigger 4: creation keeps failing; a teardown step fails ------------------------------------


@pytest.mark.parametrize(
    "how, expected",
    [
        ({"cancel_futures": True}, "cancelled"),
        ({"timeout": 0.5}, procpool.PoolClosed),
        ({}, procpool.PoolBroken),  # no worker will ever run it: fail it rather than wait forever
    ],
    ids=["cancel_futures", "timeout", "plain"],
)
def test_close_ends_while_creation_keeps_failing(how, expected):
    pool = procpool.WorkerPool(min_workers=0, max_workers=2, faults="create.after_alloc=raise")
    fut = pool.submit(tasks.square, 2)
    wait_until(lambda: pool.creation_stalled_for() > 0, what="creation failing")
    assert pool.arbiter_alive  # a creation failure is never more than that
    close_within(pool, **how)
    if expected == "cancelled":
        assert fut.cancelled()
    else:
        err = ended_with_named_error(fut, expected)
        assert isinstance(err.__cause__ or err, Exception)
    assert_books_add_up(pool.stats())


def test_a_failing_teardown_step_still_tears_everything_down():
    # The delay keeps ids allocated until the completion is installed, so the fault is reached.
    faults = "teardown.before_wait=raise,detach.before_lock=delay:0.5"
    pool = procpool.WorkerPool(min_workers=2, max_workers=2, faults=faults)
    pids = [w.pid for w in pool.workers()]
    assert pool.submit(tasks.square, 2).result(timeout=10) == 4
    with pytest.raises(procpool.PoolBroken, match="teardown failed") as info:
        close_within(pool)
    assert isinstance(info.value.__cause__, procpool.FaultInjected)
    wait_until(lambda: not any(map(alive, pids)), what="the workers gone")
    assert_books_add_up(pool.stats())
    close_within(pool)  # idempotent: a second close returns


# -- the arbiter's own failures ----------------------------------------------------------------------


def test_a_failure_of_the_arbiter_loop_fails_every_item_and_close_ends():
    pool = procpool.WorkerPool(min_workers=1, max_workers=2)
    running = pool.submit(tasks.forever)  # straight to the idle worker
    # Armed once the pool's filler is done (it wakes the arbiter when it has made the
    # locks), before the second item wakes the arbiter to grow: that pass fails.
    wait_until(lambda: not pool._creator.filler_running(), what="the filler done")
    pool.fault_spec.update(faults.parse("arbiter.loop=raise"))
    waiting = pool.submit(tasks.forever)  # no idle worker: wakes the arbiter to grow
    for fut in (running, waiting):
        err = ended_with_named_error(fut, procpool.PoolBroken)
        assert isinstance(err, procpool.ProcpoolError)
    with pytest.raises(procpool.PoolBroken, match="arbiter thread failed") as info:
        pool.submit(tasks.square, 1)
    assert isinstance(info.value.__cause__, procpool.FaultInjected)
    assert pool.broken
    close_within(pool)
    assert_books_add_up(pool.stats())


def test_a_failing_reap_costs_only_that_worker():
    pool = procpool.WorkerPool(min_workers=2, max_workers=2, faults="reap=raise")
    try:
        fut = pool.submit(tasks.forever)
        os.kill(busy_pid(pool), signal.SIGKILL)
        err = ended_with_named_error(fut, procpool.WorkerLost)
        assert "arbiter failed in _reap" in str(err)
        assert pool.submit(tasks.square, 3).result(timeout=10) == 9  # the pool goes on
        assert not pool.broken
    finally:
        close_within(pool)
    assert_books_add_up(pool.stats())


def test_close_from_a_thread_ends_even_if_the_arbiter_thread_is_gone():
    # The watchdog path: should the arbiter thread end without its clean-up, teardown's waits
    # notice and do it themselves. A raise in the loop makes the arbiter end (with clean-up);
    # here we check that waiting on a pool whose arbiter is gone never hangs.
    pool = procpool.WorkerPool(min_workers=1, max_workers=1)
    fut = pool.submit(tasks.forever)
    # Armed once the pool's filler is done (it wakes the arbiter when it has made the
    # locks): the arbiter's next pass raises.
    wait_until(lambda: not pool._creator.filler_running(), what="the filler done")
    pool.fault_spec.update(faults.parse("arbiter.loop=raise"))
    pool._wake()
    wait_until(lambda: not pool.arbiter_alive, what="the arbiter gone")
    assert isinstance(fut.exception(timeout=10), procpool.PoolBroken)
    t0 = time.monotonic()
    close_within(pool)
    assert time.monotonic() - t0 < CLOSE_BOUND
    assert_books_add_up(pool.stats())


def test_a_live_manager_is_not_taken_for_replaced_by_its_locks_address():
    # A pool's locks name the server's address as the program planned it (a str); the server
    # reports its abstract name as bytes. Both are the same server: asked to replace it while
    # it lives, the program must say no (the failure was something else), not "replaced".
    from procpool import manager
    from procpool.spawner import get_spawner, resolve_context

    pool = procpool.WorkerPool(min_workers=1, max_workers=1)
    try:
        address = pool.manager_locks.attach.address
        server = manager.server_pid()
        assert isinstance(address, str)
        assert manager.replace_dead_manager(lambda: get_spawner(resolve_context(None)), address) is False
        assert manager.server_pid() == server and alive(server)
        assert pool.submit(tasks.square, 3).result(timeout=10) == 9
    finally:
        close_within(pool)


def test_a_workers_status_pipe_join_waits_bounded_and_reads_how_it_ended():
    # WorkerProcess.join (what the arbiter calls for every worker it reaps) waits on the
    # status pipe with one poll(2): bounded by its timeout while the spawner has written
    # nothing, the exit status once it has, and a kill of the orphan when the pipe closes
    # without one (the spawner died before it could reap the worker).
    import subprocess
    import sys

    from procpool.spawner import WorkerProcess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        r, w = os.pipe()
        proc = WorkerProcess(child.pid, r)
        try:
            t0 = time.monotonic()
            proc.join(0.05)
            assert proc.exitcode is None and time.monotonic() - t0 >= 0.04
            os.write(w, struct.pack("<i", 3))
            proc.join(5)
            assert proc.exitcode == 3 and child.poll() is None  # a status: nothing killed
        finally:
            proc.close()
            os.close(w)
        r, w = os.pipe()
        proc = WorkerProcess(child.pid, r)
        try:
            os.close(w)  # the "spawner" died: EOF, no status
            proc.join(5)
            assert proc.exitcode == -signal.SIGKILL
            assert child.wait(10) == -signal.SIGKILL  # the orphan was killed, not left running
        finally:
            proc.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
