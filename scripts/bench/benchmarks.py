"""The benchmarks: each function takes one sample (seconds, items/s, bytes, or a dict) for one
contender, and closes every pool it makes, on error too. Samples that must not share this
process's heap run in a fresh interpreter (``in_child``)."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from .items import BARRIER_TIMEOUT, barrier_round, block_item, burn_item, noop
from .peers import check_processes, managed

#: The thin entry script a child sample runs (``scripts/bench.py``, beside this package).
ENTRY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")

MAP_CHUNKSIZE = 10_000
MIXED_ITEMS = 64  # of each kind
MIXED_BLOCK = 0.050  # seconds a blocking item sleeps
MIXED_BURN = 0.020  # seconds of CPU time a CPU item burns
SCALE_SIZES = (8, 64, 256)
SCALE_ITEMS = 10  # items per worker
MEMORY_WORKERS = 8
#: import benchmark: contender -> the statement timed in a fresh interpreter. "cf" is the
#: standard library's process pool module (what ``concurrent.futures.ProcessPoolExecutor``
#: loads); "procpool:WorkerPool" (information, not a peer) what a program that makes a pool
#: imports before its first pool.
IMPORTS = {
    "procpool": "import procpool",
    "procpool:WorkerPool": "from procpool import WorkerPool",
    "cf": "import concurrent.futures.process",
    "loky": "import loky",
    "billiard": "import billiard",
    "pebble": "import pebble",
}

#: pid -> create time of the helpers (fork server, Manager, spawner, resource trackers) that the
#: child samples started: the leak check wants them gone with their child.
CHILD_HELPERS: dict[int, float] = {}
MIXED_PEAKS: list[int] = []  # procpool's peak worker count, one per mixed sample


def settle() -> None:
    """Let results and idle transitions land, collect garbage, before a timed section."""
    time.sleep(0.02)
    gc.collect()


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def bench_teardown(contender: str, n: int) -> float:
    with managed(contender, n) as pool:
        pids = barrier_round(pool, n)
        check_processes(pool, n)
        if contender == "procpool":
            s = pool.raw.stats()
            if (s.nr_workers, s.nr_idle) != (n, n):
                raise RuntimeError(f"procpool not all idle before teardown: {s}")
        settle()
        t0 = time.perf_counter()
        pool.close()
        dt = time.perf_counter() - t0
    left = [p for p in pids if alive(p)]
    if left:
        raise RuntimeError(f"{contender}: {len(left)} workers still alive after teardown")
    return dt


def bench_import(contender: str, cache: str) -> float:
    """The import time of ``IMPORTS[contender]`` in a fresh interpreter, byte code cached."""
    code = "import sys, time; t = time.perf_counter(); exec(sys.argv[1]); print(time.perf_counter() - t)"
    env = dict(os.environ, PYTHONPYCACHEPREFIX=cache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.run(
        [sys.executable, "-c", code, IMPORTS[contender]], env=env, capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        raise RuntimeError(f"{IMPORTS[contender]!r} failed: {out.stderr.strip()[-500:]}")
    return float(out.stdout.strip().splitlines()[-1])


def bench_memory(contender: str, n: int) -> float:
    """Median USS of the n workers of an idle pool, in bytes."""
    import psutil

    with managed(contender, n) as pool:
        pids = barrier_round(pool, n)
        settle()
        uss = [psutil.Process(pid).memory_full_info().uss for pid in pids]
    return statistics.median(uss)


def bench_scale(contender: str, n: int) -> float:
    """Create a pool of n, run SCALE_ITEMS items per worker, tear it down: seconds per worker."""
    items = SCALE_ITEMS * n
    settle()
    t0 = time.perf_counter()
    with managed(contender, n) as pool:
        futs = [pool.submit(noop, i) for i in range(items)]
        got = [f.result(BARRIER_TIMEOUT) for f in futs]
        nproc = pool.nr_processes()
        pool.close()
    dt = time.perf_counter() - t0
    if got != list(range(items)):
        raise RuntimeError(f"{contender}: scale-{n} returned wrong results")
    if nproc is not None and nproc > n:
        raise RuntimeError(f"{contender}: scale-{n} had {nproc} processes")
    return dt / n


def bench_destroy(k: int) -> dict[str, Any]:
    """k idle workers whose exit takes 1 s more; destroy them one at a time."""
    with managed("procpool", k, faults="detach.after=delay:1") as pool:
        barrier_round(pool, k)
        settle()
        calls = []
        for _ in range(k):
            t0 = time.perf_counter()
            got = pool.raw.destroy_idle(1)
            calls.append(time.perf_counter() - t0)
            if got != 1:
                raise RuntimeError(f"destroy_idle(1) destroyed {got}")
            time.sleep(0.002)  # later calls run while earlier victims are dying
        dying = pool.raw.stats().nr_dying
        t0 = time.perf_counter()
        pool.close()
        close = time.perf_counter() - t0
    return {"calls": calls, "nr_dying_after": dying, "close": close}


def bench_start(contender: str, n: int) -> float:
    t0 = time.perf_counter()
    with managed(contender, n) as pool:
        barrier_round(pool, n)
        dt = time.perf_counter() - t0
        check_processes(pool, n)
    return dt


def bench_cold_start(contender: str, n: int) -> dict[str, float]:
    """The cold start of a pool of n (run in a fresh interpreter, ``in_child``): "first", the
    seconds from the constructor to the result of one item submitted right after it; "all",
    to the end of a barrier round of n after that (all n exist and each ran an item)."""
    t0 = time.perf_counter()
    with managed(contender, n) as pool:
        if pool.submit(noop, 7).result(BARRIER_TIMEOUT) != 7:
            raise RuntimeError(f"{contender}: the first item returned a wrong result")
        first = time.perf_counter() - t0
        barrier_round(pool, n)
        dt = time.perf_counter() - t0
        check_processes(pool, n)
    return {"first": first, "all": dt}


def bench_throughput(contender: str, items: int) -> float:
    with managed(contender, 2) as pool:
        barrier_round(pool, 2)
        settle()
        t0 = time.perf_counter()
        hs = pool.submit_all(noop, items)
        dt = time.perf_counter() - t0
        bad = 0
        for i, h in enumerate(hs):
            try:
                bad += pool.value(h) != i
            except Exception:  # noqa: BLE001 - counted as a bad result
                bad += 1
        if bad:
            raise RuntimeError(f"{contender}: {bad} items failed")
    return items / dt


def bench_map(contender: str, items: int, chunksize: int) -> float:
    with managed(contender, 2, executor=contender == "procpool") as pool:
        barrier_round(pool, 2)
        settle()
        t0 = time.perf_counter()
        res = pool.map_list(noop, items, chunksize)
        dt = time.perf_counter() - t0
        if len(res) != items or res != list(range(items)):
            raise RuntimeError(f"{contender}: map returned wrong results ({len(res)} items)")
    return items / dt


def bench_latency(contender: str, items: int) -> float:
    with managed(contender, 2) as pool:
        barrier_round(pool, 2)
        for i in range(50):
            pool.submit(noop, i).result(BARRIER_TIMEOUT)
        settle()
        samples = pool.round_trips(noop, items)
    return statistics.median(samples)


def bench_mixed(contender: str, items: int) -> float:
    """``items`` blocking items (sleep) interleaved with ``items`` CPU items, on a fresh pool:
    procpool's through a Workqueue (concurrency management: workers for the blocked items,
    about one running per CPU), a peer's with os.cpu_count() workers. Wall time from the first
    submit to the last result; pool start and teardown untimed."""
    calls = [(block_item, MIXED_BLOCK), (burn_item, MIXED_BURN)] * items
    if contender == "procpool":
        import procpool

        wq = procpool.Workqueue("bench-mixed")
        try:
            settle()
            t0 = time.perf_counter()
            futs = [wq.queue(fn, arg) for fn, arg in calls]
            res = [f.result(BARRIER_TIMEOUT) for f in futs]
            dt = time.perf_counter() - t0
            # Nothing is culled within the pool's idle timeout (300 s): every worker it
            # started is still there, so nr_workers is the peak.
            pool: Any = wq.pool
            MIXED_PEAKS.append(pool.stats().nr_workers)
        finally:
            wq.destroy()
    else:
        with managed(contender, os.cpu_count() or 1) as pool:
            settle()
            t0 = time.perf_counter()
            futs = [pool.submit(fn, arg) for fn, arg in calls]
            res = [f.result(BARRIER_TIMEOUT) for f in futs]
            dt = time.perf_counter() - t0
    if res != [arg for _, arg in calls]:
        raise RuntimeError(f"{contender}: mixed returned wrong results")
    return dt


# -- samples in a fresh interpreter ---------------------------------------------------------------


def in_child(kind: str, contender: str, **params: int) -> float:
    """One sample of ``kind`` ("map", "throughput") in a fresh interpreter (the entry
    script with --child); ``cold_start`` has the cold start's. map and throughput: their bursts of a million
    results or 20,000 futures leave tens of MB in the heap of the process that ran them
    (pebble's map ~80 MB; glibc keeps much of it even after malloc_trim), and every later fork
    of that process would pay for it: the fork-based peers' start, and their teardown."""
    argv = ["--child", kind, "--contender", contender]
    for k, v in params.items():
        argv += [f"--{k}", str(v)]
    return float(run_child(argv)["value"])


def cold_start(contender: str, n: int) -> dict[str, float]:
    """One sample of ``bench_cold_start`` in a fresh interpreter: {"first": s, "all": s}."""
    res = run_child(["--child", "start", "--contender", contender, "--n", str(n)])
    return {"first": float(res["first"]), "all": float(res["value"])}


def run_child(argv: list[str]) -> dict[str, Any]:
    """Run the entry script with ``argv`` in a fresh interpreter; its last line is a JSON object
    whose "helpers" (pid -> create time) must be gone by the leak check."""
    out = subprocess.run([sys.executable, ENTRY, *argv], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"child {argv} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    CHILD_HELPERS.update((int(pid), ct) for pid, ct in res.get("helpers", {}).items())
    return res
