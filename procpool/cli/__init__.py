"""The ``procpool`` command: ``run`` a pool on a workload, ``ps`` the pools that are running,
``monitor`` them live (the kernel's wq_monitor for procpool).

One module per command (``procpool.cli.run``, ``.ps``, ``.monitor``) and one for what they ask
the OS about processes (``.procinfo``). This module holds only the parser and ``main``, and
imports a command's module when that command runs: ``procpool ps`` must start in tens of
milliseconds, so it never imports the pool machinery (``procpool.pool``, multiprocessing),
and nothing imports rich but the live displays that use it (``rich_or_none``).

rich (``pip install 'procpool[cli]'``) draws ``monitor``'s in-place table and ``run``'s progress
bar on a terminal. Without it both fall back to plain text: ``monitor`` prints one block per
interval, ``run`` rewrites one status line; nothing else changes.

Exit codes: 0 success; 1 some item failed (or the pool could not start); 2 bad usage (bad
options, a ``--func`` that cannot be imported, a pool option WorkerPool refuses: the message
names the flag, after that command's usage); 128 + N when stopped by signal N (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `procpool ps` starts faster
if TYPE_CHECKING:
    from typing import Any, TextIO

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

#: ``procpool run``'s own defaults: a demo, so workers are cheap and the idle cull is quick,
#: and the whole run lasts about 30 s (8 bursts of 40 items of 0.2 s on 4 workers, each
#: burst about 2 s, then a pause of 1.6 s in which the idle workers are culled): long enough
#: to watch from another terminal.
DEFAULT_MAX_WORKERS = 4
DEFAULT_IDLE_TIMEOUT = 1.0
DEFAULT_TEARDOWN_TIMEOUT = 3.0
DEFAULT_TASKS = 320
DEFAULT_TASK_MS = 200.0
DEFAULT_BURSTS = 8
#: The largest --max-workers (procpool.idtable.MAX_WORKERS; not imported: ps must stay light).
MAX_WORKERS = 4096


class UsageError(Exception):
    """Bad usage found after argparse (an unimportable --func): usage, one line, exit 2."""


def usage_error(args: argparse.Namespace, err: TextIO, message: str) -> int:
    """Report bad usage found after parsing as argparse does: the command's own usage, then
    ``procpool CMD: error: message``. Returns EXIT_USAGE."""
    parser: argparse.ArgumentParser = args.subparser
    err.write(parser.format_usage())
    err.write(f"{parser.prog}: error: {message}\n")
    err.flush()
    return EXIT_USAGE


def rich_or_none() -> Any:
    """The rich package (with ``rich.console`` loaded), or None if it is not installed: the
    live displays fall back to plain text (see the module docstring)."""
    try:
        import rich.console  # noqa: F401 - loaded for the caller (rich.console.Console)
    except ImportError:
        return None
    return sys.modules["rich"]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("procpool")
    except Exception:  # noqa: BLE001 - not installed (run from a checkout): the package's own
        from procpool import __version__

        return __version__


class _VersionAction(argparse.Action):
    """``--version``, resolved only when asked (importlib.metadata costs milliseconds)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *a: Any, **kw: Any) -> None:
        sys.stdout.write(f"procpool {_version()}\n")
        parser.exit()


# -- argument types: each error names what was wrong; argparse adds the flag ------------------


def _int_in(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
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


def _pool_id(text: str) -> int:
    """A pool id as ps shows it (``u3``) or bare (``3``)."""
    digits = text[1:] if text[:1] == "u" else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"not a pool id (u3 or 3): {text!r}")
    return int(digits)


