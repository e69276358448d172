"""A benchmark's samples per contender (``Bench``), and how they are printed: median [min - max]
over rounds, the procpool/peer ratio of the medians, the best peer marked ``*``."""

from __future__ import annotations

import os
import statistics
from typing import Any

W = 24  # width of the benchmark column


class Bench:
    """The samples of one benchmark (one table row per contender). "floor" is the contender
    name of the floors (no pool); names starting with "procpool" are procpool's, not peers."""

    def __init__(self, name: str, unit: str, scale: float, higher_better: bool, contenders: tuple[str, ...]) -> None:
        self.name, self.unit, self.scale, self.higher_better = name, unit, scale, higher_better
        self.contenders = contenders
        self.samples: dict[str, list[float]] = {c: [] for c in contenders}
        self.errors: dict[str, list[str]] = {c: [] for c in contenders}
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


def print_bench(b: Bench) -> dict[str, Any]:
    """Print the benchmark's rows; returns its entry of the JSON report."""
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
            ratio = fmt_ratio(rt) if rt is not None else "-"
            entry["contenders"][c]["ratio_procpool_over_peer"] = rt
        med, lo, hi = (x * b.scale for x in (statistics.median(s), min(s), max(s)))
        errs = f"  ({len(b.errors[c])} errors)" if b.errors[c] else ""
        print(f"{b.name:<{W}} {label:<15} {fmt(med):>12} {fmt(lo):>11} {fmt(hi):>11}  {ratio:<6}{errs}  {b.unit}")
    if best is not None and b.median("procpool") is not None:
        rt = b.ratio(best)
        entry["ratio_procpool_over_best_peer"] = rt
        print(f"{'':<{W}} {'vs best peer':<15} procpool / {best} = {fmt_ratio(rt) if rt is not None else '-'}")
    return entry


def fmt_ratio(rt: float) -> str:
    return f"{rt:.2f}x" if rt >= 0.1 else f"{rt:.3f}x"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"
