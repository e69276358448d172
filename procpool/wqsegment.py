"""The workqueue segment: one small file per program in /dev/shm listing its live workqueues,
for ``procpool ps``.

``procpool-<uid>-<owner pid>-wq``: a JSON list with one object per live workqueue (name,
attributes, the ids of the pools it holds, and its statistics, see procpool.workqueue)::

    workqueue made / moved / destroyed, or its numbers changed (every few tenths of a second)
        └─► write_workqueues(entries) ─► private <name>-<random>.tmp ─► rename over <name>
                                          (none left: unlink <name>)
    procpool ps ─► procpool.idtable.read_snapshot ─► read_wq(name): checked entry by entry

Rewritten whole, so a reader sees the old or the new content, never half. If that name is
taken by something that is not ours, the segment is ``...-wq-<random>`` instead (readers find
it by listing). Unlinked by the spawner like the id tables if the program dies first (it
shares their prefix). File safety and the naming scheme are procpool.shmfile's.
"""

from __future__ import annotations

import json
import os

from .shmfile import (
    SHM_DIR,
    WQ_SUFFIX,
    BadSegment,
    classify,
    create_private,
    finite_time,
    is_ours,
    random_suffix,
    read_ours,
    segment_prefix,
    unlink_name,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `procpool ps` starts faster
if TYPE_CHECKING:
    from typing import Any

#: A workqueue segment larger than this is not one of ours (a few hundred bytes per workqueue).
WQ_MAX_BYTES = 4 << 20

# The name this process publishes its workqueues under, once chosen: (pid, name). Guarded by
# the caller's lock (procpool.workqueue's _publish_lock: one write at a time).
_wq_name: tuple[int, str] | None = None


def wq_segment_name(owner_pid: int) -> str:
    return f"{segment_prefix()}{owner_pid}{WQ_SUFFIX}"


def is_wq_segment(name: str) -> bool:
    return classify(name)[0] in ("wq", "tmp")


def write_workqueues(entries: list[dict]) -> None:
    """Publish this program's workqueues (none: unlink). Never raises OSError: the numbers are
    for observers, a failure to show them must not fail a workqueue. Callers serialize."""
    global _wq_name
    pid = os.getpid()
    name = _wq_name[1] if _wq_name is not None and _wq_name[0] == pid else wq_segment_name(pid)
    try:
        if not entries:
            unlink_name(name)
            return
        tmp, fd = create_private(wq_segment_name(pid))
        try:
            try:
                data = json.dumps(entries).encode()
                if os.write(fd, data) != len(data):
                    raise OSError("short write")
            finally:
                os.close(fd)
            name = _replace_ours(tmp, name)
        finally:
            unlink_name(tmp)
        _wq_name = (pid, name)
    except OSError:
        pass


def _replace_ours(tmp: str, name: str) -> str:
    """Rename ``tmp`` over ``name`` if ``name`` is absent or ours; otherwise over a new name of
    our own (``...-wq-<random>``, found by readers by listing). Returns the name used."""
    path = os.path.join(SHM_DIR, name)
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is None or is_ours(st):
        try:
            # rename replaces the name itself, never what a symlink there points to; in the
            # sticky /dev/shm it fails (EPERM) on another user's name, unless we are root.
            os.rename(os.path.join(SHM_DIR, tmp), path)
            return name
        except (PermissionError, IsADirectoryError):
            pass
    new = f"{wq_segment_name(os.getpid())}-{random_suffix()}"
    try:
        # link, not rename: it fails rather than replace a name someone planted meanwhile.
        os.link(os.path.join(SHM_DIR, tmp), os.path.join(SHM_DIR, new))
    except FileExistsError:
        raise OSError(f"{new} is taken") from None
    return new


def _check_wq_entry(e: Any) -> str | None:
    """Why a workqueue entry read from a segment is malformed, or None if it is well formed."""
    if not isinstance(e, dict):
        return f"an entry is a {type(e).__name__}, not an object"
    if not isinstance(e.get("name"), str):
        return "an entry has no string 'name'"
    pools = e.get("pools")
    if not isinstance(pools, list) or not all(type(p) is int and p >= 0 for p in pools):
        return f"workqueue {e['name']!r}: 'pools' is not a list of pool ids"
    for key in ("started", "in_flight", "completed", "cpu_intensive", "cm_wakeups", "mayday", "rescued"):
        v = e.get(key, 0)
        if type(v) is not int or v < 0:
            return f"workqueue {e['name']!r}: {key!r} is {v!r}, not a count"
    v = e.get("cpu_time", 0.0)
    if type(v) not in (int, float) or not finite_time(v):
        return f"workqueue {e['name']!r}: 'cpu_time' is {v!r}, not a number of seconds"
    if not isinstance(e.get("rescuer", False), bool):
        return f"workqueue {e['name']!r}: 'rescuer' is not true or false"
    return None


def read_wq(name: str) -> tuple[list[dict[str, Any]], float]:
    path = os.path.join(SHM_DIR, name)
    data = read_ours(name, WQ_MAX_BYTES)
    try:
        mtime = os.lstat(path).st_mtime
    except FileNotFoundError:
        mtime = 0.0
    try:
        entries = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadSegment(f"not a workqueue segment: {type(exc).__name__}") from None
    if not isinstance(entries, list):
        raise BadSegment(f"not a workqueue segment: a JSON {type(entries).__name__}, not a list")
    for e in entries:
        why = _check_wq_entry(e)
        if why is not None:
            raise BadSegment(why)
    return entries, mtime
