"""The shared-memory id table: the userspace ``pool->worker_idr``.

One POSIX shared-memory segment per pool, named ``procpool-<uid>-<owner pid>-<pool id>`` so
that ``procpool ps`` in any process of the same user can find and read it (mode 0600). A
header describes the pool and carries the detach completion's state; one fixed-size slot per
worker id mirrors that worker's life for observers::

    header  magic, version, pool id, owner pid, capacity, completion waiting/completed, t0
    slot i  state, flags, pid, gen, items done, state since

Guards (see DESIGN.md):
    M = the pool's Manager attach lock (any process)      I = written once at creation
    W = written only by the worker that owns the slot     L = written only by the parent

Allocation takes the lowest free id (``alloc``); a slot is freed by its worker on the way
out (``free``), or by the parent on behalf of a worker that died without detaching. ``gen``
grows on every allocation, so "is this slot still mine?" is a single comparison and a freed
slot can never look like it belongs to an older worker again.

Everyone maps the file in /dev/shm directly; nothing goes through
``multiprocessing.shared_memory``, whose resource tracker is one more process per program
(and, on Python < 3.13, a reader's attach would register the segment again and its exit
unlink it under the live pool). Who unlinks: the pool at the end of teardown; if the
program dies first (even SIGKILLed), its spawner, which outlives it by design for exactly
such clean-up (see procpool.spawner).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from dataclasses import dataclass

MAGIC = b"PROCPOOL"
VERSION = 1
SHM_DIR = "/dev/shm"

# Slot states. The numeric values are part of the on-disk format read by `procpool ps`.
FREE, STARTING, IDLE, BUSY, DYING = range(5)
STATE_NAMES = {FREE: "free", STARTING: "starting", IDLE: "idle", BUSY: "busy", DYING: "dying"}

# Slot flags (L).
FLAG_DIE = 1

#                         magic ver pool owner cap waiting completed t0
_HEADER = struct.Struct("<8s I I q I I I d")
HEADER_SIZE = 64
#                       state flags pid gen done since
_SLOT = struct.Struct("<I I q Q Q d")
_U32 = struct.Struct("<I")
SLOT_SIZE = 48

# Byte offsets of single fields, for writes that must not touch neighbouring fields
# (each field has one writer class; a whole-slot write would race with the other writer).
_OFF_WAITING = 8 + 4 + 4 + 8 + 4
_OFF_COMPLETED = _OFF_WAITING + 4
_OFF_STATE, _OFF_FLAGS, _OFF_PID, _OFF_GEN, _OFF_DONE, _OFF_SINCE = 0, 4, 8, 16, 24, 32


def segment_name(owner_pid: int, pool_id: int) -> str:
    return f"procpool-{os.getuid()}-{owner_pid}-{pool_id}"


def segment_prefix() -> str:
    return f"procpool-{os.getuid()}-"


@dataclass(frozen=True)
class Slot:
    """A snapshot of one slot, as read by observers."""

    id: int
    state: int
    flags: int
    pid: int
    gen: int
    items_done: int
    since: float

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, f"?{self.state}")


class IdTable:
    """A view of one pool's id table. Methods that change allocation need the M lock held."""

    def __init__(self, buf: memoryview, name: str, owner: object) -> None:
        self._buf = buf
        self.name = name
        self._owner = owner  # keeps the SharedMemory or mmap alive as long as the view
        magic, version, self.pool_id, self.owner_pid, self.capacity, *_ = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"{name} is not a procpool id table (magic {magic!r}, version {version})")

    # -- creation and attachment ---------------------------------------------------------

    @classmethod
    def create(cls, pool_id: int, capacity: int) -> IdTable:
        """Create the segment for a new pool of this process (parent only)."""
        name = segment_name(os.getpid(), pool_id)
        size = HEADER_SIZE + SLOT_SIZE * capacity
        path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            # Left by an earlier process with our pid whose clean-up never ran (its spawner
            # was killed too): the pid is ours now, so the segment is stale.
            _unlink_quietly(name)
            fd = os.open(path, flags, 0o600)
        try:
            os.ftruncate(fd, size)
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            _unlink_quietly(name)
            raise
        finally:
            os.close(fd)
        _HEADER.pack_into(m, 0, MAGIC, VERSION, pool_id, os.getpid(), capacity, 0, 0, time.time())
        return cls(memoryview(m), name, m)

    @classmethod
    def attach(cls, name: str, writable: bool = True) -> IdTable:
        """Map an existing segment by name (workers, ``procpool ps``)."""
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR if writable else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        return cls(memoryview(m), name, m)

    def destroy(self) -> None:
        """Release and unlink the segment (parent, at the end of teardown)."""
        self.close()
        _unlink_quietly(self.name)

    def close(self) -> None:
        """Unmap without unlinking (workers, readers)."""
        self._buf.release()
        self._owner.close()  # type: ignore[attr-defined]

    # -- allocation (M held) -------------------------------------------------------------

    def alloc(self) -> tuple[int, int] | None:
        """Take the lowest free id. Returns (id, gen), or None when the table is full. M held."""
        buf = self._buf
        for i in range(self.capacity):
            off = HEADER_SIZE + i * SLOT_SIZE
            state, _, _, gen, _, _ = _SLOT.unpack_from(buf, off)
            if state == FREE:
                gen += 1
                _SLOT.pack_into(buf, off, STARTING, 0, 0, gen, 0, time.time())
                return i, gen
        return None

    def free(self, wid: int, gen: int) -> bool:
        """Free id ``wid`` if it still belongs to allocation ``gen``. M held."""
        off = HEADER_SIZE + wid * SLOT_SIZE
        state, _, _, cur_gen, _, _ = _SLOT.unpack_from(self._buf, off)
        if state == FREE or cur_gen != gen:
            return False
        struct.pack_into("<I", self._buf, off + _OFF_STATE, FREE)
        struct.pack_into("<d", self._buf, off + _OFF_SINCE, time.time())
        return True

    def owned_by(self, wid: int, gen: int) -> bool:
        """Is slot ``wid`` still allocated to ``gen``? Safe without M when the answer is False:
        a slot never goes back to an older generation."""
        state, _, _, cur_gen, _, _ = _SLOT.unpack_from(self._buf, HEADER_SIZE + wid * SLOT_SIZE)
        return state != FREE and cur_gen == gen

    def nr_allocated(self) -> int:
        # A raw scan (no Slot objects): called under the attach lock by every detacher.
        buf, unpack = self._buf, _U32.unpack_from
        end = HEADER_SIZE + SLOT_SIZE * self.capacity
        return sum(1 for off in range(HEADER_SIZE, end, SLOT_SIZE) if unpack(buf, off)[0] != FREE)

    # -- the detach completion's state (M held) ------------------------------------------

    def install_completion(self) -> None:
        struct.pack_into("<I", self._buf, _OFF_WAITING, 1)

    def should_complete(self) -> bool:
        """A teardown waits, nothing is attached, and nobody completed yet. M held."""
        waiting, completed = struct.unpack_from("<II", self._buf, _OFF_WAITING)
        return bool(waiting) and not completed and self.nr_allocated() == 0

    def mark_completed(self) -> None:
        (completed,) = struct.unpack_from("<I", self._buf, _OFF_COMPLETED)
        struct.pack_into("<I", self._buf, _OFF_COMPLETED, completed + 1)

    @property
    def completions(self) -> int:
        """How many times the detach completion was completed (invariant 4: at most once)."""
        return struct.unpack_from("<I", self._buf, _OFF_COMPLETED)[0]

    # -- per-slot fields ----------------------------------------------------------------

    def set_state(self, wid: int, state: int) -> None:  # W
        off = HEADER_SIZE + wid * SLOT_SIZE
        struct.pack_into("<I", self._buf, off + _OFF_STATE, state)
        struct.pack_into("<d", self._buf, off + _OFF_SINCE, time.time())

    def set_pid(self, wid: int, pid: int) -> None:  # W (and L right after start)
        struct.pack_into("<q", self._buf, HEADER_SIZE + wid * SLOT_SIZE + _OFF_PID, pid)

    def set_flags(self, wid: int, flags: int) -> None:  # L
        struct.pack_into("<I", self._buf, HEADER_SIZE + wid * SLOT_SIZE + _OFF_FLAGS, flags)

    def add_done(self, wid: int, n: int = 1) -> None:  # W
        off = HEADER_SIZE + wid * SLOT_SIZE + _OFF_DONE
        (done,) = struct.unpack_from("<Q", self._buf, off)
        struct.pack_into("<Q", self._buf, off, done + n)

    def slot(self, wid: int) -> Slot:
        return Slot(wid, *_SLOT.unpack_from(self._buf, HEADER_SIZE + wid * SLOT_SIZE))

    def slots(self) -> list[Slot]:
        return [self.slot(i) for i in range(self.capacity)]

    @property
    def created(self) -> float:
        return _HEADER.unpack_from(self._buf, 0)[-1]


