"""The run: choose benchmarks and peers, warm up, run the rounds interleaved, print the results,
the floors and the targets, check for leftovers. Also the entry of a child sample (--child,
--floor-child), which runs one sample in a fresh interpreter and prints it as JSON.

    main ─ select ─ Session.plan ─ warm_up ─ rounds: every bench × contender (rotating order),
                                                     destroy, start-cold, floors
                                 ─ print results, floors, targets ─ startup ─ leak check
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import functools
import gc
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from . import benchmarks as bm
from .floors import FLOOR_PROCS, floor_exit, floor_pingpong, manager_alongside, rss_mb
from .items import barrier_round
from .peers import ALL_PEERS, CONTENDERS, managed
from .report import Bench, W, fmt, load, print_bench
from .targets import (
    START_COLD,
    START_COLD_FIRST,
    START_COLD_MANAGER_FLOOR,
    START_WARM,
    START_WORKERS,
    Run,
    evaluate,
    print_targets,
)

#: ``--only`` takes these names; "teardown" and "start" name both of their variants.
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
Sampler = Callable[[str], Any]


# -- choosing ---------------------------------------------------------------------------------


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


def available_peers(wanted: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The wanted peers that can be imported, and why each other one is skipped."""
    ok, skipped = [], {}
    for c in wanted:
        cls = CONTENDERS[c]
        if cls.optional:
            try:
                importlib.import_module(cls.module)
            except Exception as e:  # noqa: BLE001 - not installed, or broken: skip it, say why
                skipped[c] = f"not importable ({type(e).__name__}: {e})"
                continue
        ok.append(c)
    return tuple(ok), skipped


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


