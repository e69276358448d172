"""Files in /dev/shm that no one else can redirect, and the names procpool gives them.

/dev/shm is shared by every local user, so nothing here trusts a name in it (see README,
Security). Every file is created under a private, unpredictable temporary name with
``O_CREAT|O_EXCL|O_NOFOLLOW`` (mode 0600), filled, then published (``link_new``, or a rename
over our own previous version). Readers open with ``O_NOFOLLOW|O_NONBLOCK`` and accept only a
regular file of this uid (``read_ours``). Owns the naming scheme shared by the id tables
(procpool.idtable) and the workqueue segment (procpool.wqsegment)::

    procpool-<uid>-<owner pid>-<pool id>[-<random>]   an id table
    procpool-<uid>-<owner pid>-wq[-<random>]          a program's workqueues
    ...-<random>.tmp                                  being written (never read)
"""

from __future__ import annotations

import math
import os
import stat

from .procs import unlink_quietly

SHM_DIR = "/dev/shm"
OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
WQ_SUFFIX = "-wq"


class BadSegment(Exception):
    """A name under our prefix in /dev/shm that is not a valid procpool segment of ours; the
    message says why (for ``procpool ps``'s one-line note)."""


def segment_prefix() -> str:
    return f"procpool-{os.getuid()}-"


def list_segments() -> list[str]:
    """Names under this user's procpool prefix in /dev/shm (anyone can create such a name:
    what a name holds is checked when it is read)."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    prefix = segment_prefix()
    return sorted(n for n in names if n.startswith(prefix))


def unlink_name(name: str) -> None:
    """Unlink ``name`` in /dev/shm, unless it is gone already."""
    unlink_quietly(os.path.join(SHM_DIR, name))


# -- creating files no one else can redirect -------------------------------------------------


def random_suffix() -> str:
    return os.urandom(8).hex()


def create_private(stem: str) -> tuple[str, int]:
    """Create ``<stem>-<random>.tmp`` for writing, exclusively (never an existing file, never
    through a symlink), mode 0600. Returns (name, descriptor)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(16):
        name = f"{stem}-{random_suffix()}.tmp"
        try:
            return name, os.open(os.path.join(SHM_DIR, name), flags, 0o600)
        except FileExistsError:
            continue  # 64 random bits taken: someone is guessing; draw again
    raise FileExistsError(f"procpool: could not create a private file under {SHM_DIR}/{stem}-*")


def is_ours(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def link_new(tmp: str, base: str) -> str:
    """Give the private file ``tmp`` the name ``base``, or, if that name is taken by something
    that is not ours, ``base-<random>``. Returns the name it got. ``link`` fails on any
    existing name (a symlink included) instead of following or replacing it."""
    src = os.path.join(SHM_DIR, tmp)
    try:
        os.link(src, os.path.join(SHM_DIR, base))
        return base
    except FileExistsError:
        pass
    try:
        st = os.lstat(os.path.join(SHM_DIR, base))
    except FileNotFoundError:
        st = None
    if st is None or is_ours(st):
        # Left by an earlier process with our pid whose clean-up never ran (its spawner was
        # killed too): the pid is ours now, so the table is stale. (In the sticky /dev/shm
        # nobody else can replace a file of ours between the lstat and the unlink.)
        unlink_name(base)
        try:
            os.link(src, os.path.join(SHM_DIR, base))
            return base
        except FileExistsError:
            pass
    for _ in range(16):
        name = f"{base}-{random_suffix()}"
        try:
            os.link(src, os.path.join(SHM_DIR, name))
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"procpool: every name tried for {SHM_DIR}/{base} is taken")


def check_ours(st: os.stat_result, name: str) -> int:
    """The size of an open segment, if it is a regular file of this user; else ValueError."""
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{name} is not a regular file ({_kind(st.st_mode)})")
    if st.st_uid != os.geteuid():
        raise ValueError(f"{name} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})")
    return st.st_size


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return f"mode {mode:o}"


def read_ours(name: str, max_bytes: int) -> bytes:
    """The whole content of ``name`` in /dev/shm, if it is a regular file of this user of at
    most ``max_bytes``; else BadSegment. Never blocks (a FIFO is refused before it is opened,
    and opened O_NONBLOCK should one be swapped in), never follows a symlink, and reads with
    ``pread`` rather than a mapping (a file truncated under a mapping raises SIGBUS)."""
    path = os.path.join(SHM_DIR, name)
    try:
        before = os.lstat(path)
        if not is_ours(before):
            check_ours(before, "it")  # raises, saying why
        fd = os.open(path, os.O_RDONLY | OPEN_FLAGS)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise BadSegment(_reason(exc)) from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise BadSegment("replaced while being read")
        try:
            size = check_ours(st, "it")
        except ValueError as exc:
            raise BadSegment(str(exc)) from None
        if size > max_bytes:
            raise BadSegment(f"{size} bytes, more than any procpool segment ({max_bytes})")
        data = os.pread(fd, size, 0)
        if len(data) != size:
            raise BadSegment(f"changed size while being read ({len(data)} of {size} bytes)")
        return data
    except OSError as exc:
        raise BadSegment(_reason(exc)) from None
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot open: {exc.strerror}"
    return str(exc)


def classify(name: str) -> tuple[str, int | None]:
    """What a name under our prefix claims to be: ('table' | 'wq' | 'tmp' | 'other', owner pid
    from the name or None). Only a claim: the content is checked when read."""
    rest = name[len(segment_prefix()) :] if name.startswith(segment_prefix()) else None
    if rest is None:
        return "other", None
    if rest.endswith(".tmp"):
        return "tmp", None
    pid_text, _, tail = rest.partition("-")
    owner = int(pid_text) if pid_text.isdigit() and pid_text.isascii() else None
    if tail == WQ_SUFFIX[1:] or tail.startswith(WQ_SUFFIX[1:] + "-"):
        return "wq", owner
    return "table", owner


def finite_time(value: float) -> bool:
    return math.isfinite(value) and value >= 0
