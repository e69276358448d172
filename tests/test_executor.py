"""procpool.ProcessPoolExecutor: concurrent.futures semantics, procpool's deliberate
deviations, and its extras (item timeout, cancel_running), all with real worker processes."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import tasks
from conftest import alive, wait_until

import procpool

T = 10  # seconds any single wait in this file may take before it counts as a hang


@pytest.fixture
def files(tmp_path):
    """Paths for mark/release files: an item says "I run" and waits to be let go."""
    return lambda name: str(tmp_path / name)


def test_is_an_executor_and_submit_passes_keywords_through():
    with procpool.ProcessPoolExecutor(2) as ex:
        assert isinstance(ex, cf.Executor)
        assert ex.submit(tasks.add, 2, b=3).result(timeout=T) == 5
        # fn is positional-only: 'fn' (and 'self') are free to be the call's own keywords.
        assert ex.submit(tasks.echo_kwargs, fn=1, self=2).result(timeout=T) == {"fn": 1, "self": 2}
        assert ex._max_workers == 2


def test_workers_start_on_demand_up_to_max_workers():
    with procpool.ProcessPoolExecutor(2) as ex:
        assert ex.pool.stats().nr_workers == 0
        futs = [ex.submit(tasks.sleep_then, 0.2, i) for i in range(4)]
        assert [f.result(timeout=T) for f in futs] == [0, 1, 2, 3]
        st = ex.pool.stats()
        assert 1 <= st.created <= 2 and st.lost == 0


def test_as_completed_and_wait():
    with procpool.ProcessPoolExecutor(2) as ex:
        futs = {ex.submit(tasks.sleep_then, d, d): d for d in (0.3, 0.0, 0.1)}
        got = [f.result() for f in cf.as_completed(futs, timeout=T)]
        assert sorted(got) == [0.0, 0.1, 0.3]
        slow = ex.submit(tasks.sleep_then, 0.5, "slow")
        fast = ex.submit(tasks.identity, "fast")
        done, not_done = cf.wait([slow, fast], timeout=T, return_when=cf.FIRST_COMPLETED)
        assert fast in done
        done, not_done = cf.wait([slow, fast], timeout=T)
        assert not not_done and slow.result() == "slow"


def test_map_returns_results_in_order_with_and_without_chunks():
    with procpool.ProcessPoolExecutor(2) as ex:
        expected = [a + b for a, b in zip(range(10), range(100, 107), strict=False)]
        for chunksize in (1, 3, 50):
            assert list(ex.map(tasks.add, range(10), range(100, 107), chunksize=chunksize)) == expected
        assert list(ex.map(tasks.square, [])) == []


def test_map_sends_each_chunk_as_one_item():
    with procpool.ProcessPoolExecutor(2) as ex:
        before = ex.pool.stats().items_done
        out = list(ex.map(tasks.pid_and, range(10), chunksize=4))
        assert [x for _, x in out] == list(range(10))
        assert ex.pool.stats().items_done - before == 3  # chunks of 4, 4 and 2
        for start in (0, 4, 8):  # a chunk runs in one worker
            assert len({pid for pid, _ in out[start : start + 4]}) == 1


def test_map_chunks_sequences_and_iterators_alike():
    # A range, list or tuple is chunked by slicing, anything else by iterating: same results.
    cases = [range(3, 100, 7), range(40, 0, -3), range(0), list(range(-5, 30)), tuple("abcdefghij")]
    with procpool.ProcessPoolExecutor(2) as ex:
        for seq in cases:
            for chunksize in (1, 4, 1000):
                assert list(ex.map(tasks.identity, seq, chunksize=chunksize)) == list(seq)
                assert list(ex.map(tasks.identity, iter(seq), chunksize=chunksize)) == list(seq)


def test_chunked_map_timeout_cancels_the_chunks_that_did_not_start(files):
    done, release = files("done"), files("release")
    Path(done).touch()
    with procpool.ProcessPoolExecutor(1) as ex:
        it = ex.map(tasks.wait_for_file, [release, done, done, done, done], chunksize=2, timeout=0.5)
        with pytest.raises(TimeoutError):
            next(it)
        Path(release).touch()  # the first chunk finishes; the other two never start
    assert ex.pool.stats().items_done == 1


def test_closing_a_map_iterator_cancels_what_did_not_start(tmp_path):
    # As with the standard library's generator: close() ends the iteration at once, and the
    # calls that have not started are cancelled (a fresh pool never prefetches: see pool.py).
    done, release = str(tmp_path / "done"), str(tmp_path / "release")
    Path(done).touch()
    for chunksize, calls in ((1, [done, release, release]), (2, [done, done, release, release, release])):
        with procpool.ProcessPoolExecutor(1) as ex:
            it = ex.map(tasks.wait_for_file, calls, chunksize=chunksize)
            assert next(it) is None  # the first call (chunk) is done; the next one runs
            it.close()
            assert list(it) == []  # nothing more, not even the rest of the chunk in hand
            Path(release).touch()
        assert ex.pool.stats().items_done == 2
        Path(release).unlink()


def test_map_raises_when_iterated_not_when_called():
    with procpool.ProcessPoolExecutor(2) as ex:
        for chunksize in (1, 2):
            it = ex.map(tasks.maybe_fail, range(6), chunksize=chunksize)  # maybe_fail(3) raises
            assert [next(it) for _ in range(2)] == [0, 1]
            if chunksize == 1:
                assert next(it) == 2
            with pytest.raises(KeyError):
                next(it)
        with pytest.raises(ValueError, match="chunksize"):
            ex.map(tasks.square, range(3), chunksize=0)


def test_map_timeout_counts_from_the_call_and_cancels_what_did_not_start(files):
    done, release = files("done"), files("release")
    Path(done).touch()
    # The caller takes the second result only after map()'s 3 s timeout has passed: a timeout
    # counted from map() has run out by then, and next() raises at once; one counted from
    # next() would wait 3 s more. (Bounds that tell those apart by seconds, not milliseconds.)
    with procpool.ProcessPoolExecutor(1) as ex:
        t0 = time.monotonic()
        it = ex.map(tasks.wait_for_file, [done, release, done], timeout=3.0)
        assert next(it) is None  # already there: no wait
        time.sleep(max(0.0, t0 + 3.2 - time.monotonic()))  # the slow caller, past the timeout
        t1 = time.monotonic()
        with pytest.raises(TimeoutError):
            next(it)
        assert time.monotonic() - t1 < 2.0  # the deadline had passed: no new wait
        Path(release).touch()  # let the running one finish; the third never starts
    assert ex.pool.stats().items_done == 2


def test_shutdown_wait_runs_pending_work_then_refuses_new():
    ex = procpool.ProcessPoolExecutor(1)
    futs = [ex.submit(tasks.sleep_then, 0.05, i) for i in range(5)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futs) and [f.result() for f in futs] == list(range(5))
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.square, 2)
    ex.shutdown()  # idempotent


def test_shutdown_without_wait_returns_at_once_and_work_still_runs(files):
    mark, release = files("mark"), files("release")
    ex = procpool.ProcessPoolExecutor(1)
    running = ex.submit(tasks.touch_and_wait, mark, release)
    pending = ex.submit(tasks.square, 6)
    wait_until(lambda: os.path.exists(mark), timeout=T, what="item running")
    ex.shutdown(wait=False)
    # Returned while the item is held (until `release`): it did not wait for it.
    assert not running.done() and not pending.done()
    Path(release).touch()
    assert pending.result(timeout=T) == 36 and running.result(timeout=T) > 0
    ex.shutdown(wait=True)  # a second call waits for the first one's teardown


def test_shutdown_cancel_futures_cancels_only_what_waits(files):
    mark, release = files("mark"), files("release")
    ex = procpool.ProcessPoolExecutor(1)
    running = ex.submit(tasks.touch_and_wait, mark, release)
    pending = [ex.submit(tasks.square, i) for i in range(5)]
    wait_until(lambda: os.path.exists(mark), timeout=T, what="item running")
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in pending)
    Path(release).touch()
    assert running.result(timeout=T) > 0
    ex.shutdown(wait=True)


def test_context_manager_leaves_no_process():
    with procpool.ProcessPoolExecutor(2) as ex:
        pids = {pid for pid, _ in ex.map(tasks.pid_and, range(4))}
    assert pids and not any(alive(p) for p in pids)
    with pytest.raises(RuntimeError):
        ex.submit(tasks.square, 1)


def test_pending_work_of_shutdown_without_wait_runs_before_the_program_exits(tmp_path):
    # As in concurrent.futures: shutdown(wait=False) does not drop work at interpreter exit.
    script = f"""
