"""The ``procpool`` command, run as real processes and observed from outside.

``procpool run`` runs in a subprocess (its own session, so cleanup can reach its whole process
group); what it does is checked through ``procpool ps --json`` in another process, through
psutil, and through /dev/shm — never through the pool object itself.

Tests run in parallel under pytest-xdist, so other tests' pools are on the machine at the
same time (and the machine's own kernel ``kworker`` threads): every check filters by the
owner pid of the run it started, or by a title prefix unique to the test.
"""

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
from typing import Any

import psutil
import pytest
from conftest import dead_pid, title_of, wait_until

from procpool import cli, idtable

CLI = [sys.executable, "-m", "procpool.cli"]
SHM = Path(idtable.SHM_DIR)
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


# -- procpool run ----------------------------------------------------------------------------------


def progress_shows(run: Run, *counts: int) -> bool:
    """Did the run's progress lines so far show these worker counts, in this order?"""
    seen = iter(int(n) for n in PROGRESS_WORKERS.findall(run.out))
    return all(any(n == c for n in seen) for c in counts)


def test_run_grows_shrinks_and_ends_by_itself(start: Callable[..., Run], tmp_path: Path, user_module: str) -> None:
    # Two bursts of 24 items on 2..4 workers with a 3 s pause and a 0.2 s idle timeout: the
    # pool must grow to 4, shrink back to 2 (the kernel's "keep 2 idle"), and grow again.
    # The items wait for a file per burst, so each burst certainly keeps 4 workers busy until
    # the test has seen them in the run's own progress lines; the pause leaves the cull 2.8 s.
    release = tmp_path / "release"
    run = start(
        "run", "--func", f"{user_module}:held", "--tasks", "48", "--bursts", "2", "--max-workers", "4",
        "--idle-timeout", "0.2", "--pause", "3.0", "--interval", "0.05",
        env=env_with(PYTHONPATH=str(tmp_path / "mods"), PROCPOOL_TEST_RELEASE=str(release), PROCPOOL_TEST_BURST="24"),
    )  # fmt: skip
    try:
        wait_ps(lambda: progress_shows(run, 4), what="the first burst on 4 workers")
        Path(f"{release}-0").touch()
        wait_ps(lambda: progress_shows(run, 4, 2), what="the shrink to 2 in the pause")
        wait_ps(lambda: progress_shows(run, 4, 2, 4), what="the regrowth to 4 in the second burst")
    finally:
        for burst in range(2):
            Path(f"{release}-{burst}").touch()
    assert run.wait() == 0, run.err
    out = run.out
    assert summary_items(out) == (48, 48, 0, 0)
    m = SUMMARY_WORKERS.search(out)
    assert m, out
    created, destroyed, lost = map(int, m.groups())
    # 2 at start + 2 grown in burst 1 + 2 grown again in burst 2 after the cull took 2.
    assert created == 6 and destroyed == created and lost == 0, out
    assert "every item ended" in out


def test_run_on_a_workqueue_shows_it_in_titles_and_ps(
    start: Callable[..., Run], tmp_path: Path, user_module: str
) -> None:
    # The items wait for a file, so the run certainly has 3 of them in flight, titled, for as
    # long as the test looks (however slowly `procpool ps` starts on a loaded machine).
    release = tmp_path / "release"
    run = start(
        "run", "--func", f"{user_module}:held", "--workqueue", "cliwq", "--max-active", "3", "--tasks", "30",
        "--bursts", "1", "--quiet",
        env=env_with(PYTHONPATH=str(tmp_path / "mods"), PROCPOOL_TEST_RELEASE=str(release), PROCPOOL_TEST_BURST="30"),
    )  # fmt: skip

    def entry() -> dict[str, Any] | None:
        for pool in ps_json():
            if pool["owner_pid"] == run.pid:
                for e in pool["workqueues"]:
                    if e["name"] == "cliwq" and e["in_flight"] == 3:
                        return {"pool": pool, "wq": e}
        return None

    try:
        seen = wait_until(entry, timeout=WAIT, what="ps listing the workqueue of the run, 3 in flight")
        assert seen["wq"]["max_active"] == 3 and seen["wq"]["pending"] == 27
        # Its workers name the workqueue in their titles while they run its items.
        wait_until(
            lambda: sum((w["title"] or "").endswith("+cliwq") for p in ps_json() if p["owner_pid"] == run.pid
                        for w in p["workers"]) == 3,
            timeout=WAIT,
            what="3 workers titled ...+cliwq",
        )  # fmt: skip
    finally:
        Path(f"{release}-0").touch()
    assert run.wait() == 0, run.err
    out = run.out
    assert summary_items(out) == (30, 30, 0, 0)
    assert "workqueue cliwq: 30 started, 30 completed, at most 3 in flight" in out


