"""procpool vs the usual Python process pools, side by side, in one run.

    .venv/bin/python scripts/bench.py [--rounds N] [--quick] [--only NAME,...] [--peers NAME,...] [--json FILE]

Contenders: ``procpool`` (WorkerPool, forkserver workers, the default) and the peers

    cf-fork         concurrent.futures.ProcessPoolExecutor, mp_context fork
    cf-forkserver   concurrent.futures.ProcessPoolExecutor, mp_context forkserver
    mp-pool         multiprocessing.Pool (fork)
    loky            loky.ProcessPoolExecutor (its default "loky" start method)
    billiard        billiard.Pool (fork)
    pebble          pebble.ProcessPool (fork)

loky, billiard and pebble are optional (``.venv/bin/pip install -e '.[bench]'``); a peer that
cannot be imported is reported as skipped. ``--peers`` chooses among them (default: all).

The run is interleaved: every round runs every benchmark once per contender (the contender
order rotates from round to round), so machine noise hits all of them alike. Each benchmark
reports the median over rounds with the min-max spread, the procpool/peer ratio of the
medians, and the ratio to the best peer (marked ``*``); then PASS/MISS for the targets
(``targets.TARGETS``, 2 cores). Default: 5 rounds (start-cold in all 5), about 5 minutes on
an idle 2-core machine (12 under load); ``--quick``: 2 rounds of fewer items, and
teardown-64, start-warm and start-cold once, under a minute. The load average and this
process's RSS are printed every round: both move the numbers.

Benchmarks (``--only`` takes these names; ``teardown`` and ``start`` name both variants)
==========

import         a fresh interpreter runs ``import procpool`` (and, for information,
               ``from procpool import WorkerPool``), ``import concurrent.futures.process``, ``import
               loky`` / ``billiard`` / ``pebble``: the import's own wall time, in ms, interpreter
               start excluded. Byte code is cached (PYTHONDONTWRITEBYTECODE is dropped for these
               children, the cache lives in a temporary PYTHONPYCACHEPREFIX warmed once), as in
               an installed package: without it procpool would pay for compiling its sources.
memory         8 idle workers (after a barrier round): the median USS (memory unique to the
               process, psutil's memory_full_info) of a worker, in MiB.
scale          procpool and cf-fork: pools of 8, 64 and 256 workers: create, run 10 trivial items
               per worker (all submitted at once), tear down; the wall time per worker, in ms.
               It should stay flat as the pool grows.

teardown-8     N idle workers (N = 8, 64), then time the graceful teardown: ``close()``
teardown-64    (procpool), ``shutdown(wait=True)`` (cf, loky), ``close(); join()`` (mp-pool,
               billiard, pebble). Before timing, every contender runs one *barrier round*
               (below), which proves that all N processes exist, started and ran an item, and
               are idle again. CPython's executor starts workers on demand with forkserver (one
               per submit that finds no idle worker); the barrier round makes every contender
               have N processes, and the script checks the pool's own process count. After
               the teardown, none of the N pids may still be alive.
destroy        procpool only: ``destroy_idle(1)`` wall time, one call per idle worker, with the
               fault ``detach.after=delay:1`` so that every destroyed worker takes 1 s more to
               exit; ``nr_dying`` right after the calls shows the workers were still alive.
start-warm     constructor until 32 workers exist and each ran an item (a barrier round of 32),
               in this program, where procpool's helpers, the multiprocessing fork server and
               loky's helpers already run (the warm-up started them).
start-cold     the same, as the first pool of a fresh interpreter (a child process per sample;
               it pays for starting the fork server, and procpool for its Manager too), in
               two rows from the same samples: "first result", the constructor and one item
               submitted right after it until its result; then the plain row, until the
               barrier round behind that item ended (all 32 exist and ran an item). The
               contender's module and pool class are imported before the clock starts; what
               making the first pool imports (procpool: the Manager's machinery) is timed.
throughput     2 workers, submit 20,000 trivial items one at a time (cf/loky/procpool
               ``submit``, mp-pool/billiard ``apply_async``, pebble ``schedule``), then wait
               for all: items/s. The timed loop calls each pool's own method directly. Each
               sample runs in a fresh interpreter, as map's (below).
map            2 workers, ``map(fn, range(1,000,000), chunksize=10,000)``, results collected
               in a list: items/s. procpool runs it through ``procpool.ProcessPoolExecutor``
               (WorkerPool has no map). Each sample runs in a fresh
               interpreter (pool start and barrier round untimed there): the big lists would
               otherwise stay in this process's heap and slow down every later fork of it.
latency        2 workers, one item at a time (submit, then wait for the result): the median
               round trip of ~2,000 items, in µs.
mixed          64 items that block 50 ms (time.sleep) interleaved with 64 that burn 20 ms of
               CPU time, all submitted at once to a fresh pool; wall time until the last
               result. procpool: a ``Workqueue`` (its pool's concurrency management gives the
               blocked items workers of their own, up to max(32, 4 x CPUs)); peers: os.cpu_count()
               workers. Pool start and teardown untimed. Also prints procpool's peak worker count.
floors         what the machine allows, no pool involved: a 1-byte ping-pong between two
               processes over a pipe, over a socketpair, and with multiprocessing Connections
               (procpool's own transport); and 64 processes forked, blocked on a pipe, woken at
               once by closing it, exiting and reaped (a teardown floor), both as children of
               this (large) process and of a fresh interpreter.

Barrier round: N items of ``items.barrier_item``; each opens a FIFO for reading (non-blocking), checks
in by creating a file named after its pid, then waits (poll, no CPU) for one byte of the FIFO.
The parent waits until N distinct pids checked in, then writes N bytes. An item holds its worker
until then, so N check-ins means N distinct live workers.

Fairness: before every sample the script runs the cyclic GC, so that no closed procpool pool
(and its Manager lock proxies, which every multiprocessing fork child increfs at fork and decrefs
at exit) is still alive when a fork-based peer forks its workers, and hands freed heap back to
the OS (glibc malloc_trim), so that the map benchmark's big lists do not make every later fork
of this process slower. Every pool is closed, on error
too (then without waiting for pending items), and a leak check at the end looks for stray
processes, zombies and shared memory.

Layout (``scripts/bench.py`` is the entry; this package does the work)
======

items.py       the functions run in the workers, and the barrier round
peers.py       one adapter class per contender (procpool and each peer), the table CONTENDERS
benchmarks.py  one function per benchmark, one sample each; samples in a fresh interpreter
floors.py      the machine's floors, no pool
report.py      a benchmark's samples (Bench) and how they print
targets.py     the targets, in one table (TARGETS), and their verdicts
runner.py      the run: selection, warm-up, interleaved rounds, report, leak check; --child
"""
