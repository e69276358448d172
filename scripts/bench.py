#!/usr/bin/env python3
"""procpool vs concurrent.futures.ProcessPoolExecutor, side by side, in one run.

    .venv/bin/python scripts/bench.py [--rounds N] [--quick] [--json FILE]

Contenders: ``procpool`` (WorkerPool, forkserver workers, the default) and the peer
``ProcessPoolExecutor`` with ``mp_context`` fork (``cf-fork``) and forkserver
(``cf-forkserver``). The run is interleaved: every round runs every benchmark once per
contender (the contender order rotates from round to round), so machine noise hits all of
them alike. Each benchmark reports the median over rounds with the min-max spread, and the
procpool/peer ratio of the medians.

Benchmarks
==========

teardown-N   N idle workers (N = 8, 64), then time ``close()`` / ``shutdown(wait=True)``.
             Before timing, every contender runs one *barrier round* (below), which proves
             that all N processes exist, started and ran an item, and are idle again.
             CPython's executor starts workers on demand with forkserver (one per submit that
             finds no idle worker) and all at once on the first submit with fork; the barrier
             round makes both have N processes, and the script also checks
             ``len(executor._processes) == N`` (procpool: ``stats().nr_workers == nr_idle == N``).
destroy      procpool only: ``destroy_idle(1)`` wall time, one call per idle worker, with the
             fault ``detach.after=delay:1`` so that every destroyed worker takes 1 s more to
             exit; ``nr_dying`` right after the calls shows the workers were still alive.
start-32     constructor until 32 workers exist and each ran an item (a barrier round of 32).
             "warm": in this program, where the fork server (shared by procpool and
             cf-forkserver) and procpool's Manager process already run. "cold": the first
             pool of a fresh interpreter (a child process per sample; it pays for starting the
             fork server, and procpool for its Manager too).
throughput   2 workers, submit 20,000 trivial items then wait for all: items/s.
latency      2 workers, one item at a time (submit, then wait for the result): the median
             round trip of ~2,000 items, in µs.

Barrier round: N items of ``_barrier_item``; each opens a FIFO for reading (non-blocking), checks
in by creating a file named after its pid, then waits (poll, no CPU) for one byte of the FIFO.
The parent waits until N distinct pids checked in, then writes N bytes. An item holds its worker
until then, so N check-ins means N distinct live workers.

Fairness: before every sample the script runs the cyclic GC, so that no closed procpool pool
(and its Manager lock proxies, which every multiprocessing fork child increfs at fork and decrefs
at exit) is still alive when the cf-fork peer forks its workers.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import gc
import json
import multiprocessing
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

CONTENDERS = ("procpool", "cf-fork", "cf-forkserver")
PEERS = CONTENDERS[1:]
BARRIER_TIMEOUT = 60.0

# -- functions run in the workers (module level, so every start method can pickle them) ------


def noop(x: Any) -> Any:
    return x


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


def make(contender: str, n: int, **kw: Any) -> Any:
    """A pool of exactly ``n`` workers (procpool starts them at once; the peer on first use)."""
    if contender == "procpool":
        from procpool import WorkerPool  # imported lazily: the peer's fork server preloads __main__

        return WorkerPool(min_workers=n, max_workers=n, **kw)
    method = contender.split("-", 1)[1]
    return cf.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context(method))


def shut(ex: Any) -> None:
    if isinstance(ex, cf.ProcessPoolExecutor):
        ex.shutdown(wait=True)
    else:
        ex.close()


@contextlib.contextmanager
def managed(contender: str, n: int, **kw: Any) -> Iterator[Any]:
    ex = make(contender, n, **kw)
    try:
        yield ex
    finally:
        shut(ex)  # idempotent for both; closes on error too


def nr_processes(ex: Any) -> int:
    if isinstance(ex, cf.ProcessPoolExecutor):
        return len(ex._processes or {})
    return ex.stats().nr_workers


def barrier_round(ex: Any, n: int) -> set[int]:
    """Run n items that hold their worker until all n checked in; returns their pids."""
    d = tempfile.mkdtemp(prefix="procpool-bench-")
    wfd = -1
    try:
        os.mkfifo(os.path.join(d, "go"), 0o600)
        wfd = os.open(os.path.join(d, "go"), os.O_RDWR)  # a writer exists from now on
        futs = [ex.submit(_barrier_item, d, BARRIER_TIMEOUT) for _ in range(n)]
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


def settle() -> None:
    """Let results and idle transitions land, collect garbage, before a timed section."""
    time.sleep(0.02)
    gc.collect()


# -- benchmarks: each returns one sample (seconds, items/s, or a list) ---------------------------


def bench_teardown(contender: str, n: int) -> float:
    with managed(contender, n) as ex:
        pids = barrier_round(ex, n)
        if nr_processes(ex) != n:
            raise RuntimeError(f"{contender}: {nr_processes(ex)} processes, wanted {n}")
        if contender == "procpool":
            s = ex.stats()
            if (s.nr_workers, s.nr_idle) != (n, n):
                raise RuntimeError(f"procpool not all idle before teardown: {s}")
        settle()
        t0 = time.perf_counter()
        shut(ex)
        dt = time.perf_counter() - t0
    left = [p for p in pids if _alive(p)]
    if left:
        raise RuntimeError(f"{contender}: {len(left)} workers still alive after teardown")
    return dt


def bench_destroy(k: int) -> dict[str, Any]:
    """k idle workers whose exit takes 1 s more; destroy them one at a time."""
    with managed("procpool", k, faults="detach.after=delay:1") as pool:
        barrier_round(pool, k)
        settle()
        calls = []
        for _ in range(k):
            t0 = time.perf_counter()
            got = pool.destroy_idle(1)
            calls.append(time.perf_counter() - t0)
            if got != 1:
                raise RuntimeError(f"destroy_idle(1) destroyed {got}")
            time.sleep(0.002)  # later calls run while earlier victims are dying
        dying = pool.stats().nr_dying
        t0 = time.perf_counter()
        pool.close()
        close = time.perf_counter() - t0
    return {"calls": calls, "nr_dying_after": dying, "close": close}


def bench_start(contender: str, n: int) -> float:
    t0 = time.perf_counter()
    ex = make(contender, n)
    try:
        barrier_round(ex, n)
        dt = time.perf_counter() - t0
        if nr_processes(ex) != n:
            raise RuntimeError(f"{contender}: {nr_processes(ex)} processes, wanted {n}")
    finally:
        shut(ex)
    return dt


COLD_HELPERS: dict[int, float] = {}


def bench_start_cold(contender: str, n: int) -> float:
    """One cold start, in a fresh interpreter (this script with --cold-child)."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--cold-child", contender, "--cold-n", str(n)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        raise RuntimeError(f"cold child failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    COLD_HELPERS.update((int(pid), ct) for pid, ct in res["helpers"].items())
    return float(res["seconds"])


def bench_throughput(contender: str, items: int) -> float:
    with managed(contender, 2) as ex:
        barrier_round(ex, 2)
        settle()
        t0 = time.perf_counter()
        futs = [ex.submit(noop, i) for i in range(items)]
        cf.wait(futs)
        dt = time.perf_counter() - t0
        bad = sum(f.exception() is not None or f.result() != i for i, f in enumerate(futs))
        if bad:
            raise RuntimeError(f"{contender}: {bad} items failed")
    return items / dt


def bench_latency(contender: str, items: int) -> float:
    with managed(contender, 2) as ex:
        barrier_round(ex, 2)
        for i in range(50):
            ex.submit(noop, i).result()
        settle()
        samples = []
        for i in range(items):
            t0 = time.perf_counter()
            ex.submit(noop, i).result()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- running ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, name: str, unit: str, scale: float, higher_better: bool, contenders: tuple[str, ...]) -> None:
        self.name, self.unit, self.scale, self.higher_better = name, unit, scale, higher_better
        self.contenders = contenders
        self.samples: dict[str, list[float]] = {c: [] for c in contenders}
        self.errors: dict[str, list[str]] = {c: [] for c in contenders}

    def median(self, c: str) -> float | None:
        s = self.samples[c]
        return statistics.median(s) if s else None

    def ratio(self, peer: str) -> float | None:
        a, b = self.median("procpool"), self.median(peer)
        return a / b if a is not None and b else None


