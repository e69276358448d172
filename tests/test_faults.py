"""Crashes at every moment: the pool stays usable and no item vanishes (invariants 4-7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import tasks
from conftest import alive, my_segments, started_workers, title_of, wait_until

import procpool
from procpool.idtable import IdTable


def busy_pid(pool) -> int:
    return wait_until(lambda: next((w.pid for w in pool.workers() if w.state == "busy"), None), what="a busy worker")


def test_sigkilled_busy_worker_fails_only_its_item(tmp_path):
    release = tmp_path / "go"
    with procpool.WorkerPool(min_workers=2, max_workers=2) as pool:
        victim_fut = pool.submit(tasks.touch_and_wait, str(tmp_path / "m"), str(tmp_path / "never"))
        wait_until(lambda: (tmp_path / "m").exists(), what="victim running")
        victim = busy_pid(pool)
        victim_id = next(w.id for w in pool.workers() if w.pid == victim)
        others = [pool.submit(tasks.wait_for_file, str(release), i) for i in range(5)]
        os.kill(victim, signal.SIGKILL)
        err = victim_fut.exception(timeout=5)
        assert isinstance(err, procpool.WorkerLost)
        assert isinstance(err, procpool.ProcpoolError)
        from concurrent.futures.process import BrokenProcessPool

        assert isinstance(err, BrokenProcessPool)
        msg = str(err)
        assert f"worker {victim_id}" in msg and f"pid {victim}" in msg and "SIGKILL" in msg
        release.touch()
        assert [f.result(timeout=10) for f in others] == list(range(5))
        st = pool.stats()
        assert st.lost == 1 and st.nr_workers == 2  # replaced, because work was waiting
        table = IdTable.attach(pool.table_name, writable=False)
        try:
            assert table.nr_allocated() == 2  # its id was freed on its behalf and reused
        finally:
            table.close()


def test_worker_lost_is_seen_quickly():
    with procpool.WorkerPool(min_workers=1, max_workers=1) as pool:
        fut = pool.submit(tasks.forever)
        pid = busy_pid(pool)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        assert isinstance(fut.exception(timeout=5), procpool.WorkerLost)
        # Generous bound (the issue asks for 100 ms; CI machines are noisy): the loss is
        # noticed by the process sentinel, not by a polling timeout.
        assert time.monotonic() - t0 < 2.0


def test_function_calling_os_exit_is_a_lost_worker():
    with procpool.WorkerPool(min_workers=1, max_workers=1) as pool:
        err = pool.submit(tasks.exit_hard, 7).exception(timeout=10)
        assert isinstance(err, procpool.WorkerLost) and "exited with status 7" in str(err)
        assert pool.submit(tasks.square, 3).result(timeout=10) == 9


@pytest.mark.parametrize("state", ["idle", "dying"])
def test_killed_idle_or_dying_worker_leaves_the_pool_usable(state):
    opts = {"linger_dying": 3.0} if state == "dying" else {}
    pool = procpool.WorkerPool(min_workers=2, max_workers=2, **opts)
    try:
        victim = pool.workers()[0]
        if state == "dying":
            pool.destroy_idle(1)
            victim = next(w for w in pool.workers() if w.state == "dying")
            wait_until(lambda: pool.stats().nr_dying == 1)
        os.kill(victim.pid, signal.SIGKILL)
        wait_until(lambda: not alive(victim.pid), what="victim gone")
        wait_until(lambda: victim.pid not in {w.pid for w in pool.workers()}, what="victim reaped")
        assert [pool.submit(tasks.square, i).result(timeout=10) for i in range(4)] == [0, 1, 4, 9]
    finally:
        t0 = time.monotonic()
        pool.close()
        assert time.monotonic() - t0 < 10


def test_worker_killed_holding_the_manager_lock_does_not_block_the_next_one():
    # Worker 0 is SIGKILLed at the exact moment it holds the Manager attach lock mid-detach.
    # Worker 1 detaches last (after the teardown installed its completion), so it completes.
    pool = procpool.WorkerPool(
        min_workers=2, max_workers=2, faults="detach.locked@0=kill,detach.before_lock@1=delay:0.5"
    )
    pids = [w.pid for w in pool.workers()]
    t0 = time.monotonic()
    pool.close()
    assert time.monotonic() - t0 < 10
    assert pool.manager_locks.attach.broken >= 1  # the next acquirer took the lock over from the dead owner
    assert pool.completions == 1
    assert not any(alive(p) for p in pids)


# Workers 1-3 ask for the attach lock a moment after worker 0, which then holds it.
LATER = ",".join(f"detach.before_lock@{i}=delay:0.05" for i in (1, 2, 3))


def _hold_attach_lock_and_close(pool) -> tuple[threading.Thread, dict[int, int]]:
    """Close ``pool`` in a thread while its worker 0 holds the attach lock (fault point) and
    the others, dying, wait for it; returns the closing thread and the workers' pids by id."""
    pids = {w.id: w.pid for w in started_workers(pool)}
    closer = threading.Thread(target=pool.close)
    closer.start()
    wait_until(lambda: (pool.manager_locks.attach.owner() or (0,))[0] == pids[0], what="worker 0 holds the attach lock")
    wait_until(
        lambda: all(title_of(pid) == "kworker/dying" for wid, pid in pids.items() if wid), what="the others dying"
    )
    return closer, pids


