"""The seed's lifecycle in real processes, watched from outside with psutil."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import psutil
import pytest
import tasks
from conftest import (
    alive,
    assert_program_left_nothing,
    comm_of,
    live_titles,
    my_segments,
    named_workers,
    run_program,
    started_workers,
    title_of,
    wait_until,
)

import procpool
from procpool.idtable import IdTable


def test_submit_returns_results_and_workers_are_titled():
    with procpool.WorkerPool(min_workers=3, max_workers=3) as pool:
        assert pool.submit(tasks.square, 9).result(timeout=10) == 81
        workers = started_workers(pool)
        assert sorted(w.id for w in workers) == [0, 1, 2]
        for w in workers:
            expected = f"kworker/u{pool.id}:{w.id}"
            # A worker names itself first thing after the fork, asynchronously to the pool.
            wait_until(lambda: title_of(w.pid) == expected, what=f"title {expected}")  # noqa: B023
            assert title_of(w.pid) == expected  # command line: ps, htop
            assert comm_of(w.pid) == expected  # comm: ps -o comm, /proc/PID/comm
            assert psutil.Process(w.pid).status() != psutil.STATUS_ZOMBIE
        pids = {w.pid for w in workers}
    assert not any(alive(p) for p in pids)


def test_id_table_is_readable_from_outside_and_matches_stats():
    with procpool.WorkerPool(min_workers=2, max_workers=4) as pool:
        reader = IdTable.attach(pool.table_name, writable=False)
        try:
            mode = os.stat(f"/dev/shm/{pool.table_name}").st_mode & 0o777
            assert mode == 0o600
            wait_until(lambda: all(s.pid and s.state_name == "idle" for s in reader.slots() if s.state), what="idle")
            used = {s.id: s.pid for s in reader.slots() if s.state_name != "free"}
            assert used == {w.id: w.pid for w in pool.workers()}
            st = pool.stats()
            assert st.nr_workers == len(used) == 2 and st.nr_idle == 2 and st.nr_busy == 0
            pool.submit(tasks.square, 3).result(timeout=10)
            wait_until(lambda: sum(s.items_done for s in reader.slots()) == 1, what="items_done mirrored")
        finally:
            reader.close()


def test_destroy_does_not_wait_for_the_worker_to_exit():
    # Every exiting worker takes 2 s after detaching: destroy must return long before.
    with procpool.WorkerPool(min_workers=2, max_workers=2, faults="detach.after=delay:2") as pool:
        victim = next(w for w in pool.workers() if w.id == 0)
        assert pool.destroy_idle(1) == 1
        # The process is certainly still there: destroy returned without waiting for it.
        assert alive(victim.pid)
        st = pool.stats()
        assert (st.nr_workers, st.nr_idle, st.nr_dying, st.destroyed) == (1, 1, 1, 1)
        wait_until(lambda: title_of(victim.pid) == "kworker/dying", what="dying title")
        assert comm_of(victim.pid) == "kworker/dying"


def test_dying_worker_id_is_reused_without_duplicate_titles():
    with procpool.WorkerPool(min_workers=0, max_workers=3, linger_dying=3.0) as pool:
        pool.submit(tasks.square, 1).result(timeout=10)
        first = pool.workers()[0]
        assert first.id == 0
        pool.destroy_idle(1)
        # Once detached (id freed) the dying process lingers; a new worker takes id 0 at once.
        table = IdTable.attach(pool.table_name, writable=False)
        try:
            wait_until(lambda: table.slot(0).state_name == "free", what="id 0 freed")
        finally:
            table.close()
        assert pool.submit(tasks.whoami).result(timeout=10) != first.pid
        new = [w for w in pool.workers() if w.state != "dying"]
        assert [w.id for w in new] == [0]
        titles = live_titles(pool)
        assert titles[first.pid] == "kworker/dying"
        assert titles[new[0].pid] == f"kworker/u{pool.id}:0"
        assert len(set(titles.values())) == len(titles)


def test_churn_keeps_ids_lowest_free_and_titles_distinct(tmp_path):
    # Each round holds `need` workers busy at once (items that wait for a file), so the pool
    # has exactly that many: those left from the last round, plus new ones, which must take
    # the lowest ids the destroyed ones left free, while the destroyed still linger.
    with procpool.WorkerPool(min_workers=0, max_workers=4, linger_dying=0.2) as pool:
        table = IdTable.attach(pool.table_name, writable=False)
        try:
            for round_, need in enumerate((4, 3, 4, 2, 4, 1, 3)):
                # Dying workers detach (free their ids) while their processes still linger.
                wait_until(lambda: table.nr_allocated() == pool.stats().nr_workers, what="detached")
                kept = {w.id for w in pool.workers() if w.state != "dying"}
                free = sorted(set(range(4)) - kept)
                expected = sorted(kept | set(free[: max(0, need - len(kept))]))
                release = tmp_path / f"release-{round_}"
                futs = [pool.submit(tasks.wait_for_file, str(release), i) for i in range(need)]
                wait_until(lambda: pool.stats().nr_busy == need, timeout=30, what=f"{need} busy")  # noqa: B023
                attached = sorted(w.id for w in pool.workers() if w.state != "dying")
                assert attached == expected, (kept, attached)  # lowest free ids
                # A worker names itself after its fork, asynchronously to the pool (which may
                # have handed it its item already): wait for the names, then compare them.
                wait_until(lambda: named_workers(pool) >= need, what="the workers named")  # noqa: B023
                titles = live_titles(pool)
                named = [t for t in titles.values() if t != "kworker/dying"]
                assert len(named) == len(set(named)), titles
                release.touch()
                assert [f.result(timeout=30) for f in futs] == list(range(need))
                pool.destroy_idle(1 + round_ % 3)
        finally:
            table.close()


def test_close_waits_for_every_detach_and_leaves_nothing():
    # Worker 0 takes 2 s in its exit path: the teardown has long installed its completion by
    # then (however slowly this machine runs it), so that completion is waited for.
    faults = "detach.before_lock=delay:0.3,detach.before_lock@0=delay:2"
    pool = procpool.WorkerPool(min_workers=4, max_workers=4, faults=faults)
    pids = [w.pid for w in started_workers(pool)]
    name = pool.table_name
    pool.close()
    assert pool.completions == 1  # the last detacher completed the teardown wait, once
    assert not any(alive(p) for p in pids)
    assert not os.path.exists(f"/dev/shm/{name}")
    assert my_segments() == []


MANAGER_SOCKETS_SCRIPT = """
import os, signal, sys, threading, time, psutil, procpool, tasks
from conftest import wait_until
release, threaded = sys.argv[1], sys.argv[2] == "threaded"
if threaded:  # then the spawner (and the Manager it forks) starts through the fork server
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
pool = procpool.WorkerPool(min_workers=0, max_workers=4, idle_timeout=60)
pool.manager_locks  # made behind the constructor, the Manager started with them: wait for them
mgr = psutil.Process(procpool.manager.server_pid())
assert " ".join(mgr.cmdline()).strip() == "procpool: manager"


