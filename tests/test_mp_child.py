"""procpool inside a process that multiprocessing started (a Dask worker is one): such a
process ends by joining its multiprocessing children before atexit runs, and a spawner started
through multiprocessing is one of them. The pools must close and the spawner go first, or the
process never ends (a Dask Nanny had to kill its worker after 4 s at every close)."""

from __future__ import annotations

import threading
import time

from conftest import assert_program_left_nothing, run_program


def threaded_child_forgets_its_pool() -> None:
    # A thread of its own: the spawner is then started through multiprocessing (forkserver),
    # not forked, and becomes a multiprocessing child of this process.
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    from procpool import WorkerPool

    pool = WorkerPool(1, 1)  # never closed: exit must close it
    print("result", pool.submit(pow, 2, 10).result(30), flush=True)


PROGRAM = """
import multiprocessing, time
from test_mp_child import threaded_child_forgets_its_pool

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=threaded_child_forgets_its_pool)
    started = time.monotonic()
    p.start()
    p.join(60)
    print("exitcode", p.exitcode, "after", round(time.monotonic() - started, 1), flush=True)
    if p.exitcode is None:
        p.kill()
        p.join()
"""


def test_multiprocessing_child_with_a_pool_exits():
    proc, token = run_program(PROGRAM, timeout=90)
    assert "result 1024" in proc.out, (proc.out, proc.err)
    assert "exitcode 0 " in proc.out, (proc.out, proc.err)
    assert_program_left_nothing(proc, token)
