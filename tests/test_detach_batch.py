"""Batched detach: the Manager performs the attach lock's critical section for every worker
leaving at the same time (procpool.lockserver, ``_RobustLockServer.detach``).

The invariants are those of a worker's own detach: ids are freed under the attach lock (with
the generation check), at most one detacher completes the detach completion, and a worker
SIGKILLed while its request waits for the lock leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import threading
from multiprocessing import connection

import pytest
from conftest import assert_program_left_nothing, run_program, started_workers, title_of, wait_until

from procpool import lockname, lockserver
from procpool.idtable import DYING, FREE, IdTable

pytestmark = pytest.mark.timeout(60)


class Replies:
    """What the Manager answered each request, in the order it answered."""

    def __init__(self) -> None:
        self.got: list[tuple[int, bool]] = []

    def reply_for(self, wid: int) -> object:
        outer = self

        class _R:
            conn = None

            def send(self, complete: bool) -> None:
                outer.got.append((wid, complete))

        return _R()


def _waiting(table: IdTable) -> int:
    return table.completion_waiting


@pytest.fixture
def table():
    t = IdTable.create(pool_id=900 + os.getpid() % 50, capacity=8)
    try:
        yield t
    finally:
        t.destroy()


def _requests(table: IdTable, ids: list[tuple[int, int]], replies: Replies) -> list[lockserver.Detach]:
    return [lockserver.Detach(table.name, table.created, wid, gen, replies.reply_for(wid)) for wid, gen in ids]


def test_a_batch_frees_every_id_and_completes_once(table):
    ids = [table.alloc() for _ in range(4)]
    table.install_completion()
    lock = lockserver._RobustLockServer()
    replies = Replies()
    lock.detach(_requests(table, ids, replies))
    assert [s.state for s in table.slots()[:4]] == [FREE] * 4
    assert sorted(w for w, _ in replies.got) == [0, 1, 2, 3]
    assert [w for w, complete in replies.got if complete] == [3]  # the last of the batch, once
    assert table.completions == 1
    assert lock.owner() is None  # released


def test_no_completion_while_ids_remain_or_nobody_waits(table):
    ids = [table.alloc() for _ in range(3)]
    lock = lockserver._RobustLockServer()
    replies = Replies()
    lock.detach(_requests(table, ids[:1], replies))  # nobody waits yet
    table.install_completion()
    lock.detach(_requests(table, ids[1:2], replies))  # one id still allocated
    assert not any(c for _, c in replies.got) and table.completions == 0
    lock.detach(_requests(table, ids[2:], replies))
    assert replies.got[-1] == (2, True) and table.completions == 1
    # A stale generation (the id was reused) frees nothing, and nothing completes twice.
    lock.detach(_requests(table, [(ids[0][0], ids[0][1])], replies))
    assert replies.got[-1] == (0, False) and table.completions == 1


def test_a_batch_waits_for_the_holder_and_takes_late_requests_along(table):
    ids = [table.alloc() for _ in range(4)]
    table.install_completion()
    lock = lockserver._RobustLockServer()
    me = os.getpid()
    assert lock.acquire(me)
    replies = Replies()
    lock.detach(_requests(table, ids[:2], replies))
    lock.detach(_requests(table, ids[2:], replies))  # queued behind the same parked batch
    assert replies.got == [] and [s.state for s in table.slots()[:4]] != [FREE] * 4
    assert len(lock._parked) == 1  # one parked grant for the whole batch
    lock.release(me)
    assert [s.state for s in table.slots()[:4]] == [FREE] * 4
    assert [w for w, c in replies.got if c] == [3] and table.completions == 1
    assert lock.owner() is None


def test_a_table_of_a_later_pool_with_the_same_name_is_not_touched(table):
    wid, gen = table.alloc()
    lock = lockserver._RobustLockServer()
    replies = Replies()
    stale = lockserver.Detach(table.name, table.created - 1.0, wid, gen, replies.reply_for(wid))
    lock.detach([stale])
    assert table.slot(wid).state != FREE
    assert replies.got == [(wid, False)]


def _close_while_holding_attach(pool) -> tuple[threading.Thread, dict[int, int]]:
    """Hold the pool's attach lock here, close the pool in a thread, and wait until every
    worker is dying (its detach request, batched, waits for the lock)."""
    pids = {w.id: w.pid for w in started_workers(pool)}
    closer = threading.Thread(target=pool.close)
    closer.start()
    wait_until(lambda: all(pool.id_table.slot(wid).state == DYING for wid in pids), what="all workers dying")
    wait_until(lambda: all(title_of(p) == "kworker/dying" for p in pids.values()), what="dying titles")
    return closer, pids


SIGKILLED_WHILE_BATCHED = """
import json, os, signal, threading, procpool
from conftest import alive, wait_until
from test_detach_batch import _close_while_holding_attach
pool = procpool.WorkerPool(min_workers=4, max_workers=4)
assert all(w.pid for w in pool.workers())
pool.manager_locks.attach.acquire()
released = False
try:
    closer, pids = _close_while_holding_attach(pool)
    os.kill(pids[2], signal.SIGKILL)
    wait_until(lambda: not alive(pids[2]), what="victim gone")
    pool.manager_locks.attach.release()
    released = True
    closer.join(20)
    assert not closer.is_alive()