def unnamed_sockets():
    # The handed-over connections are socket pairs: no address. Connections through the
    # listener (short-lived clients) carry its abstract name and come and go on their own
    # schedule; they are not what this test counts. The program's threads have handed-over
    # connections too, one per thread that takes a lock: here only the arbiter's (it takes M
    # arb to start the workers), made with the first worker.
    return sum(1 for c in mgr.net_connections(kind="unix") if not c.laddr and not c.raddr)



spawner = psutil.Process(mgr.ppid())  # forked by this program, or by the fork server
assert (spawner.ppid() == os.getpid()) != threaded
# The base: the two channels connections are handed over on (the spawner's, the program's
# link) and the arbiter's connection. (Not counted before the first worker: the server end of
# the connection that made the pool's locks may still be closing then.)
counts = [3]
assert pool.submit(tasks.square, 3).result(timeout=10) == 9
futs = [pool.submit(tasks.wait_for_file, release) for _ in range(4)]
wait_until(lambda: pool.stats().nr_busy == 4, timeout=30, what="four busy workers")
# Wait for all four sockets (the test then checks there is no fifth), and after the kill
# for the close.
wait_until(lambda: unnamed_sockets() == counts[0] + 4, timeout=30, what="exactly four more sockets")
counts.append(unnamed_sockets())
os.kill(pool.workers()[-1].pid, signal.SIGKILL)
wait_until(lambda: sum(f.done() for f in futs) == 1, timeout=30, what="the victim's item failed")
wait_until(lambda: unnamed_sockets() < counts[1], timeout=30, what="a socket closed")
counts.append(unnamed_sockets())
open(release, "w").close()
assert sum(f.exception(timeout=10) is None for f in futs) == 3
pool.close()
print(*counts, flush=True)
"""


@pytest.mark.parametrize("program", ["single-threaded", "threaded"])
def test_each_worker_has_its_manager_connection_from_fork_and_frees_it_when_gone(tmp_path, program):
    # The spawner hands each new worker's Manager connection to the Manager at fork, so a
    # worker's exit path does no connect and no handshake: the Manager holds one socket per
    # live worker, and drops it when the worker is gone, even SIGKILLed. Counted in a program
    # of its own, whose Manager serves nobody else.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    out = subprocess.run(
        [sys.executable, "-c", MANAGER_SOCKETS_SCRIPT, str(tmp_path / "release"), program],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    no_worker, four_busy, three_busy = map(int, out.stdout.split())
    assert four_busy == no_worker + 4  # four workers, a socket each, before any exits
    assert three_busy == four_busy - 1  # the SIGKILLed one's socket is closed


def test_a_lock_whose_handed_over_connection_never_reached_the_manager_connects_itself():
    # What a worker does if the spawner died before passing its connection on: the first
    # request fails on a closed socket, and the lock connects the stock way and retries.
    import socket

    from procpool.manager import new_lock
    from procpool.spawner import get_spawner, resolve_context

    lock = new_lock(lambda: get_spawner(resolve_context(None)), "test.fallback")
    ours, theirs = socket.socketpair()
    theirs.close()
    lock.adopt_connection(ours.detach())
    assert lock.acquire(timeout=5)
    assert lock.owner()[0] == os.getpid()
    lock.release()
    assert lock.owner() is None


def test_close_with_no_worker_left_does_not_wait():
    pool = procpool.WorkerPool(min_workers=0, max_workers=2)
    pool.close()
    assert pool.completions == 0


def test_busy_workers_finish_their_items_during_close():
    pool = procpool.WorkerPool(min_workers=1, max_workers=2)
    futs = [pool.submit(tasks.sleep_then, 0.2, i) for i in range(4)]
    pool.close()
    assert [f.result(timeout=0) for f in futs] == [0, 1, 2, 3]


def test_cancel_futures_cancels_pending_items(tmp_path):
    # The first item is certainly running (it said so) when close() cancels the rest, and it
    # is held until they are cancelled: close() must let it finish, and run none of the rest.
    mark, release = tmp_path / "mark", tmp_path / "release"
    pool = procpool.WorkerPool(min_workers=1, max_workers=1)
    running = pool.submit(tasks.touch_and_wait, str(mark), str(release))
    pending = [pool.submit(tasks.square, i) for i in range(5)]
    closer = threading.Thread(target=pool.close, kwargs={"cancel_futures": True})
    try:
        wait_until(mark.exists, timeout=30, what="the first item running")
        closer.start()
        wait_until(lambda: all(f.cancelled() for f in pending), timeout=30, what="pending items cancelled")
        assert not running.done()
    finally:
        release.touch()
        pool.close()  # waits for the closer's teardown (or tears down, if it never started)
        if closer.ident is not None:
            closer.join(30)
    assert not closer.is_alive()
    assert running.result(timeout=0) > 0  # the worker's pid: it ran to the end
    assert all(f.cancelled() for f in pending)


def test_close_is_idempotent_and_submit_after_close_fails():
    pool = procpool.WorkerPool(min_workers=1, max_workers=1)
    pool.close(wait=False)
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        pool.submit(tasks.square, 2)


def test_idle_workers_shrink_to_two_plus_one_per_four_busy(tmp_path):
    release = tmp_path / "release"
    with procpool.WorkerPool(min_workers=0, max_workers=8, idle_timeout=0.3) as pool:
        # Items that wait for a file: 8 workers certainly exist at once (no worker can finish
        # one and take another first).
        futs = [pool.submit(tasks.wait_for_file, str(release), i) for i in range(8)]
        wait_until(lambda: pool.stats().nr_busy == 8, timeout=30, what="growth to 8")
        release.touch()
        assert [f.result(timeout=30) for f in futs] == list(range(8))
        # All idle now: the idle timeout culls the longest-idle down to 2 (KEEP_IDLE).
        wait_until(lambda: pool.stats().nr_workers == 2, what="shrink to 2")
        wait_until(lambda: len(live_titles(pool)) == 2, what="culled processes gone")
        st = pool.stats()
        assert (st.created, st.nr_idle, st.destroyed) == (8, 2, 6)


def test_min_workers_are_never_culled():
    with procpool.WorkerPool(min_workers=3, max_workers=6, idle_timeout=0.05) as pool:
        futs = [pool.submit(tasks.sleep_then, 0.2) for _ in range(6)]
        [f.result(timeout=10) for f in futs]
        wait_until(lambda: pool.stats().nr_workers == 3, what="shrink to min_workers")
        assert pool.stats().nr_workers == 3


def test_burst_grows_up_to_max_workers_and_no_further(tmp_path):
    release = tmp_path / "go"
    with procpool.WorkerPool(min_workers=1, max_workers=4) as pool:
        futs = [pool.submit(tasks.wait_for_file, str(release), i) for i in range(10)]
        wait_until(lambda: pool.stats().nr_busy == 4, what="4 busy workers")
        st = pool.stats()
        assert (st.nr_workers, st.nr_pending) == (4, 6)
        assert len(live_titles(pool)) == 4
        release.touch()
        assert [f.result(timeout=10) for f in futs] == list(range(10))
        assert pool.stats().created == 4


def test_function_exception_is_reraised_with_the_worker_traceback():
    with procpool.WorkerPool(min_workers=1, max_workers=1) as pool:
        fut = pool.submit(tasks.fail, "boom")
        with pytest.raises(ValueError, match="boom") as info:
            fut.result(timeout=10)
        cause = info.value.__cause__
        assert isinstance(cause, procpool.RemoteTraceback)
        assert "in fail" in cause.tb and "ValueError: boom" in cause.tb
        assert pool.submit(tasks.square, 4).result(timeout=10) == 16  # worker survived


def test_every_item_ends_as_result_or_exception():
    with procpool.WorkerPool(min_workers=2, max_workers=3) as pool:
        futs = [pool.submit(tasks.maybe_fail, i) for i in range(300)]
        for i, f in enumerate(futs):
            if i % 7 == 3:
                assert isinstance(f.exception(timeout=20), KeyError)
            else:
                assert f.result(timeout=20) == i
        assert pool.stats().items_done == 300


def test_unpicklable_argument_is_named_and_harms_nothing():
    with procpool.WorkerPool(min_workers=1, max_workers=1) as pool:
        with pytest.raises(TypeError, match=r"argument 1 \(Unpicklable\) cannot be pickled"):
            pool.submit(tasks.identity, 1, tasks.Unpicklable())
        with pytest.raises(TypeError, match="keyword argument 'x'"):
            pool.submit(tasks.identity, x=threading.Lock())
        with pytest.raises(TypeError, match="function"):
            pool.submit(threading.Lock().acquire)  # not even cloudpickle can (lambdas it can)
        with pytest.raises(TypeError, match="needs a callable"):
            pool.submit(42)
        assert pool.submit(tasks.square, 5).result(timeout=10) == 25
        assert pool.stats().nr_pending == 0


def test_unpicklable_result_fails_only_that_item():
    with procpool.WorkerPool(min_workers=1, max_workers=1) as pool:
        err = pool.submit(tasks.return_unpicklable).exception(timeout=10)
        assert err is not None and "Unpicklable" in str(err)
        assert pool.submit(tasks.square, 6).result(timeout=10) == 36


@pytest.mark.parametrize(
    "kwargs, exc, text",
    [
        ({"min_workers": 5, "max_workers": 2}, ValueError, "min_workers"),
        ({"max_workers": 0}, ValueError, "max_workers"),
        ({"idle_timeout": -1}, ValueError, "idle_timeout"),
        ({"linger_dying": -0.5}, ValueError, "linger_dying"),
        ({"linger_dying": float("inf")}, ValueError, "linger_dying"),
        ({"idle_timeout": float("nan")}, ValueError, "idle_timeout"),
        ({"max_workers": "4"}, TypeError, "max_workers"),
        ({"title_prefix": "has space"}, ValueError, "title_prefix"),
        ({"mp_context": "fork"}, ValueError, "fork"),
        ({"mp_context": "nonsense"}, ValueError, "nonsense"),
        ({"faults": "nowhere=kill"}, ValueError, "unknown point"),
    ],
)
def test_bad_parameters_are_named(kwargs, exc, text):
    with pytest.raises(exc, match=text):
        procpool.WorkerPool(**kwargs)


def test_bad_close_timeout_is_named():
    with procpool.WorkerPool(min_workers=0, max_workers=1) as pool:
        with pytest.raises(ValueError, match="timeout"):
            pool.close(timeout=-1)


def test_pool_ids_are_small_and_unique_among_live_pools():
    a = procpool.WorkerPool(min_workers=0, max_workers=1)
    b = procpool.WorkerPool(min_workers=0, max_workers=1, title_prefix="ptest")
    try:
        assert a.id != b.id
        fut = b.submit(tasks.whoami)
        assert title_of(fut.result(timeout=10)) == f"ptest/u{b.id}:0"
    finally:
        a.close()
        b.close()
    c = procpool.WorkerPool(min_workers=0, max_workers=1)
    try:
        assert c.id == min(a.id, b.id)  # lowest free again
    finally:
        c.close()


def test_default_start_method_is_safe_with_threads_in_the_parent():
    # A thread holding a lock while the pool starts workers: with fork, a child could copy
    # the held lock; procpool's default (forkserver) never forks this process.
    held = threading.Lock()
    held.acquire()
    t = threading.Thread(target=held.acquire)
    t.start()
    try:
        with procpool.WorkerPool(min_workers=2, max_workers=2) as pool:
            assert pool._ctx.get_start_method() == "forkserver"
            for w in pool.workers():
                # Workers are forks of the single-threaded spawner, never of this process.
                spawner = psutil.Process(w.pid).parent()
                assert spawner.pid != os.getpid()
                assert title_of(spawner.pid) == "procpool: spawner"
            assert pool.submit(tasks.square, 2).result(timeout=10) == 4
    finally:
        held.release()
        t.join()


FORK_CHILD_SCRIPT = """
import os, sys, procpool, tasks
pool = procpool.WorkerPool(2, 2)
wq = procpool.Workqueue("forkexit")
pids = sorted(w.pid for w in pool.workers())
child = os.fork()
if child == 0:
    # The fork starts with no workqueue and no shared pool of its own: a workqueue made here
    # gets a new pool (with the fork's own spawner), not the parent's.
    wq2 = procpool.Workqueue("forkchild")
    assert wq2.pool is not wq.pool
    ok = wq2.queue(tasks.square, 4).result(timeout=10) == 16
    wq2.destroy()
    sys.exit(0 if ok else 3)  # a normal exit: atexit hooks run in the fork
