"""A pool's two Manager locks: ``arb`` and ``attach`` (M in docs/design.md's lock legend).

::

   PoolLocks()      [constructor] names both (lockname.plan_address: where the program's
                    server is or will be); nothing of procpool.manager loaded, no process
                    started ─► workers may be forked with ``attach_name()`` at once
   begin()          [the filler thread, after its reserved workers] the program's Manager
                    server forked if it has none, not waited for
   start()          [the filler thread, or the first ``held``] the program's Manager server
                    started if it has none, both locks made in one request (once; a failed
                    start is tried again by the next caller)
   held(name)       start(), then take the lock; a dead server ─► new server, new locks
   (gone)           the server is told to drop both (``free_locks``, not waited for)

Made on first use so that a pool's first workers are forked, and its constructor returns,
before the program's server even exists (docs/design.md, "Pool start"). A worker forked
before the locks exist uses its attach lock only on its way out; should that come first, the
server makes the lock on that first use (``procpool.lockserver._Server._planned_object``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from . import faults
from .errors import LOST
from .lockname import LockName, name_lock, plan_address
from .spawner import drop_pending, get_spawner

if TYPE_CHECKING:
    from .manager import ManagerLock


def _manager() -> Any:
    from . import manager  # the Manager's client (light): loaded by the first pool's filler

    return manager


class PoolLocks:
    """A pool's two Manager locks, ``arb`` (the kernel's manager_arb: one creator at a time,
    and none once teardown passed its point of no return) and ``attach`` (id allocation and
    freeing, and the detach completion's state), with the way on when the server dies.

    ``held(name)`` takes one as a context manager. If the Manager server is found dead, both
    locks are replaced by locks of a new server, and the new one is taken: workers started
    from then on carry the new ``attach``; workers attached through the dead server cannot
    take its lock on their way out, so they exit without detaching and the parent frees
    their ids when it reaps them (``Reaper.detach_on_behalf``), under the new lock. (A worker that
    was inside its critical section when the server died finishes it unguarded: its id slot
    is generation-checked, so the parent's repair of it is safe.) Only the first locks get
    the pool's ``manager.*`` fault points, so an injected Manager death happens once.
    """

    def __init__(self, ctx: Any, allow_fork: bool, pool_id: int, fault_spec: faults.Spec) -> None:
        self._spawner = lambda: get_spawner(ctx, allow_fork)  # I: it forks the Manager's server
        self._pool_id = pool_id  # I
        # guards _names, _arb, _attach and replaced (the swap, not the locks' use)
        self._guard = threading.Lock()
        # guards made: one thread makes the locks (start), the others wait for it. Taken
        # before _guard, never while holding it.
        self._starting = threading.Lock()
        self.made = False
        self.replaced = 0
        self._faults = fault_spec  # I (tests arm and clear points in it)
        self._first_faults = {point: v for point, v in fault_spec.items() if point.startswith("manager.")}  # I
        address, self.manager_follows = plan_address()  # I: no server yet, start() starts it
        self._names = self._plan(address)
        self._arb: ManagerLock | None = None  # the locks' clients, once made
        self._attach: ManagerLock | None = None

    def _plan(self, address: str) -> tuple[LockName, LockName]:
        return name_lock(address, f"pool{self._pool_id}.manager_arb"), name_lock(address, f"pool{self._pool_id}.attach")

    def attach_name(self) -> LockName:
        """What a worker forked now is given of the attach lock (procpool.lockname)."""
        with self._guard:
            return self._names[1]

    @property
    def arb(self) -> ManagerLock:
        """The arb lock (made first if need be: tests and tools)."""
        self.start()
        assert self._arb is not None
        return self._arb

    @property
    def attach(self) -> ManagerLock:
        """The attach lock (made first if need be: tests and tools)."""
        self.start()
        assert self._attach is not None
        return self._attach

    def begin(self) -> None:
        """Have the program's Manager server forked if it has none, without waiting for it to
        listen (a spawner round trip, ~1 ms): the filler's step between its reserved workers
        and ``start``, which waits for the server. A failure here is ``start``'s to report (it
        tries again)."""
        if self.made:
            return
        try:
            faults.hit(self._faults, "locks.begin")
            _manager().get_manager(self._spawner)
        except Exception:  # noqa: BLE001 - start() tries again and raises what it finds
            pass

    def start(self) -> None:
        """Make the locks, once (every later call returns at once; a failed one is tried again
        by the next): on the program's Manager server, started now if there is none. If the
        server is not the one they were named for (it died, or failed to start, since they
        were named), new locks are named and made there: workers forked with the old name
        exit without detaching (their ids are freed when the parent reaps them, as for
        workers of a dead server). A server that dies meanwhile is replaced once, as on any
        later request. Raises LOST (an OSError naming what failed, for a failure of another
        kind) if no locks could be made."""
        if self.made:
            return
        with self._starting:
            if self.made:
                return
            try:
                faults.hit(self._faults, "locks.start")
                self._make()
            except Exception as exc:
                if self.manager_follows:
                    # Workers forked before the server wait for it on their way out: let
                    # them go the other way (a later start serves the workers to come).
                    drop_pending()
                if isinstance(exc, LOST):
                    raise
                # callers handle a Manager they cannot reach (LOST)
                raise OSError(f"procpool: pool u{self._pool_id}'s Manager locks could not be made: {exc!r}") from exc
            self.made = True

    def _make(self) -> None:
        m = _manager()
        address = m.get_manager(self._spawner)
        # Its start waited for here, not under _guard: ``attach_name`` (every creation) takes
        # it, and the filler forks the reserved workers meanwhile. (A server that died first:
        # LOST from make_locks below, which replaces it.)
        try:
            m.wait_manager_ready()
        except LOST:
            pass
        with self._guard:
            if not m.same_address(self._names[0].address, address):
                self._names = self._plan(address)
            locks = [m.lock_for(name) for name in self._names]
            try:
                m.make_locks(locks, self._first_faults)
                self._arb, self._attach = locks
                self._free_when_gone(locks)
                return
            except LOST:
                if not m.replace_dead_manager(self._spawner, address):
                    raise
            self._new()
            self.replaced += 1

    def _new(self) -> None:
        """_guard held: name and make locks on the program's (new) server."""
        m = _manager()
        names = self._plan(m.get_manager(self._spawner))
        locks = [m.lock_for(name) for name in names]
        m.make_locks(locks)
        self._names = names
        self._arb, self._attach = locks
        self._free_when_gone(locks)

    def _free_when_gone(self, locks: list[ManagerLock]) -> None:
        """The server keeps ``locks`` as long as this object lives (the pool, and anything that
        reads them after its close: their ``broken`` count, say), then is told to drop them
        (``free_locks``: not waited for). Not at the program's exit: the server goes with it."""
        weakref.finalize(self, _manager().free_locks, locks).atexit = False

    @contextmanager
    def held(self, name: str) -> Iterator[None]:
        """Hold lock ``name`` ('arb' or 'attach'). Raises what the Manager raised if it cannot
        be reached and cannot be replaced. A release that fails because the server died while
        we held the lock is not an error: the lock died with it."""
        lock = self._take(name)
        try:
            yield
        finally:
            try:
                lock.release()
            except LOST:
                pass

    def _take(self, name: str) -> ManagerLock:
        self.start()
        lock: ManagerLock = getattr(self, name)
        try:
            lock.acquire()
            return lock
        except LOST:
            if not self._replace(lock):
                raise
        lock = getattr(self, name)
        lock.acquire()
        return lock

    def _replace(self, failed: ManagerLock) -> bool:
        """New locks if ``failed``'s server is dead; True if there are new ones to try."""
        m = _manager()
        with self._guard:
            if failed is not self._arb and failed is not self._attach:
                return True  # another thread of this pool replaced them already
            if not m.replace_dead_manager(self._spawner, failed.address):
                return False
            try:
                self._new()
            except Exception:  # noqa: BLE001 - no new locks: the caller treats it as a creation failure
                return False
            self.replaced += 1
            return True
