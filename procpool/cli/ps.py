"""``procpool ps``: every pool of this user's programs, every worker from its fork until it is
reaped, and each program's helpers (its spawner and its Manager server).

Where each row comes from (see docs/design.md, "Watching workers die"):

* the pool's id table in /dev/shm (``procpool.idtable.read_snapshot``: every file validated,
  what fails is skipped with a note): one row per allocated id, ``starting`` / ``idle`` /
  ``busy`` / ``dying``, with items done and time in that state;
* the table's header: the pids of the program's spawner and Manager (helper rows), and the
  pool's counters (``procpool monitor``);
* the spawner's children (psutil): every worker process from its fork until the spawner
  reaps it. A worker frees its id on its way out *before* it exits (the kernel's order), so
  a dying worker that detached has no allocated slot any more; it is found here, titled
  ``kworker/dying``, and given to its pool by the freed slot that still names its pid (or,
  once that id was taken again, to the only pool of its program, else marked pool unknown).
  A child that exited and is not reaped yet is ``dying`` with ``exited``.

Nothing here waits: a snapshot is a few reads of /dev/shm and /proc.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterable

from ..idtable import FLAG_DIE, SHM_DIR, TableInfo, read_snapshot
from . import procinfo
from .procinfo import printable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `procpool ps` starts faster
if TYPE_CHECKING:
    from typing import Any, TextIO

#: ``procpool ps`` cuts longer titles in its text table (not in --json).
TITLE_WIDTH = 60


def _worker_row(**kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": None,
        "pid": None,
        "state": "starting",
        "flags": [],
        "gen": None,
        "items_done": None,
        "in_state_s": None,
        "title": None,
        "alive": False,
        "detached": False,
        "exited": False,
    }
    row.update(kw)
    return row


def describe_pool(table: TableInfo, kids: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One validated id table (``procpool.idtable.read_table``) as ``procpool ps`` shows it.
    ``kids``: the program's spawner's children by pid, to fill in what the table cannot say
    (a worker just forked whose pid the pool has not written yet)."""
    alive = procinfo.owner_alive(table.owner_pid, table.created)
    now = time.time()
    kids = kids or {}
    workers = []
    for s in table.slots:
        pid = s.pid
        if not pid:
            # Forked, but the pool has not written its pid yet: the spawner's child that took
            # this slot's title already (it does so first thing after the fork).
            suffix = f"/u{table.pool_id}:{s.id}"
            pid = next((k for k, c in kids.items() if c["title"] and c["title"].endswith(suffix)), 0)
        title = procinfo.process_title(pid)
        if title is not None and title.startswith(procinfo.SPAWNER_TITLE):
            title = None  # forked, not yet renamed: the spawner's title is not the worker's
        workers.append(
            _worker_row(
                id=s.id,
                pid=pid or None,
                state=s.state_name,
                flags=["die"] if s.flags & FLAG_DIE else [],
                gen=s.gen,
                items_done=s.items_done,
                in_state_s=round(max(0.0, now - s.since), 3),
                title=title,
                alive=pid in kids or title is not None,
            )
        )
    c = table.counters
    return {
        "pool": table.pool_id,
        "table": table.name,
        "owner_pid": table.owner_pid,
        "owner_alive": alive,
        "stale": not alive,
        "owner_cmdline": procinfo.process_title(table.owner_pid) if alive else None,
        "capacity": table.capacity,
        "created": table.created,
        "counters": {k: v for k, v in c.as_dict().items() if not k.endswith("_pid")},
        "helpers": [],
        "workers": workers,
        "_helper_pids": (c.spawner_pid, c.manager_pid),
        "_freed": table.freed,
    }