import procpool, tasks
ex = procpool.ProcessPoolExecutor(1)
for i in range(3):
    ex.submit(tasks.sleep_then, 0.2, i).add_done_callback(
        lambda f: open({str(tmp_path)!r} + f"/{{f.result()}}", "w").close())
ex.shutdown(wait=False)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    subprocess.run([sys.executable, "-c", script], env=env, timeout=60, check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2"]


# -- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_must_be_positive(bad):
    with pytest.raises(ValueError, match="max_workers"):
        procpool.ProcessPoolExecutor(bad)


def test_other_arguments_are_validated_before_anything_starts():
    with pytest.raises(TypeError, match="max_workers"):
        procpool.ProcessPoolExecutor("2")
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        procpool.ProcessPoolExecutor(1, max_tasks_per_child=0)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="max_tasks_per_child"):
            procpool.ProcessPoolExecutor(1, max_tasks_per_child=bad)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        procpool.ProcessPoolExecutor(1, initializer=42)
    with pytest.raises(TypeError, match=r"initargs\[0\] \(lock\) cannot be pickled"):
        procpool.ProcessPoolExecutor(1, initializer=tasks.identity, initargs=(threading.Lock(),))
    with pytest.raises(TypeError, match="no_such_option"):
        procpool.ProcessPoolExecutor(1, no_such_option=1)


