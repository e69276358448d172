"""Shared test helpers. Every test is checked for leftovers (worker processes of this test
process's pools, zombies among its descendants, id tables in /dev/shm) by procpool's own pytest
plugin: ``procpool_leaks = true`` in pyproject.toml (see procpool.pytest_plugin)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import psutil
import pytest

from procpool.idtable import SHM_DIR, segment_prefix

TITLE_PREFIXES = ("kworker/", "ptest")
T = TypeVar("T")


def wait_until(pred: Callable[[], T], timeout: float = 10.0, what: str = "condition", *, interval: float = 0.01) -> T:
    """Poll ``pred`` every ``interval`` s until it is truthy, and return its value; fail after
    ``timeout`` s. For facts that the OS only shows asynchronously (a process exiting, a title
    changing), never to wait out a race. A costly ``pred`` (one that runs ``procpool ps``) polls
    less often."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped (no process has it now, unless the
    kernel reuses it: pids wrap slowly, and the tests that use one tolerate that)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def title_of(pid: int) -> str | None:
    try:
        return " ".join(psutil.Process(pid).cmdline()).strip()
    except psutil.Error:
        return None


def comm_of(pid: int) -> str | None:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def worker_processes(root: int | None = None) -> list[psutil.Process]:
    """Live descendants of ``root`` (default: this process) with a worker title."""
    out = []
    for p in psutil.Process(root or os.getpid()).children(recursive=True):
        try:
            title = " ".join(p.cmdline()).strip()
            if title.startswith(TITLE_PREFIXES) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def live_titles(pool) -> dict[int, str]:
    """pid -> title of the pool's worker processes, read from outside with psutil."""
    out = {}
    for w in pool.workers():
        t = title_of(w.pid)
        # An exiting process reads as an empty command line before it is a zombie.
        if t and alive(w.pid):
            out[w.pid] = t
    return out


#: Set in the environment of a program a test runs (run_program): every process it starts
#: inherits it, so what it leaves behind can be found from outside, even orphans.
TOKEN_VAR = "PROCPOOL_TEST_TOKEN"


def processes_with_token(token: str) -> list[psutil.Process]:
    """Live processes (zombies excluded) whose environment carries ``token``."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TOKEN_VAR) == token and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def run_program(code: str, *args: str, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Run ``code`` as a program of its own (tests/ on its path), with a token in its
    environment. Returns the ended process, its output as ``.out`` and ``.err``, and the token.
    A program still running after ``timeout`` is killed and fails the test (a hang)."""
    token = os.urandom(8).hex()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]), **{TOKEN_VAR: token})
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        proc.out, proc.err = proc.communicate(timeout=timeout)  # type: ignore[attr-defined]
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        for p in processes_with_token(token):
            p.kill()
        raise AssertionError(f"the program still ran after {timeout} s (a hang); its stderr:\n{err}") from None
    return proc, token


def assert_program_left_nothing(proc: subprocess.Popen, token: str, within: float = 10.0) -> None:
    """No process of that program is left, nor any /dev/shm entry of its pid."""
    wait_until(lambda: not processes_with_token(token), timeout=within, what="every process of the program gone")
    wait_until(lambda: not my_segments(proc.pid), timeout=within, what="its /dev/shm entries gone")


def assert_books_add_up(st) -> None:
    """A closed pool's stats: nothing left, and every worker created is accounted for."""
    assert (st.nr_workers, st.nr_idle, st.nr_dying, st.nr_pending) == (0, 0, 0, 0), st
    assert st.created == st.destroyed + st.lost, st


def named_workers(pool) -> int:
    """How many of the pool's live workers carry a worker title (``kworker/u3:1``, ``+wq``...):
    a new worker names itself after its fork, asynchronously to the pool, and shows its
    spawner's title until then; a dying one is ``kworker/dying``."""
    return sum(1 for t in live_titles(pool).values() if t.startswith(f"{pool.title_prefix}/u"))


def my_segments(pid: int | None = None) -> list[str]:
    prefix = f"{segment_prefix()}{pid or os.getpid()}-"
    return [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]


def pytest_configure(config: pytest.Config) -> None:
    """The suite's leftover check is procpool's pytest plugin: refuse to run without it (an
    install without the entry point, ``-p no:procpool``) rather than pass unchecked."""
    if not config.pluginmanager.has_plugin("procpool") or not config.getini("procpool_leaks"):
        raise pytest.UsageError(
            "procpool's pytest plugin with procpool_leaks = true must be active for this suite "
            "(pip install -e '.[test]' registers it)"
        )
