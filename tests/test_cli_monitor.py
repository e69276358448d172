"""``procpool monitor``: counters that move on a live pool, pools and workqueues in text, and
what it says without pools or with bad usage.

``procpool run`` runs in a subprocess (its own session, so cleanup can reach its whole process
group); what it does is checked through ``procpool ps --json`` in another process, through
psutil, and through /dev/shm — never through the pool object itself. Every check filters by
the owner pid of the run it started, or by a title prefix unique to the test (other tests'
pools run at the same time). The helpers are conftest's ("the procpool command").
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from conftest import (
    Run,
    cli_output,
    dead_pid,
    env_with,
    ps_owner,
    wait_ps,
)


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
