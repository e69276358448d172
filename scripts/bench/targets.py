"""The targets procpool is held to on a 2-core machine, in one table (``TARGETS``), and their
verdicts (PASS / MISS / n/a) from a run's benchmarks.

A row is a ``Ratio`` (procpool's median over a named peer's, or over the best peer's of this
run, against a limit), the ``Destroy`` row (an absolute bound on ``destroy_idle(1)``), or an
``Info`` row (a figure printed for context, no verdict).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .benchmarks import MEMORY_WORKERS, SCALE_SIZES
from .floors import FLOOR_PROCS
from .report import Bench, fmt_ratio

#: Workers of the start benchmarks (start-warm, start-cold).
START_WORKERS = 32
START_WARM = f"start-{START_WORKERS} warm"
START_COLD = f"start-{START_WORKERS} cold"
START_COLD_FIRST = f"start-{START_WORKERS} cold, first result"
MEMORY = f"memory per idle worker (USS, {MEMORY_WORKERS} idle)"
EXIT_FLOOR_FRESH = f"wake+exit+reap {FLOOR_PROCS}, fresh"
#: The floor the brief's Manager sets under the cold start (floors.manager_alongside).
START_COLD_MANAGER_FLOOR = f"start-{START_WORKERS} cold, cf-fork + a Manager"

Row = dict[str, Any]
Benches = Mapping[str, Bench]


def _verdict(ok: bool | None) -> str:
    return "n/a (errors)" if ok is None else "PASS" if ok else "MISS"


@dataclass(frozen=True)
class Run:
    """What the targets are judged on: the run's benchmarks by name, and the destroy calls."""

    benches: Benches
    destroy_calls: list[float]
    destroy_ran: bool


@dataclass(frozen=True)
class Ratio:
    """procpool's median over a peer's on ``bench``: one row per peer of ``vs`` that ran, or,
    with ``vs`` empty, one row against the best peer of the run (``what`` then names the
    measure and the row's text says the limit and which peer was best)."""

    group: str
    bench: str
    what: str
    limit: float
    higher: bool = False
    vs: tuple[str, ...] = ()

    def rows(self, run: Run) -> list[Row]:
        b = run.benches.get(self.bench)
        if b is None:
            return []
        if self.vs:
            return [self._row(self.what.format(peer=p), b.ratio(p)) for p in self.vs if p in b.contenders]
        best = b.best_peer()
        target = f"{self.what}: procpool {'>=' if self.higher else '<='} {self.limit:g}x best peer ({best or '-'})"
        if "procpool" not in b.contenders:
            return [
                {
                    "group": self.group,
                    "target": target,
                    "measured": "-",
                    "value": None,
                    "verdict": "n/a (procpool not run)",
                }
            ]
        return [self._row(target, b.ratio(best) if best else None)]

    def _row(self, target: str, rt: float | None) -> Row:
        ok = None if rt is None else (rt >= self.limit if self.higher else rt <= self.limit)
        measured = fmt_ratio(rt) if rt is not None else "-"
        return {"group": self.group, "target": target, "measured": measured, "value": rt, "verdict": _verdict(ok)}


@dataclass(frozen=True)
class Destroy:
    """``destroy_idle(1)`` returns within ``limit_us`` (median), workers slow to exit."""

    group: str
    limit_us: float

    def rows(self, run: Run) -> list[Row]:
        target = f"destroy_idle(1) <= {self.limit_us / 1000:g} ms"
        if run.destroy_calls:
            med = statistics.median(run.destroy_calls) * 1e6
            return [
                {
                    "group": self.group,
                    "target": f"{target} (median; slow-exiting workers)",
                    "measured": f"{med:.1f} µs (max {max(run.destroy_calls) * 1e6:.0f})",
                    "value": med,
                    "verdict": _verdict(med <= self.limit_us),
                }
            ]
        if run.destroy_ran:
            return [{"group": self.group, "target": target, "measured": "-", "value": None, "verdict": _verdict(None)}]
        return []


@dataclass(frozen=True)
class Info:
    """A figure for context: ``figure(benches)`` returns (target, measured, value) rows."""

    group: str
    figure: Callable[[Benches], list[tuple[str, str, float | None]]]

    def rows(self, run: Run) -> list[Row]:
        return [
            {"group": self.group, "target": t, "measured": m, "value": v, "verdict": "-"}
            for t, m, v in self.figure(run.benches)
        ]


def _workerpool_import(by: Benches) -> list[tuple[str, str, float | None]]:
    b = by.get("import")
    if b is None or "cf" not in b.contenders:
        return []
    wp, cf = b.median("procpool:WorkerPool"), b.median("cf")
    if not (wp and cf):
        return []
    return [("(information) from procpool import WorkerPool / cf.process", f"{wp / cf:.2f}x", wp / cf)]


def _scale(by: Benches) -> list[tuple[str, str, float | None]]:
    out: list[tuple[str, str, float | None]] = []
    for n in SCALE_SIZES:
        sc = by.get(f"scale-{n} per worker")
        if sc is None:
            continue
        pm, cm, rt = sc.median("procpool"), sc.median("cf-fork"), sc.ratio("cf-fork")
        if pm and cm and rt is not None:
            measured = f"{pm * 1e3:.2f} / {cm * 1e3:.2f} = {rt:.2f}x"
            out.append((f"(information) scale-{n}: ms per worker, procpool / cf-fork", measured, rt))
    return out


