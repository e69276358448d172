#!/usr/bin/env python3
"""procpool vs the usual Python process pools, side by side, in one run.

    .venv/bin/python scripts/bench.py [--rounds N] [--quick] [--only NAME,...] [--peers NAME,...] [--json FILE]

Contenders: ``procpool`` (WorkerPool, forkserver workers, the default) and the peers

    cf-fork         concurrent.futures.ProcessPoolExecutor, mp_context fork
    cf-forkserver   concurrent.futures.ProcessPoolExecutor, mp_context forkserver
    mp-pool         multiprocessing.Pool (fork)
    loky            loky.ProcessPoolExecutor (its default "loky" start method)
    billiard        billiard.Pool (fork)
    pebble          pebble.ProcessPool (fork)

loky, billiard and pebble are optional (``.venv/bin/pip install -e '.[bench]'``); a peer that
cannot be imported is reported as skipped. ``--peers`` chooses among them (default: all).

The run is interleaved: every round runs every benchmark once per contender (the contender
order rotates from round to round), so machine noise hits all of them alike. Each benchmark
reports the median over rounds with the min-max spread, the procpool/peer ratio of the
medians, and the ratio to the best peer (marked ``*``); then PASS/MISS for the targets of
issues 2, 3, 4 and 15 (2 cores). Default: 5 rounds (start-cold in all 5), about 5 minutes on
an idle 2-core machine (12 under load); ``--quick``: 2 rounds of fewer items, and
teardown-64, start-warm and start-cold once, under a minute. The load average and this
process's RSS are printed every round: both move the numbers.

Benchmarks (``--only`` takes these names; ``teardown`` and ``start`` name both variants)
==========

import         a fresh interpreter runs ``import procpool`` (and, for information,
               ``from procpool import WorkerPool``), ``import concurrent.futures.process``, ``import
               loky`` / ``billiard`` / ``pebble``: the import's own wall time, in ms, interpreter
               start excluded. Byte code is cached (PYTHONDONTWRITEBYTECODE is dropped for these
               children, the cache lives in a temporary PYTHONPYCACHEPREFIX warmed once), as in
               an installed package: without it procpool would pay for compiling its sources.
memory         8 idle workers (after a barrier round): the median USS (memory unique to the
               process, psutil's memory_full_info) of a worker, in MiB.
scale          procpool and cf-fork: pools of 8, 64 and 256 workers: create, run 10 trivial items
               per worker (all submitted at once), tear down; the wall time per worker, in ms.
               It should stay flat as the pool grows.

teardown-8     N idle workers (N = 8, 64), then time the graceful teardown: ``close()``
teardown-64    (procpool), ``shutdown(wait=True)`` (cf, loky), ``close(); join()`` (mp-pool,
               billiard, pebble). Before timing, every contender runs one *barrier round*
               (below), which proves that all N processes exist, started and ran an item, and
               are idle again. CPython's executor starts workers on demand with forkserver (one
               per submit that finds no idle worker); the barrier round makes every contender
               have N processes, and the script checks the pool's own process count. After
               the teardown, none of the N pids may still be alive.
destroy        procpool only: ``destroy_idle(1)`` wall time, one call per idle worker, with the
               fault ``detach.after=delay:1`` so that every destroyed worker takes 1 s more to
               exit; ``nr_dying`` right after the calls shows the workers were still alive.
start-warm     constructor until 32 workers exist and each ran an item (a barrier round of 32),
               in this program, where procpool's helpers, the multiprocessing fork server and
               loky's helpers already run (the warm-up started them).
start-cold     the same, as the first pool of a fresh interpreter (a child process per sample;
               it pays for starting the fork server, and procpool for its Manager too). The
               contender's module and pool class are imported before the clock starts; what
               making the first pool imports (procpool: the Manager's machinery) is timed.
throughput     2 workers, submit 20,000 trivial items one at a time (cf/loky/procpool
               ``submit``, mp-pool/billiard ``apply_async``, pebble ``schedule``), then wait
               for all: items/s. The timed loop calls each pool's own method directly. Each
               sample runs in a fresh interpreter, as map's (below).
map            2 workers, ``map(fn, range(1,000,000), chunksize=10,000)``, results collected
               in a list: items/s. procpool runs it through ``procpool.ProcessPoolExecutor``
               when that exists (skipped with a note otherwise). Each sample runs in a fresh
               interpreter (pool start and barrier round untimed there): the big lists would
               otherwise stay in this process's heap and slow down every later fork of it.
latency        2 workers, one item at a time (submit, then wait for the result): the median
               round trip of ~2,000 items, in µs.
mixed          64 items that block 50 ms (time.sleep) interleaved with 64 that burn 20 ms of
               CPU time, all submitted at once to a fresh pool; wall time until the last
               result. procpool: a ``Workqueue`` (its pool's concurrency management gives the
               blocked items workers of their own, up to max(32, 4 x CPUs)); peers: os.cpu_count()
               workers. Pool start and teardown untimed. Also prints procpool's peak worker count.
floors         what the machine allows, no pool involved: a 1-byte ping-pong between two
               processes over a pipe, over a socketpair, and with multiprocessing Connections
               (procpool's own transport); and 64 processes forked, blocked on a pipe, woken at
               once by closing it, exiting and reaped (a teardown floor), both as children of
               this (large) process and of a fresh interpreter.

Barrier round: N items of ``_barrier_item``; each opens a FIFO for reading (non-blocking), checks
in by creating a file named after its pid, then waits (poll, no CPU) for one byte of the FIFO.
The parent waits until N distinct pids checked in, then writes N bytes. An item holds its worker
until then, so N check-ins means N distinct live workers.

Fairness: before every sample the script runs the cyclic GC, so that no closed procpool pool
(and its Manager lock proxies, which every multiprocessing fork child increfs at fork and decrefs
at exit) is still alive when a fork-based peer forks its workers, and hands freed heap back to
the OS (glibc malloc_trim), so that the map benchmark's big lists do not make every later fork
of this process slower. Every pool is closed, on error
too (then without waiting for pending items), and a leak check at the end looks for stray
processes, zombies and shared memory.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import ctypes
import functools
import gc
import importlib
import json
import multiprocessing
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

ALL_PEERS = ("cf-fork", "cf-forkserver", "mp-pool", "loky", "billiard", "pebble")
OPTIONAL_PEERS = {"loky": "loky", "billiard": "billiard", "pebble": "pebble"}  # contender -> module
ALL_CONTENDERS = ("procpool", *ALL_PEERS)
BENCH_NAMES = (
    "import",
    "memory",
    "scale",
    "teardown-8",
    "teardown-64",
    "destroy",
    "start-warm",
    "start-cold",
    "throughput",
    "map",
    "latency",
    "mixed",
    "floors",
)
BARRIER_TIMEOUT = 60.0
W = 24  # width of the benchmark column
ABORT_GRACE = 1.0
MAP_CHUNKSIZE = 10_000
FLOOR_PROCS = 64
MIXED_ITEMS = 64  # of each kind
MIXED_BLOCK = 0.050  # seconds a blocking item sleeps
MIXED_BURN = 0.020  # seconds of CPU time a CPU item burns
SCALE_SIZES = (8, 64, 256)
SCALE_ITEMS = 10  # items per worker
MEMORY_WORKERS = 8
#: import benchmark: contender -> the statement timed in a fresh interpreter. "cf" is the
#: standard library's process pool module (what ``concurrent.futures.ProcessPoolExecutor``
#: loads); "procpool: WorkerPool" (information, not a peer) what a program that makes a pool
#: imports before its first pool.
IMPORTS = {
    "procpool": "import procpool",
    "procpool:WorkerPool": "from procpool import WorkerPool",
    "cf": "import concurrent.futures.process",
    "loky": "import loky",
    "billiard": "import billiard",
    "pebble": "import pebble",
}

# -- functions run in the workers (module level, so every start method can pickle them) ------


def noop(x: Any) -> Any:
    return x


def block_item(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def burn_item(seconds: float) -> float:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return seconds


def _barrier_item(dirpath: str, timeout: float) -> int:
    fd = os.open(os.path.join(dirpath, "go"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.close(os.open(os.path.join(dirpath, f"w{os.getpid()}"), os.O_CREAT | os.O_WRONLY, 0o600))
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("barrier: the parent never released the workers")
            poller.poll(left * 1000)
            try:
                if os.read(fd, 1):
                    return os.getpid()
            except BlockingIOError:
                pass  # another worker took the byte; wait for the next one
    finally:
        os.close(fd)


# -- contenders ----------------------------------------------------------------------------


def procpool_executor() -> Any:
    """``procpool.ProcessPoolExecutor`` if this procpool has it, else None."""
    import procpool

    return getattr(procpool, "ProcessPoolExecutor", None)


class _AsyncResult:
    """An mp-pool / billiard AsyncResult seen as a future (for the untimed barrier round)."""

    __slots__ = ("_r",)

    def __init__(self, r: Any) -> None:
        self._r = r

    def done(self) -> bool:
        return self._r.ready()

    def result(self, timeout: float | None = None) -> Any:
        return self._r.get(timeout)


class Pool:
    """One contender's pool of ``n`` workers behind one small interface.

    ``style`` says how the pool's own API is called: "futures" (``submit(fn, *args)`` returns a
    concurrent.futures.Future: procpool, cf, loky), "mp" (``apply_async(fn, args)`` returns an
    AsyncResult: mp-pool, billiard) or "pebble" (``schedule(fn, args)`` returns a Future).
    ``native`` is that bound method: the timed loops call it directly, so the adapter costs
    nobody anything. ``executor=True`` makes procpool's contender its ProcessPoolExecutor.
    """

    def __init__(self, contender: str, n: int, *, executor: bool = False, **kw: Any) -> None:
        self.contender, self.n, self.closed = contender, n, False
        c = contender
        if c == "procpool":
            import procpool  # imported lazily: the peer's fork server preloads __main__

            if executor:
                cls = procpool_executor()
                if cls is None:
                    raise RuntimeError("procpool.ProcessPoolExecutor does not exist")
                self.raw = cls(max_workers=n, **kw)
            else:
                self.raw = procpool.WorkerPool(min_workers=n, max_workers=n, **kw)
            self.style, self.native = "futures", self.raw.submit
        elif c in ("cf-fork", "cf-forkserver"):
            self.raw = cf.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context(c[3:]))
            self.style, self.native = "futures", self.raw.submit
        elif c == "loky":
            import loky

            self.raw = loky.ProcessPoolExecutor(max_workers=n)
            self.style, self.native = "futures", self.raw.submit
        elif c == "mp-pool":
            self.raw = multiprocessing.get_context("fork").Pool(n)
            self.style, self.native = "mp", self.raw.apply_async
        elif c == "billiard":
            import billiard

            self.raw = billiard.Pool(n)
            self.style, self.native = "mp", self.raw.apply_async
        elif c == "pebble":
            import pebble

            self.raw = pebble.ProcessPool(max_workers=n, context=multiprocessing.get_context("fork"))
            self.style, self.native = "pebble", self.raw.schedule
        else:
            raise ValueError(f"unknown contender {c!r}")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Anything with ``done()`` and ``result(timeout)``."""
        if self.style == "mp":
            return _AsyncResult(self.native(fn, args))
        if self.style == "pebble":
            return self.native(fn, args)
        return self.native(fn, *args)

    def map_list(self, fn: Callable[..., Any], items: int, chunksize: int) -> list:
        it = range(items)
        if self.style == "mp":
            return self.raw.map(fn, it, chunksize)
        if self.style == "pebble":
            return list(self.raw.map(fn, it, chunksize=chunksize).result())
        return list(self.raw.map(fn, it, chunksize=chunksize))  # WorkerPool has no map: AttributeError

    def nr_processes(self) -> int | None:
        raw = self.raw
        if self.contender == "procpool":
            wp = getattr(raw, "pool", raw)  # the executor's WorkerPool
            return wp.stats().nr_workers if hasattr(wp, "stats") else None
        if self.style == "futures":
            return len(raw._processes or {})
        if self.style == "mp":
            return sum(p.is_alive() for p in raw._pool)
        return len(raw._pool_manager.worker_manager.workers)

    def close(self) -> None:
        """The graceful teardown: pending items run, then every worker is waited for."""
        if self.closed:
            return
        self.closed = True
        if self.style == "futures":
            self.raw.shutdown(wait=True)
        else:
            self.raw.close()
            self.raw.join()

    def abort(self) -> None:
        """Teardown on an error path, bounded: pending items are dropped, busy workers killed."""
        if self.closed:
            return
        self.closed = True
        raw = self.raw
        if self.contender == "procpool":
            wp = getattr(raw, "pool", raw)  # the executor's WorkerPool
            if hasattr(wp, "stats"):  # SIGTERM, then SIGKILL, after ABORT_GRACE
                wp.close(cancel_futures=True, timeout=ABORT_GRACE)
            else:
                raw.shutdown(wait=True, cancel_futures=True)
        elif self.contender == "loky":
            raw.shutdown(wait=True, kill_workers=True)
        elif self.style == "futures":  # cf: running items cannot be cancelled, only killed
            procs = list((raw._processes or {}).values())  # shutdown() forgets them
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.terminate()
            raw.shutdown(wait=True, cancel_futures=True)  # the pool is broken now: returns at once
            for proc in procs:
                proc.join(ABORT_GRACE * 10)
        elif self.style == "mp":
            raw.terminate()
            raw.join()
        else:
            raw.stop()
            raw.join(ABORT_GRACE * 10)


