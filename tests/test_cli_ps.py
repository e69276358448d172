"""``procpool ps``: the running pools and their workers, from birth to ``kworker/dying``, the
helpers, stale and unreadable tables, filters; it starts without importing rich.

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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    CLI,
    SHM,
    UID,
    WAIT,
    Run,
    cli_output,
    dead_pid,
    env_with,
    pool_of,
    ps_owner,
    settled_pool,
    title_of,
    wait_ps,
    wait_until,
)

from procpool import cli, idtable


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
    wait_ps(
        lambda: sum(w["items_done"] for w in (pool_of(run.pid) or {"workers": []})["workers"]) > before,
        what="items_done to grow",
    )

    text = cli_output("ps")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["POOL", "OWNER", "STATUS", "ID", "PID", "STATE", "DONE", "AGE", "TITLE"]
    mine = [ln for ln in lines if f"kworker/u{pool['pool']}:" in ln and f" {run.pid} " in ln]
    assert len(mine) == 3 and all(" live " in ln for ln in mine), text.stdout
    # Aligned: the TITLE column starts at the same offset on every row.
    assert {ln.index("kworker/") for ln in mine} == {lines[0].index("TITLE")}


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


def test_ps_shows_dying_workers_until_reaped_and_the_helpers(start: Callable[..., Run]) -> None:
    # Short items in two bursts, an idle timeout shorter than the pause, no minimum: the idle
    # cull destroys workers between bursts and at the end, and each lingers 3 s after it gave
    # its id back. The kernel's order: the id is free before the process is gone.
    run = start(
        "run", "--tasks", "8", "--task-ms", "50", "--bursts", "2", "--min-workers", "0", "--max-workers", "3",
        "--idle-timeout", "0.2", "--pause", "0.6", "--linger-dying", "5", "--quiet",
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
    assert (title_of(helpers["spawner"]["pid"]) or "").startswith("procpool: spawner")
    assert (title_of(helpers["manager"]["pid"]) or "").startswith("procpool: manager")
    # The id it had is free: no allocated slot of the pool names its pid.
    assert all(x["pid"] != w["pid"] for x in pool["workers"] if not x["detached"])

    # The text table shows the same row.
    # (Any dying row: on a loaded machine that one's linger may be over by the time ps runs.)
    def a_dying_row() -> str | None:
        res = cli_output("ps", "--owner", str(run.pid))
        assert res.returncode == 0, res.stderr
        return res.stdout if re.search(r"\b\d+\s+dying\b.*kworker/dying", res.stdout) else None

    text = wait_until(a_dying_row, timeout=60, what="a dying row in the text table")
    assert re.search(r"\bspawner\b.*procpool: spawner", text), text
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
    by_wq = ps_owner(run.pid, "--workqueue", "filterwq")
    assert by_wq is not None and by_wq["pool"] == pool["pool"]
    assert ps_owner(run.pid, "--workqueue", "no-such-wq") is None
    by_pool = ps_owner(run.pid, "--pool", f"u{pool['pool']}")
    assert by_pool is not None and by_pool["pool"] == pool["pool"]
    assert ps_owner(run.pid, "--pool", str(pool["pool"] + 1000)) is None
    res = cli_output("ps", "--pool", "x3")
    assert res.returncode == 2 and "argument --pool: not a pool id" in res.stderr
    (tmp_path / "release-0").touch()
    assert run.wait() == 0, run.err


def test_ps_does_not_import_rich() -> None:
    # rich is for the live displays only: `procpool ps` must not pay for importing it.
    res = subprocess.run(
        CLI[:1] + ["-X", "importtime"] + CLI[1:] + ["ps"], capture_output=True, text=True, timeout=WAIT
    )
    assert res.returncode == 0, res.stderr
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")}
    assert "procpool.cli.ps" in imported and not any(m == "rich" or m.startswith("rich.") for m in imported)
    assert "procpool.cli.run" not in imported and "procpool.cli.monitor" not in imported
