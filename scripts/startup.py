#!/usr/bin/env python3
"""How long ``procpool ps`` takes to start: wall time of the console script and of
``python -m procpool.cli ps`` (median of N runs, against ``python -c pass``, the floor), and
``-X importtime``'s costliest top-level imports. The goal (issue 13): under 60 ms here.

    .venv/bin/python scripts/startup.py [-n RUNS]

Also run at the end of scripts/bench.py. Wall times include the interpreter's own start
(``python -c pass``), which no change to procpool can remove.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

GOAL_MS = 60.0


def _wall_ms(argv: list[str], runs: int) -> list[float]:
    """Wall time of ``argv``, start to exit, in ms. ``Popen.wait(timeout=...)`` polls with
    sleeps of up to 50 ms, which once added ~50 ms to most samples here; so the wait blocks,
    and a timer kills a child that runs over 60 s instead."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        watchdog = threading.Timer(60.0, child.kill)
        watchdog.start()
        try:
            child.wait()
        finally:
            watchdog.cancel()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def top_imports(argv: list[str], n: int = 6) -> list[tuple[str, float]]:
    """The costliest top-level imports of ``argv`` (cumulative ms), from ``-X importtime``."""
    res = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True, check=False, timeout=60
    )
    rows = []
    for ln in res.stderr.splitlines():
        if not ln.startswith("import time:") or "cumulative" in ln:
            continue
        _self_us, cum_us, name = ln.split("|")  # "import time: SELF | CUMULATIVE | NAME"
        if name.startswith("  "):
            continue  # nested: counted in its top-level importer's cumulative time
        rows.append((name.strip(), int(cum_us) / 1000.0))
    return sorted(rows, key=lambda r: -r[1])[:n]


def measure(runs: int = 10) -> dict[str, Any]:
    py = sys.executable
    script = os.path.join(os.path.dirname(py), "procpool")
    cases = {
        "python -c pass (floor)": [py, "-c", "pass"],
        "python -m procpool.cli ps": [py, "-m", "procpool.cli", "ps"],
    }
    if os.path.exists(script):
        cases["procpool ps (console script)"] = [script, "ps"]
    report: dict[str, Any] = {"goal_ms": GOAL_MS, "wall_ms": {}}
    for name, argv in cases.items():
        samples = _wall_ms(argv, runs)
        report["wall_ms"][name] = {"median": statistics.median(samples), "min": min(samples)}
    report["top_imports_ms"] = top_imports([py, "-m", "procpool.cli", "ps"])
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"procpool ps startup (goal: under {report['goal_ms']:g} ms), median [min] of wall time:")
    for name, r in report["wall_ms"].items():
        verdict = ""
        if "ps" in name:
            verdict = "  met" if r["median"] < report["goal_ms"] else "  NOT met"
        print(f"  {name:<32} {r['median']:7.1f} ms [{r['min']:.1f}]{verdict}")
    print("  costliest top-level imports of `python -m procpool.cli ps` (cumulative):")
    for name, ms in report["top_imports_ms"]:
        print(f"    {name:<40} {ms:7.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--runs", type=int, default=10, help="runs per command (default 10)")
    print_report(measure(p.parse_args().runs))


if __name__ == "__main__":
    main()
