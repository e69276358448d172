"""No multiprocessing temporary directory (``pymp-*``) is left behind.

A threaded program starts its spawner through multiprocessing's fork server, whose address is a
socket in the program's ``pymp-*`` directory (``multiprocessing.util.get_temp_dir``); the program
removes it at its normal exit. A program killed, or gone through ``os._exit``, never runs that:
its spawner, which outlives it to clean up, removes it (procpool.spawner, ``_remove_temp_dir``).
A worker leaves through ``os._exit`` too: it removes a directory its items made, as a stock
worker's exit does (procpool.worker, ``_exit``).

Each program runs with a TMPDIR of its own and is watched from outside: the directory it
reported, its processes (psutil). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import alive, wait_until

pytestmark = pytest.mark.timeout(120)
pytest_plugins = ["pytester"]

#: From the program's death to its spawner's exit (cleanup included), on a loaded machine.
GONE_WITHIN = 15.0

# MODE: "kill" (waits to be killed, an item running), "os_exit", "exit" (a normal exit, the
# spawner stopped first as at interpreter exit, then the fork server used again), "symlink"
# (its pymp-* directory swapped for a symlink to VICTIM, then waits to be killed), "chown" (its
# pymp-* directory given to another uid, then waits to be killed). A thread runs before the pool:
# the spawner starts through the fork server. Prints {"temp_dir", "spawner"} once the pool runs.
PROGRAM = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import multiprocessing
    from multiprocessing import process
    import procpool
    from procpool import spawner

    def main():
        mode = sys.argv[1]
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        pool = procpool.WorkerPool(min_workers=1, max_workers=1)
        assert pool.submit(pow, 2, 3).result(timeout=60) == 8
        temp_dir = process.current_process()._config.get("tempdir")
        report = {"temp_dir": temp_dir, "spawner": spawner.spawner_pid()}
        if mode == "symlink":
            os.rename(temp_dir, temp_dir + "-aside")
            os.symlink(sys.argv[2], temp_dir)
        elif mode == "chown":
            os.chown(temp_dir, 65534, 65534)
        if mode == "exit":
            pool.close()
            spawner.stop_spawner()  # as at interpreter exit: the program goes on after it
            p = multiprocessing.get_context("forkserver").Process(target=pow, args=(2, 3))
            p.start()
            p.join(60)
            report["after_stop"] = p.exitcode
        elif mode != "os_exit":
            pool.submit(time.sleep, 600)
        print(json.dumps(report), flush=True)
        if mode == "os_exit":
            os._exit(0)
        if mode != "exit":
            time.sleep(600)

    if __name__ == "__main__":
        main()
    """
)


@pytest.fixture
def tmp(tmp_path) -> Iterator[Path]:
    """The TMPDIR of a test's program: a new directory under this test process's (tmp_path is
    too long a prefix for a fork server's socket address, at most 107 bytes), removed after."""
    path = Path(tempfile.mkdtemp(prefix="t-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(tmp_path, tmp: Path, mode: str, *args: str) -> tuple[subprocess.Popen, dict]:
    """Start the program with TMPDIR ``tmp``; returns it and its report."""
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, TMPDIR=str(tmp)),
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"the program died before it reported:\n{err}")
    report = json.loads(line)
    assert report["temp_dir"] and report["temp_dir"].startswith(str(tmp)), report
    return proc, report


def _ended(proc: subprocess.Popen, report: dict) -> str:
    """Wait for the program and its spawner to be gone (the spawner's cleanup done); its stderr."""
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    wait_until(lambda: not alive(report["spawner"]), timeout=GONE_WITHIN, what="the program's spawner gone")
    return err


@pytest.mark.parametrize("mode", ["kill", "os_exit"])
def test_a_program_gone_without_its_exit_leaves_no_temp_dir(tmp_path, tmp, mode):
    # Its fork server's directory would stay: nothing of the program runs its removal.
    proc, report = _run(tmp_path, tmp, mode)
    assert os.path.isdir(report["temp_dir"]), report
    if mode == "kill":
        proc.send_signal(signal.SIGKILL)
    _ended(proc, report)
    wait_until(
        lambda: not os.path.exists(report["temp_dir"]), timeout=GONE_WITHIN, what=f"{report['temp_dir']} removed"
    )
    assert os.listdir(tmp) == []