def config(args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick
    return {
        "rounds": args.rounds if args.rounds is not None else (2 if q else 5),
        "destroy_workers": 8 if q else 16,
        "start_workers": START_WORKERS,
        "cold_rounds": 1 if q else 5,
        "heavy_rounds": 1 if q else None,  # teardown-64, start-32 warm: their samples start 64 / 32 workers
        "throughput_items": 5000 if q else 20000,
        "map_items": 200_000 if q else 1_000_000,
        "map_chunksize": bm.MAP_CHUNKSIZE,
        "latency_items": 500 if q else 2000,
        "pingpong_items": 500 if q else 2000,
        "floor_procs": FLOOR_PROCS,
    }


# -- fairness between samples -----------------------------------------------------------------

_malloc_trim: Any = None


def trim_heap() -> None:
    """Hand freed heap back to the OS (glibc malloc_trim), where there is one."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def live_proxies() -> int:
    from multiprocessing.managers import BaseProxy

    return sum(isinstance(o, BaseProxy) for o in gc.get_objects())


def sample(bench: Bench, c: str, fn: Sampler) -> None:
    """Take one sample of ``bench`` for ``c``; an error is recorded and printed, not raised."""
    # A closed procpool pool is freed by the cyclic GC only, and while it lives its Manager
    # lock proxies make every multiprocessing *fork* child incref them at fork and decref them
    # at exit (BaseProxy's after-fork hook: a Manager connection per child). That would slow
    # the fork-based peers down for reasons that are procpool's, not theirs: collect them first.
    # Then hand freed heap back to the OS: the map benchmark's million-item lists would otherwise
    # leave this process ~100 MB larger, and every later fork (cf-fork, mp-pool, billiard,
    # pebble workers) would pay for copying its page tables.
    gc.collect()
    trim_heap()
    if c not in ("procpool", "floor") and live_proxies():
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


def _pingpong(kind: str, items: int) -> Sampler:
    return lambda c: floor_pingpong(kind, items)


def _cold_with_manager(c: str) -> float:
    """cf fork's cold start (all ran an item) with a Manager server starting alongside."""
    res = bm.run_child(["--child", "start-manager", "--contender", "cf-fork", "--n", str(START_WORKERS)])
    return float(res["value"])


# -- the session ------------------------------------------------------------------------------


class Session:
    """One run: the benchmarks chosen, their samplers, and what the rounds collect."""

    def __init__(self, cfg: dict[str, Any], chosen: set[str], contenders: tuple[str, ...]) -> None:
        self.cfg, self.chosen, self.contenders = cfg, chosen, contenders
        self.benches: list[tuple[Bench, Sampler]] = []
        self.start_cold: Bench | None = None  # all START_WORKERS exist and ran an item
        self.start_cold_first: Bench | None = None  # the first result (same samples' children)
        self.floors: list[tuple[Bench, Sampler]] = []
        self.floor_benches: list[Bench] = []
        self.floor_info: dict[str, list[float]] = collections.defaultdict(list)
        self.destroy_calls: list[float] = []
        self.destroy_info: list[dict[str, Any]] = []
        self.destroy_errors: list[str] = []
        self.destroy_wall = 0.0
        self.cleanup_dirs: list[str] = []
        self._plan_pools()
        self._plan_floors()

    def _add(self, name: str, unit: str, scale: float, higher: bool, fn: Sampler, who: tuple[str, ...] = ()) -> Bench:
        b = Bench(name, unit, scale, higher, who or self.contenders)
        self.benches.append((b, fn))
        return b

    def _plan_pools(self) -> None:
        cfg, chosen, contenders = self.cfg, self.chosen, self.contenders
        if "import" in chosen:
            cache = tempfile.mkdtemp(prefix="procpool-bench-pyc-")
            self.cleanup_dirs.append(cache)
            imp = tuple(c for c in bm.IMPORTS if c.startswith("procpool") or c == "cf" or c in contenders)
            for c in imp:  # warm the byte code cache, untimed
                bm.bench_import(c, cache)
            self._add("import", "ms", 1e3, False, lambda c: bm.bench_import(c, cache), imp)
        if "memory" in chosen:
            memory = f"memory per idle worker (USS, {bm.MEMORY_WORKERS} idle)"
            self._add(memory, "MiB", 2.0**-20, False, lambda c: bm.bench_memory(c, bm.MEMORY_WORKERS))
        if "scale" in chosen:
            scale_contenders = tuple(c for c in contenders if c in ("procpool", "cf-fork"))
            for n in bm.SCALE_SIZES:
                fn = functools.partial(bm.bench_scale, n=n)
                self._add(f"scale-{n} per worker", "ms", 1e3, False, fn, scale_contenders)
        for n in (8, 64):
            if f"teardown-{n}" in chosen:
                b = self._add(f"teardown-{n}", "ms", 1e3, False, functools.partial(bm.bench_teardown, n=n))
                if n == 64:
                    b.max_rounds = cfg["heavy_rounds"]
        if "start-warm" in chosen:
            b = self._add(START_WARM, "ms", 1e3, False, lambda c: bm.bench_start(c, START_WORKERS))
            b.max_rounds = cfg["heavy_rounds"]
        # partial, not lambdas over locals: a lambda reads ``items`` when it runs, after the
        # map branch rebound it (throughput once ran a million items that way).
        if "throughput" in chosen:
            tp = functools.partial(bm.in_child, "throughput", items=cfg["throughput_items"])
            self._add("throughput", "items/s", 1.0, True, lambda c: tp(c))
        if "map" in chosen:
            mp = functools.partial(bm.in_child, "map", items=cfg["map_items"], chunksize=cfg["map_chunksize"])
            self._add("map", "items/s", 1.0, True, lambda c: mp(c))
        if "latency" in chosen:
            self._add("latency", "µs", 1e6, False, lambda c: bm.bench_latency(c, cfg["latency_items"]))
        if "mixed" in chosen:
            self._add("mixed", "ms", 1e3, False, lambda c: bm.bench_mixed(c, bm.MIXED_ITEMS))
        if "start-cold" in chosen:
            self.start_cold_first = Bench(START_COLD_FIRST, "ms", 1e3, False, contenders)
            self.start_cold = Bench(START_COLD, "ms", 1e3, False, contenders)
            self.start_cold.max_rounds = self.start_cold_first.max_rounds = cfg["cold_rounds"]

    def _plan_floors(self) -> None:
        if "floors" not in self.chosen:
            return
        items = self.cfg["pingpong_items"]
        for kind in ("pipe", "socketpair", "connection"):
            b = Bench(f"ping-pong {kind}", "µs", 1e6, False, ("floor",))
            self.floors.append((b, _pingpong(kind, items)))
            self.floor_benches.append(b)
        for where, fresh in (("here", False), ("fresh", True)):
            fork_b = Bench(f"fork {FLOOR_PROCS}, {where}", "ms", 1e3, False, ("floor",))
            exit_b = Bench(f"wake+exit+reap {FLOOR_PROCS}, {where}", "ms", 1e3, False, ("floor",))
            self.floors.append((exit_b, self._exit_floor(fork_b, fresh)))
            self.floor_benches += [fork_b, exit_b]
        # Printed in this order: the ping-pongs, then fork and exit here, then fresh.
        if "start-cold" in self.chosen and "cf-fork" in self.contenders:
            b = Bench(START_COLD_MANAGER_FLOOR, "ms", 1e3, False, ("floor",))
            self.floors.append((b, _cold_with_manager))
            self.floor_benches.append(b)

    def _exit_floor(self, fork_b: Bench, fresh: bool) -> Sampler:
        def fn(c: str) -> float:
            res = bm.run_child(["--floor-child", str(FLOOR_PROCS)]) if fresh else floor_exit(FLOOR_PROCS)
            fork_b.samples["floor"].append(res["fork"])
            self.floor_info["rss_mb_fresh" if fresh else "rss_mb_here"].append(res["rss_mb"])
            return res["teardown"]

        return fn

    @property
    def all_benches(self) -> list[Bench]:
        cold = [self.start_cold_first, self.start_cold] if self.start_cold is not None else []
        return [b for b, _ in self.benches] + [b for b in cold if b is not None]

    def run_round(self, r: int) -> None:
        contenders = self.contenders
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        print(
            f"round {r + 1}/{self.cfg['rounds']} (order: {', '.join(order)}; load {load()}; rss {rss_mb():.0f} MB) ...",
            flush=True,
        )
        for bench, fn in self.benches:
            if bench.max_rounds is not None and r >= bench.max_rounds:
                continue
            # In the round's order; a benchmark with contenders of its own (import) rotates those.
            own = bench.contenders
            for c in order if set(own) <= set(order) else own[r % len(own) :] + own[: r % len(own)]:
                if c in own:
                    sample(bench, c, fn)
        if "destroy" in self.chosen:
            self._destroy_round()
        if self.start_cold is not None and self.start_cold.max_rounds is not None and r < self.start_cold.max_rounds:
            for c in order:
                sample(self.start_cold, c, self._cold_sampler())
        for bench, fn in self.floors:
            sample(bench, "floor", fn)

    def _cold_sampler(self) -> Sampler:
        """One cold start child gives both rows: the first result goes to its bench here, the
        time until all exist and ran an item is the sample returned."""

        def fn(c: str) -> float:
            res = bm.cold_start(c, START_WORKERS)
            if self.start_cold_first is not None:
                self.start_cold_first.samples[c].append(res["first"])
            return res["all"]

        return fn

    def _destroy_round(self) -> None:
        gc.collect()
        trim_heap()
        t0 = time.perf_counter()
        try:
            d = bm.bench_destroy(self.cfg["destroy_workers"])
            self.destroy_calls += d.pop("calls")
            self.destroy_info.append(d)
        except Exception:  # noqa: BLE001 - reported with the run
            self.destroy_errors.append(traceback.format_exc())
            print(f"  destroy: ERROR\n{self.destroy_errors[-1]}", flush=True)
        self.destroy_wall += time.perf_counter() - t0

    # -- the report ----------------------------------------------------------------------------

    def print_results(self, report: dict[str, Any], elapsed: float, warm_wall: float) -> None:
        rounds = self.cfg["rounds"]
        print()
        print(
            f"Results ({rounds} round{'s' * (rounds > 1)}, interleaved, {elapsed:.0f} s): "
            "median [min - max] over rounds"
        )
        heavy = [
            f"{b.name}: {b.max_rounds}" for b in self.all_benches if b.max_rounds is not None and b.max_rounds < rounds
        ]
        if heavy:
            print(f"(rounds run by the costly benchmarks: {', '.join(heavy)})")
        print("ratio = procpool median / peer median (time: < 1 means procpool is faster; items/s: > 1);")
        print("* marks the best peer of each benchmark")
        print(f"{'benchmark':<{W}} {'contender':<15} {'median':>12} {'min':>11} {'max':>11}  ratio")
        for b in self.all_benches:
            report["benchmarks"][b.name] = print_bench(b)
        self._print_destroy(report)
        if bm.MIXED_PEAKS:
            print(f"{'mixed':<{W}} {'procpool':<15} peak workers per sample: {bm.MIXED_PEAKS}")
            report["benchmarks"]["mixed"]["procpool_peak_workers"] = bm.MIXED_PEAKS
        walls = [("warm-up", warm_wall)] + [(b.name, b.wall) for b in self.all_benches]
        walls += [("destroy", self.destroy_wall)] if "destroy" in self.chosen else []
        walls += [("floors", sum(b.wall for b, _ in self.floors))] if self.floors else []
        print("wall time per benchmark: " + ", ".join(f"{n} {t:.0f} s" for n, t in walls))
        report["wall_s"] = dict(walls)
        self._print_floors(report)

    def _print_destroy(self, report: dict[str, Any]) -> None:
        if self.destroy_calls:
            us = sorted(x * 1e6 for x in self.destroy_calls)
            p90 = us[min(len(us) - 1, int(0.9 * len(us)))]
            dying = [d["nr_dying_after"] for d in self.destroy_info]
            closes = [d["close"] for d in self.destroy_info]
            print(
                f"{'destroy_idle(1)':<{W}} {'procpool':<15} {fmt(statistics.median(us)):>12} {fmt(us[0]):>11} "
                f"{fmt(us[-1]):>11}  p90 {fmt(p90)} µs over {len(us)} calls; workers still dying right after "
                f"the calls: {dying} of {self.cfg['destroy_workers']}; close() after: "
                f"{statistics.median(closes):.2f} s (fault detach.after=delay:1)"
            )
        if "destroy" in self.chosen:
            report["benchmarks"]["destroy"] = {
                "unit": "s",
                "calls": self.destroy_calls,
                "rounds": self.destroy_info,
                "errors": self.destroy_errors,
            }

    def _print_floors(self, report: dict[str, Any]) -> None:
        if not self.floor_benches:
            return
        print()
        print("Measured floors (no pool: what this machine allows), median [min - max] over rounds")
        for b in self.floor_benches:
            report["floors"][b.name] = print_bench(b)
        here, fresh = self.floor_info.get("rss_mb_here"), self.floor_info.get("rss_mb_fresh")
        print(
            f"  'here' = children of this benchmark process (max RSS {max(here or [0]):.0f} MB, like cf-fork, "
            f"mp-pool, billiard and pebble workers); 'fresh' = children of a fresh interpreter "
            f"(max RSS {max(fresh or [0]):.0f} MB, like a fork server's). wake+exit+reap: {FLOOR_PROCS} blocked "
            f"children, their pipe closed at once, until the last one is reaped."
        )
        report["floors"]["rss_mb"] = dict(self.floor_info)


def announce(cfg: dict[str, Any], chosen: set[str], peers: tuple[str, ...], skipped: dict[str, str]) -> None:
    import procpool

    print(f"procpool bench: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, config {cfg}", flush=True)
    print(f"benchmarks: {', '.join(b for b in BENCH_NAMES if b in chosen)}", flush=True)
    print(f"contenders: procpool, {', '.join(peers)}", flush=True)
    print(f"  procpool {procpool.__version__} from {os.path.dirname(procpool.__file__)}", flush=True)
    for c, why in skipped.items():
        print(f"  peer {c}: skipped, {why}", flush=True)
    for c in peers:
        cls = CONTENDERS[c]
        if cls.optional:
            mod = importlib.import_module(cls.module)
            print(f"  peer {c}: {cls.module} {getattr(mod, '__version__', '?')}", flush=True)
    print(f"load average at start: {load()}", flush=True)
    if os.getloadavg()[0] > 1.0:
        print("  warning: the machine is busy (load average > 1): expect noisy numbers", flush=True)


def run(args: argparse.Namespace, chosen: set[str], wanted_peers: tuple[str, ...]) -> dict[str, Any]:
    cfg = config(args)
    peers, skipped = available_peers(wanted_peers)
    announce(cfg, chosen, peers, skipped)

    t_start = time.perf_counter()
    peers = warm_up(peers, skipped)
    warm_wall = time.perf_counter() - t_start
    helpers = descendants()
    session = Session(cfg, chosen, ("procpool", *peers))
    for r in range(cfg["rounds"]):
        session.run_round(r)
    elapsed = time.perf_counter() - t_start
    print(f"load average at end: {load()}", flush=True)
    for d in session.cleanup_dirs:
        shutil.rmtree(d, ignore_errors=True)

    report: dict[str, Any] = {
        "config": cfg,
        "contenders": list(session.contenders),
        "skipped_peers": skipped,
        "elapsed_s": elapsed,
        "benchmarks": {},
        "floors": {},
        "targets": [],
    }
    report["leaks"] = leak_check(helpers, bm.CHILD_HELPERS)
    session.print_results(report, elapsed, warm_wall)

    by_name = {b.name: b for b in session.all_benches + session.floor_benches}
    report["targets"] = evaluate(Run(by_name, session.destroy_calls, "destroy" in chosen))
    print()
    print_targets(report["targets"])
    # How long the command line takes to start: scripts/startup.py, beside this package.
    import startup

    print()
    report["startup"] = startup.measure(3 if args.quick else 10)
    startup.print_report(report["startup"])
    return report


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
    program), helpers of the children (cold start, map, throughput) still alive after those
    exited, zombies among our children, and procpool id tables of this process in /dev/shm."""
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


# -- entry ------------------------------------------------------------------------------------


def child_main(args: argparse.Namespace) -> None:
    """--child KIND: one sample in this fresh interpreter, printed as a JSON line."""
    import psutil  # noqa: F401 - imported before the clock starts, as procpool imports it anyway

    c = args.contender
    # import time is not start time (the import benchmark has it): the contender's module and
    # its pool class are loaded before the clock starts, including what a lazy package (procpool,
    # concurrent.futures) loads on first use of the class; what the pool loads when it is made
    # (procpool's Manager machinery) is start time.
    cls = CONTENDERS[c]
    getattr(importlib.import_module(cls.module), cls.pool_class, None)
    extra: dict[str, float] = {}
    if args.child == "start":
        extra = bm.bench_cold_start(c, args.n)
        value = extra.pop("all")
    elif args.child == "start-manager":
        with manager_alongside():
            extra = bm.bench_cold_start(c, args.n)
        value = extra.pop("all")
    elif args.child == "map":
        value = bm.bench_map(c, args.items, args.chunksize)
    else:
        value = bm.bench_throughput(c, args.items)
    # The helpers this program started (fork server, Manager, spawner, resource trackers): the
    # parent checks that they go away with us.
    print(json.dumps({"contender": c, "value": value, **extra, "helpers": descendants()}))


def main(description: str) -> int:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 5, --quick 2)")
    ap.add_argument("--quick", action="store_true", help="2 rounds, fewer items, costly benchmarks once (< 60 s)")
    ap.add_argument("--only", metavar="NAME[,NAME]", help=f"run these benchmarks only: {', '.join(BENCH_NAMES)}")
    ap.add_argument("--peers", metavar="NAME[,NAME]", help=f"peers to run (default all): {', '.join(ALL_PEERS)}")
    ap.add_argument("--json", metavar="FILE", help="write raw samples and the summary here")
    ap.add_argument("--child", choices=("start", "start-manager", "map", "throughput"), help=argparse.SUPPRESS)
    ap.add_argument("--contender", choices=tuple(CONTENDERS), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--items", type=int, default=20000, help=argparse.SUPPRESS)
    ap.add_argument("--chunksize", type=int, default=bm.MAP_CHUNKSIZE, help=argparse.SUPPRESS)
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