@pytest.mark.parametrize(
    "victim, hold",
    [
        # Worker 0, holding the lock, is SIGKILLed: the next waiter takes the lock over.
        (0, 60),
        # Worker 2 dies while it waits for the lock (or just before it asks): the lock passes
        # over it, and the parent frees its id on its behalf.
        (2, 1),
    ],
)
def test_workers_queued_to_detach_survive_a_sigkill_in_the_queue(victim, hold):
    pool = procpool.WorkerPool(min_workers=4, max_workers=4, faults=f"detach.locked@0=delay:{hold},{LATER}")
    closer, pids = _hold_attach_lock_and_close(pool)
    os.kill(pids[victim], signal.SIGKILL)
    closer.join(20)
    assert not closer.is_alive()
    assert pool.manager_locks.attach.broken == (1 if victim == 0 else 0)  # taken over only from a dead holder
    # Once at most; 0 when the parent, freeing the dead worker's id, was the last to detach
    # before the teardown looked (then nothing was left to wait for).
    assert pool.completions <= 1
    assert not any(alive(p) for p in pids.values())


def test_worker_destroyed_before_it_ever_ran():
    # The worker is still starting (delayed before it touches its slot) when it is destroyed.
    with procpool.WorkerPool(min_workers=2, max_workers=2, faults="worker.start@1=delay:0.5") as pool:
        assert pool.destroy_idle(2) == 2
        assert pool.stats().nr_workers == 0
        assert pool.submit(tasks.square, 7).result(timeout=10) == 49


def test_teardown_while_the_manager_is_creating_a_worker():
    # Creation stalls after allocating ids under the lock; close() arrives meanwhile and must
    # wait for the creator (M arb), then still see every worker detach.
    pool = procpool.WorkerPool(min_workers=0, max_workers=2, faults="create.after_alloc=delay:0.5")
    fut = pool.submit(tasks.square, 8)
    table = IdTable.attach(pool.table_name, writable=False)
    try:
        # The arbiter is in the stalled creation once it allocated the id (the fault then holds
        # it 0.5 s; seen late on a loaded machine, the worker is at worst still starting).
        wait_until(lambda: table.nr_allocated() == 1, timeout=30, what="the id allocated")
    finally:
        table.close()
    pool.close()
    assert fut.result(timeout=0) == 64
    assert my_segments() == []


def test_creation_failure_is_retried_after_a_cooldown():
    # The first start of worker 0 raises; the pool retries after its cooldown and the item runs.
    pool = procpool.WorkerPool(min_workers=0, max_workers=1, faults="create.start=raise")
    try:
        fut = pool.submit(tasks.square, 2)
        time.sleep(0.3)
        assert not fut.done() and pool.stats().nr_workers == 0
        pool.fault_spec.clear()  # the OS "recovers"
        assert fut.result(timeout=5) == 4
    finally:
        pool.close()


def test_never_returning_function_is_killed_by_close_timeout():
    pool = procpool.WorkerPool(min_workers=1, max_workers=1)
    running = pool.submit(tasks.forever)
    busy = busy_pid(pool)
    pending = pool.submit(tasks.square, 1)
    t0 = time.monotonic()
    pool.close(timeout=0.3)
    assert time.monotonic() - t0 < 5
    assert isinstance(running.exception(timeout=0), procpool.TeardownTimeout)
    assert isinstance(pending.exception(timeout=0), procpool.PoolClosed)
    assert not alive(busy)