@contextlib.contextmanager
def managed(contender: str, n: int, **kw: Any) -> Iterator[Pool]:
    pool = Pool(contender, n, **kw)
    try:
        yield pool
    except BaseException:
        pool.abort()
        raise
    finally:
        pool.close()  # a no-op once closed or aborted


def barrier_round(pool: Pool, n: int) -> set[int]:
    """Run n items that hold their worker until all n checked in; returns their pids."""
    d = tempfile.mkdtemp(prefix="procpool-bench-")
    wfd = -1
    try:
        os.mkfifo(os.path.join(d, "go"), 0o600)
        wfd = os.open(os.path.join(d, "go"), os.O_RDWR)  # a writer exists from now on
        futs = [pool.submit(_barrier_item, d, BARRIER_TIMEOUT) for _ in range(n)]
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while sum(name.startswith("w") for name in os.listdir(d)) < n:
            if time.monotonic() > deadline or any(f.done() for f in futs):
                break
            time.sleep(0.0002)
        os.write(wfd, b"x" * n)
        pids = {f.result(BARRIER_TIMEOUT + 5) for f in futs}
    finally:
        if wfd >= 0:
            os.close(wfd)
        shutil.rmtree(d, ignore_errors=True)
    if len(pids) != n:
        raise RuntimeError(f"barrier round: {len(pids)} distinct workers ran the {n} items")
    return pids


