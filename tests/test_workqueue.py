"""Workqueues on shared pools: max_active, ordering, delayed items, flush/cancel/drain,
pool attributes (nice, CPU affinity) seen with psutil, pool sharing, titles."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import psutil
import pytest
import tasks
from conftest import alive, title_of, wait_until

import procpool
from procpool import workqueue as wqmod


def _spans(log_dir: Path) -> dict[str, tuple[float, float]]:
    out = {}
    for p in log_dir.iterdir():
        if not p.name.endswith(".tmp"):
            start, end = p.read_text().split()
            out[p.name] = (float(start), float(end))
    return out


def _max_overlap(spans) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_work_is_a_future_and_stats():
    with procpool.Workqueue("basic", max_active=4) as wq:
        works = [wq.queue(tasks.square, i) for i in range(20)]
        assert all(isinstance(w, Future) for w in works)
        assert [w.result(10) for w in works] == [i * i for i in range(20)]
        err = wq.queue(tasks.fail, "boom")
        with pytest.raises(ValueError, match="boom"):
            err.result(10)
        s = wq.stats()
        assert (s.started, s.completed, s.in_flight) == (21, 21, 0)
        assert 1 <= s.max_in_flight <= 4


def test_max_active_never_exceeded(tmp_path):
    with procpool.Workqueue("limited", max_active=2, max_workers=4) as wq:
        works = [wq.queue(tasks.record_span, str(tmp_path), i, 0.15) for i in range(6)]
        for w in works:
            w.result(20)
        assert wq.stats().max_in_flight == 2
    spans = _spans(tmp_path)
    assert len(spans) == 6
    assert _max_overlap(spans.values()) == 2  # measured inside the workers; the pool had room for 4


def test_ordered_runs_one_at_a_time_in_queue_order(tmp_path):
    with procpool.Workqueue("log", ordered=True, max_workers=3) as wq:
        assert wq.max_active == 1
        works = [wq.queue(tasks.record_span, str(tmp_path), i, 0.03) for i in range(6)]
        assert [w.result(20) for w in works] == list(range(6))
    spans = _spans(tmp_path)
    ordered = [spans[str(i)] for i in range(6)]
    for (_, end), (start, _) in zip(ordered, ordered[1:], strict=False):
        assert end <= start
    with pytest.raises(ValueError):
        procpool.Workqueue("bad", ordered=True, max_active=2)


def test_delayed_items_never_run_early():
    with procpool.Workqueue("delayed") as wq:
        t0 = time.monotonic()
        delays = [0.3, 0.1, 0.2, 0.0]
        works = [wq.queue_delayed(d, tasks.ran_at) for d in delays]
        for d, w in zip(delays, works, strict=True):
            assert w.result(10) - t0 >= d
        assert wq.flush_work(works[0]) is True


def test_mod_delayed_rearms():
    with procpool.Workqueue("rearm") as wq:
        t0 = time.monotonic()
        sooner = wq.queue_delayed(30.0, tasks.ran_at)
        later = wq.queue_delayed(0.5, tasks.ran_at)
        assert wq.flush_work(sooner) is False  # its timer is pending: nothing to wait for yet
        assert wq.mod_delayed(sooner, 0.1) is True
        assert wq.mod_delayed(later, 0.8) is True
        assert 0.1 <= sooner.result(10) - t0 < 5
        assert later.result(10) - t0 >= 0.8
        assert wq.mod_delayed(later, 1.0) is False  # done: nothing to re-arm
        assert wq.stats().started == 2


def test_mod_delayed_takes_back_a_pending_item(tmp_path):
    mark, release = str(tmp_path / "mark"), str(tmp_path / "release")
    with procpool.Workqueue("rearmpending", ordered=True) as wq:
        first = wq.queue(tasks.touch_and_wait, mark, release)
        waiting = wq.queue(tasks.ran_at)
        wait_until(lambda: os.path.exists(mark), what="first item running")
        # Off the queue, back on a timer; long enough that flush() below certainly returns
        # first, even on a loaded machine.
        t0 = time.monotonic()
        assert wq.mod_delayed(waiting, 3.0) is True
        Path(release).touch()
        first.result(10)
        assert wq.flush(10) is True  # the re-armed item is not queued: flush does not wait for it
        assert not waiting.done()
        assert waiting.result(20) - t0 >= 3.0
        assert wq.stats().started == 2


def test_cancel_pending_never_runs(tmp_path):
    mark, release = str(tmp_path / "mark"), str(tmp_path / "release")
    with procpool.Workqueue("cancel", ordered=True) as wq:
        first = wq.queue(tasks.touch_and_wait, mark, release)
        second = wq.queue(tasks.ran_at, str(tmp_path / "second"))
        third = wq.queue(tasks.square, 3)
        wait_until(lambda: os.path.exists(mark), what="first item running")
        assert wq.cancel_work(second) is True
        assert second.cancelled()
        assert wq.cancel_work(second) is False  # once only
        assert third.cancel() is True  # Future.cancel() goes through the workqueue too
        assert wq.cancel_work(first) is False  # in flight
        Path(release).touch()
        wq.flush()
        assert first.result(0) > 0
        s = wq.stats()
        assert (s.started, s.completed) == (1, 1)
    assert not (tmp_path / "second").exists()


def test_cancel_racing_start_loses_nothing_and_runs_nothing_twice():
    with procpool.Workqueue("cancelrace", max_active=2) as wq:
        works = []
        go = threading.Event()

        def canceller():
            go.wait()
            i = 0
            while i < 300:
                if i < len(works):
                    works[i].cancel()
                    i += 2
                else:
                    time.sleep(0)

        t = threading.Thread(target=canceller)
        t.start()
        go.set()
        for i in range(300):
            works.append(wq.queue(tasks.identity, i))
        t.join(10)
        assert wq.flush(20) is True
        cancelled = [w for w in works if w.cancelled()]
        ran = [w for w in works if not w.cancelled()]
        assert all(w.done() for w in works)
        assert [w.result() for w in ran] == [works.index(w) for w in ran]
        s = wq.stats()
        # Cancelled items include some taken back out of the pool's worklist: handed to the
        # pool, but never run, so counted neither started nor completed.
        assert s.started == s.completed == len(ran)
        assert len(cancelled) + len(ran) == 300


def test_cancel_sync_waits_for_running_item(tmp_path):
    mark = str(tmp_path / "mark")
    with procpool.Workqueue("cancelsync") as wq:
        w = wq.queue(tasks.touch_and_wait, mark, str(tmp_path / "release"))
        wait_until(lambda: os.path.exists(mark), what="item running")
        threading.Timer(0.2, (tmp_path / "release").touch).start()
        t0 = time.monotonic()
        assert wq.cancel_work(w, sync=True) is False
        assert w.done() and not w.cancelled()
        assert time.monotonic() - t0 >= 0.1


def test_cancel_delayed_never_runs(tmp_path):
    out = tmp_path / "ran"
    with procpool.Workqueue("canceldelayed") as wq:
        d = wq.queue_delayed(0.2, tasks.ran_at, str(out))
        assert wq.cancel_work(d) is True
        assert d.cancelled()
        time.sleep(0.35)
        assert wq.stats().started == 0
    assert not out.exists()


def test_flush_waits_for_everything_queued_before(tmp_path):
    with procpool.Workqueue("flush", max_active=2) as wq:
        works = [wq.queue(tasks.sleep_then, 0.05, i) for i in range(6)]
        assert wq.flush(10) is True
        assert all(w.done() for w in works)
        w = wq.queue(tasks.sleep_then, 0.1, "x")
        wq.flush_work(w)
        assert w.done() and w.result() == "x"


def test_flush_is_not_held_by_chained_requeue():
    with procpool.Workqueue("chain", ordered=True) as wq:
        chained: list[Future] = []
        stop = threading.Event()

        def requeue(_f):
            if not stop.is_set():
                chained.append(wq.queue(tasks.sleep_then, 0.02))
                chained[-1].add_done_callback(requeue)

        first = wq.queue(tasks.sleep_then, 0.02)
        first.add_done_callback(requeue)
        assert wq.flush(10) is True  # returns although the chain keeps requeueing
        stop.set()
        wq.drain(10)
        assert first.done()


def test_drain_allows_only_chained_queueing(tmp_path):
    mark, release = str(tmp_path / "mark"), str(tmp_path / "release")
    with procpool.Workqueue("drain") as wq:
        chained: list[Future] = []
        w = wq.queue(tasks.touch_and_wait, mark, release)
        w.add_done_callback(lambda _f: chained.append(wq.queue(tasks.square, 5)))
        wait_until(lambda: os.path.exists(mark), what="item running")
        drainer = threading.Thread(target=wq.drain)
        drainer.start()
        wait_until(lambda: wq.draining, what="drain under way")
        with pytest.raises(RuntimeError, match="draining"):
            wq.queue(tasks.square, 1)
        Path(release).touch()
        drainer.join(10)
        assert not drainer.is_alive()
        assert chained[0].done() and chained[0].result() == 25  # drain waited for the chained item
        assert wq.queue(tasks.square, 2).result(10) == 4  # queueing allowed again after drain
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.queue(tasks.square, 1)


def test_destroy_waits_for_delayed_items():
    wq = procpool.Workqueue("destroydelayed")
    t0 = time.monotonic()
    d = wq.queue_delayed(0.2, tasks.ran_at)
    wq.destroy()
    assert d.done() and d.result() - t0 >= 0.2
    wq.destroy()  # idempotent


def test_unpicklable_call_fails_its_work():
    with procpool.Workqueue("unpicklable") as wq:
        w = wq.queue(tasks.identity, threading.Lock())
        with pytest.raises(TypeError, match="cannot be pickled"):
            w.result(10)
        assert wq.queue(tasks.square, 2).result(10) == 4


def test_pool_attributes_nice_and_affinity():
    base = psutil.Process().nice()
    cpu = min(os.sched_getaffinity(0))
    with procpool.WorkerPool(1, 1, nice=3, cpus={cpu}) as pool:
        pid = pool.submit(tasks.whoami).result(10)
        assert psutil.Process(pid).nice() == min(19, base + 3)
        assert psutil.Process(pid).cpu_affinity() == [cpu]
    with procpool.Workqueue("attrs", nice=5, cpus={cpu}) as wq:
        pid = wq.queue(tasks.whoami).result(10)
        assert psutil.Process(pid).nice() == min(19, base + 5)
        assert psutil.Process(pid).cpu_affinity() == [cpu]


def test_pool_attributes_validated():
    with pytest.raises(ValueError, match="4096"):
        procpool.WorkerPool(0, 1, cpus={0, 4096})
    with pytest.raises(ValueError, match="empty"):
        procpool.WorkerPool(0, 1, cpus=set())
    with pytest.raises(ValueError, match="nice"):
        procpool.WorkerPool(0, 1, nice=40)
    with pytest.raises(TypeError):
        procpool.Workqueue("x", nice=1.5)
    assert not wqmod.live_pools()


def test_equal_attributes_share_one_pool():
    cpu = min(os.sched_getaffinity(0))
    a = procpool.Workqueue("a")
    b = procpool.Workqueue("b", max_active=1)
    c = procpool.Workqueue("c", nice=2)
    d = procpool.Workqueue("d", cpus={cpu})
    try:
        assert a.pool is b.pool
        assert len({id(a.pool), id(c.pool), id(d.pool)}) == 3
        assert a.queue(tasks.square, 2).result(10) == 4
        a.destroy()
        assert not a.pool.closed  # b still uses it
        assert b.queue(tasks.square, 3).result(10) == 9
    finally:
        for wq in (a, b, c, d):
            wq.destroy()
    for wq in (a, b, c, d):
        assert wq.pool.closed
    assert not wqmod.live_pools()


def test_titles_name_the_workqueue(tmp_path):
    mark, release = str(tmp_path / "mark"), str(tmp_path / "release")
    with procpool.Workqueue("thumbnails", max_workers=1) as wq:
        w = wq.queue(tasks.touch_and_wait, mark, release)
        wait_until(lambda: os.path.exists(mark), what="item running")
        (info,) = wq.pool.workers()
        base = f"kworker/u{wq.pool.id}:{info.id}"
        wait_until(lambda: title_of(info.pid) == f"{base}+thumbnails", what="+thumbnails title")
        Path(release).touch()
        assert w.result(10) == info.pid
        wait_until(lambda: title_of(info.pid) == f"{base}-thumbnails", what="-thumbnails title")
        # A plain pool item does not touch the title.
        assert wq.pool.submit(tasks.whoami).result(10) == info.pid
        assert title_of(info.pid) == f"{base}-thumbnails"


def test_lost_worker_fails_only_its_work():
    with procpool.Workqueue("lost", ordered=True) as wq:
        lost = wq.queue(tasks.exit_hard, 3)
        after = wq.queue(tasks.square, 4)
        with pytest.raises(procpool.WorkerLost):
            lost.result(10)
        assert after.result(10) == 16
        assert wq.stats().completed == 2


def test_workqueue_arguments_validated():
    for bad in ("", "two words", None):
        with pytest.raises(ValueError):
            procpool.Workqueue(bad)
    with pytest.raises(ValueError):
        procpool.Workqueue("zero", max_active=0)
    with pytest.raises(ValueError, match="4096"):
        procpool.Workqueue("cpu", cpus={4096})
    assert not wqmod.live_pools()


def test_apply_attrs_moves_new_items_and_releases_the_old_pool(tmp_path):
    base = psutil.Process().nice()
    cpu = min(os.sched_getaffinity(0))
    mark, release = str(tmp_path / "mark"), str(tmp_path / "release")
    with procpool.Workqueue("moving", ordered=True) as wq:
        old = wq.pool
        running = wq.queue(tasks.touch_and_wait, mark, release)
        waiting = wq.queue(tasks.whoami)  # queued before apply_attrs, not yet handed to a pool
        wait_until(lambda: os.path.exists(mark), what="item running")
        (old_worker,) = [w.pid for w in old.workers()]
        wq.apply_attrs(nice=4, cpus={cpu})
        new = wq.pool
        assert new is not old and (0, None) in wqmod.live_pools() and (4, frozenset({cpu})) in wqmod.live_pools()
        # The old pool keeps its reference while our item runs there.
        assert not old.closed
        assert psutil.Process(old_worker).is_running()
        Path(release).touch()
        assert running.result(10) == old_worker
        for pid in (waiting.result(10), wq.queue(tasks.whoami).result(10)):
            assert pid != old_worker
            assert psutil.Process(pid).nice() == min(19, base + 4)
            assert psutil.Process(pid).cpu_affinity() == [cpu]
        # Its last item finished: the reference is dropped, the pool closes, its workers exit.
        wait_until(lambda: old.closed, what="old pool closed")
        wait_until(lambda: not alive(old_worker), what="old worker gone")
        assert (0, None) not in wqmod.live_pools()
        wq.apply_attrs(nice=4, cpus={cpu})  # the same attributes: nothing changes
        assert wq.pool is new
    assert new.closed
    assert not wqmod.live_pools()
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.apply_attrs(nice=1)


def test_apply_attrs_keeps_a_pool_other_workqueues_use():
    a = procpool.Workqueue("mover")
    b = procpool.Workqueue("stayer")
    try:
        old = a.pool
        assert b.pool is old
        assert a.queue(tasks.square, 3).result(10) == 9
        a.apply_attrs(nice=2)  # nothing of a's in flight: the reference is dropped at once
        assert a.pool is not old
        assert a.queue(tasks.square, 4).result(10) == 16
        assert not old.closed  # b still uses it
        assert b.queue(tasks.square, 5).result(10) == 25
        niced = a.pool
        a.apply_attrs()  # back to the shared pool
        assert a.pool is old
        wait_until(lambda: (2, None) not in wqmod.live_pools(), what="nice=2 pool released")
        wait_until(lambda: niced.closed, what="nice=2 pool closed")  # torn down off this thread
    finally:
        a.destroy()
        b.destroy()
    assert old.closed
    assert not wqmod.live_pools()


def test_apply_attrs_while_items_run_loses_nothing():
    with procpool.Workqueue("flipping", max_active=4) as wq:
        works = [wq.queue(tasks.sleep_then, 0.005, i) for i in range(60)]
        used = [wq.pool]
        for n in range(12):
            wq.apply_attrs(nice=n % 3)
            used.append(wq.pool)
            time.sleep(0.01)
        assert [w.result(20) for w in works] == list(range(60))
        wait_until(lambda: set(wqmod.live_pools()) == {wq.pool_key}, what="only the current pool referenced")
        wait_until(lambda: wqmod.live_pools()[wq.pool_key] == 1, what="one reference on the current pool")
    assert not wqmod.live_pools()
    for pool in used:  # the replaced ones close on teardown threads of their own
        wait_until(lambda p=pool: p.closed, what=f"pool u{pool.id} closed")


def test_ps_lists_the_workqueues_of_each_pool(capsys):
    from procpool import cli, idtable

    def mine():
        return {
            p["pool"]: sorted(e["name"] for e in p["workqueues"])
            for p in cli.collect_pools()
            if p["owner_pid"] == os.getpid()
        }

    a = procpool.Workqueue("ps-a")
    b = procpool.Workqueue("ps-b")
    c = procpool.Workqueue("ps-c", nice=3)
    try:
        assert mine() == {a.pool.id: ["ps-a", "ps-b"], c.pool.id: ["ps-c"]}
        assert cli.main(["ps"]) == 0
        out = capsys.readouterr().out
        # Only ours: other programs of this user (other suites on the machine) may have
        # workqueues of the same names.
        rows = [r for r in (line.split() for line in out.splitlines()) if r[:1] and r[0].startswith("ps-")]
        rows = [r for r in rows if r[1] == str(os.getpid())]
        assert [r[:3] for r in rows] == [
            ["ps-a", str(os.getpid()), f"u{a.pool.id}"],
            ["ps-b", str(os.getpid()), f"u{a.pool.id}"],
            ["ps-c", str(os.getpid()), f"u{c.pool.id}"],
        ]
        b.apply_attrs(nice=3)
        assert mine() == {a.pool.id: ["ps-a"], c.pool.id: ["ps-b", "ps-c"]}
    finally:
        for wq in (a, b, c):
            wq.destroy()
    prefix = idtable.wq_segment_name(os.getpid())
    assert not [n for n in os.listdir(idtable.SHM_DIR) if n == prefix or n.startswith(prefix + "-")]


def test_cancel_takes_an_item_back_from_the_pools_worklist(tmp_path):
    # A pool of one worker (its own attributes, so this workqueue makes it): the second item is
    # in flight, handed to the pool, but waits in the pool's worklist behind the first.
    release, mark = tmp_path / "release", tmp_path / "mark"
    with procpool.Workqueue("cancel-inpool", nice=4, max_workers=1) as wq:
        first = wq.queue(tasks.touch_and_wait, str(mark), str(release))
        wait_until(mark.exists, what="the first item running")
        second = wq.queue(tasks.touch_and_wait, str(tmp_path / "second-ran"), str(release))
        third = wq.queue(tasks.square, 7)
        assert wq.stats().in_flight == 3 and wq.pool.stats().nr_pending == 2
        assert wq.cancel_work(second) is True
        assert second.cancelled()
        assert wq.pool.stats().nr_pending == 1  # taken out of the pool's worklist
        assert wq.cancel_work(first) is False  # a worker runs it: cannot be taken back
        release.touch()
        assert first.result(timeout=30) > 0 and third.result(timeout=30) == 49
        assert wq.flush(10)
        assert not (tmp_path / "second-ran").exists()  # it never ran
        s = wq.stats()
        # The cancelled item was handed to the pool but never ran: not started, not completed.
        assert s.in_flight == 0 and s.started == s.completed == 2


def test_flush_delayed_work_queues_it_now(tmp_path):
    with procpool.Workqueue("flushdelayed") as wq:
        w = wq.queue_delayed(3600, tasks.square, 9)
        t0 = time.monotonic()
        assert wq.flush_delayed_work(w, timeout=30) is True
        assert w.result() == 81 and time.monotonic() - t0 < 30
        assert wq.flush_delayed_work(w) is False  # ended before the call
        d = wq.queue_delayed(3600, tasks.square, 3)
        assert wq.cancel_delayed_work(d) is True and d.cancelled()
        assert wq.stats().delayed == 0


EXIT_SCRIPT = """
import sys, procpool, tasks
wq = procpool.Workqueue("atexit", max_active=1)
for i in range(3):
    wq.queue(tasks.sleep_then_write, 0.2, sys.argv[1] + f"/ran{i}")
