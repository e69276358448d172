"""What the command line asks the OS about processes: titles, owners, helpers, children.

Everything here reads /proc through psutil and answers None (or an empty list) for a process
that is gone, a zombie, another user's, or a pid that a table named but that is not what the
table claims: the pids come from /dev/shm, which anyone of this user could have written (see
procpool.idtable), so a pid is only believed when the process it names fits.
"""

from __future__ import annotations

import os

import psutil

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `procpool ps` starts faster
if TYPE_CHECKING:
    from typing import Any

#: psutil derives a process's start time from the boot time, which /proc gives in whole
#: seconds; allow that much before calling an owner that started after its table "recycled".
CLOCK_SLACK = 1.0
#: The titles procpool's helper processes give themselves (procpool.spawner, procpool.manager).
SPAWNER_TITLE = "procpool: spawner"
MANAGER_TITLE = "procpool: manager"


def printable(text: str) -> str:
    """``text`` safe to write to a terminal: every control or format character (newline,
    escape, bidi override...) shown as a Python-style escape. Names in tables and titles come
    from files and processes anyone of this user may have written."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)


def process_title(pid: int) -> str | None:
    """A process's title as ps shows it: its command line, joined and stripped (setproctitle
    pads the argument area), or None if there is no such live process of this user (a pid in
    a table may have been recycled by anyone's process)."""
    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or proc.uids().real != os.getuid():
            return None
        return " ".join(proc.cmdline()).strip()
    except psutil.Error:
        return None


def owner_alive(pid: int, table_created: float) -> bool:
    """Does the process that created this table still run? A process with the same pid that
    started after the table was created is a recycled pid, not the owner."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= table_created + CLOCK_SLACK
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; we may just not see its details


def helper(role: str, pid: int) -> dict[str, Any] | None:
    """A helper row (``role`` 'spawner' or 'manager') for the pid a table names, if that pid is
    a live process of this user titled as that helper; else None (gone, or not what the table
    says)."""
    expected = SPAWNER_TITLE if role == "spawner" else MANAGER_TITLE
    title = process_title(pid)
    if title is None or not title.startswith(expected):
        return None
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        return None
    return {"role": role, "pid": pid, "title": title, "started": started}


def children(pid: int) -> list[dict[str, Any]]:
    """The live children of ``pid`` (zombies included: a child that exited and is not reaped
    yet), each {"pid", "title" (None for a zombie), "zombie", "started"}. For a spawner: every
    worker from its fork until it is reaped."""
    try:
        kids = psutil.Process(pid).children()
    except psutil.Error:
        return []
    out = []
    for k in kids:
        try:
            with k.oneshot():
                zombie = k.status() == psutil.STATUS_ZOMBIE
                if k.uids().real != os.getuid():
                    continue
                title = None if zombie else " ".join(k.cmdline()).strip()
                out.append({"pid": k.pid, "title": title, "zombie": zombie, "started": k.create_time()})
        except psutil.Error:
            continue  # reaped meanwhile
    return out
