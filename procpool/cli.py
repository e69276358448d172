"""The ``procpool`` command: ``run`` a pool under a live monitor, ``ps`` the pools that are running.

``procpool run`` — one thread, one loop, one job per function (the parent side of gunicorn's
arbiter, in miniature)::

    main thread:  loop ─► stop? (signal recorded, deadline passed, every item ended)
                   ▲      ─► feed: the next burst once the last one drained and the pause passed,
                   │              FEED_CHUNK items per turn (a signal is seen between chunks)
                   │      ─► show: refresh the progress line when its tick is due
                   │      ─► wait on the wake pipe (timeout: next tick, end of pause, deadline)
                   │
      wake pipe ◄──┼── Tally.on_done()   [pool's arbiter thread]  when the queue drains
                   └── signal wakeup fd  [C signal handler]       SIGINT/SIGTERM; the Python
                                                                  handler only records which
    then: close(cancel_futures=True, timeout) timed ─► summary ─► exit code

With ``--workqueue NAME`` the items go through a ``procpool.Workqueue`` (max_active from
``--max-active``) on its shared pool: workers show ``+NAME``/``-NAME`` in their titles and
``procpool ps`` lists the workqueue's statistics; stopping cancels what no worker has
started, then closes the pool the same bounded way, then destroys the workqueue.

The built-in workload comes in bursts separated by pauses longer than the idle timeout, so the
pool visibly grows (a burst finds no idle worker) and shrinks (the idle cull) in ps/htop.

``procpool ps`` reads every id table of this user in /dev/shm (the same tables the pools
write, see ``procpool.idtable``), asks psutil whether each owner still lives and what each
worker's title is, and prints an aligned table or, with ``--json``, ``{"pools": [...],
"skipped": [...]}``. /dev/shm is writable by every local user, so it trusts nothing there:
``procpool.idtable.read_snapshot`` checks every file (ours, regular, the size its header
says, every field in range) and what fails is skipped with a one-line note on stderr; names
and titles are printed with control characters escaped (``printable``).

Exit codes: 0 success; 1 some item failed (or the pool could not start); 2 bad usage (bad
options, a ``--func`` that cannot be imported, a pool option WorkerPool refuses); 128 + N
when stopped by signal N (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pickle
import select
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TextIO

import psutil

from .idtable import FLAG_DIE, SHM_DIR, BadSegment, TableInfo, read_snapshot, read_table
from .pool import WorkerPool
from .workqueue import Workqueue

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

#: ``procpool run``'s own defaults: a demo, so workers are cheap and the idle cull is quick.
DEFAULT_MAX_WORKERS = 4
DEFAULT_IDLE_TIMEOUT = 1.0
DEFAULT_TEARDOWN_TIMEOUT = 3.0
#: Items submitted per turn of the main loop, so signals and the deadline are seen between.
FEED_CHUNK = 256
#: Progress refresh: in place on a terminal, a line per second in a log.
TTY_INTERVAL = 0.1
LOG_INTERVAL = 1.0
#: psutil derives a process's start time from the boot time, which /proc gives in whole
#: seconds; allow that much before calling an owner that started after its table "recycled".
CLOCK_SLACK = 1.0
#: ``procpool ps`` cuts longer titles in its text table (not in --json).
TITLE_WIDTH = 60


class UsageError(Exception):
    """Bad usage found after argparse (an unimportable --func): one line on stderr, exit 2."""


# -- the work ----------------------------------------------------------------------------------


def work_item(index: int, seconds: float, burn: bool = False) -> int:
    """The built-in workload: hold a worker for ``seconds``, asleep or spinning on the CPU.

    Module level on purpose: workers start from a fork server and unpickle the function by
    reference (``procpool.cli.work_item``), so it must be importable by that name.
    """
    if burn:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    elif seconds > 0:
        time.sleep(seconds)
    return index


def resolve_func(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` (the function may be dotted, ``module:Class.method``).

    The current directory is appended to ``sys.path`` first, so a module next to the user is
    found as with ``python -m``; appended, not prepended, so it cannot shadow the standard
    library. Workers inherit this ``sys.path`` (the fork server is started after this).
    Every failure is a UsageError that says which part failed.
    """
    modname, sep, qualname = spec.partition(":")
    if not sep or not modname or not qualname:
        raise UsageError(f"--func {spec!r}: expected MODULE:FUNCTION")
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)
    try:
        obj: Any = importlib.import_module(modname)
    except Exception as exc:  # ImportError, SyntaxError, or whatever the module raised
        raise UsageError(f"--func {spec!r}: cannot import module {modname!r}: {type(exc).__name__}: {exc}") from None
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"--func {spec!r}: module {modname!r} has no attribute {qualname!r}") from None
    if not callable(obj):
        raise UsageError(f"--func {spec!r}: {qualname!r} is a {type(obj).__name__}, not a function")
    try:
        # Workers get the function by reference; find out now rather than at the first submit.
        pickle.dumps(obj)
    except Exception as exc:
        raise UsageError(f"--func {spec!r}: cannot be sent to worker processes: {exc}") from None
    return obj