@pytest.mark.parametrize("ctx", ["fork", multiprocessing.get_context("fork")], ids=["name", "context"])
def test_fork_context_is_refused(ctx):
    # Deliberate: a fork of a threaded parent is unsafe, and code asking for fork usually
    # relies on what fork inherits, which a silent switch to forkserver would break.
    with pytest.raises(ValueError, match="fork"):
        procpool.ProcessPoolExecutor(1, mp_context=ctx)


def test_spawn_context_is_accepted():
    with procpool.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        assert ex.submit(tasks.square, 4).result(timeout=T) == 16


# -- initializer -------------------------------------------------------------------------------


def test_initializer_runs_once_per_worker_before_its_items(tmp_path):
    with procpool.ProcessPoolExecutor(2, initializer=tasks.remember_init, initargs=("hi", str(tmp_path))) as ex:
        states = [f.result(timeout=T) for f in [ex.submit(tasks.init_state) for _ in range(12)]]
        states += list(ex.map(tasks.init_state, range(12), chunksize=3))
        created = ex.pool.stats().created
    assert {(count, value) for _, count, value in states} == {(1, "hi")}
    logged = [name.split("-") for name in os.listdir(tmp_path)]
    assert all(n == "1" for _, n in logged)  # no process ran it twice
    assert len(logged) == created  # every worker ran it, items or not
    assert {pid for pid, _, _ in states} <= {int(pid) for pid, _ in logged}