def test_run_duration_cancels_the_rest(start: Callable[..., Run]) -> None:
    run = start("run", "--tasks", "3000", "--task-ms", "20", "--bursts", "1", "--duration", "1", "--quiet")
    assert run.wait() == 0, run.err
    out = run.out
    total, done, failed, cancelled = summary_items(out)
    assert total == 3000 and failed == 0
    assert done > 0 and cancelled > 0 and done + cancelled == total, out
    assert "--duration 1s passed" in out
    assert "[" not in out.split("procpool run:")[0], "--quiet printed progress"


def test_ps_shows_the_running_pool_and_its_workers(start: Callable[..., Run]) -> None:
    run = start(
        "run", "--tasks", "100000", "--task-ms", "50", "--bursts", "1", "--min-workers", "3",
        "--max-workers", "3", "--quiet",
    )  # fmt: skip
    pool = wait_ps(settled_pool(run.pid, 3), what="3 titled workers in procpool ps")
    assert pool["stale"] is False and pool["owner_alive"] is True
    assert pool["table"] == f"procpool-{UID}-{run.pid}-{pool['pool']}"
    assert "procpool.cli" in pool["owner_cmdline"]
    workers = pool["workers"]
    assert sorted(w["id"] for w in workers) == [0, 1, 2]  # lowest free ids
    assert len({w["pid"] for w in workers}) == 3
    for w in workers:
        expected = f"kworker/u{pool['pool']}:{w['id']}"
        assert w["title"] == expected and w["alive"] is True
        # Seen independently of procpool: the process's own command line, and its ancestry.
        assert title_of(w["pid"]) == expected
        ancestors = [p.pid for p in psutil.Process(w["pid"]).parents()]
        assert run.pid in ancestors
    # Items complete: some worker's counter moves while we watch.
    before = sum(w["items_done"] for w in workers)
    wait_ps(lambda: sum(w["items_done"] for w in pool_of(run.pid)["workers"]) > before, what="items_done to grow")

    text = cli_output("ps")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["POOL", "OWNER", "STATUS", "ID", "PID", "STATE", "DONE", "AGE", "TITLE"]
    mine = [ln for ln in lines if f"kworker/u{pool['pool']}:" in ln and f" {run.pid} " in ln]
    assert len(mine) == 3 and all(" live " in ln for ln in mine), text.stdout
    # Aligned: the TITLE column starts at the same offset on every row.
    assert {ln.index("kworker/") for ln in mine} == {lines[0].index("TITLE")}


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_tears_down_cleanly(start: Callable[..., Run], sig: signal.Signals, code: int) -> None:
    prefix = f"kwt{uuid.uuid4().hex[:8]}"
    run = start(
        "run", "--tasks", "100000", "--task-ms", "50", "--bursts", "1", "--max-workers", "3",
        "--title-prefix", prefix, "--linger-dying", "0.3", "--quiet",
    )  # fmt: skip
    pool = wait_ps(settled_pool(run.pid, 3), what="3 titled workers in procpool ps")
    assert all(w["title"] == f"{prefix}/u{pool['pool']}:{w['id']}" for w in pool["workers"])
    family = psutil.Process(run.pid).children(recursive=True)  # fork server, manager, tracker, workers
    assert {w["pid"] for w in pool["workers"]} <= {p.pid for p in family}
    # Some item done before the signal, so the summary has all three kinds to add up.
    wait_ps(
        lambda: sum(w["items_done"] for w in (pool_of(run.pid) or {"workers": []})["workers"]) > 0, what="an item done"
    )

    run.proc.send_signal(sig)
    assert run.wait() == code, run.err
    out = run.out
    assert f"interrupted by {sig.name}" in out
    total, done, failed, cancelled = summary_items(out)
    assert total == 100000 and done > 0 and cancelled > 0 and done + failed + cancelled == total
    assert re.search(r"teardown\s+\d+\.\d ms", out)
    # Nothing of the run outlives it: no worker (live or dying), no helper, no table.
    wait_ps(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family),
        what="every process of the run to exit",
    )
    assert processes_titled(prefix) == []
    assert list(SHM.glob(f"procpool-{UID}-{run.pid}-*")) == []


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