# -- counting outcomes (callbacks on the pool's threads, read by the main loop) -----------------


@dataclass
class Tally:
    """How the submitted items ended. Guards: T = ``_lock`` (main thread and pool threads)."""

    wake: Callable[[], None]  # I: wakes the main loop
    submitted: int = 0  # T
    done: int = 0  # T: ended with a result
    failed: int = 0  # T: ended with an exception (its function's, or a procpool error)
    cancelled: int = 0  # T: cancelled before it ran
    first_failure: str | None = None  # T
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def track(self, index: int, fut: Future) -> None:
        with self._lock:
            self.submitted += 1
        fut.add_done_callback(lambda f: self.on_done(index, f))

    def on_done(self, index: int, fut: Future) -> None:
        """CONTEXT: the pool's arbiter thread, or whichever thread cancelled ``fut``."""
        exc = None if fut.cancelled() else fut.exception()
        with self._lock:
            if fut.cancelled():
                self.cancelled += 1
            elif exc is not None:
                self.failed += 1
                if self.first_failure is None:
                    self.first_failure = f"item {index}: {type(exc).__name__}: {exc}"
            else:
                self.done += 1
            drained = self._ended() == self.submitted
        if drained:
            # Only a drained queue changes what the loop does next (start the pause, or stop);
            # waking it per item would cost a pipe write and a loop turn per item.
            self.wake()

    def _ended(self) -> int:
        return self.done + self.failed + self.cancelled

    def ended(self) -> int:
        with self._lock:
            return self._ended()

    def progress(self) -> tuple[int, int]:
        """(ended, failed), read together."""
        with self._lock:
            return self._ended(), self.failed

    def is_drained(self) -> bool:
        """Has every submitted item ended?"""
        with self._lock:
            return self._ended() == self.submitted


# -- waking the main loop -----------------------------------------------------------------------


