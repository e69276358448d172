"""Shared test helpers. Every test is checked for leftovers (worker processes of this test
process's pools, zombies among its descendants, id tables in /dev/shm) by procpool's own pytest
plugin: ``procpool_leaks = true`` in pyproject.toml (see procpool.pytest_plugin)."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

os.environ.setdefault("PROCPOOL_DEBUG_LOCKS", "1")  # assert_held checks the holder (procpool.locking)

from procpool.idtable import SHM_DIR, segment_prefix

TITLE_PREFIXES = ("kworker/", "ptest")
T = TypeVar("T")


def wait_until(
    pred: Callable[[], T | None], timeout: float = 10.0, what: str = "condition", *, interval: float = 0.01
) -> T:
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


def started_workers(pool: Any, timeout: float = 30.0) -> list[Any]:
    """``pool.workers()`` once all of ``min_workers`` are on the books: the constructor returns
    with the first few (procpool.creation.FIRST_BATCH), the filler starts the rest behind it."""
    n = pool.min_workers
    wait_until(lambda: pool.stats().nr_workers >= n, timeout=timeout, what=f"{n} workers started")
    return pool.workers()


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


def run_bounded(fn: Callable[[], object], bound: float, what: str = "it") -> None:
    """``fn()`` on a thread of its own: fail the test if it is still running after ``bound``
    seconds (a hang) rather than hanging the suite; re-raise what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(bound)
    assert not t.is_alive(), f"{what} still running after {bound} s (a hang)"
    if raised:
        raise raised[0]


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
    if _runs_tests_here(config):
        _make_temp_dir_private()
    else:
        _make_private_temp_root(config)


# -- multiprocessing's temporary directories (pymp-*) -------------------------------------------
# multiprocessing makes a ``pymp-*`` directory under TMPDIR in any process that needs one (a fork
# server's address lives there) and removes it at that process's normal exit. A test must leave
# none: a program it killed is cleaned up after by its spawner, and a worker removes its own
# (procpool.spawner, procpool.worker). Other suites run on this machine at the same time, so
# each test process gets a TMPDIR of its own, inherited by every process it starts (pools'
# helpers, the programs tests run): what is found there is this process's doing. Its own
# pymp-* directory (threaded pools in this process started a fork server) is not a leftover:
# it goes at this process's exit.

#: This test process's private TMPDIR (None: not made, e.g. in xdist's controller).
PRIVATE_TMP: str | None = None
#: Set by xdist's controller for its workers: the directory their private TMPDIRs go in, which
#: it removes at its end, once every worker is gone (a worker killed mid-run, by a timeout say,
#: never removes its own).
TMP_ROOT_VAR = "PROCPOOL_TESTS_TMP_ROOT"


def _runs_tests_here(config: pytest.Config) -> bool:
    """An xdist worker, or a run without xdist workers; not xdist's controller, which runs no
    test (its TMPDIR would also be every worker's, inherited at their start)."""
    return hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None)


def _make_private_temp_root(config: pytest.Config) -> None:
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="procpool-tests-")
    os.environ[TMP_ROOT_VAR] = root  # (the workers start after pytest_configure: they inherit it)
    config.add_cleanup(functools.partial(shutil.rmtree, root, ignore_errors=True))


def _make_temp_dir_private() -> None:
    global PRIVATE_TMP
    import multiprocessing.util
    import shutil
    import tempfile

    base = tempfile.gettempdir()
    # pytest's own tmp_path stays where it was (under xdist, the controller chose it anyway).
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", base)
    root = os.environ.get(TMP_ROOT_VAR)
    # Short names: a fork server's socket address in there must fit in 107 bytes.
    if root and os.path.isdir(root):
        PRIVATE_TMP = tempfile.mkdtemp(prefix="w-", dir=root)
    else:
        PRIVATE_TMP = tempfile.mkdtemp(prefix="procpool-tests-", dir=base)
    os.environ["TMPDIR"] = PRIVATE_TMP
    tempfile.tempdir = PRIVATE_TMP  # (gettempdir() caches its answer)
    # Removed at exit after multiprocessing removed this process's own pymp-* (priority -100).
    multiprocessing.util.Finalize(
        None, shutil.rmtree, args=(PRIVATE_TMP,), kwargs={"ignore_errors": True}, exitpriority=-1000
    )


def temp_dirs_left() -> list[str]:
    """The pymp-* directories in this test process's private TMPDIR but its own."""
    if PRIVATE_TMP is None:
        return []
    from multiprocessing import process

    own = process.current_process()._config.get("tempdir")
    return sorted(
        os.path.join(PRIVATE_TMP, n)
        for n in os.listdir(PRIVATE_TMP)
        if n.startswith("pymp-") and os.path.join(PRIVATE_TMP, n) != own
    )


