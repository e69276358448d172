"""Every use procpool makes of CPython's private internals, each with the reason.

A new CPython may rename or drop any of these; this module is where to look when it does.
Each helper degrades to a documented fallback when the internal is missing, unless noted.
Users (grep for ``_compat.``): procpool.worker (exit finalizers, its temporary directory),
procpool.spawner (multiprocessing's helper processes, the program's temporary directory),
procpool.lockserver (running a Manager server in a bare fork), procpool.executor
(interpreter-shutdown hook).

Internals used elsewhere and not (yet) wrapped here, with their reason:

* ``concurrent.futures.process._RemoteTraceback`` (procpool.errors): subclassed so code that
  checks ``type(exc.__cause__)`` against it holds for procpool's futures too.
* ``Future._state`` / ``Future._condition`` (procpool.future, procpool.workqueue): a future
  made without a fresh Condition per item, and a workqueue item put back to PENDING when its
  run is requeued; ``concurrent.futures`` has no public API for either.
* ``multiprocessing.managers.Server.id_to_obj`` / ``id_to_refcount`` / ``mutex`` /
  ``serve_client`` (procpool.lockserver): the handover thread answers lock requests of
  handed-over connections itself, and the server makes and drops the program's locks.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast


def run_exit_finalizers() -> None:
    """Run multiprocessing's exit finalizers now (``util._run_finalizers(0)``): a worker leaves
    through ``os._exit``, which skips them, and a Queue's finalizer is what tells its feeder
    thread to flush what it buffered. Missing: nothing is flushed (items' logs may be lost)."""
    from multiprocessing import util

    run = getattr(util, "_run_finalizers", None)
    if run is not None:
        run(0)


def register_shutdown_hook(fn: Callable[[], None]) -> None:
    """Call ``fn`` when the interpreter shuts down, *before* non-daemon threads are joined
    (``threading._register_atexit``, as concurrent.futures does): an ``atexit`` hook would run
    after that join, too late to stop a pool whose threads it waits for. Missing: atexit."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:
        import atexit

        atexit.register(fn)
    else:
        register(fn)


def is_inheriting() -> bool:
    """Is this process a multiprocessing child still importing its main module
    (``current_process()._inheriting``)? A pool made then cannot start anything."""
    import multiprocessing

    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def program_helper_fds() -> set[int]:
    """The descriptors multiprocessing hands every child of the program: the fork server's
    "alive" pipe and the resource tracker's pipe (``forkserver._forkserver``,
    ``resource_tracker._resource_tracker``). A spawner lets go of them (procpool.spawner)."""
    from multiprocessing import forkserver, resource_tracker

    fds = {
        getattr(getattr(forkserver, "_forkserver", None), "_forkserver_alive_fd", None),
        getattr(getattr(resource_tracker, "_resource_tracker", None), "_fd", None),
    }
    return {fd for fd in fds if isinstance(fd, int)}


def forget_program_helpers() -> None:
    """Make multiprocessing forget the program's fork server and resource tracker in this
    process (a spawner, whose copies of their pipes point at /dev/null): a worker that needs
    one then starts its own, as a process that never had one would."""
    from multiprocessing import forkserver, resource_tracker

    fs = getattr(forkserver, "_forkserver", None)
    for attr in ("_forkserver_alive_fd", "_forkserver_pid", "_forkserver_address", "_inherited_fds"):
        if hasattr(fs, attr):
            setattr(fs, attr, None)
    rt = getattr(resource_tracker, "_resource_tracker", None)
    for attr in ("_fd", "_pid"):
        if hasattr(rt, attr):
            setattr(rt, attr, None)


def _own_temp_dir_finalizer() -> Any:
    """The finalizer that removes multiprocessing's temporary directory of this process
    (``util.get_temp_dir``: ``_config['tempdir']``, removed by a ``util.Finalize`` of priority
    -100 at a normal exit), if this very process made it; None otherwise. A forked child
    inherits its parent's ``tempdir`` and that finalizer too, registered under the parent's
    pid: such a directory is the parent's, never the child's to remove. Looked up in
    sys.modules, no import statement: a worker runs this on its way out (an import there costs
    copy-on-write faults), and where multiprocessing is not loaded it made no directory."""
    util, process = sys.modules.get("multiprocessing.util"), sys.modules.get("multiprocessing.process")
    if util is None or process is None:
        return None
    path = getattr(process.current_process(), "_config", {}).get("tempdir")
    remove = getattr(util, "_remove_temp_dir", None)
    if not path or remove is None:
        return None
    me = os.getpid()
    for finalizer in list(getattr(util, "_finalizer_registry", {}).values()):
        args = getattr(finalizer, "_args", None) or ()
        if getattr(finalizer, "_callback", None) is remove and getattr(finalizer, "_pid", None) == me and path in args:
            return finalizer
    return None


def own_temp_dir() -> str | None:
    """The path of multiprocessing's temporary directory (``pymp-*``: a fork server's address
    lives there) if this process made it, else None (see ``_own_temp_dir_finalizer``).
    Missing internals: None (the program's spawner then cannot remove it for a killed program)."""
    finalizer = _own_temp_dir_finalizer()
    return None if finalizer is None else cast(str, finalizer._args[-1])


#: The temporary directory setting a new worker inherits (``note_inherited_temp_dir``, in the
#: spawner before its first fork): a worker whose setting is still this object made none.
_inherited_temp_dir: Any = None


def _temp_dir_setting() -> Any:
    process = sys.modules.get("multiprocessing.process")
    return None if process is None else getattr(process.current_process(), "_config", {}).get("tempdir")


def note_inherited_temp_dir() -> None:
    """In the spawner, before it forks workers: remember the temporary directory setting they
    will inherit, so that an exiting worker that made none of its own (almost all) finds that
    out with one comparison (``remove_own_temp_dir``)."""
    global _inherited_temp_dir
    _inherited_temp_dir = _temp_dir_setting()


def remove_own_temp_dir() -> None:
    """Remove multiprocessing's temporary directory of this process now, if this process made
    it, as its normal exit would (a worker leaves through ``os._exit``, which skips that).
    Missing internals: nothing is removed. Cheap when the setting is the one inherited (the
    worker made none): a dying worker pays a copy-on-write fault for every object it touches
    first, and searching the finalizer registry cost a teardown of 64 ~1.7 ms."""
    if _temp_dir_setting() is _inherited_temp_dir:
        return
    finalizer = _own_temp_dir_finalizer()
    if finalizer is not None:
        try:
            finalizer()  # runs once: it leaves the registry (and clears _config['tempdir'])
        except OSError:
            pass  # removed already, by hand


def forkserver_preload(ctx: Any, module: str) -> None:
    """Add ``module`` to what the fork server imports before it forks, keeping the program's
    own list (``_preload_modules``; default ``['__main__']``), unless the server runs already
    (``_forkserver_pid``): too late then."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if getattr(server, "_forkserver_pid", None) is not None:
        return
    mods = list(getattr(server, "_preload_modules", ["__main__"]))
    if module not in mods:
        ctx.set_forkserver_preload(mods + [module])


@contextmanager
def spawning_popen(popen: Any) -> Iterator[None]:
    """While in the block, pickle as multiprocessing does for a child it starts with ``popen``
    (``multiprocessing.context.set_spawning_popen``): objects that may only reach a child
    "through inheritance" call ``popen.duplicate_for_child`` for each descriptor they hold.
    procpool.calls passes a stand-in that collects those descriptors for its workers."""
    from multiprocessing import context

    context.set_spawning_popen(popen)
    try:
        yield
    finally:
        context.set_spawning_popen(None)


_raw_signal: Any = None


def raw_signal() -> Any:
    """CPython's C module under ``signal`` (``_signal``): the same functions without the
    enum wrapping of every argument and result, which costs microseconds a call. A worker
    sets its signals up on its first steps (``spawner._worker_signals``): through ``signal``
    that was ~0.3 ms of each worker's start. Looked up once (the spawner does it before its
    first fork): an import statement in a new worker costs ~50 µs of copy-on-write faults."""
    global _raw_signal
    if _raw_signal is None:
        import importlib

        _raw_signal = importlib.import_module("_signal")  # (no stub: typeshed knows only ``signal``)
    return _raw_signal


def run_manager_server(manager: Any, ready: Any, initializer: Callable[..., None], initargs: tuple) -> None:
    """Serve as ``manager``'s server in this process, a bare fork made to be it: what
    ``BaseManager.start`` runs in the process it starts (``_run_server``: serve, having sent
    the address on ``ready``), after the part of ``Process._bootstrap`` a server needs: the
    forking process's finalizers are not ours to run, multiprocessing's after-fork hooks
    (its fork-aware locks) are, and stdin is not ours to read."""
    from multiprocessing import util

    util._finalizer_registry.clear()  # type: ignore[attr-defined]
    util._run_after_forkers()  # type: ignore[attr-defined]
    try:
        if sys.stdin is not None:
            sys.stdin.close()
            sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    except (OSError, ValueError):
        pass
    args = (manager._registry, manager._address, manager._authkey, manager._serializer, ready)
    type(manager)._run_server(*args, initializer, initargs)