def _latency_floor(by: Benches) -> list[tuple[str, str, float | None]]:
    lat, pp = by.get("latency"), by.get("ping-pong connection")
    if lat is None or pp is None:
        return []
    pm, fm = lat.median("procpool"), pp.median("floor")
    if not (pm and fm):
        return []
    return [("procpool round trip / Connection ping-pong floor", f"{pm / fm:.2f}x", None)]


def _cold_start_floor(by: Benches) -> list[tuple[str, str, float | None]]:
    cold, fl = by.get(START_COLD), by.get(START_COLD_MANAGER_FLOOR)
    if cold is None or fl is None or not fl.median("floor") or not cold.median("cf-fork"):
        return []
    figures = (cold.median("procpool"), cold.median("cf-fork"), fl.median("floor"))
    if not all(figures):
        return []
    pm, cm, fm = figures
    measured = f"{pm * 1e3:.1f} / {cm * 1e3:.1f} / {fm * 1e3:.1f} ({pm / fm:.2f}x the floor)"
    return [(f"{START_COLD}, all: procpool / cf-fork / cf-fork + a Manager (floor), ms", measured, None)]


def _teardown_floor(by: Benches) -> list[tuple[str, str, float | None]]:
    td, fl = by.get("teardown-64"), by.get(EXIT_FLOOR_FRESH)
    if td is None or fl is None or not fl.median("floor"):
        return []
    best = td.best_peer()
    best_median = td.median(best) if best else None
    goal = 0.3 * best_median if best_median else None
    figures = (td.median("procpool"), goal, fl.median("floor"))
    measured = " / ".join(f"{x * 1e3:.1f}" if x else "-" for x in figures)
    return [("teardown-64: procpool / 0.3x best peer / exit floor (fresh), ms", measured, None)]


CF = ("cf-fork", "cf-forkserver")
G_START = "teardown and start (vs concurrent.futures)"
G_SPEED = "speed (vs the best peer)"
G_LEAN = "import, memory, scale (vs the best peer measured in this run)"
G_MIXED = "mixed blocking and CPU items (vs concurrent.futures)"
G_FLOORS = "floors (information)"

#: Every target, in the order they are printed (a group's title is printed when it changes).
TARGETS: tuple[Ratio | Destroy | Info, ...] = (
    Ratio(G_START, "teardown-64", "teardown 64 idle: procpool <= 0.3x {peer} shutdown", 0.3, vs=CF),
    Destroy(G_START, limit_us=1000),
    Ratio(G_START, START_WARM, START_WARM + ": procpool no slower than {peer}", 1.0, vs=("cf-fork",)),
    Ratio(G_START, START_COLD, START_COLD + ": procpool no slower than {peer}", 1.0, vs=("cf-fork",)),
    Ratio(G_SPEED, "throughput", "submit one at a time, items/s", 3.0, higher=True),
    Ratio(G_SPEED, "map", "map with chunks, items/s", 1.0, higher=True),
    Ratio(G_SPEED, "latency", "one-at-a-time round trip", 0.5),
    Ratio(G_SPEED, START_COLD_FIRST, START_COLD_FIRST + ": procpool <= 0.5x {peer}", 0.5, vs=("cf-fork",)),
    Ratio(G_SPEED, "teardown-64", "teardown 64 idle", 0.3),
    Ratio(G_LEAN, "import", "import procpool <= 1.5x import concurrent.futures.process", 1.5, vs=("cf",)),
    Info(G_LEAN, _workerpool_import),
    Ratio(
        G_LEAN,
        START_COLD,
        f"{START_COLD}, all {START_WORKERS} exist and ran an item: <= 1.0x {{peer}}",
        1.0,
        vs=("cf-fork",),
    ),
    Ratio(G_LEAN, "teardown-64", "teardown 64 idle", 1.0),
    Ratio(G_LEAN, "throughput", "submit one at a time, items/s", 3.0, higher=True),
    Ratio(G_LEAN, "map", "map with chunks, items/s (no regression)", 1.0, higher=True),
    Ratio(G_LEAN, "latency", "one-at-a-time round trip (no regression)", 0.5),
    Ratio(G_LEAN, MEMORY, "memory per idle worker (USS)", 1.0),
    Info(G_LEAN, _scale),
    Ratio(G_MIXED, "mixed", "mixed blocking + CPU items: procpool <= 0.4x {peer}", 0.4, vs=CF),
    Info(G_FLOORS, _latency_floor),
    Info(G_FLOORS, _teardown_floor),
    Info(G_FLOORS, _cold_start_floor),
)


def evaluate(run: Run) -> list[Row]:
    """Every target's rows for this run (a target whose benchmark did not run has none)."""
    return [row for target in TARGETS for row in target.rows(run)]


def print_targets(rows: list[Row]) -> None:
    print("Targets (2 cores)")
    print(f"{'target':<66} {'measured':>30}  verdict")
    group = None
    for t in rows:
        if t["group"] != group:
            group = t["group"]
            print(f"-- {group}")
        print(f"{t['target']:<66} {t['measured']:>30}  {t['verdict']}")
