"""The shared-memory id table: the userspace ``pool->worker_idr``.

One POSIX shared-memory segment per pool, named ``procpool-<uid>-<owner pid>-<pool id>`` so
that ``procpool ps`` in any process of the same user can find and read it (mode 0600). A
header describes the pool and carries the detach completion's state; one fixed-size slot per
worker id mirrors that worker's life for observers::

    header  magic, version, pool id, owner pid, capacity, completion waiting/completed, t0;
            then (version 2) the pool's helpers and counters for observers: spawner pid,
            Manager pid, workers created/destroyed/lost/killed, items started/done/pending,
            CPU-intensive marks, concurrency-management wakeups, CPU seconds (``PoolCounters``)
    slot i  state, flags, pid, gen, items done, state since

A freed slot keeps the pid of its last worker (only its state and time change) until the id is
allocated again: ``procpool ps`` uses it to name the pool of a worker that detached and is still
dying (see docs/design.md, "Watching workers die").

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

/dev/shm is shared by every local user, so nothing here trusts a name in it (see README,
Security); how files are created and read safely there is procpool.shmfile's. A table is
published by ``link`` to its name (fails if the name exists; never follows it). If a table's
name is taken by something that is not ours (another user's file, a symlink, a FIFO...), the
table takes another name under the same prefix (``procpool-<uid>-<pid>-<pool>-<random>``),
which readers find by listing. Readers (``attach``, ``read_snapshot``) accept only a regular
file of this uid whose size is what its header says; ``read_snapshot`` (``procpool ps``)
checks every field and reports what it skipped, and why, instead of raising. The program's
workqueue segment, which ``read_snapshot`` reads too, is procpool.wqsegment's.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

from .shmfile import OPEN_FLAGS as OPEN_FLAGS
from .shmfile import (
    SHM_DIR,
    BadSegment,
    check_ours,
    classify,
    create_private,
    finite_time,
    link_new,
    list_segments,
    read_ours,
    unlink_name,
)
from .shmfile import segment_prefix as segment_prefix
from .wqsegment import is_wq_segment as is_wq_segment
from .wqsegment import read_wq, wq_segment_name
from .wqsegment import write_workqueues as write_workqueues

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `procpool ps` starts faster
if TYPE_CHECKING:
    from typing import Any

MAGIC = b"PROCPOOL"
#: 2: the header grew the helper pids and the pool's counters (``PoolCounters``).
VERSION = 2

#: The most workers one pool may have (``WorkerPool`` refuses a larger ``max_workers``).
#: Each worker is an OS process with its own interpreter (tens of MiB), so 4096 is already far
#: past what one machine runs usefully; the bound keeps the id table (2 x max_workers + 2 slots,
#: see ``capacity_for``) under 400 KiB, so ``procpool ps`` reads any table in a millisecond or
#: so, and lets it refuse a table that claims more.
MAX_WORKERS = 4096
#: Kernel's PID_MAX_LIMIT (4M): no pid is larger, whatever /proc/sys/kernel/pid_max says.
PID_LIMIT = 1 << 22

# Slot states. The numeric values are part of the on-disk format read by `procpool ps`.
FREE, STARTING, IDLE, BUSY, DYING = range(5)
STATE_NAMES = {FREE: "free", STARTING: "starting", IDLE: "idle", BUSY: "busy", DYING: "dying"}

# Slot flags (L).
FLAG_DIE = 1

#                         magic ver pool owner cap waiting completed t0
_HEADER = struct.Struct("<8s I I q I I I d")
#: After _HEADER (44 bytes), at _OFF_COUNTERS: written only by the parent (L), read by observers.
#                         spawner manager created destroyed lost killed started done pending cpuitsv cmw cputime
_COUNTERS = struct.Struct("<q q Q Q Q Q Q Q Q Q Q d")
_OFF_COUNTERS = 48
HEADER_SIZE = 160
#                       state flags pid gen done since
_SLOT = struct.Struct("<I I q Q Q d")
_U32 = struct.Struct("<I")
SLOT_SIZE = 48

# Byte offsets of single fields, for writes that must not touch neighbouring fields
# (each field has one writer class; a whole-slot write would race with the other writer).
_OFF_WAITING = 8 + 4 + 4 + 8 + 4
_OFF_COMPLETED = _OFF_WAITING + 4
_OFF_STATE, _OFF_FLAGS, _OFF_PID, _OFF_GEN, _OFF_DONE, _OFF_SINCE = 0, 4, 8, 16, 24, 32


def capacity_for(max_workers: int) -> int:
    """Slots of a pool's table: dying workers keep their ids until they detach, so a pool under
    churn can hold more ids than workers for a moment."""
    return 2 * max_workers + 2


MAX_CAPACITY = capacity_for(MAX_WORKERS)


class PoolCounters:
    """What the parent publishes in its table's header for observers (``procpool monitor``):
    the pids of the program's spawner and Manager server (0: none yet) and the pool's running
    totals. Written by the arbiter once per loop turn, not per event: a few hundred
    nanoseconds a turn, and an observer sampling every 0.2 s sees at most one turn's lag.

    The records of this module are plain slotted classes, not dataclasses: ``procpool ps``
    imports this module, and dataclasses (with inspect) cost it ~8 ms of start-up."""

    #: The fields, in the order of the header's counters.
    FIELDS = (
        "spawner_pid",
        "manager_pid",
        "created",
        "destroyed",
        "lost",
        "killed",
        "started",  # items sent to a worker
        "done",  # items answered (a result or the function's exception)
        "pending",  # items waiting for a worker
        "cpu_intensive",
        "cm_wakeups",
        "cpu_time",
    )
    __slots__ = FIELDS

    def __init__(
        self,
        spawner_pid: int = 0,
        manager_pid: int = 0,
        created: int = 0,
        destroyed: int = 0,
        lost: int = 0,
        killed: int = 0,
        started: int = 0,
        done: int = 0,
        pending: int = 0,
        cpu_intensive: int = 0,
        cm_wakeups: int = 0,
        cpu_time: float = 0.0,
    ) -> None:
        self.spawner_pid = spawner_pid
        self.manager_pid = manager_pid
        self.created = created
        self.destroyed = destroyed
        self.lost = lost
        self.killed = killed
        self.started = started
        self.done = done
        self.pending = pending
        self.cpu_intensive = cpu_intensive
        self.cm_wakeups = cm_wakeups
        self.cpu_time = cpu_time

    def values(self) -> tuple[float, ...]:
        return tuple(getattr(self, f) for f in self.FIELDS)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.FIELDS, self.values(), strict=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PoolCounters) and self.values() == other.values()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "PoolCounters(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


assert _COUNTERS.size == len(PoolCounters.FIELDS) * 8
assert _OFF_COUNTERS + _COUNTERS.size <= HEADER_SIZE


def segment_name(owner_pid: int, pool_id: int) -> str:
    return f"procpool-{os.getuid()}-{owner_pid}-{pool_id}"


class Slot:
    """A snapshot of one slot, as read by observers."""

    __slots__ = ("id", "state", "flags", "pid", "gen", "items_done", "since")

    def __init__(self, id: int, state: int, flags: int, pid: int, gen: int, items_done: int, since: float) -> None:
        self.id = id
        self.state = state
        self.flags = flags
        self.pid = pid
        self.gen = gen
        self.items_done = items_done
        self.since = since

    def __repr__(self) -> str:
        return "Slot(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, f"?{self.state}")


class IdTable:
    """A view of one pool's id table. Methods that change allocation need the M lock held."""

    def __init__(self, buf: memoryview, name: str, owner: object) -> None:
        self._buf = buf
        self.name = name
        self._owner = owner  # keeps the SharedMemory or mmap alive as long as the view
        if len(buf) < HEADER_SIZE:
            raise ValueError(f"{name} is not a procpool id table ({len(buf)} bytes)")
        magic, version, self.pool_id, self.owner_pid, self.capacity, *_ = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"{name} is not a procpool id table (magic {magic!r}, version {version})")
        if len(buf) != HEADER_SIZE + SLOT_SIZE * self.capacity:
            raise ValueError(f"{name}: {len(buf)} bytes, but its header says {self.capacity} slots")

    # -- creation and attachment ---------------------------------------------------------

    @classmethod
    def create(cls, pool_id: int, capacity: int) -> IdTable:
        """Create the segment for a new pool of this process (parent only).

        Built under a private temporary name, then linked to its name whole: a reader never
        sees it half written, and a name someone else planted is never opened (see the module
        docstring)."""
        base = segment_name(os.getpid(), pool_id)
        size = HEADER_SIZE + SLOT_SIZE * capacity
        tmp, fd = create_private(base)
        try:
            try:
                os.ftruncate(fd, size)
                m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            _HEADER.pack_into(m, 0, MAGIC, VERSION, pool_id, os.getpid(), capacity, 0, 0, time.time())
            try:
                name = link_new(tmp, base)
            except BaseException:
                m.close()
                raise
        finally:
            unlink_name(tmp)
        return cls(memoryview(m), name, m)

    @classmethod
    def attach(cls, name: str, writable: bool = True) -> IdTable:
        """Map an existing segment by name (workers). Only a regular file of this user whose
        size matches its header is accepted (ValueError otherwise)."""
        fd = os.open(os.path.join(SHM_DIR, name), (os.O_RDWR if writable else os.O_RDONLY) | OPEN_FLAGS)
        try:
            size = check_ours(os.fstat(fd), name)
            if size < HEADER_SIZE:
                raise ValueError(f"{name}: {size} bytes is too short for a procpool id table")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        try:
            return cls(memoryview(m), name, m)
        except BaseException:
            m.close()
            raise

    def destroy(self) -> None:
        """Release and unlink the segment (parent, at the end of teardown)."""
        self.close()
        unlink_name(self.name)

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
    def completion_waiting(self) -> int:
        """For tests and tools: the waiting flag of the detach completion (1 once a teardown waits)."""
        return struct.unpack_from("<I", self._buf, _OFF_WAITING)[0]

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

    def publish(self, c: PoolCounters) -> None:  # L
        """Write the pool's counters for observers (parent only)."""
        _COUNTERS.pack_into(
            self._buf,
            _OFF_COUNTERS,
            c.spawner_pid,
            c.manager_pid,
            c.created,
            c.destroyed,
            c.lost,
            c.killed,
            c.started,
            c.done,
            c.pending,
            c.cpu_intensive,
            c.cm_wakeups,
            c.cpu_time,
        )

    def counters(self) -> PoolCounters:
        return PoolCounters(*_COUNTERS.unpack_from(self._buf, _OFF_COUNTERS))

    def slot(self, wid: int) -> Slot:
        return Slot(wid, *_SLOT.unpack_from(self._buf, HEADER_SIZE + wid * SLOT_SIZE))

    def slots(self) -> list[Slot]:
        return [self.slot(i) for i in range(self.capacity)]

    @property
    def created(self) -> float:
        return _HEADER.unpack_from(self._buf, 0)[-1]