def test_a_program_stopping_its_spawner_keeps_its_temp_dir_until_its_own_exit(tmp_path, tmp):
    # Stopped in order, the spawner leaves the directory to the program: the fork server it
    # holds still works after the stop, and the program's own removal at exit finds it there
    # (a directory removed under it prints a traceback at exit).
    proc, report = _run(tmp_path, tmp, "exit")
    err = _ended(proc, report)
    assert proc.returncode == 0, err
    assert report["after_stop"] == 0, report
    assert "Traceback" not in err, err
    assert not os.path.exists(report["temp_dir"]), "the program's exit removes its temp dir"


def test_the_spawner_never_follows_a_symlink_at_the_programs_temp_dir(tmp_path, tmp):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "canary").write_text("still here")
    proc, report = _run(tmp_path, tmp, "symlink", str(victim))
    try:
        proc.send_signal(signal.SIGKILL)
        _ended(proc, report)
        assert (victim / "canary").read_text() == "still here"
        assert os.path.islink(report["temp_dir"]), "a symlink is not ours to remove"
    finally:
        os.unlink(report["temp_dir"])


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid takes root")
def test_the_spawner_leaves_a_temp_dir_of_another_uid_alone(tmp_path, tmp):
    proc, report = _run(tmp_path, tmp, "chown")
    proc.send_signal(signal.SIGKILL)
    _ended(proc, report)
    assert os.path.isdir(report["temp_dir"]), "a directory of another uid is not ours to remove"
    assert os.stat(report["temp_dir"]).st_uid == 65534


ITEM_PROGRAM = textwrap.dedent(
    """
    import json, os
    from multiprocessing import process, util
    import procpool

    def make_temp_dir(_):
        return util.get_temp_dir(), os.getpid()

    if __name__ == "__main__":
        with procpool.WorkerPool(min_workers=1, max_workers=1) as pool:
            path, worker = pool.submit(make_temp_dir, 0).result(timeout=60)
            made_by_worker = os.path.isdir(path)
        print(json.dumps({
            "path": path,
            "made_by_worker": made_by_worker,
            "program_has_one": process.current_process()._config.get("tempdir") is not None,
            "exists_after_close": os.path.exists(path),
        }))
    """
)


def test_a_temp_dir_an_item_made_goes_with_its_worker(tmp_path, tmp):
    # A single-threaded program: no temp dir of its own, so the worker's is the item's doing.
    script = tmp_path / "program.py"
    script.write_text(ITEM_PROGRAM)
    res = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, TMPDIR=str(tmp)),
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["made_by_worker"] and not report["program_has_one"], report
    # close() returns once every worker exited: its exit removed the directory.
    assert not report["exists_after_close"], report
    assert os.listdir(tmp) == []


LEAVES_ONE = """
import os, tempfile

def test_leaves_one():
    # What a program killed with its spawner leaves: a pymp-* directory, a socket in it.
    os.mkdir(os.path.join(tempfile.gettempdir(), "pymp-leftover"))
    print("TMP", tempfile.gettempdir())

def test_own_one_is_fine():
    from multiprocessing import util

    assert os.path.isdir(util.get_temp_dir())  # this test process's: it goes at its exit
"""


@pytest.mark.parametrize("xdist", [False, True], ids=["one-process", "xdist"])
def test_the_suite_fails_a_test_that_leaves_a_temp_dir(pytester: pytest.Pytester, xdist: bool) -> None:
    """The suite's own check (tests/conftest.py), run on a suite of two tests: the one that
    leaves a pymp-* directory errors naming it, and its private TMPDIR is gone after the run."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_leaves=LEAVES_ONE)
    pytester.makeini("[pytest]\nprocpool_leaks = true\nprocpool_leak_grace = 1\n")
    args = ["-n", "2"] if xdist else ["-p", "no:xdist"]
    result = pytester.runpytest_subprocess(*args, "-p", "no:cacheprovider", "-s", "-rA")
    result.assert_outcomes(passed=2, errors=1)
    out = result.stdout.str()
    assert "test_leaves.py::test_leaves_one left multiprocessing temp directories" in out, out
    left = re.findall(r"(/\S+/pymp-leftover)", out)
    assert left, out
    assert not any(os.path.exists(os.path.dirname(p)) for p in left), "its private TMPDIR is removed at the end"