_, status = os.waitpid(child, 0)
assert os.waitstatus_to_exitcode(status) == 0
# The fork's exit neither closed the program's pool nor destroyed its workqueue.
assert sorted(w.pid for w in pool.workers()) == pids, (pool.workers(), pids)
assert pool.submit(tasks.square, 6).result(timeout=10) == 36
assert wq.queue(tasks.square, 5).result(timeout=10) == 25
print("ok", flush=True)
"""


def test_a_forked_child_leaves_the_programs_pools_and_workqueues_alone():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    # Its own session: if the fork hangs in its exit (the bug this guards against), the whole
    # group is killed, so no stray process outlives the test.
    proc = subprocess.Popen(
        [sys.executable, "-c", FORK_CHILD_SCRIPT],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    assert proc.returncode == 0, err
    assert out == "ok\n"


LOCKS_DROPPED = """
import gc, json, procpool
from multiprocessing import connection, current_process, managers
from conftest import wait_until

def objects(address):
    # The stock server's own count, asked the stock way (the authkey handshake).
    conn = connection.Client(address, authkey=bytes(current_process().authkey))
    try:
        return managers.dispatch(conn, None, "number_of_objects", ())
    finally:
        conn.close()

pool = procpool.WorkerPool(min_workers=1, max_workers=1)
address = pool.manager_locks.arb.address
with_pool = objects(address)
second = procpool.WorkerPool(min_workers=1, max_workers=1)
with_two = objects(second.manager_locks.arb.address)
second.close()
after_close = objects(address)  # kept while the pool object lives: its locks can still be read
del second
gc.collect()
wait_until(lambda: objects(address) == with_pool, what="the second pool's locks dropped")
pool.close()
print(json.dumps([with_pool, with_two, after_close]))
"""


def test_a_pools_locks_are_dropped_by_the_server_once_the_pool_is_gone():
    # Each pool makes two locks on the program's server; the program holds the server's
    # reference while the pool object lives, and gives it back (not waited for) once it is
    # gone, so a program that makes pools in a loop does not grow its server.
    proc, token = run_program(LOCKS_DROPPED)
    assert proc.returncode == 0, proc.err
    with_pool, with_two, after_close = json.loads(proc.out)
    assert with_two == with_pool + 2 and after_close == with_two
    assert_program_left_nothing(proc, token)


THREAD_CONNECTIONS = """
import gc, json, threading, psutil, procpool, tasks
from conftest import wait_until