# -- reading for observers (procpool ps) -------------------------------------------------------


class TableInfo:
    """A validated snapshot of one id table (see ``read_table``)."""

    __slots__ = ("name", "pool_id", "owner_pid", "capacity", "created", "slots", "counters", "freed")

    def __init__(
        self,
        name: str,
        pool_id: int,
        owner_pid: int,
        capacity: int,
        created: float,
        slots: list[Slot],
        counters: PoolCounters | None = None,
        freed: dict[int, int] | None = None,
    ) -> None:
        self.name = name
        self.pool_id = pool_id
        self.owner_pid = owner_pid
        self.capacity = capacity
        self.created = created
        self.slots = slots  # the allocated ones (state not FREE), by id
        self.counters = PoolCounters() if counters is None else counters
        #: Freed slots that still name their last worker's pid, {pid: id}: a worker that
        #: detached (its id is free) may still be alive, dying; this is how ``procpool ps``
        #: knows its pool.
        self.freed = {} if freed is None else freed

    def __repr__(self) -> str:
        return f"TableInfo(name={self.name!r}, pool_id={self.pool_id}, slots={len(self.slots)})"


def read_table(name: str) -> TableInfo:
    """Read and check one id table; BadSegment says what is wrong with it (FileNotFoundError:
    it vanished, a pool closing). Every field is checked: the magic and version, a capacity
    within MAX_CAPACITY and a size that matches it, owner pid within 1..PID_LIMIT, finite
    times, known slot states and flags, slot pids within 0..PID_LIMIT (0: not started yet)."""
    data = read_ours(name, HEADER_SIZE + SLOT_SIZE * MAX_CAPACITY)
    if len(data) < HEADER_SIZE:
        raise BadSegment(f"{len(data)} bytes, too short for a procpool id table")
    magic, version, pool_id, owner_pid, capacity, _waiting, _completed, created = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise BadSegment(f"not a procpool id table (magic {magic!r})")
    if version != VERSION:
        raise BadSegment(f"id table version {version}, this procpool reads {VERSION}")
    if not 1 <= capacity <= MAX_CAPACITY:
        raise BadSegment(f"capacity {capacity} outside 1..{MAX_CAPACITY}")
    if len(data) != HEADER_SIZE + SLOT_SIZE * capacity:
        raise BadSegment(f"{len(data)} bytes, but its header says {capacity} slots")
    if not 0 < owner_pid < PID_LIMIT:
        raise BadSegment(f"owner pid {owner_pid} is not a pid")
    if not finite_time(created):
        raise BadSegment(f"creation time {created!r} is not a time")
    counters = PoolCounters(*_COUNTERS.unpack_from(data, _OFF_COUNTERS))
    for key, value in counters.as_dict().items():
        if key.endswith("_pid"):
            if not 0 <= value < PID_LIMIT:
                raise BadSegment(f"{key.replace('_', ' ')} {value} is not a pid")
        elif not finite_time(value):  # a count (unsigned already) or CPU seconds
            raise BadSegment(f"counter {key} is {value!r}, not a count")
    slots = []
    freed: dict[int, int] = {}
    for wid in range(capacity):
        s = Slot(wid, *_SLOT.unpack_from(data, HEADER_SIZE + wid * SLOT_SIZE))
        if s.state == FREE:
            if 0 < s.pid < PID_LIMIT:
                freed[s.pid] = wid
            continue
        if s.state not in STATE_NAMES:
            raise BadSegment(f"slot {wid}: unknown state {s.state}")
        if s.flags & ~FLAG_DIE:
            raise BadSegment(f"slot {wid}: unknown flags {s.flags:#x}")
        if not 0 <= s.pid < PID_LIMIT:
            raise BadSegment(f"slot {wid}: pid {s.pid} is not a pid")
        if not finite_time(s.since):
            raise BadSegment(f"slot {wid}: time {s.since!r} is not a time")
        slots.append(s)
    return TableInfo(name, pool_id, owner_pid, capacity, created, slots, counters, freed)