def check_processes(pool: Pool, n: int) -> None:
    got = pool.nr_processes()
    if got is not None and got != n:
        raise RuntimeError(f"{pool.contender}: {got} processes, wanted {n}")


def settle() -> None:
    """Let results and idle transitions land, collect garbage, before a timed section."""
    time.sleep(0.02)
    gc.collect()


# -- benchmarks: each returns one sample (seconds, items/s, or a dict) --------------------------


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
    left = [p for p in pids if _alive(p)]
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


CHILD_HELPERS: dict[int, float] = {}
CLEANUP_DIRS: list[str] = []  # temporary directories to remove at the end of the run


def in_child(kind: str, contender: str, **params: int) -> float:
    """One sample of ``kind`` ("start", "map", "throughput") in a fresh interpreter (this script
    with --child). start: the cold start. map and throughput: their bursts of a million
    results or 20,000 futures leave tens of MB in the heap of the process that ran them
    (pebble's map ~80 MB; glibc keeps much of it even after malloc_trim), and every later fork
    of that process would pay for it: the fork-based peers' start, and their teardown."""
    argv = ["--child", kind, "--contender", contender]
    for k, v in params.items():
        argv += [f"--{k}", str(v)]
    return float(_run_child(argv)["value"])


def _run_child(argv: list[str]) -> dict[str, Any]:
    """Run this script with ``argv`` in a fresh interpreter; its last line is a JSON object whose
    "helpers" (pid -> create time) must be gone by the leak check."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {argv} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    CHILD_HELPERS.update((int(pid), ct) for pid, ct in res.get("helpers", {}).items())
    return res


def bench_throughput(contender: str, items: int) -> float:
    with managed(contender, 2) as pool:
        barrier_round(pool, 2)
        settle()
        sub = pool.native
        t0 = time.perf_counter()
        if pool.style == "futures":
            hs = [sub(noop, i) for i in range(items)]
            cf.wait(hs)
        elif pool.style == "pebble":
            hs = [sub(noop, (i,)) for i in range(items)]
            cf.wait(hs)
        else:
            hs = [sub(noop, (i,)) for i in range(items)]
            for h in hs:
                h.wait()
        dt = time.perf_counter() - t0
        get = (lambda h: h.get(0)) if pool.style == "mp" else (lambda h: h.result(0))
        bad = 0
        for i, h in enumerate(hs):
            try:
                bad += get(h) != i
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
        sub, pc = pool.native, time.perf_counter
        samples = []
        if pool.style == "futures":
            for i in range(items):
                t0 = pc()
                sub(noop, i).result()
                samples.append(pc() - t0)
        elif pool.style == "pebble":
            for i in range(items):
                t0 = pc()
                sub(noop, (i,)).result()
                samples.append(pc() - t0)
        else:
            for i in range(items):
                t0 = pc()
                sub(noop, (i,)).get()
                samples.append(pc() - t0)
    return statistics.median(samples)


MIXED_PEAKS: list[int] = []  # procpool's peak worker count, one per mixed sample


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
            MIXED_PEAKS.append(wq.pool.stats().nr_workers)
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


# -- floors: no pool, just the OS -------------------------------------------------------------


def _fork_child(body: Callable[[], None]) -> int:
    """Fork a child that runs ``body`` and leaves with os._exit (never returns in the child)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException:  # noqa: BLE001 - a failed child exits with status 1
            code = 1
        finally:
            os._exit(code)
    return pid


def _reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"floor child {pid} failed: status {status}")