pool = procpool.WorkerPool(min_workers=1, max_workers=1)
assert pool.submit(tasks.square, 2).result(timeout=20) == 4
pool.manager_locks
mgr = psutil.Process(procpool.manager.server_pid())

def unnamed():
    return sum(1 for c in mgr.net_connections(kind="unix") if not c.laddr and not c.raddr)

# The two channels connections are handed over on (the spawner's, the program's link) and the
# first pool's worker. (Counted once settled: the server end of the connection that made the
# pool's locks may still be closing.)
base = 3
wait_until(lambda: unnamed() == base, timeout=30, what="the server's connections settled")
seen = []

def close_and_count(p):
    p.close()
    seen.append(unnamed())  # this thread's connection still open: it ends with the thread

for _ in range(10):
    # Closed from a thread of its own, which takes the pool's locks (teardown), so gets a
    # connection of its own to the server, then ends.
    other = procpool.WorkerPool(min_workers=1, max_workers=1)
    t = threading.Thread(target=close_and_count, args=(other,))
    t.start()
    t.join(30)
    del other
most = max(seen)
gc.collect()
wait_until(lambda: unnamed() == base, timeout=30, what="the server back to its connections before the loop")
pool.close()
print(json.dumps({"base": base, "most": most}))
"""


def test_a_threads_connection_to_the_server_goes_with_the_thread():
    # The program's threads each get a connection to the server (handed over through the
    # link) on their first lock request; a thread that ends takes its connection with it, so
    # a program that closes pools from short-lived threads does not grow the server's
    # descriptors (it held 10 more here before a thread's connections were its own).
    proc, token = run_program(THREAD_CONNECTIONS)
    assert proc.returncode == 0, proc.err
    r = json.loads(proc.out)
    assert r["most"] > r["base"], r  # the threads did connect (and were counted)
    assert_program_left_nothing(proc, token)
