"""Program death takes everything with it; helpers hold only what they need.

Each test runs a real program (a script in tmp_path) that makes a pool, kills or signals it
from here, and watches from outside with psutil: its workers (busy ones too), its spawner and
its Manager must be gone, and no /dev/shm table of its pid left.

The bound: GONE_WITHIN (1 s, what the issue asks) from the kill, asserted whenever the machine
is not overloaded; under load (1-minute load average above the CPU count: other suites run
on this 2-core machine at the same time) the bound is GONE_UNDER_LOAD. Either way the check
has an end: a helper that stays is a failure, never a hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from conftest import alive, my_segments, title_of, wait_until

from procpool.creation import FIRST_BATCH

pytestmark = pytest.mark.timeout(120)

GONE_WITHIN = 1.0
GONE_UNDER_LOAD = 5.0

# Prints {"spawner", "manager", "workers"} once every worker is busy (or idle, with BUSY=0),
# then waits to be killed. THREADED=1: a thread runs before the first pool, so the spawner
# starts through the fork server instead of as a fork of the program.
PROGRAM = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    import procpool
    from procpool import manager, spawner

    def main():
        # Default actions, whatever this program inherited (nohup, a supervisor's SIG_IGN):
        # the test is about procpool's helpers, not about the disposition it was started with.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        n, busy, threaded = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
        if threaded:
            threading.Thread(target=threading.Event().wait, daemon=True).start()
        pool = procpool.WorkerPool(min_workers=n, max_workers=n, idle_timeout=600)
        futs = [pool.submit(time.sleep, 60) for _ in range(busy)]
        deadline = time.monotonic() + 30
        while pool.stats().nr_busy < busy and time.monotonic() < deadline:
            time.sleep(0.01)
        pool.manager_locks  # made (the Manager started) behind the constructor
        print(json.dumps({
            "spawner": spawner.spawner_pid(),
            "manager": manager.server_pid(),
            "workers": [w.pid for w in pool.workers()],
            "busy": pool.stats().nr_busy,
        }), flush=True)
        time.sleep(600)

    if __name__ == "__main__":
        main()
    """
)