late = wq.queue_delayed(3600, tasks.sleep_then_write, 0, sys.argv[1] + "/late")
print("queued", flush=True)
# no destroy(): the interpreter's exit runs what was queued and cancels the timer
"""


def test_interpreter_exit_runs_queued_items_and_cancels_delayed_ones(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "queued\n"
    # max_active=1: the three ran one after another at exit, in queue order.
    stamps = [float((tmp_path / f"ran{i}").read_text()) for i in range(3)]
    assert stamps == sorted(stamps)
    assert not (tmp_path / "late").exists()
    assert time.monotonic() - t0 < 60


def test_killed_workers_lose_no_work_item():
    # Two workqueues on one pool, one of them ordered; random busy workers are SIGKILLed while
    # items flow. Every Work ends: a result, or WorkerLost for the item its worker ran.
    import signal

    with procpool.Workqueue("storm-a", max_active=4) as a, procpool.Workqueue("storm-b", ordered=True) as b:
        works = [(wq, i, wq.queue(tasks.sleep_then, 0.005, i)) for i in range(80) for wq in (a, b)]
        stop = threading.Event()
        kills = []

        def killer():
            while not stop.is_set():
                busy = [w for w in a.pool.workers() if w.state == "busy"]
                if busy:
                    try:
                        os.kill(busy[0].pid, signal.SIGKILL)
                        kills.append(busy[0].pid)
                    except ProcessLookupError:
                        pass
                time.sleep(0.03)

        t = threading.Thread(target=killer)
        t.start()
        try:
            lost = 0
            for _, i, w in works:
                exc = w.exception(timeout=60)
                if exc is None:
                    assert w.result() == i
                else:
                    assert isinstance(exc, procpool.WorkerLost), exc
                    lost += 1
        finally:
            stop.set()
            t.join()
        assert kills and 1 <= lost <= len(kills)
        for wq in (a, b):
            s = wq.stats()
            assert s.in_flight == 0 and s.completed == s.started == 80


def test_waiting_from_a_done_callback_raises_instead_of_hanging(tmp_path):
    release = tmp_path / "release"
    errors: list[BaseException] = []
    with procpool.Workqueue("cb-wait") as wq:
        blocker = wq.queue(tasks.wait_for_file, str(release), "late")

        def callback(_work):
            for wait in (wq.flush, wq.drain, lambda: wq.flush_work(blocker)):
                try:
                    wait()
                except RuntimeError as exc:
                    errors.append(exc)

        go = tmp_path / "go"
        first = wq.queue(tasks.wait_for_file, str(go), 9)
        first.add_done_callback(callback)  # before it can finish: the callback runs on the arbiter
        go.touch()
        assert first.result(timeout=30) == 9
        wait_until(lambda: len(errors) == 3, what="the three refusals")
        assert all("done-callback would deadlock" in str(e) for e in errors)
        assert not blocker.done()  # the callback did not wait for it
        release.touch()
        assert blocker.result(timeout=30) == "late"  # and the pool carried on


def test_wait_timeouts_are_validated_and_honoured(tmp_path):
    release = tmp_path / "release"
    with procpool.Workqueue("timeouts") as wq:
        w = wq.queue(tasks.wait_for_file, str(release), 1)
        for wait in (wq.flush, wq.drain, lambda t: wq.flush_work(w, t), lambda t: wq.flush_delayed_work(w, t)):
            for bad in (-1, "soon", float("nan")):
                with pytest.raises((ValueError, TypeError), match="timeout"):
                    wait(bad)
        assert wq.flush(0.05) is False and wq.drain(0.05) is False
        with pytest.raises(TimeoutError):
            wq.flush_work(w, 0.05)
        release.touch()
        assert wq.flush_work(w, 30) is True and w.result() == 1