def _add_program_processes(pools: list[dict[str, Any]], kids_of: dict[int, dict[int, dict[str, Any]]]) -> None:
    """Helper rows, and the spawner's children no slot names: detached dying workers (and
    exited ones the spawner has not reaped yet). Pools of one program share its helpers."""
    by_owner: dict[int, list[dict[str, Any]]] = {}
    for p in pools:
        by_owner.setdefault(p["owner_pid"], []).append(p)
    now = time.time()
    for _owner, group in by_owner.items():
        spawner = next((p["_helper_pids"][0] for p in group if p["_helper_pids"][0]), 0)
        manager = next((p["_helper_pids"][1] for p in group if p["_helper_pids"][1]), 0)
        helpers = [h for h in (procinfo.helper("spawner", spawner), procinfo.helper("manager", manager)) if h]
        for p in group:
            p["helpers"] = [dict(h, age_s=round(max(0.0, now - h["started"]), 3)) for h in helpers]
        kids = kids_of.get(spawner, {}) if any(h["role"] == "spawner" for h in helpers) else {}
        listed = {w["pid"] for p in group for w in p["workers"] if w["pid"]}
        for pid, kid in sorted(kids.items()):
            if pid in listed or pid == manager:
                continue
            home = next((p for p in group if pid in p["_freed"]), None)
            title = kid["title"]
            m = re.search(r"/u(\d+):(\d+)", title or "")
            if home is None and m is not None:
                home = next((p for p in group if p["pool"] == int(m.group(1))), None)
            if home is None and title is not None and not title.endswith("/dying"):
                continue  # not a worker of ours (something a worker forked, say)
            # One pool in the program: its spawner's workers can only be that pool's.
            known = home is not None or len(group) == 1
            if home is None:
                home = group[0]
            wid = home["_freed"].get(pid) if known else None
            dying = kid["zombie"] or (title or "").endswith("/dying")
            home["workers"].append(
                _worker_row(
                    id=wid,
                    pid=pid,
                    state="dying" if dying else "starting",
                    in_state_s=round(max(0.0, now - kid["started"]), 3) if not dying else None,
                    title=title,
                    alive=True,
                    detached=dying,
                    exited=kid["zombie"],
                    pool_known=known,
                )
            )