finally:
    if not released:
        pool.manager_locks.attach.release()
print(json.dumps({"completions": pool.completions, "broken": pool.manager_locks.attach.broken,
                  "alive": [p for p in pids.values() if alive(p)], "workers": pool.stats().nr_workers}))
"""


def test_worker_sigkilled_while_its_batched_detach_waits():
    # In a program of its own: its workers certainly have handed-over connections (a spawner
    # replaced after a crash, as some other test of this process may cause, hands none over,
    # and a worker waiting the stock way that dies in the queue leaves a dead owner behind).
    proc, token = run_program(SIGKILLED_WHILE_BATCHED)
    assert proc.returncode == 0, proc.err
    r = json.loads(proc.out)
    assert r["completions"] <= 1
    assert r["broken"] == 0  # the batch held the lock, no dead owner to take over from
    assert r["alive"] == [] and r["workers"] == 0
    assert_program_left_nothing(proc, token)


LAST_WORKER_OUT = """
import json, os, signal, threading, time, psutil, procpool
from conftest import alive, wait_until
from procpool.idtable import FREE
from test_detach_batch import _waiting
pool = procpool.WorkerPool(min_workers=3, max_workers=3, faults="detach.before_lock@0=stop,detach.after@0=stop")
pid0 = next(w.pid for w in pool.workers() if w.id == 0)
table = pool.id_table
closer = threading.Thread(target=pool.close)
closer.start()
r = {}
try:
    wait_until(lambda: psutil.Process(pid0).status() == psutil.STATUS_STOPPED, what="worker 0 stopped")
    # The other two detach and leave; the teardown installs its completion for worker 0's id.
    wait_until(lambda: table.nr_allocated() == 1 and _waiting(table) == 1, what="the teardown waits for its completion")
    r["before"] = table.completions
    os.kill(pid0, signal.SIGCONT)
    wait_until(
        lambda: table.slot(0).state == FREE and psutil.Process(pid0).status() == psutil.STATUS_STOPPED,
        what="worker 0 detached and stopped again",
    )
    r["alive_when_completed"] = alive(pid0)
    r["completed_while_alive"] = table.completions
finally:
    # Resume it as often as it stops, until it is gone: a stopped worker would hold the
    # teardown (and this program) forever.
    end = time.monotonic() + 30
    while alive(pid0) and time.monotonic() < end:
        try:
            os.kill(pid0, signal.SIGCONT)
        except ProcessLookupError:
            break
        time.sleep(0.05)
closer.join(30)
r.update(closed=not closer.is_alive(), completions=pool.completions, broken=pool.manager_locks.attach.broken,
         gone=not alive(pid0))
print(json.dumps(r))
"""


def test_last_worker_out_completes_through_the_batch():
    # Worker 0 stops before it asks to detach; the others leave; the teardown installs its
    # completion (one id still allocated) and waits. Worker 0, resumed, is the last one out,
    # and stops again once detached: the completion is there while it is still alive, so it
    # came through the batch, not from teardown's fallback (which needs every worker reaped).
    # In a program of its own: a fresh spawner hands every worker's connection over.
    proc, token = run_program(LAST_WORKER_OUT)
    assert proc.returncode == 0, proc.err
    r = json.loads(proc.out)
    assert r["before"] == 0
    assert r["alive_when_completed"] and r["completed_while_alive"] == 1
    assert r["closed"] and r["completions"] == 1 and r["broken"] == 0 and r["gone"]
    assert_program_left_nothing(proc, token)


FIRST_WORKERS = """
import json, os, procpool
from procpool.creation import FIRST_BATCH