class _Parser(argparse.ArgumentParser):
    """Every usage error is reported by the parser of the command it concerns, with that
    command's usage (argparse reports an unknown option of ``procpool ps`` at the top)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``procpool`` parser: one sub-parser per command, each built by its own function
    (``run``, ``ps``, ``monitor``), which also names the module and handler that run it."""
    parser = _Parser(
        prog="procpool",
        description="Process pools modelled on the Linux kernel's workqueue worker pools.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print procpool's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    _add_run(sub)
    _add_ps(sub)
    _add_monitor(sub)
    return parser


def _add_run(sub: Any) -> None:
    """``procpool run``: a pool (or a workqueue) fed a workload in bursts, watched live."""
    run = sub.add_parser(
        "run",
        help="run a pool on a workload and watch it grow and shrink",
        description="Start a pool and feed it a workload in bursts separated by pauses longer than the idle "
        "timeout, showing live progress; ends when every item ended, at --duration, or on Ctrl-C. The "
        "defaults last about 30 s, to watch with `procpool monitor` or `procpool ps` in another terminal.",
    )
    _run_pool_options(run.add_argument_group("pool"))
    _run_workload_options(run.add_argument_group("workload"))
    _run_run_options(run.add_argument_group("run"))
    run.set_defaults(command_module="run", handler="cmd_run", subparser=run)


def _run_pool_options(g: Any) -> None:
    """``procpool run``'s pool options: size, timeouts, titles, workqueue, start method."""
    g.add_argument(
        "--min-workers",
        type=_int_in(0, MAX_WORKERS),
        default=None,
        metavar="N",
        help="workers kept at all times (default 2)",
    )
    g.add_argument(
        "--max-workers",
        type=_int_in(1, MAX_WORKERS),
        default=DEFAULT_MAX_WORKERS,
        metavar="N",
        help=f"upper bound on workers (default {DEFAULT_MAX_WORKERS})",
    )
    g.add_argument(
        "--idle-timeout",
        type=_seconds(),
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="S",
        help=f"cull idle workers after S seconds (default {DEFAULT_IDLE_TIMEOUT:g})",
    )
    g.add_argument(
        "--linger-dying",
        type=_seconds(),
        default=0.0,
        metavar="S",
        help="keep each dying worker alive S seconds after it gave its id back, to watch kworker/dying "
        "in ps (default 0)",
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
        type=_int_in(1),
        default=None,
        metavar="N",
        help="with --workqueue: items in flight at a time (default 256)",
    )
    g.add_argument(
        "--start-method",
        choices=("forkserver", "spawn"),
        default=None,
        help="how the program's spawner process starts when the program runs threads (the spawner then "
        "forks every worker; default forkserver)",
    )


def _run_workload_options(g: Any) -> None:
    """``procpool run``'s workload: how many items, how long each, in how many bursts."""
    g.add_argument(
        "--tasks", type=_int_in(0), default=DEFAULT_TASKS, metavar="N", help=f"items to run (default {DEFAULT_TASKS})"
    )
    g.add_argument(
        "--task-ms",
        type=_seconds(),
        default=DEFAULT_TASK_MS,
        metavar="MS",
        help=f"how long each built-in item takes (default {DEFAULT_TASK_MS:g})",
    )
    g.add_argument("--burn", action="store_true", help="built-in items spin on the CPU instead of sleeping")
    g.add_argument(
        "--bursts",
        type=_int_in(1),
        default=DEFAULT_BURSTS,
        metavar="N",
        help=f"submit the items in N bursts (default {DEFAULT_BURSTS})",
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
        help="run FUNCTION(index) from MODULE instead of the built-in items; the summary shows the first "
        "results (module found on PYTHONPATH or in the current directory)",
    )


def _run_run_options(g: Any) -> None:
    """``procpool run``'s run options: when to stop, how to show progress and the summary."""
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
        help="progress refresh (default 0.1s on a terminal, 1s otherwise)",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress, only the summary")
    g.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _add_ps(sub: Any) -> None:
    """``procpool ps``: the pools of this user's programs, read once."""
    ps = sub.add_parser(
        "ps",
        help="list this user's running pools, their workers and helpers",
        description="List the pools of this user's procpool programs: every worker from its fork until it is "
        "reaped (dying ones included), and each program's spawner and Manager, read from the "
        "shared-memory id tables and /proc; a table whose owner is gone is marked stale.",
    )
    _filters(ps)
    ps.add_argument(
        "--json",
        action="store_true",
        help='print a JSON object: "pools" (each with its workers, helpers, counters and workqueues) and '
        '"skipped" (names in /dev/shm that are not valid tables of this user, with why)',
    )
    ps.set_defaults(command_module="ps", handler="cmd_ps", subparser=ps)


def _add_monitor(sub: Any) -> None:
    """``procpool monitor``: every pool and workqueue, sampled live (the kernel's wq_monitor)."""
    mon = sub.add_parser(
        "monitor",
        help="watch every pool and workqueue live (the kernel's wq_monitor)",
        description="One row per pool and per workqueue, refreshed every interval: totals and per-second "
        "rates of items started and completed, items in flight, CPU time, CPU-intensive marks, "
        "concurrency-management wakeups, mayday calls, items rescued, workers idle/busy/dying, created, "
        "destroyed, lost. On a terminal the table is redrawn in place (with rich installed: "
        "pip install 'procpool[cli]'); otherwise one block per interval.",
    )
    mon.add_argument(
        "-i",
        "--interval",
        type=_seconds(positive=True),
        default=1.0,
        metavar="S",
        help="seconds between samples (default 1)",
    )
    mon.add_argument("-n", "--count", type=_int_in(1), default=None, metavar="N", help="stop after N samples")
    _filters(mon)
    mon.add_argument("--json", action="store_true", help="print one JSON object per line per interval")
    mon.set_defaults(command_module="monitor", handler="cmd_monitor", subparser=mon)


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", type=_pool_id, default=None, metavar="ID", help="only pool ID (u3 or 3)")
    p.add_argument("--owner", type=_int_in(1), default=None, metavar="PID", help="only the pools of program PID")
    p.add_argument(
        "--workqueue", default=None, metavar="NAME", help="only the pools of workqueue NAME (and that workqueue)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``procpool`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Unknown options are reported by the command they were given to, with its usage.
        args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    # __import__, not importlib.import_module: the C import path, which -X importtime reports.
    name = f"procpool.cli.{args.command_module}"
    __import__(name)
    module = sys.modules[name]
    try:
        return getattr(module, args.handler)(args, sys.stdout, sys.stderr)
    except BrokenPipeError:
        # `procpool ps | head`: the reader left. Point stdout at /dev/null so the flush at
        # exit does not raise again, and end quietly, as ps does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


#: Names this package had as one module (procpool.cli), now in its command modules: loaded on
#: first use (PEP 562), so importing procpool.cli stays light.
_MOVED = {
    "collect": "ps",
    "collect_pools": "ps",
    "describe_pool": "ps",
    "read_pool": "ps",
    "format_table": "ps",
    "format_workqueues": "ps",
    "cmd_ps": "ps",
    "printable": "procinfo",
    "process_title": "procinfo",
    "owner_alive": "procinfo",
    "work_item": "run",
    "resolve_func": "run",
    "cmd_run": "run",
    "cmd_monitor": "monitor",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"procpool.cli.{module}"), name)