class Waker:
    """A self-pipe the main loop blocks on: future callbacks and signals write to it.

    A pipe rather than a ``threading.Event``: a signal handler that sets an Event can
    deadlock if the signal lands while the main thread holds the Event's own lock; a
    ``signal.set_wakeup_fd`` write cannot.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        for fd in (self._r, self._w):
            os.set_blocking(fd, False)

    @property
    def write_fd(self) -> int:
        return self._w

    def wake(self) -> None:
        w = self._w
        if w < 0:
            return  # closed: a late callback must not write to a recycled descriptor
        try:
            os.write(w, b"\0")
        except (BlockingIOError, OSError):
            pass  # full: the loop is awake anyway

    def wait(self, timeout: float | None) -> None:
        ready, _, _ = select.select([self._r], [], [], timeout)
        if ready:
            try:
                while os.read(self._r, 4096):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        r, w = self._r, self._w
        self._r = self._w = -1
        for fd in (r, w):
            os.close(fd)


class SignalRecorder:
    """Records SIGINT/SIGTERM for the main loop instead of raising in whatever it was doing.

    A KeyboardInterrupt in the middle of ``submit`` or ``close`` would leave the pool half
    torn down; recording the signal lets the loop stop at a clean point and tear down with a
    bounded wait. A second Ctrl-C during teardown is recorded too: teardown is bounded anyway.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, waker: Waker) -> None:
        self.waker = waker
        self.received: int | None = None
        self._old: dict[int, Any] = {}
        self._old_fd: int | None = None

    def _record(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> SignalRecorder:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers; keep the defaults
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._record)
        self._old_fd = signal.set_wakeup_fd(self.waker.write_fd, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old_fd is not None:
            signal.set_wakeup_fd(self._old_fd)
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# -- feeding bursts ---------------------------------------------------------------------------


def split_bursts(total: int, bursts: int) -> list[int]:
    """``total`` items in ``bursts`` near-equal bursts (fewer when there are fewer items)."""
    n = max(1, min(bursts, total)) if total else 0
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


class Feeder:
    """Submits the workload burst by burst: the next burst goes once the previous one drained
    and ``pause`` seconds passed, so the idle cull gets its chance in between.

    A burst is submitted ``FEED_CHUNK`` items per loop turn, not all at once: submitting
    100,000 items takes seconds, and a Ctrl-C or the deadline must not wait for that.
    """

    def __init__(self, tally: Tally, submit_one: Callable[[int], Future], sizes: list[int], pause: float) -> None:
        self.tally = tally
        self.submit_one = submit_one
        self.sizes = sizes
        self.pause = pause
        self.total = sum(sizes)
        self.next_index = 0
        self.bursts_started = 0
        self.left_in_burst = 0  # items of the current burst not submitted yet
        self.drained_at: float | None = None  # when the last burst was seen drained

    def is_feeding(self) -> bool:
        """Is a burst partly submitted (the loop must come back at once)?"""
        return self.left_in_burst > 0

    def all_submitted(self) -> bool:
        return self.bursts_started == len(self.sizes) and not self.is_feeding()

    def burst_due(self, now: float) -> bool:
        """Is it time to start the next burst? Notes the moment the previous one drained."""
        if self.is_feeding() or self.bursts_started == len(self.sizes):
            return False
        if self.bursts_started == 0:
            return True
        if not self.tally.is_drained():
            return False
        if self.drained_at is None:
            self.drained_at = now
        return now >= self.drained_at + self.pause

    def next_due(self) -> float | None:
        """When a pause ends, if the feeder is pausing (the loop must wake then)."""
        return None if self.drained_at is None else self.drained_at + self.pause

    def feed(self, now: float) -> None:
        if self.burst_due(now):
            self.left_in_burst = self.sizes[self.bursts_started]
            self.bursts_started += 1
            self.drained_at = None
        for _ in range(min(FEED_CHUNK, self.left_in_burst)):
            self.tally.track(self.next_index, self.submit_one(self.next_index))
            self.next_index += 1
            self.left_in_burst -= 1

    def phase(self) -> str:
        if self.drained_at is not None:
            return f"pause before burst {self.bursts_started + 1}/{len(self.sizes)}"
        return f"burst {self.bursts_started}/{len(self.sizes)}"


# -- progress ---------------------------------------------------------------------------------


class Progress:
    """The live status: one line rewritten in place on a terminal, a line per tick otherwise."""

    def __init__(self, out: TextIO, *, tty: bool, interval: float, quiet: bool) -> None:
        self.out = out
        self.tty = tty
        self.interval = interval
        self.quiet = quiet
        self.next_at = 0.0
        self._shown = False  # a line is on the terminal without its newline

    def next_due(self) -> float | None:
        return None if self.quiet else self.next_at

    def is_due(self, now: float) -> bool:
        return not self.quiet and now >= self.next_at

    def show(self, now: float, line: str) -> None:
        self.next_at = now + self.interval
        if self.tty:
            # A line wider than the terminal wraps, and "\r" would then only go back to the
            # start of its last row: cut it to the width. Back to column 0, write, and clear
            # what a longer previous line left to the right.
            width = shutil.get_terminal_size().columns
            self.out.write("\r" + line[: max(20, width - 1)] + "\x1b[K")
            self._shown = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def finish(self) -> None:
        """End the in-place line, so what follows starts on a line of its own."""
        if self._shown:
            self.out.write("\n")
            self.out.flush()
            self._shown = False


def status_line(pool: WorkerPool, tally: Tally, feeder: Feeder, elapsed: float) -> str:
    s = pool.stats()
    ended, failed = tally.progress()
    return (
        f"[{elapsed:6.1f}s] u{pool.id} workers {s.nr_workers} (idle {s.nr_idle}, busy {s.nr_busy}, "
        f"dying {s.nr_dying}; +{s.created} -{s.destroyed}) pending {s.nr_pending}"
        f" | items {ended}/{feeder.total} ended, {failed} failed | {feeder.phase()}"
    )


# -- procpool run ------------------------------------------------------------------------------


@dataclass
class RunResult:
    reason: str
    signum: int | None
    elapsed: float
    teardown_ms: float


def run_loop(
    pool: WorkerPool, feeder: Feeder, progress: Progress, waker: Waker, signals: SignalRecorder, duration: float | None
) -> tuple[str, bool]:
    """Feed and watch until every item ended, the deadline passed or a signal came.

    Returns (why it stopped, whether it stopped early and the rest must be cancelled).
    """
    start = time.monotonic()
    deadline = None if duration is None else start + duration
    while True:
        now = time.monotonic()
        if signals.received is not None:
            return f"interrupted by {signal.Signals(signals.received).name}", True
        if deadline is not None and now >= deadline:
            return f"--duration {duration:g}s passed", True
        feeder.feed(now)
        if feeder.all_submitted() and feeder.tally.is_drained():
            return "every item ended", False
        if progress.is_due(now):
            progress.show(now, status_line(pool, feeder.tally, feeder, now - start))
        if feeder.is_feeding():
            continue
        wakes = [t for t in (progress.next_due(), feeder.next_due(), deadline) if t is not None]
        waker.wait(max(0.0, min(wakes) - time.monotonic()) if wakes else None)


def cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    prog = "procpool run"
    try:
        fn = resolve_func(args.func) if args.func else None
    except UsageError as exc:
        err.write(f"{prog}: error: {exc}\n")
        return EXIT_USAGE
    idle_timeout = args.idle_timeout
    pause = args.pause if args.pause is not None else 1.5 * max(0.0, idle_timeout) + 0.1
    interval = args.interval if args.interval is not None else (TTY_INTERVAL if out.isatty() else LOG_INTERVAL)
    task_s = args.task_ms / 1000.0

    wq: Workqueue | None = None
    works: list[Future] = []  # with --workqueue: what stopping early may have to cancel

    def submit_one(index: int) -> Future:
        call = (fn, index) if fn is not None else (work_item, index, task_s, args.burn)
        if wq is None:
            return pool.submit(*call)
        work = wq.queue(*call)
        works.append(work)
        return work

    if args.workqueue is not None:
        pool_only = [
            opt
            for opt, value, default in (
                ("--min-workers", args.min_workers, None),
                ("--idle-timeout", args.idle_timeout, DEFAULT_IDLE_TIMEOUT),
                ("--linger-dying", args.linger_dying, 0.0),
                ("--title-prefix", args.title_prefix, "kworker"),
                ("--start-method", args.start_method, None),
            )
            if value != default
        ]
        if pool_only:
            err.write(
                f"{prog}: error: {', '.join(pool_only)} cannot be used with --workqueue (a workqueue's pool is "
                "shared: kworker titles, no minimum, the default idle timeout; only --max-workers applies)\n"
            )
            return EXIT_USAGE
    elif args.max_active is not None:
        err.write(f"{prog}: error: --max-active needs --workqueue\n")
        return EXIT_USAGE

    waker = Waker()
    started = time.monotonic()
    try:
        with SignalRecorder(waker) as signals:
            try:
                if args.workqueue is not None:
                    wq = Workqueue(args.workqueue, max_active=args.max_active, max_workers=args.max_workers)
                    pool = wq.pool
                else:
                    pool = WorkerPool(
                        args.min_workers,
                        args.max_workers,
                        idle_timeout,
                        title_prefix=args.title_prefix,
                        linger_dying=args.linger_dying,
                        mp_context=args.start_method,
                    )
            except (ValueError, TypeError) as exc:
                err.write(f"{prog}: error: {exc}\n")
                return EXIT_USAGE
            except OSError as exc:
                err.write(f"{prog}: error: cannot start the pool: {exc}\n")
                return EXIT_FAILED
            tally = Tally(waker.wake)
            feeder = Feeder(tally, submit_one, split_bursts(args.tasks, args.bursts), pause)
            progress = Progress(out, tty=out.isatty(), interval=interval, quiet=args.quiet)
            if not args.quiet:
                via = "" if wq is None else f" via workqueue {wq.name} (max_active {wq.max_active})"
                out.write(
                    f"procpool run: pool u{pool.id} (pid {os.getpid()}, table {pool.table_name}): {args.tasks} items"
                    f" in {len(feeder.sizes)} bursts{via}, workers {pool.min_workers}..{pool.max_workers}, idle"
                    f" timeout {pool.idle_timeout:g}s, pause {pause:g}s\n"
                )
                out.flush()
            try:
                reason, early = run_loop(pool, feeder, progress, waker, signals, args.duration)
            finally:
                progress.finish()
                t0 = time.monotonic()
                if wq is not None:
                    # Newest first, so that cancelling an item in flight does not let the
                    # workqueue hand the pool a waiting one that is about to be cancelled too.
                    for work in reversed(works):
                        if not work.done():
                            wq.cancel_work(work)  # type: ignore[arg-type]
                # Early stop: what has not run yet is cancelled; what runs gets a bounded
                # wait, then close() kills it (its item fails with TeardownTimeout).
                pool.close(wait=True, cancel_futures=True, timeout=args.teardown_timeout)
                if wq is not None:
                    wq.destroy()  # everything ended: drains at once, drops the (closed) pool
                teardown_ms = (time.monotonic() - t0) * 1000.0
            signum = signals.received if early else None
            if signum is None and signals.received is not None:
                reason += f" (then {signal.Signals(signals.received).name} during teardown)"
    finally:
        waker.close()
    result = RunResult(reason, signum, time.monotonic() - started, teardown_ms)
    write_summary(out, pool, tally, feeder, result, wq)
    if signum is not None:
        return 128 + signum
    return EXIT_FAILED if tally.failed else EXIT_OK


def write_summary(
    out: TextIO, pool: WorkerPool, tally: Tally, feeder: Feeder, result: RunResult, wq: Workqueue | None = None
) -> None:
    s = pool.stats()
    never = feeder.total - tally.submitted
    cancelled = tally.cancelled + never
    lines = [
        f"procpool run: pool u{pool.id} stopped: {result.reason}; ran {result.elapsed:.2f}s",
        f"  items     {feeder.total} total: {tally.done} done, {tally.failed} failed, {cancelled} cancelled"
        + (f" ({never} never queued)" if never else ""),
        f"  workers   {s.created} created, {s.destroyed} destroyed, {s.lost} lost",
        f"  teardown  {result.teardown_ms:.1f} ms",
    ]
    if wq is not None:
        w = wq.stats()
        lines.append(
            f"  workqueue {wq.name}: {w.started} started, {w.completed} completed, at most {w.max_in_flight} in"
            f" flight, CPU {w.cpu_time:.2f}s, {w.cpu_intensive} CPU-intensive, {w.cm_wakeups} cm wakeups"
        )
    if tally.first_failure is not None:
        lines.append(f"  first failure: {tally.first_failure}")
    out.write("\n".join(lines) + "\n")
    out.flush()


# -- procpool ps -------------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` safe to write to a terminal: every control or format character (newline,
    escape, bidi override...) shown as a Python-style escape. Names in tables and titles come
    from files and processes anyone of this user may have written."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)


