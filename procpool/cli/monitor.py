"""``procpool monitor``: the kernel's ``tools/workqueue/wq_monitor.py`` for procpool.

Every interval it takes the snapshot ``procpool ps`` takes (validated id tables, the pools'
published counters, the workqueue segments, the spawners' children; see procpool.cli.ps) and
shows one row per pool and one per workqueue: totals, and rates per second over the last
interval. Pools and workqueues are told apart across samples by (owner pid, pool id, table
creation time) and (owner pid, name), so a pool that closed and a new one with the same id do
not make a rate.

Three outputs: on a terminal with rich (``procpool[cli]``) a table redrawn in place
(``rich.live.Live``); otherwise (a pipe, a log, no rich) one plain block per interval; with
``--json`` one JSON object per line per interval. ``-n COUNT`` stops after COUNT samples; a
Ctrl-C ends it with exit code 130 and nothing left on the terminal half drawn.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, TextIO

from . import EXIT_OK
from .procinfo import printable
from .ps import aligned, collect, select, workqueue_rows

#: Counters shown as totals with a per-second rate beside them.
RATED = ("started", "completed", "cpu_time")


def sample(args: argparse.Namespace) -> dict[str, Any]:
    """One snapshot as rows: {"time", "pools": [...], "workqueues": [...]} (totals only)."""
    pools, _skipped = collect()
    pools = select(pools, args)
    prows = []
    for p in pools:
        c = p["counters"]
        states = [w["state"] for w in p["workers"]]
        prows.append(
            {
                "key": f"{p['owner_pid']}/{p['pool']}/{p['created']!r}",
                "pool": p["pool"],
                "owner_pid": p["owner_pid"],
                "stale": p["stale"],
                "started": c["started"],
                "completed": c["done"],
                "in_flight": c["started"] - c["done"],
                "pending": c["pending"],
                "cpu_time": round(c["cpu_time"], 6),
                "cpu_intensive": c["cpu_intensive"],
                "cm_wakeups": c["cm_wakeups"],
                "idle": states.count("idle"),
                "busy": states.count("busy"),
                "starting": states.count("starting"),
                "dying": states.count("dying"),
                "created": c["created"],
                "destroyed": c["destroyed"],
                "lost": c["lost"],
                "killed": c["killed"],
            }
        )
    wrows = []
    for p, e in workqueue_rows(pools):
        if args.workqueue is not None and e["name"] != args.workqueue:
            continue
        wrows.append(
            {
                "key": f"{p['owner_pid']}/{e['name']}",
                "workqueue": e["name"],
                "owner_pid": p["owner_pid"],
                "pools": list(e["pools"]),
                "started": e.get("started", 0),
                "completed": e.get("completed", 0),
                "in_flight": e.get("in_flight", 0),
                "cpu_time": round(float(e.get("cpu_time", 0.0)), 6),
                "cpu_intensive": e.get("cpu_intensive", 0),
                "cm_wakeups": e.get("cm_wakeups", 0),
                "mayday": e.get("mayday", 0) if e.get("rescuer") else None,
                "rescued": e.get("rescued", 0) if e.get("rescuer") else None,
            }
        )
    return {"time": time.time(), "pools": prows, "workqueues": wrows}


def add_rates(cur: dict[str, Any], prev: dict[str, Any] | None) -> None:
    """Per-second rates of RATED over the time since ``prev`` (None for a row seen first)."""
    dt = None if prev is None else cur["time"] - prev["time"]
    for kind in ("pools", "workqueues"):
        before = {} if prev is None else {r["key"]: r for r in prev[kind]}
        for r in cur[kind]:
            old = before.get(r["key"])
            r["rates"] = {
                k: None if old is None or not dt or dt <= 0 else round(max(0.0, r[k] - old[k]) / dt, 3) for k in RATED
            }


def _rate(r: dict[str, Any], key: str) -> str:
    v = r["rates"][key]
    return "-" if v is None else (f"{v:.2f}" if key == "cpu_time" else f"{v:.1f}")


POOL_HEADER = (
    "POOL", "OWNER", "TOTAL", "/s", "DONE", "/s", "INFL", "PEND", "CPUTIME", "CPU/s", "CPUITSV", "CMW",
    "IDLE", "BUSY", "DYING", "CREATED", "DESTROYED", "LOST",
)  # fmt: skip
WQ_HEADER = (
    "WORKQUEUE", "OWNER", "POOLS", "TOTAL", "/s", "DONE", "/s", "INFL", "CPUTIME", "CPU/s", "CPUITSV", "CMW",
    "MAYDAY", "RESCUED",
)  # fmt: skip


def table_rows(snap: dict[str, Any]) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The pool rows and the workqueue rows as text cells, in POOL_HEADER / WQ_HEADER order."""
    prows: list[tuple[str, ...]] = [
        (
            f"u{r['pool']}" + (" (stale)" if r["stale"] else ""),
            str(r["owner_pid"]),
            str(r["started"]),
            _rate(r, "started"),
            str(r["completed"]),
            _rate(r, "completed"),
            str(r["in_flight"]),
            str(r["pending"]),
            f"{r['cpu_time']:.2f}",
            _rate(r, "cpu_time"),
            str(r["cpu_intensive"]),
            str(r["cm_wakeups"]),
            str(r["idle"]),
            str(r["busy"]),
            str(r["dying"]),
            str(r["created"]),
            str(r["destroyed"]),
            str(r["lost"]),
        )
        for r in snap["pools"]
    ]
    wrows: list[tuple[str, ...]] = [
        (
            printable(r["workqueue"]),
            str(r["owner_pid"]),
            ",".join(f"u{i}" for i in r["pools"]),
            str(r["started"]),
            _rate(r, "started"),
            str(r["completed"]),
            _rate(r, "completed"),
            str(r["in_flight"]),
            f"{r['cpu_time']:.2f}",
            _rate(r, "cpu_time"),
            str(r["cpu_intensive"]),
            str(r["cm_wakeups"]),
            "-" if r["mayday"] is None else str(r["mayday"]),
            "-" if r["rescued"] is None else str(r["rescued"]),
        )
        for r in snap["workqueues"]
    ]
    return prows, wrows


