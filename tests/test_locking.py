"""procpool.locking: ``assert_held`` catches a caller that does not hold L (the suite runs
with PROCPOOL_DEBUG_LOCKS=1, set in conftest)."""

from __future__ import annotations

import threading

import pytest

import procpool
from procpool.locking import OwnedLock, assert_held, new_lock


def test_the_suite_runs_with_checked_locks():
    assert isinstance(new_lock(), OwnedLock)


def test_assert_held_fails_unless_this_thread_holds_the_lock():
    lock = OwnedLock()
    with pytest.raises(AssertionError, match="L"):
        assert_held(lock)
    with lock:
        assert_held(lock)
        errors: list[BaseException] = []

        def other() -> None:
            try:
                assert_held(lock)
            except AssertionError as exc:
                errors.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join(10)
        assert len(errors) == 1  # held, but by another thread
    with pytest.raises(AssertionError):
        assert_held(lock)


def test_a_plain_lock_is_checked_to_be_held_at_all():
    lock = threading.Lock()
    with pytest.raises(AssertionError):
        assert_held(lock)
    with lock:
        assert_held(lock)


def test_checked_lock_works_with_a_condition():
    lock = OwnedLock()
    cond = threading.Condition(lock)
    with cond:
        assert not cond.wait(0.01)
        assert_held(lock)  # wait() gave the lock back to this thread


def test_a_pool_method_called_without_L_is_caught():
    with procpool.WorkerPool(min_workers=1, max_workers=1) as pool:
        assert isinstance(pool._lock, OwnedLock)
        with pytest.raises(AssertionError, match="pool lock"):
            pool._books.stats()  # "L held", but it is not
        assert pool.stats().nr_workers == 1