def _start(tmp_path, *args: str, new_session: bool = False) -> subprocess.Popen:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def _pids(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    assert line, "the program died before it reported its processes"
    return json.loads(line)


def _overloaded() -> bool:
    return os.getloadavg()[0] > (os.cpu_count() or 1)


def assert_all_gone(program: int, pids: list[int], since: float) -> float:
    """Every pid gone (or a zombie awaiting init) and no table of ``program`` left in /dev/shm,
    within the bound (module docstring). Returns the time it took, from ``since``."""

    def gone() -> bool:
        return not any(alive(p) for p in pids) and not my_segments(program)

    wait_until(gone, timeout=GONE_UNDER_LOAD, what=f"processes {pids} and the tables of {program} gone")
    took = time.monotonic() - since
    if not _overloaded():
        assert took <= GONE_WITHIN, f"took {took:.2f} s (bound {GONE_WITHIN} s) with load {os.getloadavg()}"
    print(f"gone in {took * 1000:.0f} ms")
    return took


def _reap(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=60)
    if proc.stdout:
        proc.stdout.close()


# -- 5. program SIGKILLed while its workers run long items --------------------------------------


@pytest.mark.parametrize("threaded", [False, True], ids=["forked-spawner", "forkserver-spawner"])
def test_sigkilled_program_takes_its_busy_workers_spawner_and_manager_with_it(tmp_path, threaded):
    proc = _start(tmp_path, "8", "8", "1" if threaded else "0")
    try:
        info = _pids(proc)
        assert info["busy"] == 8 and len(info["workers"]) == 8
        helpers = [info["spawner"], info["manager"], *info["workers"]]
        assert all(alive(p) for p in helpers)
        assert my_segments(proc.pid), "the program's id table should exist while it runs"
        since = time.monotonic()
        proc.kill()
        proc.wait(timeout=60)
        assert_all_gone(proc.pid, helpers, since)
    finally:
        _reap(proc)


# -- 6. SIGTERM / SIGHUP to the whole process group ---------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("threaded", [False, True], ids=["forked-spawner", "forkserver-spawner"])
def test_signal_to_the_process_group_leaves_no_table_and_no_helper(tmp_path, sig, threaded):
    proc = _start(tmp_path, "4", "2", "1" if threaded else "0", new_session=True)
    try:
        info = _pids(proc)
        helpers = [info["spawner"], info["manager"], *info["workers"]]
        # The helpers are in the program's process group: the signal reaches them all.
        assert {os.getpgid(p) for p in helpers} == {proc.pid}
        assert my_segments(proc.pid)
        since = time.monotonic()
        os.killpg(proc.pid, sig)
        assert proc.wait(timeout=60) == -sig
        assert_all_gone(proc.pid, helpers, since)
    finally:
        _reap(proc)


def test_spawner_and_manager_outlive_a_group_signal_the_program_survives(tmp_path):
    """A program that handles SIGTERM keeps its helpers: their life is the program's."""
    script = tmp_path / "survivor.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, signal, sys, time
            import procpool
            from procpool import manager, spawner
            if __name__ == "__main__":
                signal.signal(signal.SIGTERM, lambda *a: None)
                with procpool.WorkerPool(min_workers=1, max_workers=2) as pool:
                    # Read before the print: the test kills this worker once it has the line.
                    first = pool.workers()[0].pid
                    pool.manager_locks  # made (the Manager started) behind the constructor
                    print(json.dumps([spawner.spawner_pid(), manager.server_pid(), first]), flush=True)
                    sys.stdin.readline()
                    deadline = time.monotonic() + 30  # until the pool saw its worker's death
                    while first in [w.pid for w in pool.workers()] and time.monotonic() < deadline:
                        time.sleep(0.01)
                    print(pool.submit(abs, -7).result(timeout=30), flush=True)
                    sys.stdin.readline()
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        spawner, mgr, worker = json.loads(proc.stdout.readline())
        # The worker takes the default SIGTERM action once it runs as a worker (titled).
        wait_until(lambda: (title_of(worker) or "").startswith("kworker/"), what="the worker titled")
        os.killpg(proc.pid, signal.SIGTERM)  # the idle worker dies of it (default action)
        wait_until(lambda: not alive(worker), timeout=10, what="the worker killed by SIGTERM")
        # Ignored, not merely slow to act on: the item below needs a new worker, which only
        # a live spawner can fork, and both helpers are still there after that round trip.
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "7"
        assert alive(spawner) and alive(mgr)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
        assert_all_gone(proc.pid, [spawner, mgr], time.monotonic())
    finally:
        _reap(proc)


# -- 7. program SIGKILLed while the spawner forks a batch ---------------------------------------

BATCH = textwrap.dedent(
    """
    import procpool
    if __name__ == "__main__":
        # The spawner stops itself (SIGSTOP) with the constructor's first batch of workers
        # forked, before its answer; the program has no Manager yet (it starts behind the
        # constructor), and the spawner holds the workers' connections to it.
        pool = procpool.WorkerPool(min_workers=64, max_workers=64, faults="spawner.answer=stop")
        pool.submit(abs, -1).result(timeout=60)
    """
)


def test_program_killed_before_the_spawners_answer_still_gets_its_cleanup(tmp_path):
    script = tmp_path / "batch.py"
    script.write_text(BATCH)
    proc = subprocess.Popen([sys.executable, str(script)])
    spawner = None
    try:

        def stopped_spawner() -> psutil.Process | None:
            for child in psutil.Process(proc.pid).children():
                if title_of(child.pid) == "procpool: spawner" and child.status() == psutil.STATUS_STOPPED:
                    return child
            return None

        spawner = wait_until(stopped_spawner, timeout=60, what="the spawner stopped before its answer")
        helpers = [spawner.pid, *(c.pid for c in spawner.children())]
        # The spawner and the first batch of workers (no Manager yet).
        assert len(helpers) == 1 + FIRST_BATCH, [title_of(p) for p in helpers]
        assert my_segments(proc.pid)
        proc.kill()
        proc.wait(timeout=60)
        since = time.monotonic()
        os.kill(spawner.pid, signal.SIGCONT)  # its answer now meets a closed socket: EPIPE
        assert_all_gone(proc.pid, helpers, since)
    finally:
        _reap(proc)
        if spawner is not None:
            try:
                os.kill(spawner.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


# -- 8. helpers hold only what they need ---------------------------------------------------------

DESCRIPTORS = textwrap.dedent(
    """
    import os, select, socket, subprocess, sys, threading, procpool
    if __name__ == "__main__":
        if sys.argv[1] == "1":
            threading.Thread(target=threading.Event().wait, daemon=True).start()
        r, w = os.pipe()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        with procpool.WorkerPool(min_workers=2, max_workers=2) as pool:
            assert pool.submit(abs, -1).result(timeout=30) == 1
            os.close(w)
            listener.close()
            cat.stdin.close()
            print("eof", bool(select.select([r], [], [], 5)[0]) and os.read(r, 1) == b"", flush=True)
            again = socket.socket()
            try:
                again.bind(("127.0.0.1", port))
                print("rebind True", flush=True)
            except OSError as exc:
                print("rebind", exc, flush=True)
            try:
                print("cat", cat.wait(timeout=5), flush=True)
            except subprocess.TimeoutExpired:
                print("cat still running", flush=True)
                cat.kill()
    """
)


@pytest.mark.parametrize("threaded", [False, True], ids=["forked-spawner", "forkserver-spawner"])
def test_programs_pipes_sockets_and_subprocess_pipes_close_while_a_pool_lives(tmp_path, threaded):
    script = tmp_path / "descriptors.py"
    script.write_text(DESCRIPTORS)
    out = subprocess.run(
        [sys.executable, str(script), "1" if threaded else "0"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["eof True", "rebind True", "cat 0"], out.stdout


HELPERS_BEFORE = textwrap.dedent(
    """
    import concurrent.futures, multiprocessing, procpool
    from multiprocessing import forkserver, resource_tracker
    if __name__ == "__main__":
        ctx = multiprocessing.get_context("forkserver")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            assert ex.submit(abs, -2).result(timeout=30) == 2
        resource_tracker.ensure_running()
        with procpool.WorkerPool(min_workers=1, max_workers=1, mp_context=%r) as pool:
            assert pool.submit(abs, -3).result(timeout=30) == 3
            # Each stop closes the program's pipe to the helper and waits for it to exit:
            # forever, if a procpool process still held a copy of that pipe.
            forkserver._forkserver._stop()
            resource_tracker._resource_tracker._stop()
            print("stopped", flush=True)
    """
)


@pytest.mark.parametrize("mp_context", [None, "spawn"], ids=["forked-spawner", "spawn-spawner"])
def test_fork_server_and_resource_tracker_started_before_the_pool_stop_at_once(tmp_path, mp_context):
    script = tmp_path / "helpers_before.py"
    script.write_text(HELPERS_BEFORE % (mp_context,))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the program's stop of its fork server or resource tracker hung")
    finally:
        _reap(proc)
    assert proc.returncode == 0
    assert out.strip() == "stopped"


def test_spawner_and_manager_hold_no_descriptor_of_the_program(tmp_path):
    """From outside: the helpers' descriptors point at nothing the program opened (its
    pipe and socket inodes), only /dev/null in their place."""
    script = tmp_path / "inodes.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, os, socket, sys, procpool
            from procpool import manager, spawner
            if __name__ == "__main__":
                r, w = os.pipe()
                s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
                mine = sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in (r, w, s.fileno()))
                with procpool.WorkerPool(min_workers=1) as pool:
                    pool.submit(abs, 1).result(timeout=30)
                    pool.manager_locks  # made (the Manager started) behind the constructor
                    print(json.dumps([mine, spawner.spawner_pid(), manager.server_pid(),
                                      [x.pid for x in pool.workers()]]), flush=True)
                    sys.stdin.readline()
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        mine, *helpers = json.loads(proc.stdout.readline())
        for pid in [helpers[0], helpers[1], *helpers[2]]:
            targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert not targets & set(mine), (pid, targets & set(mine))
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        _reap(proc)


# -- a main module without ``if __name__ == "__main__":`` -----------------------------------------

NO_GUARD = textwrap.dedent(
    """
    import threading, procpool
    threading.Thread(target=threading.Event().wait, daemon=True).start()
    pool = procpool.WorkerPool(min_workers=1)
    print(pool.submit(abs, -3).result(timeout=20))
    pool.close()
    """
)


def test_missing_main_guard_in_a_threaded_program_raises_a_clear_error(tmp_path):
    script = tmp_path / "noguard.py"
    script.write_text(NO_GUARD)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        _reap(proc)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: procpool's spawner exited before it was ready"), err
    assert 'if __name__ == "__main__":' in last
    assert "ConnectionResetError" not in err
    assert not my_segments(proc.pid)


def test_port_of_a_program_killed_with_a_pool_is_free_once_it_is_gone(tmp_path):
    """The spawner outlives the program by design; it must not keep the program's port."""
    script = tmp_path / "port.py"
    script.write_text(
        textwrap.dedent(
            """
            import socket, time, procpool
            if __name__ == "__main__":
                s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
                print(s.getsockname()[1], flush=True)
                pool = procpool.WorkerPool(min_workers=1)
                pool.submit(abs, 1).result(timeout=30)
                print("ready", flush=True)
                time.sleep(600)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "ready"
        proc.kill()
        proc.wait(timeout=60)
        with socket.socket() as again:
            again.bind(("127.0.0.1", port))  # at once: nothing else held the listener
    finally:
        _reap(proc)
    wait_until(lambda: not my_segments(proc.pid), timeout=GONE_UNDER_LOAD, what="tables unlinked")
