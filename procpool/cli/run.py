"""``procpool run``: a pool on a workload, with live progress, until every item ended.

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

Exit codes: 0 success; 1 some item failed (or the pool could not start); 2 bad usage (bad
options, a ``--func`` that cannot be imported, a pool option WorkerPool refuses); 128 + N
when stopped by signal N (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import select
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..pool import WorkerPool
from ..workqueue import Workqueue
from . import EXIT_FAILED, EXIT_OK, UsageError, usage_error

#: Items submitted per turn of the main loop, so signals and the deadline are seen between.
FEED_CHUNK = 256
#: Progress refresh: in place on a terminal, a line per second in a log.
TTY_INTERVAL = 0.1
LOG_INTERVAL = 1.0
#: How many results of --func the summary shows (the lowest item numbers).
FIRST_RESULTS = 5


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
    except Exception as exc:  # noqa: BLE001 - ImportError, SyntaxError, or whatever the module raised
        raise UsageError(f"--func {spec!r}: cannot import module {modname!r}: {type(exc).__name__}: {exc}") from None
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"--func {spec!r}: module {modname!r} has no attribute {qualname!r}") from None
    if not callable(obj):
        kind = type(obj).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise UsageError(f"--func {spec!r}: {qualname!r} is {article} {kind}, not a function")
    try:
        # Workers get the function by reference; find out now rather than at the first submit.
        pickle.dumps(obj)
    except Exception as exc:  # noqa: BLE001 - whatever pickling raises is a usage error
        raise UsageError(f"--func {spec!r}: cannot be sent to worker processes: {exc}") from None
    return obj


def _short_repr(value: Any, width: int = 80) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # noqa: BLE001 - a result's own __repr__ failing must not fail the run
        text = f"<unrepresentable {type(value).__name__}: {exc}>"
    return text if len(text) <= width else text[: width - 3] + "..."


# -- counting outcomes (callbacks on the pool's threads, read by the main loop) -----------------


@dataclass
class Tally:
    """How the submitted items ended. Guards: T = ``_lock`` (main thread and pool threads)."""

    wake: Callable[[], None]  # I: wakes the main loop
    submitted: int = 0  # T
    done: int = 0  # T: ended with a result
    failed: int = 0  # T: ended with an exception (its function's, or a procpool error)
    cancelled: int = 0  # T: cancelled before it ran
    #: T: the failure with the lowest item number: (index, "Type: message"). Items end in any
    #: order; the lowest number is the one a user can reproduce first (`--tasks` up to it).
    first_failure: tuple[int, str] | None = None
    #: T: up to FIRST_RESULTS results with the lowest item numbers: {index: repr}.
    results: dict[int, str] = field(default_factory=dict)
    keep_results: bool = False  # I: --func (the built-in items return their own number)
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
                if self.first_failure is None or index < self.first_failure[0]:
                    self.first_failure = (index, f"{type(exc).__name__}: {exc}")
            else:
                self.done += 1
                if self.keep_results and (len(self.results) < FIRST_RESULTS or index < max(self.results)):
                    self.results[index] = _short_repr(fut.result())
                    if len(self.results) > FIRST_RESULTS:
                        del self.results[max(self.results)]
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
    """The live status: on a terminal a progress bar (rich, ``procpool[cli]``) with the status
    line beside it, redrawn in place; without rich one line rewritten in place; a line per
    tick otherwise (a log, a pipe)."""

    def __init__(self, out: TextIO, *, tty: bool, interval: float, quiet: bool, total: int = 0) -> None:
        self.out = out
        self.tty = tty
        self.interval = interval
        self.quiet = quiet
        self.next_at = 0.0
        self._shown = False  # a line is on the terminal without its newline
        self._bar: Any = None  # rich.progress.Progress, on a terminal when rich is installed
        if tty and not quiet:
            from . import rich_or_none

            rich = rich_or_none()
            if rich is not None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                console = rich.console.Console(file=out, highlight=False)
                self._bar = Progress(
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("{task.description}", markup=False),
                    console=console,
                    auto_refresh=False,
                )
                self._task = self._bar.add_task("", total=max(1, total))
                self._bar.start()

    def next_due(self) -> float | None:
        return None if self.quiet else self.next_at

    def is_due(self, now: float) -> bool:
        return not self.quiet and now >= self.next_at

    def show(self, now: float, line: str, ended: int = 0) -> None:
        self.next_at = now + self.interval
        if self._bar is not None:
            # The bar shows the item count and the time; the line's own "[  1.2s]" prefix and
            # item counts are left out beside it.
            self._bar.update(self._task, completed=ended, description=line.split("] ", 1)[-1])
            self._bar.refresh()
        elif self.tty:
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
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
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
            if progress.tty and not progress.quiet:  # the bar's last word: every item, 100%
                progress.show(now, status_line(pool, feeder.tally, feeder, now - start), feeder.tally.ended())
            return "every item ended", False
        if progress.is_due(now):
            progress.show(now, status_line(pool, feeder.tally, feeder, now - start), feeder.tally.ended())
        if feeder.is_feeding():
            continue
        wakes = [t for t in (progress.next_due(), feeder.next_due(), deadline) if t is not None]
        waker.wait(max(0.0, min(wakes) - time.monotonic()) if wakes else None)


def _workqueue_conflict(args: argparse.Namespace) -> str | None:
    """What in ``args`` contradicts the rest: pool options with ``--workqueue`` (its pool is
    shared), ``--max-active`` without it. None when they agree."""
    from . import DEFAULT_IDLE_TIMEOUT

    if args.workqueue is None:
        return "--max-active needs --workqueue" if args.max_active is not None else None
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
    if not pool_only:
        return None
    return (
        f"{', '.join(pool_only)} cannot be used with --workqueue (a workqueue's pool is "
        "shared: kworker titles, no minimum, the default idle timeout; only --max-workers applies)"
    )


class _Submitter:
    """Hands item ``index`` to the pool, or through the workqueue; keeps the workqueue's items
    (what stopping early may have to cancel)."""

    def __init__(self, args: argparse.Namespace, fn: Callable[..., Any] | None) -> None:
        self.fn, self.task_s, self.burn = fn, args.task_ms / 1000.0, args.burn
        self.pool: WorkerPool | None = None
        self.wq: Workqueue | None = None
        self.works: list[Future] = []

    def __call__(self, index: int) -> Future:
        call = (self.fn, index) if self.fn is not None else (work_item, index, self.task_s, self.burn)
        if self.wq is None:
            assert self.pool is not None
            return self.pool.submit(*call)
        work = self.wq.queue(*call)
        self.works.append(work)
        return work

    def start(self, args: argparse.Namespace) -> WorkerPool:
        """Start the pool (or the workqueue and its shared pool). ValueError/TypeError: a pool
        option refused; OSError: the pool could not start."""
        if args.workqueue is not None:
            self.wq = Workqueue(args.workqueue, max_active=args.max_active, max_workers=args.max_workers)
            self.pool = self.wq.pool
        else:
            self.pool = WorkerPool(
                args.min_workers,
                args.max_workers,
                args.idle_timeout,
                title_prefix=args.title_prefix,
                linger_dying=args.linger_dying,
                mp_context=args.start_method,
            )
        return self.pool

    def stop(self, teardown_timeout: float) -> float:
        """Cancel what has not run, give what runs ``teardown_timeout``, close; returns the
        teardown's milliseconds."""
        assert self.pool is not None
        t0 = time.monotonic()
        if self.wq is not None:
            # Newest first, so that cancelling an item in flight does not let the
            # workqueue hand the pool a waiting one that is about to be cancelled too.
            for work in reversed(self.works):
                if not work.done():
                    self.wq.cancel_work(work)
        # Early stop: what has not run yet is cancelled; what runs gets a bounded
        # wait, then close() kills it (its item fails with TeardownTimeout).
        self.pool.close(wait=True, cancel_futures=True, timeout=teardown_timeout)
        if self.wq is not None:
            self.wq.destroy()  # everything ended: drains at once, drops the (closed) pool
        return (time.monotonic() - t0) * 1000.0