def process_title(pid: int) -> str | None:
    """A process's title as ps shows it: its command line, joined and stripped (setproctitle
    pads the argument area), or None if there is no such live process of this user (a pid in
    a table may have been recycled by anyone's process)."""
    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or proc.uids().real != os.getuid():
            return None
        return " ".join(proc.cmdline()).strip()
    except psutil.Error:
        return None


def owner_alive(pid: int, table_created: float) -> bool:
    """Does the process that created this table still run? A process with the same pid that
    started after the table was created is a recycled pid, not the owner."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= table_created + CLOCK_SLACK
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; we may just not see its details


def describe_pool(table: TableInfo) -> dict[str, Any]:
    """One validated id table (``procpool.idtable.read_table``) as ``procpool ps`` shows it."""
    alive = owner_alive(table.owner_pid, table.created)
    now = time.time()
    workers = []
    for s in table.slots:
        title = process_title(s.pid)
        workers.append(
            {
                "id": s.id,
                "pid": s.pid or None,
                "state": s.state_name,
                "flags": ["die"] if s.flags & FLAG_DIE else [],
                "gen": s.gen,
                "items_done": s.items_done,
                "in_state_s": round(max(0.0, now - s.since), 3),
                "title": title,
                "alive": title is not None,
            }
        )
    return {
        "pool": table.pool_id,
        "table": table.name,
        "owner_pid": table.owner_pid,
        "owner_alive": alive,
        "stale": not alive,
        "owner_cmdline": process_title(table.owner_pid) if alive else None,
        "capacity": table.capacity,
        "created": table.created,
        "workers": workers,
    }


def read_pool(name: str) -> dict[str, Any] | None:
    """Snapshot one id table, or None if it vanished or is not a valid table of this user."""
    try:
        return describe_pool(read_table(name))
    except (OSError, BadSegment):
        return None


def collect(names: Iterable[str] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every valid pool of this user, ordered by owner pid then pool id, each with the
    workqueues using it (from its program's workqueue segment: name, attributes, pools and
    statistics, see procpool.workqueue); and what was skipped: [{"name", "reason"}]."""
    snap = read_snapshot(None if names is None else list(names))
    pools = [describe_pool(t) for t in snap.tables]
    for p in pools:
        p["workqueues"] = [e for e in snap.workqueues.get(p["owner_pid"], []) if p["pool"] in e["pools"]]
    return pools, [{"name": n, "reason": r} for n, r in snap.skipped]