def plain_block(snap: dict[str, Any]) -> str:
    """One interval as aligned text: a time line, the pools, the workqueues."""
    prows, wrows = table_rows(snap)
    head = f"procpool monitor  {time.strftime('%H:%M:%S', time.localtime(snap['time']))}"
    if not prows:
        return head + "\nno procpool pools running\n"
    left = {"POOL", "WORKQUEUE", "POOLS"}
    text = head + "\n" + aligned(POOL_HEADER + ("",), [r + ("",) for r in prows], set(POOL_HEADER) - left)
    if wrows:
        text += "\n\n" + aligned(WQ_HEADER + ("",), [r + ("",) for r in wrows], set(WQ_HEADER) - left)
    return text.rstrip() + "\n"


def rich_view(snap: dict[str, Any]) -> Any:
    """One interval as rich renderables (a table of pools, one of workqueues)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    prows, wrows = table_rows(snap)
    when = time.strftime("%H:%M:%S", time.localtime(snap["time"]))

    def table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
        t = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
        for h in header:
            t.add_column(h, justify="left" if h in ("POOL", "WORKQUEUE", "POOLS") else "right", no_wrap=True)
        for r in rows:
            # Text, not markup: a workqueue name is data ("[bold]" must print as itself).
            t.add_row(*(Text(c) for c in r))
        return t

    parts: list[Any] = [table(f"procpool monitor {when}: pools", POOL_HEADER, prows)]
    if not prows:
        parts.append(Text("no procpool pools running"))
    if wrows:
        parts.append(Text(""))
        parts.append(table("workqueues", WQ_HEADER, wrows))
    return Group(*parts)


def cmd_monitor(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Sample every ``args.interval`` seconds, ``args.count`` times (forever without)."""
    live = None
    if not args.json and out.isatty():
        from . import rich_or_none

        rich = rich_or_none()
        if rich is None:
            err.write("procpool monitor: rich is not installed (pip install 'procpool[cli]'): plain output\n")
        else:
            from rich.live import Live

            live = Live(console=rich.console.Console(file=out), auto_refresh=False, transient=False)
    prev = None
    n = 0
    next_at = time.monotonic()
    try:
        if live is not None:
            live.start()
        while True:
            snap = sample(args)
            add_rates(snap, prev)
            prev = snap
            n += 1
            if args.json:
                doc = {"time": snap["time"], "pools": _public(snap["pools"]), "workqueues": _public(snap["workqueues"])}
                out.write(json.dumps(doc) + "\n")
                out.flush()
            elif live is not None:
                live.update(rich_view(snap), refresh=True)
            else:
                out.write(plain_block(snap) + "\n")
                out.flush()
            if args.count is not None and n >= args.count:
                return EXIT_OK
            next_at += args.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    except KeyboardInterrupt:
        return 130
    finally:
        if live is not None:
            live.stop()


def _public(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "key"} for r in rows]