def test_failing_initializer_breaks_the_executor():
    # The worker starts 0.3 s late, so all three items are queued before the pool breaks.
    ex = procpool.ProcessPoolExecutor(
        1, initializer=tasks.fail, initargs=("init boom",), faults="worker.start=delay:0.3"
    )
    try:
        futs = [ex.submit(tasks.square, i) for i in range(3)]
        errors = [f.exception(timeout=T) for f in futs]
        first = errors[0]
        assert isinstance(first, procpool.InitializerFailed) and isinstance(first, BrokenProcessPool)
        assert "initializer raised" in str(first)
        assert isinstance(first.__cause__, ValueError) and str(first.__cause__) == "init boom"
        assert "init boom" in str(first.__cause__.__cause__)  # the worker's traceback
        assert all(isinstance(e, procpool.InitializerFailed) for e in errors[1:])
        assert ex.pool.broken
        with pytest.raises(BrokenProcessPool):
            ex.submit(tasks.square, 1)
        with pytest.raises(BrokenProcessPool):
            ex.map(tasks.square, range(3))
    finally:
        ex.shutdown(wait=True)
    st = ex.pool.stats()
    assert st.created == st.destroyed + st.lost and st.nr_workers == 0


def test_initializer_failing_in_idle_workers_breaks_the_pool_before_any_item():
    pool = procpool.WorkerPool(min_workers=2, max_workers=2, initializer=tasks.fail, initargs=("idle boom",))
    try:
        wait_until(lambda: pool.broken, timeout=T, what="pool broken")
        with pytest.raises(procpool.InitializerFailed, match="idle boom"):
            pool.submit(tasks.square, 1)
        wait_until(lambda: pool.stats().nr_workers == 0, timeout=T, what="both workers destroyed")
    finally:
        pool.close()
    st = pool.stats()
    assert st.created == 2 and st.created == st.destroyed + st.lost


# -- max_tasks_per_child -----------------------------------------------------------------------


def test_max_tasks_per_child_replaces_workers_in_order():
    with procpool.ProcessPoolExecutor(1, max_tasks_per_child=3) as ex:
        pids = [f.result(timeout=T) for f in [ex.submit(tasks.whoami) for _ in range(9)]]
        assert pids[0:3] == [pids[0]] * 3 and pids[3:6] == [pids[3]] * 3 and pids[6:9] == [pids[6]] * 3
        assert len(set(pids)) == 3
        st = ex.pool.stats()
        # Retired through the normal exit path: destroyed, not lost.
        assert (st.created, st.destroyed, st.lost, st.killed) == (3, 3, 0, 0)
        assert st.created == st.nr_workers + st.destroyed + st.lost
        wait_until(lambda: not any(alive(p) for p in pids), timeout=T, what="retired workers gone")
        assert ex.submit(tasks.square, 3).result(timeout=T) == 9


def test_max_tasks_per_child_with_several_workers_and_chunks():
    with procpool.ProcessPoolExecutor(2, max_tasks_per_child=2) as ex:
        out = list(ex.map(tasks.pid_and, range(24), chunksize=2))
        assert [x for _, x in out] == list(range(24))
        per_pid: dict[int, int] = {}
        for pid, _ in out:
            per_pid[pid] = per_pid.get(pid, 0) + 1
        assert max(per_pid.values()) <= 4  # 2 chunks of 2 per worker
        assert len(per_pid) >= 6


# -- failures: each fails its own item only ---------------------------------------------------


def test_function_exception_comes_back_with_its_traceback():
    with procpool.ProcessPoolExecutor(1) as ex:
        err = ex.submit(tasks.fail, "nope").exception(timeout=T)
        assert isinstance(err, ValueError) and str(err) == "nope"
        assert isinstance(err.__cause__, procpool.RemoteTraceback) and "in fail" in str(err.__cause__)


@pytest.mark.parametrize(
    "crash, how", [((tasks.exit_hard, 3), "exited with status 3"), ((tasks.kill_self,), "SIGKILL")]
)
def test_a_crashing_worker_fails_only_its_item(files, crash, how):
    mark, release = files("mark"), files("release")
    with procpool.ProcessPoolExecutor(2) as ex:
        bystander = ex.submit(tasks.touch_and_wait, mark, release)
        wait_until(lambda: os.path.exists(mark), timeout=T, what="bystander running")
        err = ex.submit(*crash).exception(timeout=T)
        assert isinstance(err, procpool.WorkerLost) and isinstance(err, BrokenProcessPool)
        assert how in str(err)
        Path(release).touch()
        assert bystander.result(timeout=T) > 0  # the other worker's item is untouched
        assert ex.submit(tasks.square, 7).result(timeout=T) == 49  # and the executor goes on
        assert ex.pool.stats().lost == 1


