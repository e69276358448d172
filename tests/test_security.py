"""Another local user against procpool's shared files and its Manager (issue 11).

/dev/shm is writable by everyone: each test plants what another user could (symlinks at every
name procpool will create, FIFOs, directories, files of another uid, forged tables, hostile
JSON) and checks from outside that nothing outside is written, that ``procpool ps`` ends in
time with exit 0, and that the program's pools still work. Files "of another uid" are made
by this (root) test and chowned to nobody, which is what the kernel would see had nobody
made them; connections "from another uid" come from a child that really is nobody.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import dead_pid, wait_until

import procpool
from procpool import idtable, lockserver, manager
from procpool.pool import MAX_WORKERS

SHM = Path(idtable.SHM_DIR)
UID = os.geteuid()
NOBODY = 65534
PS = [sys.executable, "-m", "procpool.cli", "ps"]
#: The issue's bound on one ``procpool ps``, whatever is in /dev/shm.
PS_LIMIT = 2.0

needs_root = pytest.mark.skipif(UID != 0, reason="plants files of another uid: needs root to chown and setuid")


def _ps(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    res = subprocess.run([*PS, *args], capture_output=True, text=True, timeout=30)
    return res, time.monotonic() - t0


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    except FileNotFoundError:
        pass


@pytest.fixture
def planted() -> Iterator[list[Path]]:
    """Paths a test plants in /dev/shm; removed afterwards (as root we may remove nobody's)."""
    paths: list[Path] = []
    yield paths
    for p in paths:
        _remove(p)


def _plant(paths: list[Path], name: str, kind: str, target: Path | None = None, owner: int = NOBODY) -> Path:
    path = SHM / name
    if kind == "symlink":
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path, 0o666)
    elif kind == "dir":
        os.mkdir(path, 0o777)
    elif kind == "file":
        path.write_bytes(b"not yours")
    else:
        raise ValueError(kind)
    paths.append(path)
    os.lchown(path, owner, owner)
    return path


def _table_bytes(pool_id: int, owner: int, capacity: int = 2, worker_pid: int = 0, **over: object) -> bytearray:
    """A table in the on-disk format, with any header field overridden (a forgery)."""
    h = (
        dict(magic=idtable.MAGIC, version=idtable.VERSION, pool=pool_id, owner=owner, cap=capacity, t0=time.time())
        | over
    )
    buf = bytearray(idtable.HEADER_SIZE + idtable.SLOT_SIZE * capacity)
    idtable._HEADER.pack_into(buf, 0, h["magic"], h["version"], h["pool"], h["owner"], h["cap"], 0, 0, h["t0"])
    if worker_pid and capacity:
        idtable._SLOT.pack_into(buf, idtable.HEADER_SIZE, idtable.IDLE, 0, worker_pid, 1, 3, time.time())
    return buf


def _run_items(pool: procpool.WorkerPool, n: int = 8) -> None:
    assert [f.result(timeout=60) for f in [pool.submit(pow, i, 2) for i in range(n)]] == [i * i for i in range(n)]


# -- creating: planted names are never followed and never block a pool -----------------------------


KINDS = ("symlink-to-victim", "symlink-to-nowhere", "fifo", "dir", "file")