def warm_up() -> None:
    """Start the shared machinery once, untimed: procpool first, so that it starts the fork
    server (with procpool.worker preloaded) and its Manager; then each peer once."""
    with managed("procpool", 1) as pool:
        barrier_round(pool, 1)
    for c in PEERS:
        with managed(c, 1) as ex:
            barrier_round(ex, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick
    cfg = {
        "rounds": args.rounds if args.rounds is not None else (2 if q else 7),
        "teardown_sizes": [8, 64],
        "destroy_workers": 8 if q else 16,
        "start_workers": 32,
        "cold_rounds": 1 if q else 5,
        "throughput_items": 5000 if q else 20000,
        "latency_items": 500 if q else 2000,
    }
    n_start = cfg["start_workers"]
    benches: list[tuple[Bench, Callable[[str], float]]] = []
    for n in cfg["teardown_sizes"]:
        benches.append((Bench(f"teardown-{n}", "ms", 1e3, False, CONTENDERS), lambda c, n=n: bench_teardown(c, n)))
    start_warm = Bench(f"start-{n_start} warm", "ms", 1e3, False, CONTENDERS)
    benches.append((start_warm, lambda c: bench_start(c, n_start)))
    thr = Bench("throughput", "items/s", 1.0, True, CONTENDERS)
    benches.append((thr, lambda c: bench_throughput(c, cfg["throughput_items"])))
    lat = Bench("latency", "µs", 1e6, False, CONTENDERS)
    benches.append((lat, lambda c: bench_latency(c, cfg["latency_items"])))
    start_cold = Bench(f"start-{n_start} cold", "ms", 1e3, False, CONTENDERS)
    destroy_calls: list[float] = []
    destroy_info: list[dict[str, Any]] = []
    destroy_errors: list[str] = []

    print(f"procpool bench: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, config {cfg}", flush=True)
    print(f"load average at start: {_load()}", flush=True)
    t_start = time.perf_counter()
    warm_up()
    helpers = descendants()
    rounds = cfg["rounds"]
    for r in range(rounds):
        order = CONTENDERS[r % len(CONTENDERS) :] + CONTENDERS[: r % len(CONTENDERS)]
        print(f"round {r + 1}/{rounds} (order: {', '.join(order)}) ...", flush=True)
        for bench, fn in benches:
            for c in order:
                _sample(bench, c, fn)
        try:
            d = bench_destroy(cfg["destroy_workers"])
            destroy_calls += d.pop("calls")
            destroy_info.append(d)
        except Exception:
            destroy_errors.append(traceback.format_exc())
            print(f"  destroy: ERROR\n{destroy_errors[-1]}", flush=True)
        if r < cfg["cold_rounds"]:
            for c in order:
                _sample(start_cold, c, lambda c: bench_start_cold(c, n_start))
    elapsed = time.perf_counter() - t_start
    print(f"load average at end: {_load()}", flush=True)

    all_benches = [b for b, _ in benches] + [start_cold]
    report: dict[str, Any] = {"config": cfg, "elapsed_s": elapsed, "benchmarks": {}, "targets": []}
    report["leaks"] = leak_check(helpers, COLD_HELPERS)
    print()
    print(f"Results ({rounds} rounds, interleaved, {elapsed:.0f} s): median [min - max] over rounds")
    print("ratio = procpool median / peer median (time: < 1 means procpool is faster; items/s: > 1)")
    print(f"{'benchmark':<18} {'contender':<14} {'median':>12} {'min':>11} {'max':>11}  ratio")
    for b in all_benches:
        entry: dict[str, Any] = {"unit": b.unit, "higher_better": b.higher_better, "contenders": {}}
        for c in b.contenders:
            s = b.samples[c]
            entry["contenders"][c] = {"samples": s, "median": b.median(c), "errors": b.errors[c]}
            if not s:
                print(f"{b.name:<18} {c:<14} {'ERROR':>12}  ({len(b.errors[c])} errors)")
                continue
            ratio = ""
            if c != "procpool":
                rt = b.ratio(c)
                ratio = f"{rt:.2f}x" if rt is not None else "-"
                entry["contenders"][c]["ratio_procpool_over_peer"] = rt
            med, lo, hi = (x * b.scale for x in (b.median(c), min(s), max(s)))
            errs = f"  ({len(b.errors[c])} errors)" if b.errors[c] else ""
            print(f"{b.name:<18} {c:<14} {_fmt(med):>12} {_fmt(lo):>11} {_fmt(hi):>11}  {ratio}{errs}  {b.unit}")
        report["benchmarks"][b.name] = entry
    if destroy_calls:
        us = sorted(x * 1e6 for x in destroy_calls)
        p90 = us[min(len(us) - 1, int(0.9 * len(us)))]
        dying = [d["nr_dying_after"] for d in destroy_info]
        closes = [d["close"] for d in destroy_info]
        print(
            f"{'destroy_idle(1)':<18} {'procpool':<14} {_fmt(statistics.median(us)):>12} {_fmt(us[0]):>11} "
            f"{_fmt(us[-1]):>11}  p90 {_fmt(p90)} µs over {len(us)} calls; workers still dying right after "
            f"the calls: {dying} of {cfg['destroy_workers']}; close() after: {statistics.median(closes):.2f} s "
            f"(fault detach.after=delay:1)"
        )
    report["benchmarks"]["destroy"] = {
        "unit": "s",
        "calls": destroy_calls,
        "rounds": destroy_info,
        "errors": destroy_errors,
    }

    targets = _targets(all_benches, destroy_calls)
    report["targets"] = targets
    print()
    print("Targets (from the issue, 2 cores)")
    print(f"{'target':<58} {'measured':>22}  verdict")
    for t in targets:
        print(f"{t['target']:<58} {t['measured']:>22}  {t['verdict']}")
    return report


def _sample(bench: Bench, c: str, fn: Callable[[str], float]) -> None:
    # A closed procpool pool is freed by the cyclic GC only, and while it lives its Manager
    # lock proxies make every multiprocessing *fork* child incref them at fork and decref them
    # at exit (BaseProxy's after-fork hook: a Manager connection per child). That would slow
    # cf-fork down for reasons that are procpool's, not the peer's: collect them first.
    gc.collect()
    if c != "procpool" and _live_proxies():
        print(f"  warning: {bench.name} / {c}: Manager proxies alive in the parent", flush=True)
    try:
        bench.samples[c].append(fn(c))
    except Exception:
        tb = traceback.format_exc()
        bench.errors[c].append(tb)
        print(f"  {bench.name} / {c}: ERROR\n{tb}", flush=True)


def _live_proxies() -> int:
    from multiprocessing.managers import BaseProxy

    return sum(isinstance(o, BaseProxy) for o in gc.get_objects())


def _targets(benches: list[Bench], destroy_calls: list[float]) -> list[dict[str, Any]]:
    by = {b.name: b for b in benches}
    out = []

    def verdict(ok: bool | None) -> str:
        return "n/a (errors)" if ok is None else "PASS" if ok else "MISS"

    td = by["teardown-64"]
    for peer in PEERS:
        rt = td.ratio(peer)
        out.append(
            {
                "target": f"teardown 64 idle: procpool <= 0.3x {peer} shutdown",
                "measured": f"{rt:.2f}x" if rt is not None else "-",
                "verdict": verdict(None if rt is None else rt <= 0.3),
            }
        )
    if destroy_calls:
        med = statistics.median(destroy_calls) * 1e6
        out.append(
            {
                "target": "destroy_idle(1) <= 1 ms (median; slow-exiting workers)",
                "measured": f"{med:.1f} µs (max {max(destroy_calls) * 1e6:.0f})",
                "verdict": verdict(med <= 1000),
            }
        )
    else:
        out.append({"target": "destroy_idle(1) <= 1 ms", "measured": "-", "verdict": verdict(None)})
    for name in ("start-32 warm", "start-32 cold"):
        rt = by[name].ratio("cf-fork")
        out.append(
            {
                "target": f"{name}: procpool no slower than cf-fork",
                "measured": f"{rt:.2f}x" if rt is not None else "-",
                "verdict": verdict(None if rt is None else rt <= 1.0),
            }
        )
    return out


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


def leak_check(helpers: dict[int, float], cold_helpers: dict[int, float]) -> list[str]:
    """What this run left behind: processes started after the warm-up (the helpers it started
    -- fork server, resource tracker, procpool's Manager and spawner -- live as long as the
    program), helpers of the cold-start children still alive after those exited, zombies
    among our children, and procpool id tables of this process in /dev/shm."""
    import psutil

    from procpool.idtable import SHM_DIR, segment_prefix

    problems = []
    new = {pid: ct for pid, ct in descendants().items() if helpers.get(pid) != ct}
    problems += [f"stray process: {s}" for s in still_alive(new)]
    problems += [f"cold child's helper outlived it: {s}" for s in still_alive(cold_helpers)]
    for p in psutil.Process().children():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                problems.append(f"zombie child: pid {p.pid}")
        except psutil.Error:
            pass
    prefix = f"{segment_prefix()}{os.getpid()}-"
    problems += [f"shared memory left: {n}" for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    return problems


def cold_child(contender: str, n: int) -> None:
    import psutil  # noqa: F401 - imported before the clock starts, as procpool imports it anyway

    if contender == "procpool":
        import procpool  # noqa: F401 - import time is not start time
    t = bench_start(contender, n)
    # The helpers this program started (fork server, Manager, spawner): the parent checks
    # that they go away with us.
    print(json.dumps({"contender": contender, "seconds": t, "helpers": descendants()}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 7, --quick 2)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and items (< 40 s)")
    ap.add_argument("--json", metavar="FILE", help="write raw samples and the summary here")
    ap.add_argument("--cold-child", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--cold-n", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cold_child:
        cold_child(args.cold_child, args.cold_n)
        return 0
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be >= 1")
    report = run(args)
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