def list_segments() -> list[str]:
    """Names of this user's procpool id tables in /dev/shm."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    prefix = segment_prefix()
    return sorted(n for n in names if n.startswith(prefix))


def _unlink_quietly(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


# -- the workqueues of a program, for `procpool ps` ------------------------------------------------
#
# One more small segment per program, ``procpool-<uid>-<owner pid>-wq``: a JSON list with one
# object per live workqueue (name, attributes, the ids of the pools it holds, and its
# statistics, see procpool.workqueue), rewritten whole (a temporary file renamed over it, so a
# reader sees the old or the new content, never half) when a workqueue is made, moved or
# destroyed and, while its numbers change, every few tenths of a second; unlinked when the
# program has no workqueue. Unlinked by the spawner like the id tables if the program dies
# first (it shares their prefix).

WQ_SUFFIX = "-wq"


def wq_segment_name(owner_pid: int) -> str:
    return f"{segment_prefix()}{owner_pid}{WQ_SUFFIX}"


def is_wq_segment(name: str) -> bool:
    return name.endswith(WQ_SUFFIX) or name.endswith(WQ_SUFFIX + ".tmp")


def write_workqueues(entries: list[dict]) -> None:
    """Publish this program's workqueues (none: unlink). Never raises OSError: the numbers are
    for observers, a failure to show them must not fail a workqueue."""
    name = wq_segment_name(os.getpid())
    try:
        if not entries:
            _unlink_quietly(name)
            return
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(entries).encode())
        finally:
            os.close(fd)
        os.replace(path + ".tmp", path)
    except OSError:
        pass


def read_workqueues(owner_pid: int) -> list[dict]:
    """The workqueues program ``owner_pid`` published ([] if it has none or it vanished)."""
    try:
        with open(os.path.join(SHM_DIR, wq_segment_name(owner_pid)), "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return []
    if not isinstance(data, list):
        return []
    return [
        e for e in data if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("pools"), list)
    ]
