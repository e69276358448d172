#!/usr/bin/env python3
"""Regenerate the README's pictures: docs/img/monitor.svg (``procpool monitor``) and
docs/img/ps.svg (``procpool ps`` with workers in ``kworker/dying``), from a real run.

    .venv/bin/python scripts/capture_svgs.py

It starts ``procpool run`` (short bursts, an idle cull between them, dying workers lingering
2 s so they can be seen), waits until ps shows a dying worker, records both views with rich
(``Console(record=True)``, ``save_svg``), then lets the run end. Bounded: every wait has a
deadline, and the run is stopped (SIGINT, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds (default 60)")
    timeout = p.parse_args().timeout
    from rich.console import Console
    from rich.text import Text

    from procpool.cli import monitor, ps

    OUT.mkdir(parents=True, exist_ok=True)
    run = subprocess.Popen(
        [sys.executable, "-m", "procpool.cli", "run", "--tasks", "600", "--task-ms", "60", "--bursts", "6",
         "--min-workers", "1", "--max-workers", "4", "--idle-timeout", "0.3", "--pause", "0.8",
         "--linger-dying", "2", "--quiet"],
        stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    args = argparse.Namespace(pool=None, owner=run.pid, workqueue=None)
    try:
        deadline = time.monotonic() + timeout
        prev = None
        shot_monitor = shot_ps = False
        while not (shot_monitor and shot_ps):
            if time.monotonic() > deadline or run.poll() is not None:
                raise SystemExit("capture_svgs: the run ended before both pictures were taken")
            snap = monitor.sample(args)
            monitor.add_rates(snap, prev)
            if prev is not None and not shot_monitor and snap["pools"] and snap["pools"][0]["rates"]["started"]:
                console = Console(record=True, width=132, file=open(os.devnull, "w"))  # noqa: SIM115
                console.print(monitor.rich_view(snap))
                console.save_svg(str(OUT / "monitor.svg"), title="procpool monitor")
                shot_monitor = True
            prev = snap
            pools = ps.select(ps.collect()[0], args)
            if not shot_ps and any(w["state"] == "dying" for pl in pools for w in pl["workers"]):
                console = Console(record=True, width=120, file=open(os.devnull, "w"))  # noqa: SIM115
                console.print(Text(f"$ procpool ps --owner {run.pid}\n" + ps.render(pools)))
                console.save_svg(str(OUT / "ps.svg"), title="procpool ps")
                shot_ps = True
            time.sleep(0.3)
        print(f"wrote {OUT / 'monitor.svg'} and {OUT / 'ps.svg'}")
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
            try:
                run.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait(10)


if __name__ == "__main__":
    main()