def test_run_func_from_the_current_directory(start: Callable[..., Run], tmp_path: Path, user_module: str) -> None:
    results = tmp_path / "results"
    results.mkdir()
    run = start(
        "run", "--func", f"{user_module}:record", "--tasks", "12", "--bursts", "2", "--pause", "0",
        "--max-workers", "3", "--quiet",
        env=env_with(PROCPOOL_TEST_OUT=str(results)), cwd=tmp_path / "mods",
    )  # fmt: skip
    assert run.wait() == 0, run.err
    assert summary_items(run.out) == (12, 12, 0, 0)
    # The function really ran once per index, in worker processes, not in the run process.
    assert sorted(int(p.name) for p in results.iterdir()) == list(range(12))
    pids = {int(p.read_text()) for p in results.iterdir()}
    assert run.pid not in pids and 1 <= len(pids) <= 3


def test_run_func_failures_exit_1(start: Callable[..., Run], tmp_path: Path, user_module: str) -> None:
    run = start(
        "run", "--func", f"{user_module}:flaky", "--tasks", "12", "--bursts", "1", "--quiet",
        env=env_with(PYTHONPATH=str(tmp_path / "mods")),
    )  # fmt: skip
    assert run.wait() == 1, run.err
    assert summary_items(run.out) == (12, 9, 3, 0)
    # Items 0, 4 and 8 fail, ending in any order: the summary names the lowest.
    assert "first failure (lowest item): item 0: ValueError: bad item 0" in run.out, run.out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cli_no_such_module_xyz:f", "cannot import module 'cli_no_such_module_xyz': ModuleNotFoundError"),
        ("cli_broken_mod:f", "cannot import module 'cli_broken_mod': RuntimeError: broken at import"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:not_callable", "'not_callable' is an int, not a function"),
        ("{mod}", "expected MODULE:FUNCTION"),
    ],
)
def test_run_func_errors_exit_2(tmp_path: Path, user_module: str, spec: str, message: str) -> None:
    res = cli_output("run", "--func", spec.format(mod=user_module), env=env_with(PYTHONPATH=str(tmp_path / "mods")))
    assert res.returncode == 2
    # The run command's usage, then one error line that says what was wrong.
    assert res.stderr.startswith("usage: procpool run "), res.stderr
    (error,) = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert error.startswith("procpool run: error: --func ") and message in error, res.stderr
    assert res.stdout == ""  # refused before any pool started


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "-1"], "argument --tasks: must be >= 0"),
        (["--tasks", "many"], "argument --tasks: not an integer"),
        (["--task-ms", "nan"], "argument --task-ms"),
        (["--duration", "0"], "argument --duration: must be a positive number"),
        (["--bursts", "0"], "argument --bursts"),
        (["--no-such-option"], "unrecognized arguments"),
        # Every message names the flag the user typed, never a Python parameter.
        (["--min-workers", "5", "--max-workers", "2"], "--min-workers 5 is more than --max-workers 2"),
        (["--max-workers", "0"], "argument --max-workers: must be >= 1, got 0"),
        (["--max-workers", "5000"], "argument --max-workers: must be <= 4096, got 5000"),
        (["--idle-timeout", "-1"], "argument --idle-timeout: must be a non-negative number"),
        (["--idle-timeout", "nan"], "argument --idle-timeout: must be a non-negative number"),
        (["--title-prefix", "a b"], "--title-prefix must be a non-empty string without spaces"),
        (["--workqueue", "a b"], "name must be a non-empty string without spaces"),
        (["--workqueue", "wq", "--linger-dying", "1"], "--linger-dying cannot be used with --workqueue"),
        (["--max-active", "2"], "--max-active needs --workqueue"),
        (["--workqueue", "wq", "--max-active", "0"], "argument --max-active: must be >= 1"),
    ],
)
def test_run_bad_options_exit_2(args: list[str], message: str) -> None:
    res = cli_output("run", *args)
    assert res.returncode == 2, res
    assert message in res.stderr
    # Reported by the run command, with its usage (not the top level's).
    assert res.stderr.startswith("usage: procpool run "), res.stderr
    assert re.search(r"^procpool run: error: ", res.stderr, re.MULTILINE), res.stderr
    assert res.stdout == ""


def test_no_command_exits_2() -> None:
    res = cli_output()
    assert res.returncode == 2 and "required" in res.stderr