def collect(
    names: Iterable[str] | None = None, *, children: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every valid pool of this user, ordered by owner pid then pool id, each with its
    workers (dying ones until reaped, with ``children``), its program's helpers, its counters
    and the workqueues using it (from its program's workqueue segment: name, attributes,
    pools and statistics, see procpool.workqueue); and what was skipped: [{"name", "reason"}]."""
    snap = read_snapshot(None if names is None else list(names))
    kids_of: dict[int, dict[int, dict[str, Any]]] = {}
    if children:
        for t in snap.tables:
            sp = t.counters.spawner_pid
            if sp and sp not in kids_of:
                kids_of[sp] = {k["pid"]: k for k in procinfo.children(sp)}
    pools = [describe_pool(t, kids_of.get(t.counters.spawner_pid)) for t in snap.tables]
    _add_program_processes(pools, kids_of)
    for p in pools:
        del p["_helper_pids"], p["_freed"]
        p["workers"].sort(key=lambda w: (w["id"] is None, w["id"] if w["id"] is not None else 0, w["pid"] or 0))
        p["workqueues"] = [e for e in snap.workqueues.get(p["owner_pid"], []) if p["pool"] in e["pools"]]
    return pools, [{"name": n, "reason": r} for n, r in snap.skipped]


def collect_pools(names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The pools of ``collect``, without what was skipped."""
    return collect(names)[0]


def read_pool(name: str) -> dict[str, Any] | None:
    """Snapshot one id table, or None if it vanished or is not a valid table of this user."""
    pools = collect([name])[0]
    return pools[0] if pools else None


def select(pools: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The pools ``--pool``, ``--owner`` and ``--workqueue`` keep."""
    out = []
    for p in pools:
        if args.pool is not None and p["pool"] != args.pool:
            continue
        if args.owner is not None and p["owner_pid"] != args.owner:
            continue
        if args.workqueue is not None and not any(e["name"] == args.workqueue for e in p["workqueues"]):
            continue
        out.append(p)
    return out


def aligned(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[str]) -> str:
    """Columns padded to their widest cell; the last one is left ragged."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        cells = [c.rjust(wd) if h in right else c.ljust(wd) for c, wd, h in zip(r, widths, header, strict=False)]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    return "\n".join(lines)


def workqueue_rows(pools: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(pool, workqueue entry) once per workqueue (an entry is listed under each of its pools)."""
    seen: set[tuple[int, str]] = set()
    out = []
    for p in pools:
        for e in p.get("workqueues", []):
            if (p["owner_pid"], e["name"]) not in seen:
                seen.add((p["owner_pid"], e["name"]))
                out.append((p, e))
    return out


def format_workqueues(pools: list[dict[str, Any]]) -> str:
    """One row per workqueue, in the kernel's wq_monitor columns: items started (TOTAL), in
    flight (INFL), CPU seconds (CPUTIME), CPU-intensive marks (CPUITSV), concurrency-
    management wakeups (CMW), mayday calls and items rescued. '' if there is none."""
    header = ("WORKQUEUE", "OWNER", "POOLS", "TOTAL", "INFL", "CPUTIME", "CPUITSV", "CMW", "MAYDAY", "RESCUED")
    rows: list[tuple[str, ...]] = []
    for p, e in workqueue_rows(pools):
        rows.append(
            (
                printable(e["name"]),
                str(p["owner_pid"]),
                ",".join(f"u{i}" for i in e["pools"]),
                str(e.get("started", 0)),
                str(e.get("in_flight", 0)),
                f"{e.get('cpu_time', 0.0):.2f}",
                str(e.get("cpu_intensive", 0)),
                str(e.get("cm_wakeups", 0)),
                str(e.get("mayday", 0)) if e.get("rescuer") else "-",
                str(e.get("rescued", 0)) if e.get("rescuer") else "-",
            )
        )
    if not rows:
        return ""
    return aligned(header, rows, set(header) - {"WORKQUEUE", "POOLS"})


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 600:
        return f"{seconds:.0f}s"
    if seconds < 36000:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _cut(title: str) -> str:
    if len(title) > TITLE_WIDTH:
        return title[: TITLE_WIDTH - 3] + "..."
    return title


def format_table(pools: list[dict[str, Any]]) -> str:
    """An aligned text table: per pool its helpers, then one row per worker (one row for a
    pool with no worker). A detached dying worker has no id ('-'); '?' after the pool: its
    pool could not be told (its freed id was taken again and its program has several)."""
    header = ("POOL", "OWNER", "STATUS", "ID", "PID", "STATE", "DONE", "AGE", "TITLE")
    right = {"OWNER", "ID", "PID", "DONE", "AGE"}
    rows: list[tuple[str, ...]] = []
    for p in pools:
        head = (f"u{p['pool']}", str(p["owner_pid"]), "stale" if p["stale"] else "live")
        for h in p.get("helpers", []):
            rows.append(head + ("-", str(h["pid"]), h["role"], "-", age(h.get("age_s")), printable(h["title"])))
        if not p["workers"]:
            rows.append(head + ("-", "-", "-", "-", "-", "(no workers)"))
        for w in p["workers"]:
            state = w["state"] + ("+die" if "die" in w["flags"] else "")
            if w["exited"]:
                title = "(exited, not reaped yet)"
            elif w["title"] is not None:
                title = _cut(printable(w["title"]))
            elif w["state"] == "starting" and w["alive"]:
                title = "(forked, taking its title)"
            else:
                title = "(gone)"
            wid = "-" if w["id"] is None else str(w["id"])
            if w["detached"]:
                wid += "" if w.get("pool_known", True) else "?"
            done = "-" if w["items_done"] is None else str(w["items_done"])
            rows.append(head + (wid, str(w["pid"] or "-"), state, done, age(w["in_state_s"]), title))
    return aligned(header, rows, right)


def render(pools: list[dict[str, Any]]) -> str:
    """The whole text ``procpool ps`` prints for ``pools`` (without a trailing newline)."""
    if not pools:
        return "no procpool pools running"
    text = format_table(pools)
    wqs = format_workqueues(pools)
    if wqs:
        text += "\n\n" + wqs
    if any(p["stale"] for p in pools):
        text += "\nstale: the owner is gone but its table was left in /dev/shm (its workers may be gone too)"
    return text


def cmd_ps(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """List the pools. Whatever is in /dev/shm, this ends and exits 0: a name under our prefix
    that is not a valid segment of ours (another user's, a FIFO, forged, truncated) is skipped
    with one line on ``err`` and, with --json, listed in ``skipped``."""
    pools, skipped = collect()
    pools = select(pools, args)
    for s in skipped:
        err.write(f"procpool ps: skipped {SHM_DIR}/{printable(s['name'])}: {printable(s['reason'])}\n")
    err.flush()
    if args.json:
        json.dump({"pools": pools, "skipped": skipped}, out, indent=2)
        out.write("\n")
    else:
        out.write(render(pools) + "\n")
    out.flush()
    return 0