@pytest.fixture(autouse=True)
def _no_temp_dir_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a pymp-* directory behind (after the grace the procpool plugin
    gives exits: a spawner removes a killed program's asynchronously); they are removed then,
    so that the next test is not blamed."""
    yield
    if not temp_dirs_left():
        return
    grace = float(request.config.getini("procpool_leak_grace"))
    deadline = time.monotonic() + grace
    while (left := temp_dirs_left()) and time.monotonic() < deadline:
        time.sleep(0.02)
    if left:
        import shutil

        named = [f"{path} holding {sorted(os.listdir(path)) if os.path.isdir(path) else '?'}" for path in left]
        for path in left:
            shutil.rmtree(path, ignore_errors=True)
        pytest.fail(
            f"{request.node.nodeid} left multiprocessing temp directories (still there after {grace:g} s):\n  "
            + "\n  ".join(named),
            pytrace=False,
        )


# -- the procpool command (test_cli_*.py) -------------------------------------------------------
# ``procpool run`` runs in a subprocess (its own session, so cleanup can reach its whole process
# group); what it does is checked through ``procpool ps --json`` in another process, through
# psutil, and through /dev/shm, never through the pool object itself. Tests run in parallel
# under pytest-xdist, so other tests' pools are on the machine at the same time (and the
# machine's own kernel ``kworker`` threads): every check filters by the owner pid of the run it
# started, or by a title prefix unique to the test.

#: ``python -m procpool.cli``: the command as a program of its own.
CLI = [sys.executable, "-m", "procpool.cli"]
SHM = Path(SHM_DIR)
UID = os.getuid()
#: Upper bound for any one condition; generous because two xdist workers share two cores.
WAIT = 20.0
#: wait_until for conditions read through ``procpool ps`` (a subprocess each): polled less often.
wait_ps = functools.partial(wait_until, timeout=WAIT, interval=0.05)
SUMMARY_ITEMS = re.compile(r"items\s+(\d+) total: (\d+) done, (\d+) failed, (\d+) cancelled")
SUMMARY_WORKERS = re.compile(r"workers\s+(\d+) created, (\d+) destroyed, (\d+) lost")
PROGRESS_WORKERS = re.compile(r"\] u\d+ workers (\d+) ")


class Run:
    """A ``procpool`` subprocess whose output goes to files (a pipe could fill and block it)."""

    def __init__(self, args: list[str], tmp: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        tag = uuid.uuid4().hex[:8]
        self.out_path = tmp / f"out-{tag}.txt"
        self.err_path = tmp / f"err-{tag}.txt"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                CLI + args, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True, text=True
            )
        self.pid = self.proc.pid
        self.killed = False

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        """Stop it the polite way, then the hard way; the hard way leaves its shm to us."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.killed = True
        if self.killed:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # the session we created: forkserver, workers, manager
            except ProcessLookupError:
                pass
            self.proc.wait(10)
            for seg in SHM.glob(f"procpool-{UID}-{self.pid}-*"):
                seg.unlink(missing_ok=True)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Start ``procpool`` subprocesses; every one is stopped at the end, pass or fail."""
    runs: list[Run] = []

    def _start(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Run:
        run = Run(list(args), tmp_path, env, cwd)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        run.cleanup()


def cli_output(*args: str, env: dict[str, str] | None = None, timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=timeout)


def ps_json() -> list[dict[str, Any]]:
    """The pools ``procpool ps --json`` lists (its "skipped" list is other tests' business)."""
    res = cli_output("ps", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["pools"]


def pool_of(owner_pid: int) -> dict[str, Any] | None:
    pools = [p for p in ps_json() if p["owner_pid"] == owner_pid]
    assert len(pools) <= 1, pools
    return pools[0] if pools else None


def settled_pool(owner_pid: int, nr_workers: int) -> Callable[[], dict[str, Any] | None]:
    """A predicate: the run's pool as ps shows it, once it has ``nr_workers`` titled workers."""

    def check() -> dict[str, Any] | None:
        pool = pool_of(owner_pid)
        if pool is None or len(pool["workers"]) != nr_workers:
            return None
        # "starting" slots may still carry the fork server's command line as their title.
        if any(w["state"] not in ("idle", "busy") for w in pool["workers"]):
            return None
        return pool

    return check


def processes_titled(prefix: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        title = title_of(proc.pid)
        if title is not None and title.startswith(prefix):
            found.append(proc)
    return found


def summary_items(out: str) -> tuple[int, int, int, int]:
    m = SUMMARY_ITEMS.search(out)
    assert m, f"no items summary in:\n{out}"
    total, done, failed, cancelled = map(int, m.groups())
    return total, done, failed, cancelled


def env_with(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


USER_MODULE = """
import os
import time


def record(i):
    # One file per item, holding the pid that ran it.
    with open(os.path.join(os.environ["PROCPOOL_TEST_OUT"], str(i)), "w") as f:
        f.write(str(os.getpid()))
    return i


def held(i):
    # Wait until the test releases this item's burst: PROCPOOL_TEST_RELEASE-<burst>.
    path = os.environ["PROCPOOL_TEST_RELEASE"] + "-" + str(i // int(os.environ["PROCPOOL_TEST_BURST"]))
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return i


def flaky(i):
    if i % 4 == 0:
        raise ValueError(f"bad item {i}")
    return i


not_callable = 42
"""


@pytest.fixture
def user_module(tmp_path: Path) -> str:
    name = f"cli_user_{uuid.uuid4().hex[:8]}"
    moddir = tmp_path / "mods"
    moddir.mkdir()
    (moddir / f"{name}.py").write_text(USER_MODULE)
    (moddir / "cli_broken_mod.py").write_text("raise RuntimeError('broken at import')\n")
    return name


def ps_owner(owner_pid: int, *extra: str) -> dict[str, Any] | None:
    """The pool of program ``owner_pid`` as ``procpool ps --json --owner PID`` lists it."""
    res = cli_output("ps", "--json", "--owner", str(owner_pid), *extra)
    assert res.returncode == 0, res.stderr
    pools = json.loads(res.stdout)["pools"]
    assert all(p["owner_pid"] == owner_pid for p in pools), pools  # the filter filters
    return pools[0] if pools else None