def test_pickling_failures_on_either_side_fail_only_their_item():
    with procpool.ProcessPoolExecutor(1) as ex:
        # The call cannot be pickled here: the future fails, as in the standard library, with
        # a pickling error (also a TypeError) naming the part; nothing was queued.
        err = ex.submit(tasks.identity, threading.Lock()).exception(timeout=T)
        assert isinstance(err, procpool.CallNotPicklable) and isinstance(err, pickle.PicklingError)
        assert isinstance(err, TypeError) and "argument 0 (lock)" in str(err)
        assert (err.side, err.what) == ("parent", "call")
        it = ex.map(tasks.identity, [1, 2, threading.Lock()])
        assert next(it) == 1 and next(it) == 2
        with pytest.raises(procpool.CallNotPicklable, match="cannot be pickled"):
            next(it)
        # ... nor by the worker: the standard library breaks its pool (BrokenProcessPool).
        err = ex.submit(tasks.identity, tasks.FailsToUnpickle()).exception(timeout=T)
        assert isinstance(err, procpool.CallNotUnpicklable) and isinstance(err, BrokenProcessPool)
        assert isinstance(err, procpool.TransferError) and "could not be unpickled in the worker" in str(err)
        assert (err.side, err.what) == ("worker", "call")
        assert "FailsToUnpickle refuses" in str(err.__cause__)
        # The result cannot be pickled by the worker (the standard library: a pickling error) ...
        err = ex.submit(tasks.return_unpicklable).exception(timeout=T)
        assert isinstance(err, procpool.ResultNotPicklable) and isinstance(err, (pickle.PicklingError, TypeError))
        assert "could not be pickled in the worker" in str(err) and (err.side, err.what) == ("worker", "result")
        # ... or unpickled here (the standard library: BrokenProcessPool).
        err = ex.submit(tasks.return_fails_to_unpickle).exception(timeout=T)
        assert isinstance(err, procpool.ResultNotUnpicklable) and isinstance(err, BrokenProcessPool)
        assert "result could not be unpickled here" in str(err) and (err.side, err.what) == ("parent", "result")
        assert isinstance(err.__cause__, ValueError)
        # Loading the call kills the worker outright.
        err = ex.submit(tasks.identity, tasks.ExitsOnUnpickle()).exception(timeout=T)
        assert isinstance(err, procpool.WorkerLost) and "exited with status 7" in str(err)
        # Deliberate difference: none of that broke the executor.
        assert list(ex.map(tasks.square, range(4))) == [0, 1, 4, 9]
        st = ex.pool.stats()
        assert st.nr_pending == 0 and st.lost == 1


def test_a_batch_with_an_unpicklable_call_is_not_cut_short():
    # Code written for concurrent.futures: submit them all, then look at each outcome.
    calls = [1, threading.Lock(), 3]
    with procpool.ProcessPoolExecutor(2) as ex:
        futs = {ex.submit(tasks.square if i != 1 else tasks.identity, x): i for i, x in enumerate(calls)}
        outcome = {}
        for fut in cf.as_completed(futs, timeout=T):
            try:
                outcome[futs[fut]] = fut.result()
            except pickle.PicklingError as exc:
                outcome[futs[fut]] = exc
        assert outcome[0] == 1 and outcome[2] == 9
        assert isinstance(outcome[1], procpool.CallNotPicklable)


def test_workerpool_submit_still_fails_fast_on_an_unpicklable_call():
    # WorkerPool is procpool's own API: the error comes from submit itself, nothing is queued.
    with procpool.WorkerPool(0, 1) as pool:
        with pytest.raises(procpool.CallNotPicklable, match=r"argument 0 \(lock\)"):
            pool.submit(tasks.identity, threading.Lock())
        assert pool.stats().nr_pending == 0 and pool.stats().created == 0