class Snapshot:
    """What ``procpool ps`` (and any monitor) sees in /dev/shm: the valid tables, each
    program's workqueue entries by owner pid, and (name, reason) for everything skipped."""

    __slots__ = ("tables", "workqueues", "skipped")

    def __init__(self) -> None:
        self.tables: list[TableInfo] = []
        self.workqueues: dict[int, list[dict[str, Any]]] = {}
        self.skipped: list[tuple[str, str]] = []


def read_snapshot(names: list[str] | None = None) -> Snapshot:
    """Read every name under this user's prefix (or ``names``), validating each; never raises
    for what a file holds and never blocks. Names still being written (``*.tmp``) and names
    that vanish while read are left out silently: they are a live program's, not bad."""
    snap = Snapshot()
    wq_mtime: dict[int, float] = {}
    for name in list_segments() if names is None else names:
        kind, owner = classify(name)
        if kind == "tmp":
            continue
        try:
            if kind == "table":
                snap.tables.append(read_table(name))
                continue
            if kind != "wq" or owner is None:
                raise BadSegment("not a procpool segment name")
            entries, mtime = read_wq(name)
            # Two names for one program only while it moves to a new one: the newest wins.
            if mtime >= wq_mtime.get(owner, -1.0):
                wq_mtime[owner] = mtime
                snap.workqueues[owner] = entries
        except FileNotFoundError:
            continue
        except BadSegment as exc:
            snap.skipped.append((name, str(exc)))
    snap.tables.sort(key=lambda t: (t.owner_pid, t.pool_id))
    return snap


def read_workqueues(owner_pid: int) -> list[dict]:
    """The workqueues program ``owner_pid`` published ([] if it has none, it vanished, or what
    is there is not valid)."""
    prefix = wq_segment_name(owner_pid)
    names = [n for n in list_segments() if n == prefix or n.startswith(prefix + "-")]
    return read_snapshot(names).workqueues.get(owner_pid, [])