@needs_root
@pytest.mark.parametrize("kind", KINDS)
def test_names_planted_by_another_user_are_never_followed(kind: str, tmp_path: Path, planted: list[Path]) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    nowhere = tmp_path / "created-through-a-symlink"
    pid = os.getpid()
    # Every name this process will give its next pools' tables and its workqueue segment
    # (the pool ids are the lowest free ones), and the old predictable temporary name.
    names = [idtable.segment_name(pid, i) for i in range(8)]
    names += [idtable.wq_segment_name(pid), idtable.wq_segment_name(pid) + ".tmp"]
    for name in names:
        if kind.startswith("symlink"):
            _plant(planted, name, "symlink", victim if kind == "symlink-to-victim" else nowhere)
        else:
            _plant(planted, name, kind)
    with procpool.WorkerPool(1, 2, title_prefix="kwsec") as pool:
        table = pool.table_name
        assert table.startswith(idtable.segment_name(pid, pool.id) + "-"), table  # another name
        _run_items(pool)
        wq = procpool.Workqueue("secwq", max_workers=2)
        try:
            assert wq.queue(pow, 3, 2).result(timeout=60) == 9
            # procpool ps finds both under their other names, and skips what was planted.
            res, took = _ps("--json")
            assert res.returncode == 0 and took < PS_LIMIT, (took, res.stderr)
            out = json.loads(res.stdout)
            mine = {p["table"]: p for p in out["pools"] if p["owner_pid"] == pid}
            assert table in mine and mine[table]["pool"] == pool.id
            assert any(e["name"] == "secwq" for p in mine.values() for e in p["workqueues"]), mine
            skipped = {s["name"] for s in out["skipped"]}
            assert {p.name for p in planted if not p.name.endswith(".tmp")} <= skipped
        finally:
            wq.destroy()
        _run_items(pool)
    # Nothing was written through a planted name, nothing created at a symlink's target, and
    # every planted entry is still what was planted.
    assert victim.read_bytes() == b"precious"
    assert not nowhere.exists()
    for p in planted:
        st = p.lstat()
        assert st.st_uid == NOBODY, p
        if kind == "file":
            assert p.read_bytes() == b"not yours"
    ours = [n for n in os.listdir(SHM) if n.startswith(f"{idtable.segment_prefix()}{pid}-")]
    assert sorted(ours) == sorted(p.name for p in planted)  # no temporary of ours left


def test_files_procpool_creates_are_private_regular_files() -> None:
    pid = os.getpid()
    with procpool.WorkerPool(1, 2, title_prefix="kwsec") as pool:
        wq = procpool.Workqueue("secpriv", max_workers=2)
        try:
            wq.queue(pow, 2, 2).result(timeout=60)
            mine = [n for n in os.listdir(SHM) if n.startswith(f"{idtable.segment_prefix()}{pid}-")]
            assert pool.table_name in mine and any(idtable.classify(n)[0] == "wq" for n in mine), mine
            for name in mine:
                try:
                    st = os.lstat(SHM / name)
                except FileNotFoundError:
                    # Only a temporary may vanish under us: the statistics publisher renamed it
                    # into place between the listing and this look.
                    assert name.endswith(".tmp"), name
                    continue
                assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == UID, name
        finally:
            wq.destroy()

    # Temporaries never outlive their write (one may be mid-write while the publisher runs).
    def temporaries() -> list[str]:
        return [n for n in os.listdir(SHM) if n.startswith(f"{idtable.segment_prefix()}{pid}-") and n.endswith(".tmp")]

    wait_until(lambda: not temporaries(), timeout=10, what=f"no temporary left, have {temporaries()}")


def test_a_stale_table_of_ours_is_replaced_not_renamed_around(planted: list[Path]) -> None:
    # Left by an earlier process with our pid whose clean-up never ran: ours, so it is stale.
    pid = os.getpid()
    for i in range(8):
        path = SHM / idtable.segment_name(pid, i)
        path.write_bytes(bytes(_table_bytes(i, pid)))
        planted.append(path)
    with procpool.WorkerPool(1, 1, title_prefix="kwsec") as pool:
        assert pool.table_name == idtable.segment_name(pid, pool.id)
        _run_items(pool, 2)


# -- reading: procpool ps against hostile files -------------------------------------------------


