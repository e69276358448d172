"""procpool's pytest plugin, registered through the ``pytest11`` entry point: installing
procpool is enough, nothing to list in a conftest.

Fixtures:

* ``procpool_pool``: a ``WorkerPool`` for the test, closed after it;
* ``procpool_executor``: a ``procpool.ProcessPoolExecutor``, shut down after the test;
* ``procpool_pool_factory(**options)``: makes as many pools as a test needs, each closed after it.

The options of the first two come from the marker ``@pytest.mark.procpool(**options)`` (as to
``WorkerPool`` / ``ProcessPoolExecutor``). Closing is bounded: the ini option
``procpool_close_timeout`` (seconds, default 60) is handed to ``close(timeout=...)``, so items
still running then are killed, and the test fails saying so; a close that still does not
return well after that bound fails the test as a hang instead of holding the run forever.

Leak check: ``--procpool-leaks`` on the command line, or ``procpool_leaks = true`` in the ini
file. After each test (its fixtures closed first) the test fails if it left behind, once a
grace period for asynchronous exits has passed (ini ``procpool_leak_grace``, default
``LEAK_GRACE`` seconds):

* procpool worker processes among this test process's descendants: children of a procpool
  spawner other than its Manager, whatever their title, and anything titled ``kworker/``;
* zombies among its descendants (an exit nobody reaped);
* procpool's /dev/shm tables of this process (its pools' id tables, its workqueue segment).

Each leftover is named: pid and title for a process, the path for a file. After the report the
pools this process still has open are closed, so the next test is not blamed too. The spawner and the
Manager are not leftovers: they live as long as the program, by design (procpool.spawner).
Under pytest-xdist every xdist worker is a test process of its own and checks its own
descendants and tables, so parallel tests never see each other's processes.

Imports of procpool's runtime happen inside the fixtures: loading the plugin costs a pytest
run that never uses procpool nothing but this module.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

#: Seconds a process of a closed pool may take to exit, a zombie to be reaped, before the
#: leak check calls it a leftover (exits are asynchronous; a loaded machine is slow).
LEAK_GRACE = 10.0
#: Default of the ini option procpool_close_timeout.
CLOSE_TIMEOUT = 60.0
#: How much longer than the close timeout a close may take before it counts as a hang
#: (killing and reaping workers that ran past the timeout takes a moment).
HANG_MARGIN = 30.0

SPAWNER_TITLE = "procpool: spawner"
MANAGER_TITLE = "procpool: manager"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("procpool")
    group.addoption(
        "--procpool-leaks",
        action="store_true",
        default=False,
        help="fail a test that leaves procpool worker processes, zombies or /dev/shm tables behind",
    )
    parser.addini("procpool_leaks", type="bool", default=False, help="the same as --procpool-leaks")
    parser.addini(
        "procpool_leak_grace",
        default=str(LEAK_GRACE),
        help="seconds the leak check waits for exits and reaping before it calls what is left a leftover",
    )
    parser.addini(
        "procpool_close_timeout",
        default=str(CLOSE_TIMEOUT),
        help="seconds the procpool fixtures give a pool's running items at close before killing them",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "procpool(**options): options of the procpool_pool / procpool_executor fixtures")


def _leaks_enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("--procpool-leaks") or config.getini("procpool_leaks"))


# -- the leak check ----------------------------------------------------------------------------


def _title(p: Any) -> str:
    try:
        return " ".join(p.cmdline()).strip() or p.name()
    except Exception:  # noqa: BLE001 - psutil.Error: it is gone, or not ours to read
        return "?"


def leftovers(pid: int | None = None) -> list[str]:
    """What procpool left behind of process ``pid`` (default: this one), as lines naming each
    leftover; empty if nothing. See the module docstring for what counts."""
    import psutil

    from .idtable import SHM_DIR, segment_prefix

    pid = pid or os.getpid()
    out: list[str] = []
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    info = {}
    for p in descendants:
        try:
            info[p.pid] = (p.status(), _title(p), p.ppid())
        except psutil.Error:
            pass  # gone meanwhile: not a leftover
    helpers = {q for q, (_, title, _) in info.items() if title == SPAWNER_TITLE}
    for q, (status, title, ppid) in sorted(info.items()):
        if status == psutil.STATUS_ZOMBIE:
            out.append(f"zombie pid {q} (child of {ppid}: exited, never reaped)")
        elif ppid in helpers and title != MANAGER_TITLE:
            # A fresh fork of the spawner still shows the spawner's title: a worker too.
            out.append(f"worker process pid {q} title {title!r}")
        elif title.startswith("kworker/"):
            out.append(f"worker process pid {q} title {title!r}")
    prefix = f"{segment_prefix()}{pid}-"
    try:
        names = sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except OSError:
        names = []
    out.extend(f"file {os.path.join(SHM_DIR, n)}" for n in names)
    return out


def wait_for_no_leftovers(grace: float = LEAK_GRACE) -> list[str]:
    """Poll ``leftovers()`` until it is empty or ``grace`` seconds passed; returns the last."""
    deadline = time.monotonic() + grace
    while True:
        found = leftovers()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def _procpool_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    # Autouse, so set up before the test's own fixtures and torn down after them: the pools
    # the procpool fixtures made are closed by the time this looks.
    yield
    if not _leaks_enabled(request.config):
        return
    grace = _seconds(request.config, "procpool_leak_grace")
    found = wait_for_no_leftovers(grace)
    if found:
        # Reported once: the pools this process still has open are closed now, so the next
        # test is not blamed for this one's leftovers.
        _close_live_pools()
        pytest.fail(
            f"procpool leftovers after {request.node.nodeid} (still there after {grace:g} s):\n  " + "\n  ".join(found),
            pytrace=False,
        )


def _close_live_pools() -> None:
    import sys

    pool_module = sys.modules.get("procpool.pool")
    if pool_module is None:
        return  # no pool was ever made here
    for pool in list(pool_module._live_pools):
        if pool._owner_pid == os.getpid():
            t = threading.Thread(target=pool.close, kwargs={"timeout": 5.0}, daemon=True)
            t.start()
            t.join(5.0 + HANG_MARGIN)


# -- fixtures ---------------------------------------------------------------------------------


def _seconds(config: pytest.Config, name: str) -> float:
    raw = config.getini(name)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value >= 0:
        raise pytest.UsageError(f"{name} must not be negative, got {raw!r}")
    return value


def _close_timeout(config: pytest.Config) -> float:
    return _seconds(config, "procpool_close_timeout")


def close_bounded(pool: Any, timeout: float) -> None:
    """Close ``pool`` (a WorkerPool) with ``close(timeout=timeout)`` on a thread of its own;
    fail the test if items were still running at the bound (they were killed) or if the close
    did not return within a margin past it (a hang: the thread is left, a daemon)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pool.close(wait=True, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    started = time.monotonic()
    t = threading.Thread(target=run, name="procpool-fixture-close", daemon=True)
    t.start()
    t.join(timeout + HANG_MARGIN)
    if t.is_alive():
        pytest.fail(f"closing {pool!r} hung: still not closed {timeout + HANG_MARGIN:g} s later", pytrace=False)
    if errors:
        raise errors[0]
    if time.monotonic() - started >= timeout:
        pytest.fail(
            f"closing {pool!r} took procpool_close_timeout ({timeout:g} s) or longer: items still running then "
            "were killed (TeardownTimeout)",
            pytrace=False,
        )


def _marker_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker("procpool")
    if marker is None:
        return {}
    if marker.args:
        raise pytest.UsageError("@pytest.mark.procpool takes keyword options only")
    return dict(marker.kwargs)


@pytest.fixture
def procpool_pool_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """``make(**options)`` -> a new ``WorkerPool``; every pool made is closed after the test
    (newest first), each within ``procpool_close_timeout``."""
    from .pool import WorkerPool

    made: list[Any] = []

    def make(**options: Any) -> Any:
        pool = WorkerPool(**options)
        made.append(pool)
        return pool

    yield make
    timeout = _close_timeout(request.config)
    for pool in reversed(made):
        close_bounded(pool, timeout)


@pytest.fixture
def procpool_pool(procpool_pool_factory: Callable[..., Any], request: pytest.FixtureRequest) -> Any:
    """A ``WorkerPool`` (options from ``@pytest.mark.procpool``), closed after the test."""
    return procpool_pool_factory(**_marker_options(request))


@pytest.fixture
def procpool_executor(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A ``procpool.ProcessPoolExecutor`` (options from ``@pytest.mark.procpool``), shut down
    after the test within ``procpool_close_timeout``."""
    from .executor import ProcessPoolExecutor

    executor = ProcessPoolExecutor(**_marker_options(request))
    yield executor
    close_bounded(executor.pool, _close_timeout(request.config))