def sockets(pid):
    fds = os.listdir(f"/proc/{pid}/fd")
    return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in fds if fd.isdigit())

# The program's first pool forks its first workers while its Manager starts, then more
# behind the constructor once it does: each one is born with its handed-over connection.
pool = procpool.WorkerPool(min_workers=FIRST_BATCH + 2, max_workers=FIRST_BATCH + 2)
assert [pool.submit(abs, -i).result(timeout=20) for i in range(8)] == list(range(8))
from conftest import wait_until
wait_until(lambda: pool.stats().nr_workers == FIRST_BATCH + 2, what="all workers")
assert procpool.manager.server_pid() is not None  # started behind the constructor
r = {w.id: sockets(w.pid) for w in pool.workers()}
pool.close()
print(json.dumps({"sockets": r, "broken": pool.manager_locks.attach.broken}))
"""


def test_workers_forked_while_the_manager_starts_detach_in_batches_too():
    proc, token = run_program(FIRST_WORKERS)
    assert proc.returncode == 0, proc.err
    r = json.loads(proc.out)
    # One socket each, from its fork: the Manager connection the spawner handed over (a
    # worker without one connects only on its way out).
    assert set(r["sockets"].values()) == {1}, r
    assert r["broken"] == 0
    assert_program_left_nothing(proc, token)


# -- the wire: a worker's detach request and its answer (no proxy, no ForkingPickler) ---------


@pytest.fixture
def pair():
    """A connected Unix stream socket pair: a multiprocessing Connection on one end (what the
    Manager's handover thread holds), the raw descriptor of the other (a worker's end)."""
    a, b = socket.socketpair()
    conn = connection.Connection(a.detach())
    fd = b.detach()
    try:
        yield conn, fd
    finally:
        conn.close()
        try:
            os.close(fd)
        except OSError:
            pass


def test_a_detach_request_is_the_frame_a_proxy_call_would_send(pair):
    conn, fd = pair
    request = ("some-id", "detach", ("procpool-table", 1.5, 3, 7), {})
    conn.send(("#RETURN", True))  # what a Connection.send of the answer writes
    conn.send(("#RETURN", False))
    assert pickle.loads(lockname.ask(fd, pickle.dumps(request))) == ("#RETURN", True)
    assert conn.recv() == request  # what the handover thread reads: Connection.recv
    # Exactly one frame per answer read: the second answer stays for the next request.
    assert pickle.loads(lockname.ask(fd, pickle.dumps(request))) == ("#RETURN", False)
    assert conn.recv() == request


def test_an_answer_cut_short_by_the_peer_is_an_eof(pair):
    conn, fd = pair
    os.write(conn.fileno(), lockname.FRAME.pack(100) + b"only part")
    peer = socket.socket(fileno=os.dup(conn.fileno()))
    peer.shutdown(socket.SHUT_WR)  # it stops sending (the request is still received)
    peer.close()
    with pytest.raises(EOFError):
        lockname.ask(fd, b"request")
    assert conn.recv_bytes() == b"request"


@pytest.mark.parametrize("outcome", ["answer", "error"])
def test_the_detach_answer_closes_the_workers_connection(pair, outcome):
    # A worker asks nothing after its detach: the answer closes the connection, so the
    # handover thread is not woken once more by each exiting worker. The worker still reads
    # the whole answer, then EOF.
    conn, fd = pair
    reply = lockserver._Reply(conn)
    if outcome == "answer":
        reply.send(True)
        assert pickle.loads(_one_frame(fd)) == ("#RETURN", True)
    else:
        reply.fail(RuntimeError("a fault point"))
        kind, exc = pickle.loads(_one_frame(fd))
        assert kind == "#ERROR" and isinstance(exc, RuntimeError) and str(exc) == "a fault point"
    assert conn.closed
    assert os.read(fd, 1) == b""  # EOF: the Manager's end is closed


def _one_frame(fd: int) -> bytes:
    head = os.read(fd, lockname.FRAME.size)
    (size,) = lockname.FRAME.unpack(head)
    data = b""
    while len(data) < size:
        data += os.read(fd, size - len(data))
    return data