@needs_root
def test_ps_skips_every_hostile_file_and_ends_in_time(tmp_path: Path, planted: list[Path]) -> None:
    dead = dead_pid()
    pre = f"{idtable.segment_prefix()}{dead}-"
    hostile: dict[str, str] = {}  # name -> what its skip reason must mention

    def write(name: str, data: bytes, why: str, owner: int = UID) -> Path:
        path = SHM / name
        path.write_bytes(data)
        os.chown(path, owner, owner)
        planted.append(path)
        hostile[name] = why
        return path

    _plant(planted, pre + "1", "fifo", owner=UID)  # ours, and it would block an open for reading
    hostile[pre + "1"] = "FIFO"
    _plant(planted, pre + "2", "dir", owner=UID)
    hostile[pre + "2"] = "directory"
    good = write(pre + "3", bytes(_table_bytes(3, dead)), "")  # a valid (stale) table, for the symlink
    del hostile[good.name]
    _plant(planted, pre + "4", "symlink", good, owner=UID)
    hostile[pre + "4"] = "symlink"
    write(pre + "5", b"", "too short")
    write(pre + "6", os.urandom(idtable.HEADER_SIZE + 3 * idtable.SLOT_SIZE), "magic")
    write(pre + "7", bytes(_table_bytes(7, -5)), "owner pid -5")
    write(pre + "8", bytes(_table_bytes(8, dead, t0=math.nan)), "not a time")
    write(pre + "9", bytes(_table_bytes(9, dead, capacity=2, cap=3_000_000)), "capacity 3000000")
    write(pre + "10", bytes(_table_bytes(10, dead, worker_pid=-7)), "pid -7")
    write(pre + "11", bytes(_table_bytes(11, dead)), "uid 65534", owner=NOBODY)  # valid, but not ours
    # A sparse file claiming 3 million slots, as big as it claims: refused by its size alone.
    huge = SHM / (pre + "12")
    with open(huge, "wb") as f:
        f.write(_table_bytes(12, dead, capacity=0, cap=3_000_000))
        f.truncate(idtable.HEADER_SIZE + idtable.SLOT_SIZE * 3_000_000)
    planted.append(huge)
    hostile[huge.name] = "bytes, more than"
    # Hostile workqueue segments of three other "programs" (each with a valid table, so the
    # workqueue would be listed): a string where a count belongs, not a list, not JSON.
    for data, why in [
        (json.dumps([{"name": "w", "pools": [0], "started": "many"}]), "'started'"),
        (json.dumps({"name": "w"}), "not a list"),
        ("[{", "JSONDecodeError"),
    ]:
        other = dead_pid()
        write(f"{idtable.segment_prefix()}{other}-0", bytes(_table_bytes(0, other)), "")
        del hostile[f"{idtable.segment_prefix()}{other}-0"]
        write(idtable.wq_segment_name(other), data.encode(), why)
    # A valid workqueue whose name would drive the terminal: shown escaped.
    evil = "evil\n\x1b[2J\x1b[31mred\u202e"
    write(idtable.wq_segment_name(dead), json.dumps([{"name": evil, "pools": [3], "started": 1}]).encode(), "")
    del hostile[idtable.wq_segment_name(dead)]

    with procpool.WorkerPool(1, 2, title_prefix="kwsec") as pool:
        res, took = _ps("--json")
        assert res.returncode == 0 and took < PS_LIMIT, (took, res.stderr)
        out = json.loads(res.stdout)
        skipped = {s["name"]: s["reason"] for s in out["skipped"]}
        for name, why in hostile.items():
            assert name in skipped and why in skipped[name], (name, why, skipped.get(name))
            assert f"skipped {SHM / name}: " in res.stderr
        listed = {(p["owner_pid"], p["pool"]): p for p in out["pools"]}
        assert (os.getpid(), pool.id) in listed  # the program's own pool is there
        assert listed[(dead, 3)]["workqueues"][0]["name"] == evil  # JSON escapes it itself
        assert (dead, 11) not in listed  # another uid's table is not one of our pools

        res, took = _ps()
        assert res.returncode == 0 and took < PS_LIMIT, (took, res.stderr)
        assert "\x1b" not in res.stdout + res.stderr and "\u202e" not in res.stdout
        assert "evil\\x0a\\x1b[2J\\x1b[31mred\\u202e" in res.stdout, res.stdout
        assert all(f"skipped {SHM / name}: " in res.stderr for name in hostile)
        _run_items(pool)  # and the pool never noticed


def test_ps_escapes_control_characters_in_worker_titles(planted: list[Path]) -> None:
    # A title is the process's command line: anyone of this uid may set it to anything.
    evil = "kw\x1b]0;owned\x07"
    proc = subprocess.Popen([evil, "60"], executable=shutil.which("sleep"))
    try:
        dead = dead_pid()
        path = SHM / f"{idtable.segment_prefix()}{dead}-0"
        path.write_bytes(bytes(_table_bytes(0, dead, worker_pid=proc.pid)))
        planted.append(path)
        wait_until(lambda: evil in psutil.Process(proc.pid).cmdline(), timeout=10, what="the title set")
        res, took = _ps()
        assert res.returncode == 0 and took < PS_LIMIT, (took, res.stderr)
        assert "\x1b" not in res.stdout and "\x07" not in res.stdout
        assert "kw\\x1b]0;owned\\x07" in res.stdout, res.stdout
    finally:
        proc.kill()
        proc.wait()


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["k\0w", "kw\x1b[31m", "kw\x7f", "kw\u202e", "kw\n"])
def test_titles_and_workqueue_names_refuse_control_characters(bad: str) -> None:
    with pytest.raises(ValueError, match="title_prefix"):
        procpool.WorkerPool(0, 1, title_prefix=bad)
    with pytest.raises(ValueError, match="title"):
        procpool.WorkerPool(0, 1, title=bad)
    with pytest.raises(ValueError, match="name"):
        procpool.Workqueue(bad)