def test_kill_storm_loses_no_item():
    # Kill random busy workers while 200 items flow: every item ends as a result or WorkerLost.
    with procpool.WorkerPool(min_workers=2, max_workers=3) as pool:
        futs = [pool.submit(tasks.sleep_then, 0.005, i) for i in range(200)]
        stop = threading.Event()

        def killer():
            while not stop.is_set():
                for w in pool.workers():
                    if w.state == "busy":
                        try:
                            os.kill(w.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                        break
                time.sleep(0.05)

        t = threading.Thread(target=killer)
        t.start()
        try:
            outcomes = []
            for i, f in enumerate(futs):
                exc = f.exception(timeout=30)
                outcomes.append("lost" if isinstance(exc, procpool.WorkerLost) else f.result())
                if exc is None:
                    assert f.result() == i
        finally:
            stop.set()
            t.join()
        assert len(outcomes) == 200 and outcomes.count("lost") >= 1
        # Each lost worker failed at most the one item it was running (prefetched items behind
        # it are requeued; a worker seen busy may have gone idle before the signal landed).
        assert 1 <= outcomes.count("lost") <= pool.stats().lost


PARENT_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time, psutil, procpool
    def main():
        if sys.argv[1] == "threaded":  # a second thread: the spawner must not be a fork of us
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        ctx = "forkserver" if sys.argv[1] == "explicit-forkserver" else None
        pool = procpool.WorkerPool(min_workers=3, max_workers=3, mp_context=ctx)
        pool.manager_locks  # the Manager exists once they are made (behind the constructor)
        deadline = time.monotonic() + 30  # the rest of min_workers start behind it too
        while pool.stats().nr_workers < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = [w.pid for w in pool.workers()]
        helpers = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in pids]
        print(pool.table_name, ",".join(map(str, pids)), ",".join(map(str, helpers)), flush=True)
        time.sleep(60)
    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.parametrize("mode", ["single-threaded", "threaded", "explicit-forkserver"])
def test_parent_sigkill_takes_every_worker_and_the_table_with_it(tmp_path, mode):
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, text=True)
    try:
        name, pids, helpers = proc.stdout.readline().split()
        pids = [int(p) for p in pids.split(",")]
        helpers = [int(p) for p in helpers.split(",")]  # spawner, Manager, fork server, tracker
        assert len(pids) == 3 and all(alive(p) for p in pids)
        assert os.path.exists(f"/dev/shm/{name}")
        spawner = psutil.Process(pids[0]).parent()
        assert title_of(spawner.pid) == "procpool: spawner"
        # Single-threaded, the program forks its spawner itself (fast); with threads, or when
        # the program asked for a start method, the spawner comes from multiprocessing's fork
        # server, never from a fork of the program.
        assert (spawner.ppid() == proc.pid) == (mode == "single-threaded")
        proc.kill()
        proc.wait()
        wait_until(lambda: not any(alive(p) for p in pids), timeout=2, what="workers gone within 2 s")
        wait_until(lambda: not os.path.exists(f"/dev/shm/{name}"), timeout=5, what="table unlinked")
        wait_until(lambda: not any(alive(p) for p in helpers), timeout=5, what="spawner and Manager gone")
    finally:
        proc.kill()
        proc.wait()


def test_spawner_killed_loses_its_workers_and_the_pool_recovers():
    with procpool.WorkerPool(min_workers=2, max_workers=2) as pool:
        pids = [w.pid for w in pool.workers()]
        spawner = psutil.Process(pids[0]).parent()
        spawner.kill()
        wait_until(lambda: pool.stats().nr_workers == 0, what="workers written off")
        wait_until(lambda: not any(alive(p) for p in pids), what="orphaned workers killed")
        assert pool.submit(tasks.square, 11).result(timeout=10) == 121  # a new spawner
        assert psutil.Process(pool.workers()[0].pid).parent().pid != spawner.pid


HANDLER_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time, procpool
    def main():
        # The program's own SIGTERM handler must not be inherited by the spawner, the Manager
        # or the workers (the spawner is a fork of this single-threaded program).
        signal.signal(signal.SIGTERM, lambda *a: print("program got SIGTERM", flush=True))
        with procpool.WorkerPool(min_workers=2, max_workers=2) as pool:
            print(*[w.pid for w in pool.workers()], flush=True)
            sys.stdin.readline()
    if __name__ == "__main__":
        main()
    """
)

THREADED_HANDLER_SCRIPT = textwrap.dedent(
    """
    import signal, sys, threading, procpool
    # Installed when the module is imported: the fork server imports it again (its preload),
    # so the spawner it starts (this program runs a thread) inherits the handler from there.
    # A worker resets only the spawner's own handler: the spawner must have reset this one.
    signal.signal(signal.SIGTERM, lambda *a: print("program got SIGTERM", flush=True))
    def main():
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        with procpool.WorkerPool(min_workers=2, max_workers=2) as pool:
            print(*[w.pid for w in pool.workers()], flush=True)
            sys.stdin.readline()
    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.parametrize("text", [HANDLER_SCRIPT, THREADED_HANDLER_SCRIPT], ids=["forked", "forkserver"])