def test_remote_traceback_is_the_standard_librarys_class():
    with procpool.ProcessPoolExecutor(1) as ex:
        err = ex.submit(tasks.fail, "nope").exception(timeout=T)
    assert isinstance(err.__cause__, cf.process._RemoteTraceback)
    assert issubclass(type(err.__cause__), cf.process._RemoteTraceback)
    assert "in fail\n    raise ValueError(msg)" in err.__cause__.tb


def test_max_workers_zero_says_what_the_standard_library_says():
    for bad in (0, -3):
        with pytest.raises(ValueError, match="^max_workers must be greater than 0$"):
            procpool.ProcessPoolExecutor(max_workers=bad)


def test_submit_from_an_atexit_handler_is_refused_as_after_interpreter_shutdown(tmp_path):
    out = tmp_path / "out"
    script = f"""
import atexit, procpool, tasks
ex = procpool.ProcessPoolExecutor(1)
assert ex.submit(tasks.square, 3).result(timeout=30) == 9
def late():
    for how in ("submit", "map"):
        try:
            getattr(ex, how)(tasks.square, *([2] if how == "submit" else [[2]]))
            result = "accepted"
        except RuntimeError as exc:
            result = str(exc)
        with open({str(out)!r}, "a") as f:
            f.write(how + ": " + result + "\\n")
atexit.register(late)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=60, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().splitlines() == [
        "submit: cannot schedule new futures after interpreter shutdown",
        "map: cannot schedule new futures after interpreter shutdown",
    ]


def test_processes_lists_worker_pids_and_terminate_fails_only_that_item(files):
    mark, release = files("mark"), files("release")
    with procpool.ProcessPoolExecutor(2) as ex:
        assert ex._max_workers == 2 and ex._mp_context.get_start_method() == "forkserver"
        assert dict(ex._processes) == {}  # workers start on demand
        running = ex.submit(tasks.write_pid_and_wait, mark, release)
        wait_until(lambda: os.path.exists(mark) and Path(mark).read_text(), timeout=T, what="item running")
        pid = int(Path(mark).read_text())
        procs = ex._processes
        assert pid in procs and procs[pid].pid == pid and procs[pid].is_alive() and alive(pid)
        with pytest.raises(TypeError):
            procs[1] = None  # read-only
        # The recipe: terminate the workers on a timeout.
        for handle in ex._processes.values():
            handle.terminate()
        for handle in procs.values():
            handle.join(T)
            assert not handle.is_alive() and handle.exitcode == -signal.SIGTERM
        assert not alive(pid)
        err = running.exception(timeout=T)
        assert isinstance(err, procpool.WorkerLost) and "SIGTERM" in str(err)
        assert pid not in ex._processes
        assert ex.submit(tasks.square, 5).result(timeout=T) == 25  # replaced, still usable
        assert pid not in ex._processes and ex._processes
        handle = next(iter(ex._processes.values()))
        handle.kill()
        handle.join(T)
        assert not handle.is_alive() and handle.exitcode == -signal.SIGKILL and not alive(handle.pid)
        handle.kill()  # reaped: a no-op, never a signal to a pid that may be reused
        Path(release).touch()


# -- beyond the standard library: item timeout, cancel_running ----------------------------------


def test_item_timeout_kills_and_replaces_the_worker(files):
    mark, release = files("mark"), files("release")
    with procpool.ProcessPoolExecutor(1) as ex:
        fut = ex.submit_with(tasks.write_pid_and_wait, mark, release, timeout=0.5)
        behind = ex.submit(tasks.square, 8)  # waits for the only worker: gets its replacement
        err = fut.exception(timeout=T)
        assert isinstance(err, procpool.ItemTimeout) and isinstance(err, TimeoutError)
        assert "timeout of 0.5 s" in str(err) and "SIGKILL" in str(err)
        victim = int(Path(mark).read_text())
        wait_until(lambda: not alive(victim), timeout=T, what="timed-out worker gone")
        assert behind.result(timeout=T) == 64
        assert ex.submit(tasks.whoami).result(timeout=T) != victim
        assert ex.submit_with(tasks.square, 5, timeout=T).result(timeout=T) == 25
        st = ex.pool.stats()
        assert (st.killed, st.lost) == (1, 0)
        assert st.created == st.nr_workers + st.destroyed + st.lost


def test_item_timeout_counts_from_when_the_item_starts():
    with procpool.ProcessPoolExecutor(1) as ex:
        ahead = ex.submit(tasks.sleep_then, 0.8, "ahead")
        # Waits 0.8 s for the only worker, then runs 0.1 s: well within its 0.5 s.
        timed = ex.submit_with(tasks.sleep_then, 0.1, "timed", timeout=0.5)
        assert timed.result(timeout=T) == "timed" and ahead.result(timeout=T) == "ahead"
        with pytest.raises(TypeError, match="timeout"):
            ex.submit_with(tasks.square, 1, timeout="soon")


def test_cancel_running_kills_the_worker_and_the_pool_carries_on(files):
    mark, release = files("mark"), files("release")
    with procpool.ProcessPoolExecutor(1) as ex:
        running = ex.submit(tasks.write_pid_and_wait, mark, release)
        waiting = ex.submit(tasks.square, 3)
        wait_until(lambda: os.path.exists(mark), timeout=T, what="item running")
        assert running.cancel() is False  # the Future contract: a running future cannot be
        assert ex.cancel_running(waiting) is True and waiting.cancelled()
        assert ex.cancel_running(running) is True
        err = running.exception(timeout=T)
        assert isinstance(err, procpool.ItemCancelled) and isinstance(err, cf.CancelledError)
        assert not running.cancelled()  # finished, with that error
        assert ex.cancel_running(running) is False  # already over
        victim = int(Path(mark).read_text())
        wait_until(lambda: not alive(victim), timeout=T, what="cancelled worker gone")
        done = ex.submit(tasks.square, 4)
        assert done.result(timeout=T) == 16 and ex.cancel_running(done) is False
        st = ex.pool.stats()
        assert (st.killed, st.lost) == (1, 0) and st.created == st.nr_workers + st.destroyed + st.lost


def test_lambdas_and_closures_with_cloudpickle():
    pytest.importorskip("cloudpickle")
    offset = 10
    with procpool.ProcessPoolExecutor(2, initializer=lambda: os.environ.update(PROCPOOL_TEST_INIT="yes")) as ex:
        assert ex.submit(lambda x: x + offset, 1).result(timeout=T) == 11
        assert list(ex.map(lambda x: x * offset, range(5), chunksize=2)) == [0, 10, 20, 30, 40]
        assert ex.submit(lambda: os.environ.get("PROCPOOL_TEST_INIT")).result(timeout=T) == "yes"


# -- nothing of a call or its result is kept once the caller lets go ---------------------------


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_frees_each_result_as_soon_as_the_caller_drops_it(chunksize):
    with procpool.ProcessPoolExecutor(2) as ex:
        still_alive = []
        for obj in ex.map(tasks.make_object, range(10), chunksize=chunksize):
            assert isinstance(obj, tasks.Payload)
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            still_alive.append(ref() is not None)
        assert still_alive == [False] * 10


def test_a_closed_chunked_map_frees_the_rest_of_its_chunk():
    with procpool.ProcessPoolExecutor(1) as ex:
        it = ex.map(tasks.make_object, range(6), chunksize=3)
        first = next(it)
        refs = [weakref.ref(first)]
        it.close()
        assert list(it) == []
        del first
        gc.collect()
        assert refs[0]() is None
        # The two results of the chunk not read are gone too: nothing but the chunk held them.
        assert not [o for o in gc.get_objects() if type(o) is tasks.Payload]


def test_submit_keeps_neither_the_arguments_nor_a_dropped_futures_result(files):
    mark, release = files("mark"), files("release")
    with procpool.ProcessPoolExecutor(1) as ex:
        blocker = ex.submit(tasks.write_pid_and_wait, mark, release)
        arg = tasks.Counter()
        ref_arg = weakref.ref(arg)
        pending = ex.submit(tasks.identity, arg)  # queued behind the blocker: not yet sent
        del arg
        gc.collect()
        assert ref_arg() is None  # pickled at submit; the pending item holds only bytes
        Path(release).touch()
        result = pending.result(timeout=T)
        ref_result = weakref.ref(result)
        del result, pending
        gc.collect()
        assert ref_result() is None  # the future was the only holder, and it is gone
        assert blocker.result(timeout=T) > 0
        # Through as_completed, the usual loop: each result freed once its future is dropped.
        futs = [ex.submit(tasks.make_object, i) for i in range(5)]
        refs = [weakref.ref(f.result(timeout=T)) for f in cf.as_completed(futs, timeout=T)]
        del futs
        gc.collect()
        assert [r() for r in refs] == [None] * 5


# -- initargs that may only be shared through inheritance -------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("executor_ctx", [None, "forkserver", "spawn"])
@pytest.mark.parametrize("objects_ctx", ["forkserver", "spawn"])
def test_logging_cookbook_queue_lock_and_value_reach_the_workers(executor_ctx, objects_ctx):
    ctx = multiprocessing.get_context(objects_ctx)
    queue, lock, counter = ctx.Queue(), ctx.Lock(), ctx.Value("i", 0)
    with procpool.ProcessPoolExecutor(1, mp_context=executor_ctx) as ex:
        ex.submit(tasks.square, 1).result(timeout=T)  # the program's spawner and Manager are up
    fds_before = _open_fds()
    with procpool.ProcessPoolExecutor(
        2, mp_context=executor_ctx, initializer=tasks.configure_logging_to, initargs=(queue, lock, counter)
    ) as ex:
        pids = list(ex.map(tasks.log_and_count, range(6)))
    assert counter.value == 6  # every worker incremented the one shared Value, under the lock
    records = sorted(queue.get(timeout=T).getMessage() for _ in range(6))
    assert [r.split(" from ")[0] for r in records] == [f"item {i}" for i in range(6)]
    assert {int(r.split(" from ")[1]) for r in records} == set(pids)
    assert _open_fds() == fds_before  # the pool's copies of the queue's pipe ends are closed


def test_workerpool_initializer_gets_inherited_objects_too():
    ctx = multiprocessing.get_context("forkserver")
    queue, lock, counter = ctx.Queue(), ctx.Lock(), ctx.Value("i", 0)
    with procpool.WorkerPool(0, 2, initializer=tasks.configure_logging_to, initargs=(queue, lock, counter)) as pool:
        futs = [pool.submit(tasks.log_and_count, i) for i in range(4)]
        assert all(f.result(timeout=T) > 0 for f in futs)
        # A worker started after the first ones (the spawner got the descriptors again).
        pool.destroy_idle(pool.stats().nr_idle)
        assert pool.submit(tasks.log_and_count, 4).result(timeout=T) > 0
    assert counter.value == 5
    assert sorted(queue.get(timeout=T).getMessage().split(" from ")[0] for _ in range(5)) == [
        f"item {i}" for i in range(5)
    ]


def test_a_manager_queue_works_as_initarg():
    with multiprocessing.Manager() as manager:
        queue = manager.Queue()
        with procpool.ProcessPoolExecutor(1, initializer=tasks.remember_queue, initargs=(queue,)) as ex:
            assert ex.submit(tasks.put_on_remembered, "hello").result(timeout=T) is None
        assert queue.get(timeout=T) == "hello"


def test_fork_context_objects_are_refused_at_creation_with_what_to_use_instead():
    queue = multiprocessing.get_context("fork").Queue()
    fds_before = _open_fds()
    with pytest.raises(TypeError, match=r"initargs\[0\] \(Queue\) was made by a 'fork' context.*forkserver.*Manager"):
        procpool.ProcessPoolExecutor(1, initializer=tasks.identity, initargs=(queue,))
    assert _open_fds() == fds_before