def collect_pools(names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The pools of ``collect``, without what was skipped."""
    return collect(names)[0]


def _aligned(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[str]) -> str:
    """Columns padded to their widest cell; the last one is left ragged."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        cells = [c.rjust(wd) if h in right else c.ljust(wd) for c, wd, h in zip(r, widths, header, strict=False)]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    return "\n".join(lines)


def format_workqueues(pools: list[dict[str, Any]]) -> str:
    """One row per workqueue, in the kernel's wq_monitor columns: items started (TOTAL), in
    flight (INFL), CPU seconds (CPUTIME), CPU-intensive marks (CPUITSV), concurrency-
    management wakeups (CMW), mayday calls and items rescued. '' if there is none."""
    header = ("WORKQUEUE", "OWNER", "POOLS", "TOTAL", "INFL", "CPUTIME", "CPUITSV", "CMW", "MAYDAY", "RESCUED")
    rows: list[tuple[str, ...]] = []
    seen: set[tuple[int, int]] = set()
    for p in pools:
        for e in p.get("workqueues", []):
            if (p["owner_pid"], id(e)) in seen:
                continue  # listed under each of its pools: one row is enough
            seen.add((p["owner_pid"], id(e)))
            rows.append(
                (
                    printable(e["name"]),
                    str(p["owner_pid"]),
                    ",".join(f"u{i}" for i in e["pools"]),
                    str(e.get("started", 0)),
                    str(e.get("in_flight", 0)),
                    f"{e.get('cpu_time', 0.0):.2f}",
                    str(e.get("cpu_intensive", 0)),
                    str(e.get("cm_wakeups", 0)),
                    str(e.get("mayday", 0)) if e.get("rescuer") else "-",
                    str(e.get("rescued", 0)) if e.get("rescuer") else "-",
                )
            )
    if not rows:
        return ""
    return _aligned(header, rows, set(header) - {"WORKQUEUE", "POOLS"})


def _age(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 600:
        return f"{seconds:.0f}s"
    if seconds < 36000:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def format_table(pools: list[dict[str, Any]]) -> str:
    """An aligned text table, one row per worker (one row for a pool with no worker)."""
    header = ("POOL", "OWNER", "STATUS", "ID", "PID", "STATE", "DONE", "AGE", "TITLE")
    right = {"OWNER", "ID", "PID", "DONE", "AGE"}
    rows: list[tuple[str, ...]] = []
    for p in pools:
        head = (f"u{p['pool']}", str(p["owner_pid"]), "stale" if p["stale"] else "live")
        if not p["workers"]:
            rows.append(head + ("-", "-", "-", "-", "-", "(no workers)"))
        for w in p["workers"]:
            state = w["state"] + ("+die" if "die" in w["flags"] else "")
            title = printable(w["title"]) if w["title"] is not None else "(gone)"
            if len(title) > TITLE_WIDTH:
                # A worker still starting shows the fork server's long command line until it
                # sets its title; the full text is in --json.
                title = title[: TITLE_WIDTH - 3] + "..."
            rows.append(
                head + (str(w["id"]), str(w["pid"] or "-"), state, str(w["items_done"]), _age(w["in_state_s"]), title)
            )
    return _aligned(header, rows, right)


def cmd_ps(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """List the pools. Whatever is in /dev/shm, this ends and exits 0: a name under our prefix
    that is not a valid segment of ours (another user's, a FIFO, forged, truncated) is skipped
    with one line on ``err`` and, with --json, listed in ``skipped``."""
    pools, skipped = collect()
    for s in skipped:
        err.write(f"procpool ps: skipped {SHM_DIR}/{printable(s['name'])}: {printable(s['reason'])}\n")
    err.flush()
    if args.json:
        json.dump({"pools": pools, "skipped": skipped}, out, indent=2)
        out.write("\n")
    elif pools:
        out.write(format_table(pools) + "\n")
        wqs = format_workqueues(pools)
        if wqs:
            out.write("\n" + wqs + "\n")
        if any(p["stale"] for p in pools):
            out.write("stale: the owner is gone but its table was left in /dev/shm (its workers may be gone too)\n")
    else:
        out.write("no procpool pools running\n")
    out.flush()
    return EXIT_OK


# -- arguments ---------------------------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _seconds(*, positive: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(
                f"must be a {'positive' if positive else 'non-negative'} number, got {text!r}"
            )
        return value

    return parse


def _number(text: str) -> float:
    """A finite float. Range checks are WorkerPool's, so its message is the one users see;
    but it lets nan and inf through (WorkerPool's check_number), so refuse them here."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="procpool",
        description="Process pools modelled on the Linux kernel's workqueue worker pools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run a pool on a workload and watch it grow and shrink",
        description="Start a pool and feed it a workload in bursts separated by pauses longer than the idle "
        "timeout, showing live progress; ends when every item ended, at --duration, or on Ctrl-C.",
    )
    g = run.add_argument_group("pool")
    g.add_argument(
        "--min-workers", type=int, default=None, metavar="N", help="workers kept at all times (pool default: 2)"
    )
    g.add_argument(
        "--max-workers",
        type=int,
        default=DEFAULT_MAX_WORKERS,
        metavar="N",
        help=f"upper bound on workers (default {DEFAULT_MAX_WORKERS})",
    )
    g.add_argument(
        "--idle-timeout",
        type=_number,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="S",
        help=f"cull idle workers after S seconds (default {DEFAULT_IDLE_TIMEOUT:g})",
    )
    g.add_argument(
        "--linger-dying",
        type=_number,
        default=0.0,
        metavar="S",
        help="keep a detached dying worker alive S seconds, to watch kworker/dying in ps (default 0)",
    )
    g.add_argument("--title-prefix", default="kworker", metavar="PREFIX", help="process title prefix (default kworker)")
    g.add_argument(
        "--workqueue",
        metavar="NAME",
        help="queue the items on a procpool.Workqueue NAME (its shared pool's workers show +NAME/-NAME in "
        "their titles; procpool ps lists its statistics); only --max-workers applies to its pool",
    )
    g.add_argument(
        "--max-active",
        type=_int_at_least(1),
        default=None,
        metavar="N",
        help="with --workqueue: items in flight at a time (default 256)",
    )
    g.add_argument(
        "--start-method",
        choices=("forkserver", "spawn"),
        default=None,
        help="how worker processes start (default forkserver)",
    )
    g = run.add_argument_group("workload")
    g.add_argument("--tasks", type=_int_at_least(0), default=200, metavar="N", help="items to run (default 200)")
    g.add_argument(
        "--task-ms", type=_seconds(), default=20.0, metavar="MS", help="how long each built-in item takes (default 20)"
    )
    g.add_argument("--burn", action="store_true", help="built-in items spin on the CPU instead of sleeping")
    g.add_argument(
        "--bursts", type=_int_at_least(1), default=4, metavar="N", help="submit the items in N bursts (default 4)"
    )
    g.add_argument(
        "--pause",
        type=_seconds(),
        default=None,
        metavar="S",
        help="pause between bursts, after one drained (default 1.5 x idle timeout + 0.1)",
    )
    g.add_argument(
        "--func",
        metavar="MODULE:FUNCTION",
        help="run FUNCTION(index) from MODULE instead of the built-in items (module found on "
        "PYTHONPATH or in the current directory)",
    )
    g = run.add_argument_group("run")
    g.add_argument(
        "--duration",
        type=_seconds(positive=True),
        default=None,
        metavar="S",
        help="stop after S seconds and cancel the items not started",
    )
    g.add_argument(
        "--teardown-timeout",
        type=_seconds(),
        default=DEFAULT_TEARDOWN_TIMEOUT,
        metavar="S",
        help="when stopping early, how long running items may finish before their workers "
        f"are killed (default {DEFAULT_TEARDOWN_TIMEOUT:g})",
    )
    g.add_argument(
        "--interval",
        type=_seconds(positive=True),
        default=None,
        metavar="S",
        help=f"progress refresh (default {TTY_INTERVAL:g}s on a terminal, {LOG_INTERVAL:g}s otherwise)",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress, only the summary")
    run.set_defaults(handler=cmd_run)

    ps = sub.add_parser(
        "ps",
        help="list this user's running pools and their workers",
        description="List the pools of this user's procpool programs and their workers, read from the "
        "shared-memory id tables; a table whose owner is gone is marked stale.",
    )
    ps.add_argument(
        "--json",
        action="store_true",
        help='print a JSON object: "pools" (each with its workers and workqueues) and "skipped" '
        "(names in /dev/shm that are not valid tables of this user, with why)",
    )
    ps.set_defaults(handler=cmd_ps)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``procpool`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args, sys.stdout, sys.stderr)
    except BrokenPipeError:
        # `procpool ps | head`: the reader left. Point stdout at /dev/null so the flush at
        # exit does not raise again, and end quietly, as ps does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    # Run the importable copy of this module, not __main__: work functions must pickle as
    # procpool.cli.work_item, which workers can import, not as __main__.work_item.
    from procpool.cli import main as _main

    sys.exit(_main())