def floor_pingpong(kind: str, items: int) -> float:
    """Median round trip of one byte between this process and a forked child, in seconds."""
    if kind == "pipe":
        down_r, down_w = os.pipe()  # parent -> child
        up_r, up_w = os.pipe()  # child -> parent
        send, recv = functools.partial(os.write, down_w, b"x"), functools.partial(os.read, up_r, 1)

        def body() -> None:
            os.close(down_w)
            os.close(up_r)
            while os.read(down_r, 1):
                os.write(up_w, b"y")

        theirs, ours = [down_r, up_w], [down_w, up_r]
    elif kind == "socketpair":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        send, recv = functools.partial(a.send, b"x"), functools.partial(a.recv, 1)

        def body() -> None:
            a.close()
            while b.recv(1):
                b.send(b"y")

        theirs, ours = [b], [a]
    elif kind == "connection":
        ca, cb = multiprocessing.Pipe(duplex=True)  # a socketpair, as procpool's workers have
        send, recv = functools.partial(ca.send_bytes, b"x"), ca.recv_bytes

        def body() -> None:
            ca.close()
            with contextlib.suppress(EOFError):
                while True:
                    cb.send_bytes(cb.recv_bytes())

        theirs, ours = [cb], [ca]
    else:
        raise ValueError(kind)
    try:
        pid = _fork_child(body)
    except BaseException:
        _close_all(theirs + ours)
        raise
    try:
        _close_all(theirs)
        pc = time.perf_counter
        samples = []
        for i in range(items + 50):
            t0 = pc()
            send()
            recv()
            if i >= 50:
                samples.append(pc() - t0)
    finally:
        _close_all(ours)  # the child sees EOF and exits
        _reap(pid)
    return statistics.median(samples)


def _close_all(objs: list[Any]) -> None:
    for o in objs:
        os.close(o) if isinstance(o, int) else o.close()


def floor_exit(n: int) -> dict[str, float]:
    """Fork n children of this process that block on a pipe; close it (all wake at once); time
    until every one exited and was reaped. Also the fork time (n forks, until all are ready)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pids: list[int] = []

    def body() -> None:
        os.close(go_w)
        os.close(ready_r)
        os.write(ready_w, b"r")
        os.read(go_r, 1)  # EOF when the parent closes go_w

    try:
        t0 = time.perf_counter()
        for _ in range(n):
            pids.append(_fork_child(body))
        os.close(ready_w)
        ready_w = -1
        got = 0
        while got < n:
            chunk = os.read(ready_r, n)
            if not chunk:
                raise RuntimeError("floor: a child died before it was ready")
            got += len(chunk)
        forked = time.perf_counter() - t0
        gc.collect()
        t0 = time.perf_counter()
        os.close(go_w)
        go_w = -1
        while pids:
            _reap(pids.pop())
        teardown = time.perf_counter() - t0
    finally:
        for fd in (ready_r, ready_w, go_r, go_w):
            if fd >= 0:
                os.close(fd)
        for pid in pids:  # error path: the closed pipe wakes them; reap them all
            with contextlib.suppress(Exception):
                os.waitpid(pid, 0)
    return {"fork": forked, "teardown": teardown, "rss_mb": _rss_mb()}


def _rss_mb() -> float:
    """Resident set size now (ru_maxrss would not do: Linux keeps it across exec)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- running ----------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Bench:
    def __init__(self, name: str, unit: str, scale: float, higher_better: bool, contenders: tuple[str, ...]) -> None:
        self.name, self.unit, self.scale, self.higher_better = name, unit, scale, higher_better
        self.contenders = contenders
        self.samples: dict[str, list[float]] = {c: [] for c in contenders}
        self.errors: dict[str, list[str]] = {c: [] for c in contenders}
        self.note = ""
        self.wall = 0.0  # seconds spent on this benchmark's samples, setup included
        self.max_rounds: int | None = None  # run in the first rounds only

    def median(self, c: str) -> float | None:
        s = self.samples.get(c)
        return statistics.median(s) if s else None

    def ratio(self, peer: str) -> float | None:
        a, b = self.median("procpool"), self.median(peer)
        return a / b if a is not None and b else None

    def best_peer(self) -> str | None:
        meds = [
            (m, c)
            for c in self.contenders
            if c != "floor" and not c.startswith("procpool") and (m := self.median(c)) is not None
        ]
        if not meds:
            return None
        return (max if self.higher_better else min)(meds)[1]


def warm_up(peers: tuple[str, ...], skipped: dict[str, str]) -> tuple[str, ...]:
    """Start the shared machinery once, untimed: procpool first, so that it starts the fork
    server (with procpool.worker preloaded) and its Manager; then each peer once (loky starts
    its resource tracker here, multiprocessing its own). A peer that fails here is skipped;
    procpool failing ends the run. Returns the peers that work."""
    with managed("procpool", 1) as pool:
        barrier_round(pool, 1)
    ok = []
    for c in peers:
        try:
            with managed(c, 1) as pool:
                barrier_round(pool, 1)
        except Exception as e:  # noqa: BLE001 - a peer that fails is skipped, and said so
            skipped[c] = f"failed its warm-up ({type(e).__name__}: {e})"
            print(f"  peer {c}: skipped, {skipped[c]}", flush=True)
        else:
            ok.append(c)
    return tuple(ok)


