"""procpool's pytest plugin, run as a user's suite would run it: pytest in a process of its own
(pytester.runpytest_subprocess), the plugin found through its entry point, leftovers looked for
by the plugin itself and the outcome read from that run's report."""

from __future__ import annotations

import re

import pytest

pytest_plugins = ["pytester"]

LEAKY = """
import os, pytest
from procpool import WorkerPool

def test_leaks():
    pool = WorkerPool(1, 1)          # never closed: its worker and its table stay
    print("LEAK", pool.workers()[0].pid, pool.table_name, os.getpid())

def test_clean(procpool_pool, procpool_executor, procpool_pool_factory):
    assert procpool_pool.submit(pow, 2, 5).result(30) == 32
    assert procpool_executor.submit(pow, 3, 2).result(30) == 9
    other = procpool_pool_factory(min_workers=1, max_workers=1, title_prefix="mine")
    assert other.title_prefix == "mine" and other.submit(pow, 2, 2).result(30) == 4

@pytest.mark.procpool(min_workers=1, max_workers=1, title_prefix="marked")
def test_marker(procpool_pool):
    assert (procpool_pool.title_prefix, procpool_pool.max_workers) == ("marked", 1)
"""


#: Leftovers of a finished pool go within milliseconds; a short grace keeps these runs short.
GRACE = "[pytest]\nprocpool_leak_grace = 1\n"


def _leak_lines(result: pytest.RunResult) -> list[tuple[str, str, str]]:
    return re.findall(r"LEAK (\d+) (\S+) (\d+)", result.stdout.str())


def test_leaks_named_under_xdist(pytester: pytest.Pytester) -> None:
    """--procpool-leaks under -n 2: the leaking test errors naming its worker (pid, title) and
    its table; the others pass, each xdist worker checking its own processes."""
    pytester.makepyfile(test_user=LEAKY)
    pytester.makeini(GRACE)
    result = pytester.runpytest_subprocess("--procpool-leaks", "-n", "2", "-p", "no:cacheprovider", "-s", "-rA")
    result.assert_outcomes(passed=3, errors=1)
    out = result.stdout.str()
    assert "procpool leftovers after test_user.py::test_leaks" in out
    # -s shows the leaking test's print only in its xdist worker's captured output; the
    # failure names the same pid and file wherever it came from.
    m = re.search(r"worker process pid (\d+) title 'kworker/u(\d+):0'", out)
    assert m, out
    files = re.findall(r"file /dev/shm/(procpool-\S+)", out)
    assert files and all(f.endswith(f"-{m.group(2)}") for f in files), out
    assert "ERROR at teardown of test_leaks" in out or "test_leaks - Failed" in out


def test_ini_option_and_off_by_default(pytester: pytest.Pytester) -> None:
    """The ini option turns the check on like the flag; without either, the same suite passes."""
    pytester.makepyfile(test_user=LEAKY)
    pytester.makeini(GRACE)
    off = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    off.assert_outcomes(passed=3)
    pytester.makeini(GRACE + "procpool_leaks = true\n")
    on = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    on.assert_outcomes(passed=3, errors=1)
    ((pid, table, me),) = _leak_lines(on)
    out = on.stdout.str()
    assert f"worker process pid {pid} title" in out
    assert f"file /dev/shm/{table}" in out


def test_close_bound_and_zombies(pytester: pytest.Pytester) -> None:
    """A pool whose item outlives procpool_close_timeout fails its test, naming the bound; the
    item's worker is killed, so the run ends instead of waiting for it. A child nobody reaped
    is named as a zombie."""
    pytester.makeini(GRACE + "procpool_leaks = true\nprocpool_close_timeout = 0.5\n")
    pytester.makepyfile(
        test_slow="""
import os, time

def test_slow(procpool_pool):
    fut = procpool_pool.submit(time.sleep, 120)
    deadline = time.monotonic() + 30  # a worker has it (under load its start may take a while)
    while not fut.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fut.running()

def test_zombie():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # it exited (under load: not at once); unreaped
    print("ZOMBIE", pid)
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", timeout=60)
    result.assert_outcomes(passed=2, errors=2)
    out = result.stdout.str()
    assert "took procpool_close_timeout (0.5 s) or longer" in out
    (zombie,) = re.findall(r"ZOMBIE (\d+)", out)
    assert f"zombie pid {zombie} " in out