def test_max_workers_is_bounded() -> None:
    with pytest.raises(ValueError, match=f"max_workers must be at most {MAX_WORKERS}.*1000000"):
        procpool.WorkerPool(0, 10**6)
    with pytest.raises(ValueError, match="max_workers"):
        procpool.Workqueue("big", max_workers=MAX_WORKERS + 1)
    assert idtable.capacity_for(MAX_WORKERS) == idtable.MAX_CAPACITY


# -- the Manager against raw connections ------------------------------------------------------------


def _threads(pid: int) -> int:
    return psutil.Process(pid).num_threads()


def _connect(address: str, within: float = 20.0) -> socket.socket:
    """A raw connection to the Manager. Non-blocking: a Unix socket's connect fails with EAGAIN
    while the server's accept queue is full, so retry until ``within`` (never wait forever)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    deadline = time.monotonic() + within
    while True:
        try:
            s.connect(address)
            return s
        except BlockingIOError:
            if time.monotonic() > deadline:
                s.close()
                raise
            time.sleep(0.005)


def test_manager_threads_stay_bounded_under_idle_connections() -> None:
    with procpool.WorkerPool(1, 2, title_prefix="kwsec") as pool:
        address = pool.manager_locks.arb.address
        server = manager.server_pid()
        assert server is not None
        base = _threads(server)
        # At most HANDSHAKE_MAX threads authenticating, and the program's own connections
        # (its pool's arbiter may open one while the flood lasts): a small constant more.
        bound = base + lockserver.HANDSHAKE_MAX + 2
        socks: list[socket.socket] = []
        most = base
        stop = threading.Event()

        def sample() -> None:
            nonlocal most
            while not stop.is_set():
                most = max(most, _threads(server))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            # 200 connections that never answer the challenge (each connect may wait while the
            # accept queue is full: the server keeps draining it by timing out or evicting).
            for _ in range(200):
                socks.append(_connect(address))
            most = max(most, _threads(server))
            # Every one is closed by the server: timed out or evicted, never kept.
            deadline = time.monotonic() + 30
            open_ = list(socks)
            while open_ and time.monotonic() < deadline:
                ready, _, _ = select.select(open_, [], [], 1.0)
                for s in ready:
                    try:
                        if not s.recv(4096):
                            open_.remove(s)
                    except OSError:
                        open_.remove(s)
            assert not open_, f"{len(open_)} idle connections still held by the Manager"
            stop.set()  # the bound is for the flood; what follows opens legitimate connections
            sampler.join(5)
            # The program's own connections still get in: a new pool makes new locks.
            with procpool.WorkerPool(1, 2, title_prefix="kwsec") as other:
                _run_items(other)
            _run_items(pool)
        finally:
            stop.set()
            sampler.join(5)
            for s in socks:
                s.close()
        assert most <= bound, f"Manager threads: {base} before, {most} at most under 200 idle connections"


@needs_root
def test_manager_closes_connections_of_another_user_at_once() -> None:
    with procpool.WorkerPool(1, 2, title_prefix="kwsec") as pool:
        address = pool.manager_locks.arb.address
        server = manager.server_pid()
        assert server is not None
        base = _threads(server)
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            # Really another user: 500 connections, each must be closed without a byte.
            code = 1
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                held = []
                got = 0
                for _ in range(500):
                    held.append(_connect(address))
                for s in held:
                    s.settimeout(10)
                    got += len(s.recv(100))  # b"": closed by the server, no challenge sent
                os.write(w, f"{got}".encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        try:
            with os.fdopen(r) as f:
                ready, _, _ = select.select([f], [], [], 60)
                assert ready, "the other user's client hung"
                answer = f.read()
        finally:
            _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0 and answer == "0", answer
        assert _threads(server) <= base + 1, (base, _threads(server))
        _run_items(pool)