def test_progress_refreshes_in_place_on_a_terminal(tmp_path: Path) -> None:
    import pty

    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: every slave end closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.Popen(
        CLI + ["run", "--tasks", "40", "--task-ms", "20", "--bursts", "2", "--idle-timeout", "0.1",
               "--interval", "0.05"],
        stdout=slave, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    try:
        assert proc.wait(WAIT) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    reader.join(5)
    os.close(master)
    text = b"".join(chunks).decode()
    # rich's progress bar (the test extra installs rich): "N/40" redrawn in place, each redraw
    # going back to the start of the line instead of adding one.
    counts = re.findall(r"(\d+)/40\b", text)
    assert len(counts) >= 3 and counts[-1] == "40", text
    assert [int(c) for c in counts] == sorted(int(c) for c in counts), text  # it only moves forward
    bar_lines = [ln for ln in text.split("\n") if "/40" in ln]
    assert len(bar_lines) == 1 and bar_lines[0].count("\r") >= len(counts) - 1, text
    assert summary_items(text) == (40, 40, 0, 0)


# -- procpool ps -------------------------------------------------------------------------------------


def _write_stale_table(path: Path, pool_id: int, owner: int, worker_pid: int) -> None:
    # Written byte by byte with the id table's on-disk format: a stale table is one whose
    # owner and resource tracker both died, which a test cannot arrange politely.
    buf = bytearray(idtable.HEADER_SIZE + 2 * idtable.SLOT_SIZE)
    idtable._HEADER.pack_into(buf, 0, idtable.MAGIC, idtable.VERSION, pool_id, owner, 2, 0, 0, time.time())
    idtable._SLOT.pack_into(buf, idtable.HEADER_SIZE, idtable.IDLE, 0, worker_pid, 1, 7, time.time())
    path.write_bytes(bytes(buf))


def test_ps_marks_stale_tables_and_skips_unreadable_ones() -> None:
    dead = dead_pid()
    stale = SHM / f"procpool-{UID}-{dead}-99"
    empty = SHM / f"procpool-{UID}-{dead}-97"  # no header at all
    garbage = SHM / f"procpool-{UID}-{dead}-98"  # sized, but no magic
    try:
        _write_stale_table(stale, 99, dead, dead)
        empty.write_bytes(b"")
        garbage.write_bytes(b"\0" * 200)
        res = cli_output("ps", "--json")
        assert res.returncode == 0, res.stderr
        listed = json.loads(res.stdout)
        pools = [p for p in listed["pools"] if p["owner_pid"] == dead]
        assert len(pools) == 1, pools
        skipped = {s["name"]: s["reason"] for s in listed["skipped"]}
        assert "too short" in skipped[empty.name] and "magic" in skipped[garbage.name], skipped
        assert f"skipped {SHM / empty.name}:" in res.stderr
        (pool,) = pools
        assert pool["pool"] == 99 and pool["stale"] is True and pool["owner_alive"] is False
        assert pool["owner_cmdline"] is None
        assert pool["workers"] == [
            {
                "id": 0,
                "pid": dead,
                "state": "idle",
                "flags": [],
                "gen": 1,
                "items_done": 7,
                "in_state_s": pool["workers"][0]["in_state_s"],
                "title": None,
                "alive": False,
                "detached": False,
                "exited": False,
            }
        ]
        text = cli_output("ps")
        assert text.returncode == 0, text.stderr
        row = [ln for ln in text.stdout.splitlines() if ln.startswith("u99 ") and f" {dead} " in ln]
        assert len(row) == 1 and " stale " in row[0] and "(gone)" in row[0], text.stdout
        assert "stale: the owner is gone" in text.stdout
    finally:
        for path in (stale, empty, garbage):
            path.unlink(missing_ok=True)


def test_ps_skips_a_segment_that_vanished(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # A pool closing between the directory listing and the attach: the name is listed, the
    # file is gone. ps must carry on (in-process: the race cannot be timed from outside).
    gone = f"procpool-{UID}-{dead_pid()}-0"
    monkeypatch.setattr(idtable, "list_segments", lambda: [gone])
    assert cli.main(["ps", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"pools": [], "skipped": []}
    assert cli.main(["ps"]) == 0
    assert capsys.readouterr().out == "no procpool pools running\n"


def test_console_script_is_cli_main() -> None:
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "procpool"]
    assert ep.load() is cli.main


# -- watching workers from birth to kworker/dying (issue 13) -----------------------------------------


def ps_owner(owner_pid: int, *extra: str) -> dict[str, Any] | None:
    """The pool of program ``owner_pid`` as ``procpool ps --json --owner PID`` lists it."""
    res = cli_output("ps", "--json", "--owner", str(owner_pid), *extra)
    assert res.returncode == 0, res.stderr
    pools = json.loads(res.stdout)["pools"]
    assert all(p["owner_pid"] == owner_pid for p in pools), pools  # the filter filters
    return pools[0] if pools else None


def test_ps_shows_dying_workers_until_reaped_and_the_helpers(start: Callable[..., Run]) -> None:
    # Short items in two bursts, an idle timeout shorter than the pause, no minimum: the idle
    # cull destroys workers between bursts and at the end, and each lingers 3 s after it gave
    # its id back. The kernel's order: the id is free before the process is gone.
    run = start(
        "run", "--tasks", "8", "--task-ms", "50", "--bursts", "2", "--min-workers", "0", "--max-workers", "3",
        "--idle-timeout", "0.2", "--pause", "0.6", "--linger-dying", "3", "--quiet",
    )  # fmt: skip

    def a_detached_dying_worker() -> tuple[dict[str, Any], dict[str, Any]] | None:
        pool = ps_owner(run.pid)
        if pool is None:
            return None
        dying = [w for w in pool["workers"] if w["state"] == "dying" and w["detached"] and w["title"]]
        return (pool, dying[0]) if dying else None

    pool, w = wait_ps(a_detached_dying_worker, what="a dying worker that freed its id, in ps --json", timeout=60)
    assert w["title"] == "kworker/dying" and w["alive"] is True and w["pool_known"] is True
    helpers = {h["role"]: h for h in pool["helpers"]}
    assert set(helpers) == {"spawner", "manager"}, pool["helpers"]
    # Checked from outside: the spawner is the dying worker's parent; the titles are real.
    dying = psutil.Process(w["pid"])
    assert dying.ppid() == helpers["spawner"]["pid"]
    assert title_of(helpers["spawner"]["pid"]).startswith("procpool: spawner")
    assert title_of(helpers["manager"]["pid"]).startswith("procpool: manager")
    # The id it had is free: no allocated slot of the pool names its pid.
    assert all(x["pid"] != w["pid"] for x in pool["workers"] if not x["detached"])
    # The text table shows the same row.
    res = cli_output("ps", "--owner", str(run.pid))
    assert res.returncode == 0 and re.search(rf"\b{w['pid']}\s+dying\b.*kworker/dying", res.stdout), res.stdout
    assert re.search(r"\bspawner\b.*procpool: spawner", res.stdout), res.stdout
    assert run.wait(60) == 0, run.err
    # Reaped: gone from ps with its pool (the table is unlinked at the end of teardown).
    assert not psutil.pid_exists(w["pid"]) or psutil.Process(w["pid"]).status() == psutil.STATUS_ZOMBIE
    assert ps_owner(run.pid) is None


def test_ps_filters(start: Callable[..., Run], tmp_path: Path, user_module: str) -> None:
    run = start(
        "run", "--func", f"{user_module}:held", "--workqueue", "filterwq", "--tasks", "4", "--bursts", "1",
        "--quiet", env=env_with(
            PYTHONPATH=str(tmp_path / "mods"), PROCPOOL_TEST_RELEASE=str(tmp_path / "release"), PROCPOOL_TEST_BURST="4"
        ),
    )  # fmt: skip
    pool = wait_ps(lambda: ps_owner(run.pid), what="the workqueue's pool in ps")
    assert ps_owner(run.pid, "--workqueue", "filterwq")["pool"] == pool["pool"]
    assert ps_owner(run.pid, "--workqueue", "no-such-wq") is None
    assert ps_owner(run.pid, "--pool", f"u{pool['pool']}")["pool"] == pool["pool"]
    assert ps_owner(run.pid, "--pool", str(pool["pool"] + 1000)) is None
    res = cli_output("ps", "--pool", "x3")
    assert res.returncode == 2 and "argument --pool: not a pool id" in res.stderr
    (tmp_path / "release-0").touch()
    assert run.wait() == 0, run.err


def _monitor(*args: str) -> subprocess.CompletedProcess:
    return cli_output("monitor", *args, timeout=60)


def test_monitor_json_counters_move_on_a_live_pool(start: Callable[..., Run]) -> None:
    # Items of 20 ms on 2 workers for long enough that every 0.2 s interval completes some.
    run = start(
        "run", "--tasks", "100000", "--task-ms", "20", "--bursts", "1", "--max-workers", "2", "--quiet",
    )  # fmt: skip
    wait_ps(lambda: (p := ps_owner(run.pid)) and p["counters"]["done"] > 0, what="the pool's first items done")
    res = _monitor("-i", "0.2", "-n", "3", "--json", "--owner", str(run.pid))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 3, res.stdout  # one JSON document per line per interval, -n stops it
    docs = [json.loads(ln) for ln in lines]
    rows = [d["pools"][0] for d in docs]
    assert all(r["owner_pid"] == run.pid for r in rows)
    assert rows[0]["rates"]["completed"] is None  # no rate without a previous sample
    # The counters move, and the rates say so.
    assert rows[0]["completed"] < rows[2]["completed"] and rows[0]["started"] < rows[2]["started"]
    assert all(r["rates"]["completed"] is not None and r["rates"]["completed"] >= 0 for r in rows[1:])
    assert any(r["rates"]["completed"] > 0 for r in rows[1:])
    # The books add up: started = done + in flight; workers within the pool's bounds.
    for r in rows:
        assert r["in_flight"] == r["started"] - r["completed"] and 0 <= r["in_flight"] <= 2
        assert r["idle"] + r["busy"] <= 2 and r["created"] >= 1
    assert [d["time"] for d in docs] == sorted(d["time"] for d in docs)


def test_monitor_text_lists_pools_and_workqueues(start: Callable[..., Run], tmp_path: Path, user_module: str) -> None:
    run = start(
        "run", "--func", f"{user_module}:held", "--workqueue", "monwq", "--max-active", "2", "--tasks", "4",
        "--bursts", "1", "--quiet", env=env_with(
            PYTHONPATH=str(tmp_path / "mods"), PROCPOOL_TEST_RELEASE=str(tmp_path / "release"), PROCPOOL_TEST_BURST="4"
        ),
    )  # fmt: skip
    wait_ps(lambda: (p := ps_owner(run.pid)) and p["workqueues"], what="the workqueue in ps")
    res = _monitor("-i", "0.2", "-n", "3", "--owner", str(run.pid))
    assert res.returncode == 0, res.stderr
    # Not a terminal: one plain block per interval, no escape sequences.
    assert res.stdout.count("procpool monitor ") == 3 and "\x1b" not in res.stdout, res.stdout
    pool_rows = re.findall(rf"^u\d+\s+{run.pid}\s", res.stdout, re.MULTILINE)
    wq_rows = re.findall(rf"^monwq\s+{run.pid}\s+u\d+", res.stdout, re.MULTILINE)
    assert len(pool_rows) == 3 and len(wq_rows) == 3, res.stdout
    assert "MAYDAY" in res.stdout and "DYING" in res.stdout and "CMW" in res.stdout
    (tmp_path / "release-0").touch()
    assert run.wait() == 0, run.err


def test_monitor_without_pools_and_bad_usage() -> None:
    res = _monitor("-i", "0.05", "-n", "2", "--owner", str(dead_pid()))
    assert res.returncode == 0 and res.stdout.count("no procpool pools running") == 2, res
    for args, message in (
        (["-n", "0"], "argument -n/--count: must be >= 1, got 0"),
        (["-i", "0"], "argument -i/--interval: must be a positive number"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ):
        res = _monitor(*args)
        assert res.returncode == 2 and res.stderr.startswith("usage: procpool monitor "), res.stderr
        assert f"procpool monitor: error: {message}" in res.stderr, res.stderr


def test_usage_errors_show_their_commands_usage() -> None:
    res = cli_output("ps", "--foo")
    assert res.returncode == 2
    assert (
        res.stderr.startswith("usage: procpool ps ")
        and "procpool ps: error: unrecognized arguments: --foo" in res.stderr
    )
    res = cli_output("--version")
    assert res.returncode == 0 and re.fullmatch(r"procpool \d+\.\d+\S*\n", res.stdout), res


def test_ps_does_not_import_rich() -> None:
    # rich is for the live displays only: `procpool ps` must not pay for importing it.
    res = subprocess.run(
        CLI[:1] + ["-X", "importtime"] + CLI[1:] + ["ps"], capture_output=True, text=True, timeout=WAIT
    )
    assert res.returncode == 0, res.stderr
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")}
    assert "procpool.cli.ps" in imported and not any(m == "rich" or m.startswith("rich.") for m in imported)
    assert "procpool.cli.run" not in imported and "procpool.cli.monitor" not in imported
