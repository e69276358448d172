"""Named fault points: a test-only way to make races reproducible.

A fault spec is a comma-separated list of ``POINT[@ID]=ACTION[:ARG]``, given as the pool
option ``faults=`` or in the environment variable ``PROCPOOL_FAULTS`` (read when the pool is
created; workers get the pool's spec). ``@ID`` limits a fault to the worker with that id.
Actions:

* ``delay:SECONDS`` — sleep there (widen a race window deterministically);
* ``raise`` — raise ``procpool.FaultInjected``;
* ``kill`` — SIGKILL the process at that exact point;
* ``exit`` — ``os._exit(3)`` at that point;
* ``stop`` — SIGSTOP the process at that point: a test sees it stopped from outside (psutil
  status ``stopped``), does what must happen exactly then, and resumes it with SIGCONT.

Points (worker side unless marked parent):

==========================  ==============================================================
``worker.forked``           spawner side of a new worker: forked, nothing of its own set up yet
                            (title, signals)
``worker.start``            the worker process started, before it touches its slot
``worker.busy``             a work item was received, before its function runs
``worker.idle``             a result was sent, before waiting for the next message
``detach.before_lock``      the worker renamed itself dying, before taking the attach lock
``detach.locked``           holding the Manager attach lock, before freeing its id
``detach.after``            after detaching, before exiting (id free, process alive)
``create.after_alloc``      parent: ids allocated under the lock, processes not yet started
``create.start``            parent: just before one worker process is started
``create.before_locks``     parent: the constructor's first workers forked, before it returns
``create.reserved``         parent: the filler, before it forks the ids the constructor reserved
                            (the pool's locks are made behind it)
``locks.begin``             parent: the filler, before it has the program's Manager server
                            forked (if it has none); a ``raise`` is ``locks.start``'s to report
``locks.start``             parent: the pool's locks are about to be made (by the filler thread,
                            or the first use), the program's Manager started with them if it
                            has none; the first workers run already
``teardown.before_wait``    parent: completion installed, before waiting on it
``reap``                    parent: a worker's exit seen, before its books are settled
``arbiter.loop``            parent: the arbiter's loop itself, outside any handler (a
                            ``raise`` there is a failure of the loop's machinery)
``manager.acquire``         Manager server: a lock request arrived (``kill``/``exit`` end the
                            server; a replacement Manager is never injected again)
``manager.create``          Manager server: a new pool's locks are being made (its first
                            workers run already; ``kill``/``exit`` end the server)
``spawner.answer``          spawner: a batch of workers forked, before it answers the program
==========================  ==============================================================

With no spec the check is a dictionary lookup on an empty dict.
"""

from __future__ import annotations

import os
import signal
import time

from .errors import FaultInjected

ENV = "PROCPOOL_FAULTS"

POINTS = frozenset(
    {
        "worker.forked",
        "worker.start",
        "worker.busy",
        "worker.idle",
        "detach.before_lock",
        "detach.locked",
        "detach.after",
        "create.after_alloc",
        "create.start",
        "create.before_locks",
        "create.reserved",
        "locks.begin",
        "locks.start",
        "teardown.before_wait",
        "reap",
        "arbiter.loop",
        "manager.acquire",
        "manager.create",
        "spawner.answer",
    }
)
ACTIONS = frozenset({"delay", "raise", "kill", "exit", "stop"})

Spec = dict[str, list[tuple[int | None, str, float]]]


def parse(text: str | None) -> Spec:
    """Parse a fault spec; a malformed one raises ValueError naming the bad entry."""
    spec: Spec = {}
    if not text:
        return spec
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        point, sep, action = entry.partition("=")
        if not sep:
            raise ValueError(f"fault {entry!r}: expected POINT[@ID]=ACTION[:ARG]")
        point, _, wid = point.strip().partition("@")
        if point not in POINTS:
            raise ValueError(f"fault {entry!r}: unknown point {point!r}; known: {', '.join(sorted(POINTS))}")
        name, _, arg = action.strip().partition(":")
        if name not in ACTIONS:
            raise ValueError(f"fault {entry!r}: unknown action {name!r}; known: {', '.join(sorted(ACTIONS))}")
        try:
            value = float(arg) if arg else 0.0
            target = int(wid) if wid else None
        except ValueError:
            raise ValueError(f"fault {entry!r}: bad number") from None
        spec.setdefault(point, []).append((target, name, value))
    return spec


def hit(spec: Spec, point: str, wid: int | None = None) -> None:
    """Run the actions armed at ``point`` (for worker ``wid``), if any."""
    actions = spec.get(point)
    if not actions:
        return
    for target, name, value in actions:
        if target is not None and target != wid:
            continue
        if name == "delay":
            time.sleep(value)
        elif name == "raise":
            raise FaultInjected(f"fault injected at {point}")
        elif name == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)  # SIGKILL is asynchronous only in theory
        elif name == "exit":
            os._exit(3)
        elif name == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
