"""Workqueues: every item is a future, max_active and ordering hold, titles name the
workqueue, bad arguments are refused, lost workers fail only their item, ``procpool ps``
lists workqueues, the interpreter's exit runs queued items, waits are bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import tasks
from conftest import title_of, wait_until

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


def test_unpicklable_call_fails_its_work():
    with procpool.Workqueue("unpicklable") as wq:
        w = wq.queue(tasks.identity, threading.Lock())
        with pytest.raises(TypeError, match="cannot be pickled"):
            w.result(10)
        assert wq.queue(tasks.square, 2).result(10) == 4


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