def _announce(out: TextIO, args: argparse.Namespace, pool: WorkerPool, wq: Workqueue | None, feeder: Feeder) -> None:
    """The first lines: what runs where, and how to watch it."""
    via = "" if wq is None else f" via workqueue {wq.name} (max_active {wq.max_active})"
    out.write(
        f"procpool run: pool u{pool.id} (pid {os.getpid()}, table {pool.table_name}): {args.tasks} items"
        f" in {len(feeder.sizes)} bursts{via}, workers {pool.min_workers}..{pool.max_workers}, idle"
        f" timeout {pool.idle_timeout:g}s, pause {feeder.pause:g}s\n"
        f"procpool run: watch it from another terminal: procpool monitor, or procpool ps --owner"
        f" {os.getpid()}\n"
    )
    out.flush()


def cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``procpool run``: check the options, start the pool, feed and watch it, stop it, sum up."""
    if args.min_workers is not None and args.min_workers > args.max_workers:
        return usage_error(args, err, f"--min-workers {args.min_workers} is more than --max-workers {args.max_workers}")
    try:
        fn = resolve_func(args.func) if args.func else None
    except UsageError as exc:
        return usage_error(args, err, str(exc))
    conflict = _workqueue_conflict(args)
    if conflict is not None:
        return usage_error(args, err, conflict)
    pause = args.pause if args.pause is not None else 1.5 * max(0.0, args.idle_timeout) + 0.1
    interval = args.interval if args.interval is not None else (TTY_INTERVAL if out.isatty() else LOG_INTERVAL)
    submit = _Submitter(args, fn)
    waker = Waker()
    started = time.monotonic()
    try:
        with SignalRecorder(waker) as signals:
            try:
                pool = submit.start(args)
            except (ValueError, TypeError) as exc:
                return usage_error(args, err, _as_flags(str(exc)))
            except OSError as exc:
                err.write(f"procpool run: error: cannot start the pool: {exc}\n")
                return EXIT_FAILED
            tally = Tally(waker.wake, keep_results=fn is not None)
            feeder = Feeder(tally, submit, split_bursts(args.tasks, args.bursts), pause)
            if not args.quiet:
                _announce(out, args, pool, submit.wq, feeder)
            progress = Progress(out, tty=out.isatty(), interval=interval, quiet=args.quiet, total=feeder.total)
            try:
                reason, early = run_loop(pool, feeder, progress, waker, signals, args.duration)
            finally:
                progress.finish()
                teardown_ms = submit.stop(args.teardown_timeout)
            signum = signals.received if early else None
            if signum is None and signals.received is not None:
                reason += f" (then {signal.Signals(signals.received).name} during teardown)"
    finally:
        waker.close()
    result = RunResult(reason, signum, time.monotonic() - started, teardown_ms)
    if args.json:
        json.dump(summary(pool, tally, feeder, result, submit.wq), out, indent=2)
        out.write("\n")
        out.flush()
    else:
        write_summary(out, pool, tally, feeder, result, submit.wq)
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
    if tally.results:
        lines.append("  results   " + ", ".join(f"item {i}: {r}" for i, r in sorted(tally.results.items())))
    if tally.first_failure is not None:
        lines.append(f"  first failure (lowest item): item {tally.first_failure[0]}: {tally.first_failure[1]}")
    out.write("\n".join(lines) + "\n")
    out.flush()


def summary(pool: WorkerPool, tally: Tally, feeder: Feeder, result: RunResult, wq: Workqueue | None) -> dict[str, Any]:
    """The summary as one JSON object (``procpool run --json``)."""
    s = pool.stats()
    never = feeder.total - tally.submitted
    doc: dict[str, Any] = {
        "pool": pool.id,
        "owner_pid": os.getpid(),
        "reason": result.reason,
        "signal": None if result.signum is None else signal.Signals(result.signum).name,
        "elapsed_s": round(result.elapsed, 3),
        "teardown_ms": round(result.teardown_ms, 1),
        "items": {
            "total": feeder.total,
            "done": tally.done,
            "failed": tally.failed,
            "cancelled": tally.cancelled + never,
            "never_queued": never,
        },
        "workers": {"created": s.created, "destroyed": s.destroyed, "lost": s.lost},
        "results": [{"item": i, "repr": r} for i, r in sorted(tally.results.items())],
        "first_failure": None
        if tally.first_failure is None
        else {"item": tally.first_failure[0], "error": tally.first_failure[1]},
    }
    if wq is not None:
        w = wq.stats()
        doc["workqueue"] = {
            "name": wq.name,
            "started": w.started,
            "completed": w.completed,
            "max_in_flight": w.max_in_flight,
            "cpu_time": w.cpu_time,
            "cpu_intensive": w.cpu_intensive,
            "cm_wakeups": w.cm_wakeups,
        }
    return doc


#: WorkerPool's parameter names as the flags a user typed (its messages name the parameters).
_FLAGS = {
    "min_workers": "--min-workers",
    "max_workers": "--max-workers",
    "idle_timeout": "--idle-timeout",
    "linger_dying": "--linger-dying",
    "title_prefix": "--title-prefix",
    "mp_context": "--start-method",
    "max_active": "--max-active",
}


def _as_flags(message: str) -> str:
    import re

    return re.sub(r"\b(" + "|".join(_FLAGS) + r")\b", lambda m: _FLAGS[m.group(1)], message)