def available_peers(wanted: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    ok, skipped = [], {}
    for c in wanted:
        mod = OPTIONAL_PEERS.get(c)
        if mod is not None:
            try:
                importlib.import_module(mod)
            except Exception as e:  # noqa: BLE001 - not installed, or broken: skip it, say why
                skipped[c] = f"not importable ({type(e).__name__}: {e})"
                continue
        ok.append(c)
    return tuple(ok), skipped


def select_benches(only: str | None) -> set[str]:
    if not only:
        return set(BENCH_NAMES)
    chosen = set()
    for word in (w.strip() for w in only.split(",")):
        hits = [b for b in BENCH_NAMES if b == word or b.startswith(word + "-")]
        if not word or not hits:
            raise ValueError(f"unknown benchmark {word!r}; names: {', '.join(BENCH_NAMES)}, teardown, start")
        chosen.update(hits)
    return chosen


def select_peers(peers: str | None) -> tuple[str, ...]:
    if not peers or peers == "all":
        return ALL_PEERS
    out = []
    for word in (w.strip() for w in peers.split(",")):
        if word not in ALL_PEERS:
            raise ValueError(f"unknown peer {word!r}; peers: {', '.join(ALL_PEERS)}")
        if word not in out:
            out.append(word)
    return tuple(out)


def run(args: argparse.Namespace, chosen: set[str], wanted_peers: tuple[str, ...]) -> dict[str, Any]:
    q = args.quick
    cfg = {
        "rounds": args.rounds if args.rounds is not None else (2 if q else 5),
        "destroy_workers": 8 if q else 16,
        "start_workers": 32,
        "cold_rounds": 1 if q else 5,
        "heavy_rounds": 1 if q else None,  # teardown-64, start-32 warm: their samples start 64 / 32 workers
        "throughput_items": 5000 if q else 20000,
        "map_items": 200_000 if q else 1_000_000,
        "map_chunksize": MAP_CHUNKSIZE,
        "latency_items": 500 if q else 2000,
        "pingpong_items": 500 if q else 2000,
        "floor_procs": FLOOR_PROCS,
    }
    peers, skipped = available_peers(wanted_peers)
    print(f"procpool bench: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, config {cfg}", flush=True)
    print(f"benchmarks: {', '.join(b for b in BENCH_NAMES if b in chosen)}", flush=True)
    import procpool

    print(f"contenders: procpool, {', '.join(peers)}", flush=True)
    print(f"  procpool {procpool.__version__} from {os.path.dirname(procpool.__file__)}", flush=True)
    for c, why in skipped.items():
        print(f"  peer {c}: skipped, {why}", flush=True)
    for c in peers:
        if c in OPTIONAL_PEERS:
            mod = importlib.import_module(OPTIONAL_PEERS[c])
            print(f"  peer {c}: {OPTIONAL_PEERS[c]} {getattr(mod, '__version__', '?')}", flush=True)
    print(f"load average at start: {_load()}", flush=True)
    if os.getloadavg()[0] > 1.0:
        print("  warning: the machine is busy (load average > 1): expect noisy numbers", flush=True)

    t_start = time.perf_counter()
    peers = warm_up(peers, skipped)
    warm_wall = time.perf_counter() - t_start
    contenders = ("procpool", *peers)
    helpers = descendants()
    has_executor = procpool_executor() is not None

    n_start = cfg["start_workers"]
    benches: list[tuple[Bench, Callable[[str], Any]]] = []
    if "import" in chosen:
        import_cache = tempfile.mkdtemp(prefix="procpool-bench-pyc-")
        CLEANUP_DIRS.append(import_cache)
        imp = tuple(c for c in IMPORTS if c.startswith("procpool") or c == "cf" or c in peers)
        for c in imp:  # warm the byte code cache, untimed
            bench_import(c, import_cache)
        b = Bench("import", "ms", 1e3, False, imp)
        benches.append((b, lambda c: bench_import(c, import_cache)))
    if "memory" in chosen:
        b = Bench(f"memory per idle worker (USS, {MEMORY_WORKERS} idle)", "MiB", 2.0**-20, False, contenders)
        benches.append((b, lambda c: bench_memory(c, MEMORY_WORKERS)))
    if "scale" in chosen:
        for n in SCALE_SIZES:
            scale_contenders = tuple(c for c in contenders if c in ("procpool", "cf-fork"))
            b = Bench(f"scale-{n} per worker", "ms", 1e3, False, scale_contenders)
            benches.append((b, lambda c, n=n: bench_scale(c, n)))
    for n in (8, 64):
        if f"teardown-{n}" in chosen:
            b = Bench(f"teardown-{n}", "ms", 1e3, False, contenders)
            benches.append((b, lambda c, n=n: bench_teardown(c, n)))
    if "start-warm" in chosen:
        benches.append(
            (Bench(f"start-{n_start} warm", "ms", 1e3, False, contenders), lambda c: bench_start(c, n_start))
        )
    if "throughput" in chosen:
        b = Bench("throughput", "items/s", 1.0, True, contenders)
        benches.append((b, lambda c: in_child("throughput", c, items=cfg["throughput_items"])))
    if "map" in chosen:
        b = Bench("map", "items/s", 1.0, True, contenders if has_executor else peers)
        if not has_executor:
            b.note = "procpool skipped: procpool.ProcessPoolExecutor does not exist yet"
        benches.append((b, lambda c: in_child("map", c, items=cfg["map_items"], chunksize=cfg["map_chunksize"])))
    if "latency" in chosen:
        b = Bench("latency", "µs", 1e6, False, contenders)
        benches.append((b, lambda c: bench_latency(c, cfg["latency_items"])))
    if "mixed" in chosen:
        b = Bench("mixed", "ms", 1e3, False, contenders)
        benches.append((b, lambda c: bench_mixed(c, MIXED_ITEMS)))
    for b, _ in benches:
        if b.name in ("teardown-64", f"start-{n_start} warm"):
            b.max_rounds = cfg["heavy_rounds"]
    start_cold = Bench(f"start-{n_start} cold", "ms", 1e3, False, contenders) if "start-cold" in chosen else None
    if start_cold is not None:
        start_cold.max_rounds = cfg["cold_rounds"]
    floors: list[tuple[Bench, Callable[[str], Any]]] = []
    floor_info: dict[str, list[float]] = collections.defaultdict(list)
    if "floors" in chosen:
        for kind in ("pipe", "socketpair", "connection"):
            b = Bench(f"ping-pong {kind}", "µs", 1e6, False, ("floor",))
            floors.append((b, lambda c, kind=kind: floor_pingpong(kind, cfg["pingpong_items"])))
        fork_here = Bench(f"fork {FLOOR_PROCS}, here", "ms", 1e3, False, ("floor",))
        exit_here = Bench(f"wake+exit+reap {FLOOR_PROCS}, here", "ms", 1e3, False, ("floor",))
        fork_fresh = Bench(f"fork {FLOOR_PROCS}, fresh", "ms", 1e3, False, ("floor",))
        exit_fresh = Bench(f"wake+exit+reap {FLOOR_PROCS}, fresh", "ms", 1e3, False, ("floor",))

        def exit_floor(fork_b: Bench, exit_b: Bench, fresh: bool) -> Callable[[str], float]:
            def fn(c: str) -> float:
                res = _run_child(["--floor-child", str(FLOOR_PROCS)]) if fresh else floor_exit(FLOOR_PROCS)
                fork_b.samples["floor"].append(res["fork"])
                floor_info["rss_mb_fresh" if fresh else "rss_mb_here"].append(res["rss_mb"])
                return res["teardown"]

            return fn

        floors.append((exit_here, exit_floor(fork_here, exit_here, False)))
        floors.append((exit_fresh, exit_floor(fork_fresh, exit_fresh, True)))
        floor_benches = [b for b, _ in floors[:3]] + [fork_here, exit_here, fork_fresh, exit_fresh]
    else:
        floor_benches = []
    destroy_calls: list[float] = []
    destroy_info: list[dict[str, Any]] = []
    destroy_errors: list[str] = []
    destroy_wall = 0.0

    rounds = cfg["rounds"]
    for r in range(rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        print(
            f"round {r + 1}/{rounds} (order: {', '.join(order)}; load {_load()}; rss {_rss_mb():.0f} MB) ...",
            flush=True,
        )
        for bench, fn in benches:
            if bench.max_rounds is not None and r >= bench.max_rounds:
                continue
            # In the round's order; a benchmark with contenders of its own (import) rotates those.
            own = bench.contenders
            for c in order if set(own) <= set(order) else own[r % len(own) :] + own[: r % len(own)]:
                if c in own:
                    _sample(bench, c, fn)
        if "destroy" in chosen:
            gc.collect()
            _trim_heap()
            t0 = time.perf_counter()
            try:
                d = bench_destroy(cfg["destroy_workers"])
                destroy_calls += d.pop("calls")
                destroy_info.append(d)
            except Exception:  # noqa: BLE001 - reported with the run
                destroy_errors.append(traceback.format_exc())
                print(f"  destroy: ERROR\n{destroy_errors[-1]}", flush=True)
            destroy_wall += time.perf_counter() - t0
        if start_cold is not None and r < start_cold.max_rounds:
            for c in order:
                _sample(start_cold, c, lambda c: in_child("start", c, n=n_start))
        for bench, fn in floors:
            _sample(bench, "floor", fn)
    elapsed = time.perf_counter() - t_start
    print(f"load average at end: {_load()}", flush=True)
    for d in CLEANUP_DIRS:
        shutil.rmtree(d, ignore_errors=True)

    all_benches = [b for b, _ in benches] + ([start_cold] if start_cold is not None else [])
    report: dict[str, Any] = {
        "config": cfg,
        "contenders": list(contenders),
        "skipped_peers": skipped,
        "elapsed_s": elapsed,
        "benchmarks": {},
        "floors": {},
        "targets": [],
    }
    report["leaks"] = leak_check(helpers, CHILD_HELPERS)
    print()
    print(f"Results ({rounds} round{'s' * (rounds > 1)}, interleaved, {elapsed:.0f} s): median [min - max] over rounds")
    heavy = [f"{b.name}: {b.max_rounds}" for b in all_benches if b.max_rounds is not None and b.max_rounds < rounds]
    if heavy:
        print(f"(rounds run by the costly benchmarks: {', '.join(heavy)})")
    print("ratio = procpool median / peer median (time: < 1 means procpool is faster; items/s: > 1);")
    print("* marks the best peer of each benchmark")
    print(f"{'benchmark':<{W}} {'contender':<15} {'median':>12} {'min':>11} {'max':>11}  ratio")
    for b in all_benches:
        report["benchmarks"][b.name] = _print_bench(b)
        if b.note:
            print(f"{b.name:<{W}} {'procpool':<15} {'skipped':>12}  ({b.note})")
    if destroy_calls:
        us = sorted(x * 1e6 for x in destroy_calls)
        p90 = us[min(len(us) - 1, int(0.9 * len(us)))]
        dying = [d["nr_dying_after"] for d in destroy_info]
        closes = [d["close"] for d in destroy_info]
        print(
            f"{'destroy_idle(1)':<{W}} {'procpool':<15} {_fmt(statistics.median(us)):>12} {_fmt(us[0]):>11} "
            f"{_fmt(us[-1]):>11}  p90 {_fmt(p90)} µs over {len(us)} calls; workers still dying right after "
            f"the calls: {dying} of {cfg['destroy_workers']}; close() after: {statistics.median(closes):.2f} s "
            f"(fault detach.after=delay:1)"
        )
    if MIXED_PEAKS:
        print(f"{'mixed':<{W}} {'procpool':<15} peak workers per sample: {MIXED_PEAKS}")
        report["benchmarks"]["mixed"]["procpool_peak_workers"] = MIXED_PEAKS
    if "destroy" in chosen:
        report["benchmarks"]["destroy"] = {
            "unit": "s",
            "calls": destroy_calls,
            "rounds": destroy_info,
            "errors": destroy_errors,
        }
    walls = [("warm-up", warm_wall)] + [(b.name, b.wall) for b in all_benches]
    walls += [("destroy", destroy_wall)] if "destroy" in chosen else []
    walls += [("floors", sum(b.wall for b, _ in floors))] if floors else []
    print("wall time per benchmark: " + ", ".join(f"{n} {t:.0f} s" for n, t in walls))
    report["wall_s"] = dict(walls)
    if floor_benches:
        print()
        print("Measured floors (no pool: what this machine allows), median [min - max] over rounds")
        for b in floor_benches:
            report["floors"][b.name] = _print_bench(b)
        here, fresh = floor_info.get("rss_mb_here"), floor_info.get("rss_mb_fresh")
        print(
            f"  'here' = children of this benchmark process (max RSS {max(here or [0]):.0f} MB, like cf-fork, "
            f"mp-pool, billiard and pebble workers); 'fresh' = children of a fresh interpreter "
            f"(max RSS {max(fresh or [0]):.0f} MB, like a fork server's). wake+exit+reap: {FLOOR_PROCS} blocked "
            f"children, their pipe closed at once, until the last one is reaped."
        )
        report["floors"]["rss_mb"] = dict(floor_info)

    targets = _targets({b.name: b for b in all_benches + floor_benches}, destroy_calls, "destroy" in chosen)
    report["targets"] = targets
    print()
    print("Targets (from the issues, 2 cores)")
    print(f"{'target':<66} {'measured':>30}  verdict")
    group = None
    for t in targets:
        if t["group"] != group:
            group = t["group"]
            print(f"-- {group}")
        print(f"{t['target']:<66} {t['measured']:>30}  {t['verdict']}")
    # The command line's start (issue 13): scripts/startup.py, beside this script.
    import startup

    print()
    report["startup"] = startup.measure(3 if q else 10)
    startup.print_report(report["startup"])
    return report


def _print_bench(b: Bench) -> dict[str, Any]:
    entry: dict[str, Any] = {"unit": b.unit, "higher_better": b.higher_better, "contenders": {}}
    best = b.best_peer()
    entry["best_peer"] = best
    for c in b.contenders:
        s = b.samples[c]
        entry["contenders"][c] = {"samples": s, "median": b.median(c), "errors": b.errors[c]}
        label = c + ("*" if c == best else "")
        if not s:
            print(f"{b.name:<{W}} {label:<15} {'ERROR':>12}  ({len(b.errors[c])} errors)")
            continue
        ratio = ""
        if c != "floor" and not c.startswith("procpool"):
            rt = b.ratio(c)
            ratio = _ratio(rt) if rt is not None else "-"
            entry["contenders"][c]["ratio_procpool_over_peer"] = rt
        med, lo, hi = (x * b.scale for x in (b.median(c), min(s), max(s)))
        errs = f"  ({len(b.errors[c])} errors)" if b.errors[c] else ""
        print(f"{b.name:<{W}} {label:<15} {_fmt(med):>12} {_fmt(lo):>11} {_fmt(hi):>11}  {ratio:<6}{errs}  {b.unit}")
    if best is not None and b.median("procpool") is not None:
        rt = b.ratio(best)
        entry["ratio_procpool_over_best_peer"] = rt
        print(f"{'':<{W}} {'vs best peer':<15} procpool / {best} = {_ratio(rt)}")
    return entry


def _sample(bench: Bench, c: str, fn: Callable[[str], float]) -> None:
    # A closed procpool pool is freed by the cyclic GC only, and while it lives its Manager
    # lock proxies make every multiprocessing *fork* child incref them at fork and decref them
    # at exit (BaseProxy's after-fork hook: a Manager connection per child). That would slow
    # the fork-based peers down for reasons that are procpool's, not theirs: collect them first.
    # Then hand freed heap back to the OS: the map benchmark's million-item lists would otherwise
    # leave this process ~100 MB larger, and every later fork (cf-fork, mp-pool, billiard,
    # pebble workers) would pay for copying its page tables.
    gc.collect()
    _trim_heap()
    if c not in ("procpool", "floor") and _live_proxies():
        print(f"  warning: {bench.name} / {c}: Manager proxies alive in the parent", flush=True)
    t0 = time.perf_counter()
    try:
        bench.samples[c].append(fn(c))
    except Exception:  # noqa: BLE001 - reported with the run
        tb = traceback.format_exc()
        bench.errors[c].append(tb)
        print(f"  {bench.name} / {c}: ERROR\n{tb}", flush=True)
    finally:
        bench.wall += time.perf_counter() - t0


def _trim_heap() -> None:
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _live_proxies() -> int:
    from multiprocessing.managers import BaseProxy

    return sum(isinstance(o, BaseProxy) for o in gc.get_objects())


def _targets(by: dict[str, Bench], destroy_calls: list[float], destroy_ran: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a (errors)" if ok is None else "PASS" if ok else "MISS"

    def add(group: str, target: str, rt: float | None, ok: Callable[[float], bool], measured: str = "") -> None:
        out.append(
            {
                "group": group,
                "target": target,
                "measured": measured or (_ratio(rt) if rt is not None else "-"),
                "value": rt,
                "verdict": verdict(None if rt is None else ok(rt)),
            }
        )

    def vs_best(group: str, name: str, what: str, factor: float, higher: bool) -> None:
        b = by.get(name)
        if b is None:
            return
        best = b.best_peer()
        target = f"{what}: procpool {'>=' if higher else '<='} {factor:g}x best peer ({best or '-'})"
        if "procpool" not in b.contenders:
            why = b.note or "procpool not run"
            out.append({"group": group, "target": target, "measured": "-", "value": None, "verdict": f"n/a ({why})"})
            return
        rt = b.ratio(best) if best else None
        add(group, target, rt, (lambda r: r >= factor) if higher else (lambda r: r <= factor))

    g2 = "issue 2"
    td = by.get("teardown-64")
    if td is not None:
        for peer in ("cf-fork", "cf-forkserver"):
            if peer in td.contenders:
                add(g2, f"teardown 64 idle: procpool <= 0.3x {peer} shutdown", td.ratio(peer), lambda r: r <= 0.3)
    if destroy_calls:
        med = statistics.median(destroy_calls) * 1e6
        out.append(
            {
                "group": g2,
                "target": "destroy_idle(1) <= 1 ms (median; slow-exiting workers)",
                "measured": f"{med:.1f} µs (max {max(destroy_calls) * 1e6:.0f})",
                "value": med,
                "verdict": verdict(med <= 1000),
            }
        )
    elif destroy_ran:
        add(g2, "destroy_idle(1) <= 1 ms", None, lambda r: r <= 1000)
    for name in ("start-32 warm", "start-32 cold"):
        b = by.get(name)
        if b is not None and "cf-fork" in b.contenders:
            add(g2, f"{name}: procpool no slower than cf-fork", b.ratio("cf-fork"), lambda r: r <= 1.0)

    g4 = "issue 4 (vs the best peer)"
    vs_best(g4, "throughput", "submit one at a time, items/s", 3.0, True)
    vs_best(g4, "map", "map with chunks, items/s", 1.0, True)
    vs_best(g4, "latency", "one-at-a-time round trip", 0.5, False)
    b = by.get("start-32 cold")
    if b is not None and "cf-fork" in b.contenders:
        add(g4, "start-32 cold: procpool <= 0.5x cf-fork", b.ratio("cf-fork"), lambda r: r <= 0.5)
    vs_best(g4, "teardown-64", "teardown 64 idle", 0.3, False)

    g15 = "issue 15 (vs the best peer measured in this run)"
    b = by.get("import")
    if b is not None and "cf" in b.contenders:
        add(g15, "import procpool <= 1.5x import concurrent.futures.process", b.ratio("cf"), lambda r: r <= 1.5)
        if b.median("procpool:WorkerPool") and b.median("cf"):
            rt = b.median("procpool:WorkerPool") / b.median("cf")
            out.append(
                {
                    "group": g15,
                    "target": "(information) from procpool import WorkerPool / cf.process",
                    "measured": f"{rt:.2f}x",
                    "value": rt,
                    "verdict": "-",
                }
            )
    b = by.get("start-32 cold")
    if b is not None and "cf-fork" in b.contenders:
        add(g15, "start-32 cold, all 32 exist and ran an item: <= 1.0x cf-fork", b.ratio("cf-fork"), lambda r: r <= 1.0)
    vs_best(g15, "teardown-64", "teardown 64 idle", 1.0, False)
    vs_best(g15, "throughput", "submit one at a time, items/s", 3.0, True)
    vs_best(g15, "map", "map with chunks, items/s (no regression)", 1.0, True)
    vs_best(g15, "latency", "one-at-a-time round trip (no regression)", 0.5, False)
    vs_best(g15, f"memory per idle worker (USS, {MEMORY_WORKERS} idle)", "memory per idle worker (USS)", 1.0, False)
    for n in SCALE_SIZES:
        sc = by.get(f"scale-{n} per worker")
        if sc is not None and sc.median("procpool") and sc.median("cf-fork"):
            out.append(
                {
                    "group": g15,
                    "target": f"(information) scale-{n}: ms per worker, procpool / cf-fork",
                    "measured": f"{sc.median('procpool') * 1e3:.2f} / {sc.median('cf-fork') * 1e3:.2f} = "
                    f"{sc.ratio('cf-fork'):.2f}x",
                    "value": sc.ratio("cf-fork"),
                    "verdict": "-",
                }
            )

    mixed = by.get("mixed")
    if mixed is not None:
        for peer in ("cf-fork", "cf-forkserver"):
            if peer in mixed.contenders:
                target = f"mixed blocking + CPU items: procpool <= 0.4x {peer}"
                add("issue 3", target, mixed.ratio(peer), lambda r: r <= 0.4)

    # Context: how far the machine's floor is from the targets (no verdict, information only).
    lat, pp = by.get("latency"), by.get("ping-pong connection")
    if lat is not None and pp is not None and lat.median("procpool") and pp.median("floor"):
        out.append(
            {
                "group": "floors (information)",
                "target": "procpool round trip / Connection ping-pong floor",
                "measured": f"{lat.median('procpool') / pp.median('floor'):.2f}x",
                "value": None,
                "verdict": "-",
            }
        )
    td, fl = by.get("teardown-64"), by.get(f"wake+exit+reap {FLOOR_PROCS}, fresh")
    if td is not None and fl is not None and fl.median("floor"):
        best = td.best_peer()
        goal = 0.3 * td.median(best) if best else None
        pm = td.median("procpool")
        out.append(
            {
                "group": "floors (information)",
                "target": "teardown-64: procpool / 0.3x best peer / exit floor (fresh), ms",
                "measured": " / ".join(f"{x * 1e3:.1f}" if x else "-" for x in (pm, goal, fl.median("floor"))),
                "value": None,
                "verdict": "-",
            }
        )
    return out


def _ratio(rt: float) -> str:
    return f"{rt:.2f}x" if rt >= 0.1 else f"{rt:.3f}x"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


# -- leftovers --------------------------------------------------------------------------------


def descendants() -> dict[int, float]:
    """pid -> create time of every live process below this one."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out[p.pid] = p.create_time()
        except psutil.Error:
            pass
    return out


def still_alive(procs: dict[int, float], grace: float = 3.0) -> list[str]:
    """Those of ``procs`` (pid -> create time) still alive after ``grace`` seconds."""
    import psutil

    deadline = time.monotonic() + grace
    while True:
        left = []
        for pid, ct in procs.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == ct and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"pid {pid} {' '.join(p.cmdline())[:60]!r}")
            except psutil.Error:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def leak_check(helpers: dict[int, float], child_helpers: dict[int, float]) -> list[str]:
    """What this run left behind: processes started after the warm-up (the helpers it started
    -- fork server, resource trackers, procpool's Manager and spawner -- live as long as the
    program), helpers of the children (cold start, map, throughput) still alive after those exited, zombies
    among our children, and procpool id tables of this process in /dev/shm."""
    import psutil

    from procpool.idtable import SHM_DIR, segment_prefix

    problems = []
    new = {pid: ct for pid, ct in descendants().items() if helpers.get(pid) != ct}
    problems += [f"stray process: {s}" for s in still_alive(new)]
    problems += [f"a child's helper outlived it: {s}" for s in still_alive(child_helpers)]
    for p in psutil.Process().children():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                problems.append(f"zombie child: pid {p.pid}")
        except psutil.Error:
            pass
    prefix = f"{segment_prefix()}{os.getpid()}-"
    problems += [f"shared memory left: {n}" for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    return problems


def child_main(args: argparse.Namespace) -> None:
    """--child KIND: one sample in this fresh interpreter, printed as a JSON line."""
    import psutil  # noqa: F401 - imported before the clock starts, as procpool imports it anyway

    c = args.contender
    # import time is not start time (the import benchmark has it): the contender's module and
    # its pool class are loaded before the clock starts, including what a lazy package (procpool,
    # concurrent.futures) loads on first use of the class; what the pool loads when it is made
    # (procpool's Manager machinery) is start time.
    mod = importlib.import_module({"procpool": "procpool", **OPTIONAL_PEERS}.get(c, "concurrent.futures"))
    cls = {"procpool": "WorkerPool", "billiard": "Pool", "pebble": "ProcessPool"}.get(c, "ProcessPoolExecutor")
    getattr(mod, cls, None)
    if args.child == "start":
        value = bench_start(c, args.n)
    elif args.child == "map":
        value = bench_map(c, args.items, args.chunksize)
    else:
        value = bench_throughput(c, args.items)
    # The helpers this program started (fork server, Manager, spawner, resource trackers): the
    # parent checks that they go away with us.
    print(json.dumps({"contender": c, "value": value, "helpers": descendants()}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 5, --quick 2)")
    ap.add_argument("--quick", action="store_true", help="2 rounds, fewer items, costly benchmarks once (< 60 s)")
    ap.add_argument("--only", metavar="NAME[,NAME]", help=f"run these benchmarks only: {', '.join(BENCH_NAMES)}")
    ap.add_argument("--peers", metavar="NAME[,NAME]", help=f"peers to run (default all): {', '.join(ALL_PEERS)}")
    ap.add_argument("--json", metavar="FILE", help="write raw samples and the summary here")
    ap.add_argument("--child", choices=("start", "map", "throughput"), help=argparse.SUPPRESS)
    ap.add_argument("--contender", choices=ALL_CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--items", type=int, default=20000, help=argparse.SUPPRESS)
    ap.add_argument("--chunksize", type=int, default=MAP_CHUNKSIZE, help=argparse.SUPPRESS)
    ap.add_argument("--floor-child", type=int, metavar="N", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return 0
    if args.floor_child:
        print(json.dumps(floor_exit(args.floor_child)))
        return 0
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be >= 1")
    try:
        chosen = select_benches(args.only)
        peers = select_peers(args.peers)
    except ValueError as e:
        ap.error(str(e))
    report = run(args, chosen, peers)
    problems = report["leaks"]
    print()
    print("Leak check: " + ("no stray processes, no shared memory left" if not problems else "; ".join(problems)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
