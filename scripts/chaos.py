"""Random work under random SIGKILLs, for minutes: every item must end, nothing may be left.

A submitter thread keeps the executor fed with a random mix (trivial calls, short and long
sleeps, calls that raise, maps, items with a timeout, cancels, cancel_running); a killer
thread SIGKILLs a random worker every ``--kill-every`` seconds, and now and then the spawner
or the Manager server. At the end the executor is shut down and every future is waited for
(bounded). The table counts what each item ended as; ``unfinished`` must be 0.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import psutil
import tasks

import procpool
from procpool import manager, spawner
from procpool.idtable import SHM_DIR, segment_prefix

BOUND = 60.0  # seconds a future may still take once the run is over


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--kill-every", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    ex = procpool.ProcessPoolExecutor(args.workers, idle_timeout=0.5)
    futures: list[tuple[object, str]] = []
    kills: collections.Counter[str] = collections.Counter()
    maps = collections.Counter()
    stop = threading.Event()

    def submitter() -> None:
        while not stop.is_set():
            r = rng.random()
            try:
                if r < 0.4:
                    futures.append((ex.submit(tasks.square, 3), "square"))
                elif r < 0.6:
                    futures.append((ex.submit(tasks.sleep_then, 0.005, "s"), "short"))
                elif r < 0.65:
                    futures.append((ex.submit(tasks.sleep_then, 0.2, "l"), "long"))
                elif r < 0.7:
                    futures.append((ex.submit(tasks.fail, "own"), "fails"))
                elif r < 0.75:
                    futures.append((ex.submit_with(tasks.sleep_then, 0.2, "l", timeout=0.05), "long"))
                elif r < 0.8 and futures:
                    rng.choice(futures)[0].cancel()
                elif r < 0.82 and futures:
                    ex.cancel_running(rng.choice(futures)[0])
                elif r < 0.85:
                    try:
                        n = rng.randrange(50)
                        ok = list(ex.map(tasks.square, range(n), chunksize=rng.choice([1, 8]), timeout=BOUND))
                        assert ok == [i * i for i in range(n)]
                        maps["complete"] += 1
                    except procpool.ProcpoolError:
                        maps["named error"] += 1
                else:
                    time.sleep(0.001)
            except procpool.ProcpoolError:
                pass  # refused with a named error (a pool broken by its machinery)

    def killer() -> None:
        while not stop.wait(args.kill_every):
            r = rng.random()
            if r < 0.9:
                pids = [w.pid for w in ex.pool.workers()]
                pid, kind = (rng.choice(pids), "worker") if pids else (None, "")
            elif r < 0.95:
                pid, kind = (spawner._spawner.pid if spawner._spawner else None), "spawner"
            else:
                pid, kind = manager.server_pid(), "manager"
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills[kind] += 1
                except ProcessLookupError:
                    pass

    threads = [threading.Thread(target=submitter), threading.Thread(target=killer)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join()
    ex.shutdown()
    ended: collections.Counter[str] = collections.Counter()
    for fut, kind in futures:
        try:
            exc = fut.exception(timeout=BOUND)
        except Exception:  # noqa: BLE001 - concurrent.futures' CancelledError / TimeoutError
            if fut.cancelled():
                ended["cancelled"] += 1
            else:
                ended["unfinished"] += 1
            continue
        if exc is None:
            ended["result"] += 1
        elif kind == "fails" and isinstance(exc, ValueError):
            ended["its own exception"] += 1
        elif isinstance(exc, procpool.ProcpoolError):
            ended[f"named: {type(exc).__name__}"] += 1
        else:
            ended[f"UNNAMED: {type(exc).__name__}"] += 1
    st = ex.pool.stats()
    left_procs = [p.pid for p in psutil.Process().children(recursive=True) if _title(p).startswith("kworker/")]
    left_shm = [n for n in os.listdir(SHM_DIR) if n.startswith(f"{segment_prefix()}{os.getpid()}-")]

    rows = [("seconds", f"{time.monotonic() - t0:.0f}"), ("items", len(futures))]
    rows += [(f"kills: {k}", v) for k, v in sorted(kills.items())]
    rows += [(f"maps: {k}", v) for k, v in sorted(maps.items())]
    rows += [(k, v) for k, v in sorted(ended.items())]
    rows += [("unfinished", ended.get("unfinished", 0))]
    rows += [("created / destroyed / lost", f"{st.created} / {st.destroyed} / {st.lost}")]
    rows += [("workers left / tables left", f"{len(left_procs)} / {len(left_shm)}")]
    width = max(len(str(k)) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    bad = (
        ended.get("unfinished", 0)
        or any(k.startswith("UNNAMED") for k in ended)
        or st.created != st.destroyed + st.lost
        or left_procs
        or left_shm
    )
    return 1 if bad else 0


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


if __name__ == "__main__":
    sys.exit(main())