def test_workers_do_not_inherit_the_programs_signal_handlers(tmp_path, text):
    script = tmp_path / "handler.py"
    script.write_text(text)
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        os.kill(pids[0], signal.SIGTERM)
        wait_until(lambda: not alive(pids[0]), timeout=5, what="worker killed by SIGTERM")
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=20) == 0
        assert "program got SIGTERM" not in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()


def test_a_worker_sigtermed_before_it_set_up_its_signals_still_dies():
    # The spawner blocks SIGTERM (a group signal must not stop it before its clean-up); a new
    # worker inherits the block until it has restored the default action: a SIGTERM in
    # between waits, then kills.
    pool = procpool.WorkerPool(min_workers=1, max_workers=1, faults="worker.forked=delay:1")
    try:
        pid = pool.workers()[0].pid
        os.kill(pid, signal.SIGTERM)  # during the delay: before the worker touched its signals
        wait_until(lambda: not alive(pid), timeout=10, what="the worker killed by the SIGTERM")
    finally:
        pool.close()
    st = pool.stats()  # reaped as lost, or destroyed by close() first: either way, off the books
    assert st.created == st.destroyed + st.lost == 1


def _sigmask(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith(field + ":"))


def test_the_spawner_blocks_rather_than_ignores_what_workers_take_at_default():
    # A worker must never inherit an ignored SIGTERM: one sent between its fork and its own
    # signal set-up would be discarded and the worker would outlive it. The spawner blocks
    # SIGTERM/SIGHUP/SIGQUIT (pending, never delivered to it) and workers unblock them.
    with procpool.WorkerPool(min_workers=1, max_workers=1) as pool:
        worker = pool.workers()[0]
        spawner = psutil.Process(worker.pid).ppid()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            bit = 1 << (sig - 1)
            assert _sigmask(spawner, "SigBlk") & bit and not _sigmask(spawner, "SigIgn") & bit, sig
            assert pool.submit(tasks.square, 3).result(timeout=10) == 9  # the worker is set up
            assert not _sigmask(worker.pid, "SigBlk") & bit and not _sigmask(worker.pid, "SigIgn") & bit, sig
        os.kill(spawner, signal.SIGTERM)  # pending in the spawner, never delivered
        assert _sigmask(spawner, "ShdPnd") & (1 << (signal.SIGTERM - 1))
        assert pool.submit(tasks.square, 4).result(timeout=10) == 16
        assert alive(spawner)


def _pipes_and_sockets(pid: int) -> tuple[set[str], int]:
    """The pipes (``pipe:[inode]``) a process holds beyond stdio, and how many sockets."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if int(fd) > 2:
            try:
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except FileNotFoundError:
                pass
    return {t for t in targets if t.startswith("pipe:")}, sum(t.startswith("socket:") for t in targets)


def test_each_worker_holds_its_own_pipes_and_no_other_workers():
    # The spawner works out once per batch what a new worker closes (its own descriptors, the
    # request's, the other workers'), in runs: each worker keeps its work and result pipes,
    # the pool's completion pipe and its Manager connection, nothing of its batch-mates'.
    # Six workers: the constructor's batch and the filler's.
    with procpool.WorkerPool(min_workers=6, max_workers=6) as pool:
        pids = [w.pid for w in started_workers(pool)]
        wait_until(lambda: all((title_of(p) or "").startswith("kworker/") for p in pids), what="workers set up")
        held = {}
        for pid in pids:
            pipes, sockets = _pipes_and_sockets(pid)
            assert sockets <= 1  # its Manager connection
            held[pid] = pipes
        # What all hold: the pool's completion pipe (and what the spawner holds of its own
        # Manager start, the same in every worker)
        shared = set.intersection(*held.values())
        own = {pid: pipes - shared for pid, pipes in held.items()}
        for pid, pipes in own.items():
            assert len(pipes) == 2, held[pid]  # its work pipe and its result pipe
            assert not any(pipes & theirs for other, theirs in own.items() if other != pid)
