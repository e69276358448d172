"""``procpool run``: it grows and shrinks its pool, runs the user's function, ends by itself
or on a signal, cleanly; bad usage exits 2 with the command's usage; progress on a terminal.

``procpool run`` runs in a subprocess (its own session, so cleanup can reach its whole process
group); what it does is checked through ``procpool ps --json`` in another process, through
psutil, and through /dev/shm — never through the pool object itself. Every check filters by
the owner pid of the run it started, or by a title prefix unique to the test (other tests'
pools run at the same time). The helpers are conftest's ("the procpool command").
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    CLI,
    PROGRESS_WORKERS,
    SHM,
    SUMMARY_WORKERS,
    UID,
    WAIT,
    Run,
    cli_output,
    env_with,
    pool_of,
    processes_titled,
    ps_json,
    settled_pool,
    summary_items,
    wait_ps,
    wait_until,
)

from procpool import cli


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


def test_console_script_is_cli_main() -> None:
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "procpool"]
    assert ep.load() is cli.main


def test_usage_errors_show_their_commands_usage() -> None:
    res = cli_output("ps", "--foo")
    assert res.returncode == 2
    assert (
        res.stderr.startswith("usage: procpool ps ")
        and "procpool ps: error: unrecognized arguments: --foo" in res.stderr
    )
    res = cli_output("--version")
    assert res.returncode == 0 and re.fullmatch(r"procpool \d+\.\d+\S*\n", res.stdout), res
