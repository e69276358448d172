"""Every named fault point × every action: nothing hangs, nothing is lost, nothing is left.

Each case is a program of its own (a ``kill`` at a parent-side point kills the program, which
is then the program-death case): it makes a pool with that one fault armed, runs items that
pass every point (creation, work, idling, a cull, a destroy, teardown), and closes it. Then:

* if the program lived: close() ended, every item ended as its result or a named procpool
  error, and the books add up (created == destroyed + lost, nothing attached or dying);
* either way: no process of the program is left, and no /dev/shm entry of its pid.
"""

from __future__ import annotations

import json

import pytest
from conftest import assert_program_left_nothing, run_program

from procpool import faults

#: Points in the program itself: a kill or exit there ends the program.
PARENT_POINTS = frozenset(
    p for p in faults.POINTS if p.startswith(("create.", "teardown.", "reap", "arbiter.", "locks."))
)

PROGRAM = """
import json, sys, time, procpool, tasks
spec = sys.argv[1]
try:
    pool = procpool.WorkerPool(min_workers=1, max_workers=3, idle_timeout=0.1, faults=spec)
except Exception as exc:
    # Creation of the first worker refused: a clean, named failure of the constructor.
    print(json.dumps({"init": repr(exc)}))
    sys.exit(0)
ended = {"result": 0, "own": 0, "named": 0, "refused": 0}
futs = []
for i, call in enumerate([(tasks.sleep_then, 0.02, i) for i in range(6)] + [(tasks.fail, "its own error")]):
    try:
        futs.append(pool.submit(*call))
    except procpool.ProcpoolError:  # a broken pool refuses work with a named error
        futs.append(None)
        ended["refused"] += 1
for i, f in enumerate(futs):
    if f is None:
        continue
    exc = f.exception(timeout=60)
    if exc is None:
        assert f.result() == i, (i, f.result())
        ended["result"] += 1
    elif isinstance(exc, ValueError) and i == 6:
        ended["own"] += 1
    else:
        assert isinstance(exc, procpool.ProcpoolError), repr(exc)
        ended["named"] += 1
time.sleep(0.15)  # past the idle timeout: a cull may run
pool.destroy_idle(1)
t0 = time.monotonic()
try:
    pool.close()
    how = "ok"
except procpool.ProcpoolError as exc:  # a teardown step failed: it still tore everything down
    how = repr(exc)
st = pool.stats()
print(json.dumps({"ended": ended, "items": len(futs), "close": how, "close_s": time.monotonic() - t0,
                  "created": st.created, "destroyed": st.destroyed, "lost": st.lost,
                  "left": [st.nr_workers, st.nr_idle, st.nr_dying, st.nr_pending]}))
"""

ACTIONS = {"kill": "kill", "exit": "exit", "raise": "raise", "delay": "delay:0.2"}


@pytest.mark.parametrize("action", sorted(ACTIONS))
@pytest.mark.parametrize("point", sorted(faults.POINTS))
def test_fault_point_action(point, action):
    proc, token = run_program(PROGRAM, f"{point}={ACTIONS[action]}", timeout=90)
    if proc.returncode != 0:
        # Only a kill or exit in the program itself may end it; then it is a program death.
        assert point in PARENT_POINTS and action in ("kill", "exit"), proc.err
    else:
        r = json.loads(proc.out)
        if "init" not in r:
            assert sum(r["ended"].values()) == r["items"]  # every item ended
            assert r["left"] == [0, 0, 0, 0]
            assert r["created"] == r["destroyed"] + r["lost"]
    assert_program_left_nothing(proc, token)
