"""PoolFuture: the Future pools hand out, with a lighter condition. It must behave as a
``concurrent.futures.Future`` everywhere callers look, including concurrent.futures.wait and
as_completed (which take each future's condition themselves) and waits from many threads."""

from __future__ import annotations

import threading
import time
from concurrent import futures as cf

import pytest
import tasks

import procpool
from procpool.future import PoolFuture, new_future


def _later(seconds: float, fn, *args) -> threading.Thread:
    t = threading.Timer(seconds, fn, args)
    t.start()
    return t


def test_pools_hand_out_pool_futures():
    assert new_future is PoolFuture  # this Python's Future has the fields PoolFuture sets
    with procpool.WorkerPool(1, 1) as pool:
        fut = pool.submit(tasks.square, 3)
        assert isinstance(fut, PoolFuture) and isinstance(fut, cf.Future)
        assert fut.result(timeout=30) == 9


def test_result_waits_times_out_and_is_woken():
    f = PoolFuture()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        f.result(timeout=0.05)
    assert time.monotonic() - t0 >= 0.04
    with pytest.raises(TimeoutError):
        f.result(timeout=0)
    _later(0.05, f.set_result, 42)
    assert f.result(timeout=10) == 42 and f.done() and not f.running()


def test_many_threads_waiting_all_wake_with_the_result():
    f = PoolFuture()
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(f.result(timeout=10))) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.05)  # let them block (a late one simply finds the result)
    f.set_result("x")
    for t in threads:
        t.join(10)
    assert got == ["x"] * 8


def test_exception_cancel_and_callbacks():
    f = PoolFuture()
    seen = []
    f.add_done_callback(lambda fut: seen.append(fut.exception()))
    err = ValueError("boom")
    _later(0.02, f.set_exception, err)
    assert f.exception(timeout=10) is err
    with pytest.raises(ValueError):
        f.result()
    assert seen == [err]
    g = PoolFuture()
    assert g.cancel() and g.cancelled()
    with pytest.raises(cf.CancelledError):
        g.result(timeout=0)
    h = PoolFuture()
    assert h.set_running_or_notify_cancel() and h.running() and not h.cancel()


def test_wait_and_as_completed_mix_pool_and_standard_futures():
    a, b, c = PoolFuture(), cf.Future(), PoolFuture()
    done, pending = cf.wait([a, b, c], timeout=0.02)
    assert not done and pending == {a, b, c}
    _later(0.02, a.set_result, 1)
    done, pending = cf.wait([a, b, c], return_when=cf.FIRST_COMPLETED, timeout=10)
    assert done == {a}
    _later(0.02, b.set_result, 2)
    _later(0.04, c.set_result, 3)
    assert sorted(f.result() for f in cf.as_completed([a, b, c], timeout=10)) == [1, 2, 3]


def test_a_timed_out_waiter_does_not_swallow_a_later_wake_up():
    f = PoolFuture()
    with pytest.raises(TimeoutError):
        f.result(timeout=0.01)  # leaves no stale waiter behind
    assert not f._sleepers  # the sleepers list, empty again
    box = []
    t = threading.Thread(target=lambda: box.append(f.result(timeout=10)))
    t.start()
    time.sleep(0.02)
    f.set_result(7)
    t.join(10)
    assert box == [7]


def test_completing_an_ended_future_raises_instead_of_hanging():
    # Regression: the error message's repr() took the (non-reentrant) lock set_result held,
    # so completing a finished future hung its caller (the arbiter, in books.fail_items).
    f = PoolFuture()
    f.set_result(1)
    done = threading.Event()
    errors: list[BaseException] = []

    def again() -> None:
        for complete in (lambda: f.set_result(2), lambda: f.set_exception(ValueError("late"))):
            try:
                complete()
            except cf.InvalidStateError as exc:
                errors.append(exc)
        done.set()

    threading.Thread(target=again, daemon=True).start()
    assert done.wait(10), "completing a finished future hung"
    assert len(errors) == 2 and "finished" in str(errors[0])
    assert f.result(timeout=0) == 1  # the first outcome stands


def test_waiters_and_callbacks_are_made_on_first_use_and_still_work():
    f, g = PoolFuture(), PoolFuture()
    assert f._w is None and f._cb is None  # nothing made for a future nobody waits on
    seen: list[object] = []
    f.add_done_callback(lambda fut: seen.append(fut.result()))
    _later(0.02, f.set_result, "a")
    _later(0.04, g.set_exception, KeyError("b"))
    done, pending = cf.wait([f, g], timeout=10)
    assert done == {f, g} and not pending and seen == ["a"]
    assert not f._w and not g._w  # wait() took its waiter back out
    assert isinstance(g.exception(timeout=0), KeyError) and repr(g).endswith("raised KeyError>")
