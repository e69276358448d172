"""Pickling a call in the submitting thread, so that a call which cannot cross the process
boundary fails there, with an error naming the part that cannot be pickled; and pickling a
pool's initializer once, with the descriptors its arguments need the workers to inherit.

The bytes themselves (the work message, the function-pickle cache) are procpool.protocol's.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

from . import _compat
from .errors import CallNotPicklable
from .protocol import PICKLE_PROTOCOL, InheritedFd, dumps, encode_work
from .spawner import MAX_INHERITED

#: Descriptors an initializer's arguments may hold (they ride in every spawn request, beside
#: each worker's own three; SCM_RIGHTS carries at most 253). A Queue holds 2, a shared Value or
#: Array 1 (its arena); a Lock, Event or Semaphore none (reopened by name).
MAX_INHERITED_FDS = MAX_INHERITED


def unpicklable(where: str, parts: list[tuple[str, Any]], exc: Exception) -> CallNotPicklable:
    """A ``CallNotPicklable`` (a TypeError and a ``pickle.PicklingError``) naming the first of
    ``parts`` (label, object) that cannot be pickled."""
    for what, obj in parts:
        try:
            dumps(obj)
        except Exception as part_exc:  # noqa: BLE001 - whatever pickling raises names the part
            return CallNotPicklable(f"{where}: {what} cannot be pickled: {part_exc}")
    return CallNotPicklable(f"{where}: the call cannot be pickled: {exc}")


def dumps_call(seq: int, fn: Callable[..., Any], args: tuple, kwargs: dict, tag: str | None = None) -> bytes:
    """Pickle one call in the caller's thread (procpool.protocol.encode_work); on failure,
    name the part that failed. A ``tag`` (a workqueue's name) rides along for the worker's
    title."""
    try:
        return encode_work(seq, fn, args, kwargs, tag)
    except Exception as exc:
        parts: list[tuple[str, Any]] = [(f"function {fn!r}", fn)]
        parts += [(f"argument {i} ({type(a).__name__})", a) for i, a in enumerate(args)]
        parts += [(f"keyword argument {k!r} ({type(v).__name__})", v) for k, v in kwargs.items()]
        raise unpicklable("submit()", parts, exc) from exc


class _Inheritance:
    """Stands in for multiprocessing's Popen object while the initializer is pickled, so that
    objects which may only reach a child "through inheritance" (Queue, Lock, Event, Value,
    Array, Connection of a 'spawn' or 'forkserver' context) pickle as they do when
    multiprocessing starts a child: each descriptor they hold is dup'd here and replaced in the
    pickle by an ``InheritedFd`` index; the pool sends the copies with every spawn request
    and the workers are forked with them (as multiprocessing's fork server does)."""

    DupFd = InheritedFd

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(os.dup(fd))
        return len(self.fds) - 1

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def _dumps_inherited(obj: Any) -> tuple[bytes, list[int]]:
    """Pickle ``obj`` as for a child being started; returns the pickle and the descriptors
    it refers to (the caller owns them)."""
    from multiprocessing import reduction

    inheritance = _Inheritance()
    try:
        with _compat.spawning_popen(inheritance):
            return bytes(reduction.ForkingPickler.dumps(obj, PICKLE_PROTOCOL)), inheritance.fds
    except BaseException:
        inheritance.close()
        raise


def _initarg_error(initializer: Callable[..., Any], initargs: tuple, exc: Exception) -> CallNotPicklable:
    """The error for initargs that cannot reach a worker, naming the first that cannot, with
    what to use instead when it is a multiprocessing object of the 'fork' context."""
    for i, arg in enumerate(initargs):
        try:
            _, fds = _dumps_inherited(arg)
        except Exception as arg_exc:  # noqa: BLE001 - whatever pickling raises names the argument
            why = f"initargs[{i}] ({type(arg).__name__}) cannot be pickled: {arg_exc}"
            if "fork context" in str(arg_exc):
                why = (
                    f"initargs[{i}] ({type(arg).__name__}) was made by a 'fork' context (the default "
                    "multiprocessing context on Linux before 3.14): its semaphore exists only in forks of "
                    "this process, and procpool's workers are forks of its spawner. Make it with "
                    "multiprocessing.get_context('forkserver') (or 'spawn'), or use a Manager().Queue()"
                )
            return CallNotPicklable(f"WorkerPool(): {why}")
        for fd in fds:
            os.close(fd)
    return unpicklable("WorkerPool()", [(f"initializer {initializer!r}", initializer)], exc)


def dumps_initializer(initializer: Callable[..., Any] | None, initargs: Any) -> tuple[bytes | None, list[int]]:
    """Pickle ``(initializer, initargs)`` once, when the pool is made, so a bad one is refused
    there and then rather than in every worker. Returns the pickle and the descriptors the
    workers must inherit (see _Inheritance), which the pool keeps open while it lives.

    The function travels as its own pickle (plain, or cloudpickle for a lambda), the arguments
    as multiprocessing pickles them for a child it starts (falling back to cloudpickle for
    arguments that need it and hold no descriptor)."""
    if initializer is None:
        return None, []
    if not callable(initializer):
        raise TypeError(f"initializer must be a callable, got {type(initializer).__name__}: {initializer!r}")
    initargs = tuple(initargs)
    fds: list[int] = []
    try:
        fn = dumps(initializer)
        try:
            args, fds = _dumps_inherited(initargs)
        except Exception:  # noqa: BLE001 - not picklable with inheritance: try by value
            args = dumps(initargs)  # lambdas and the like, with cloudpickle; else raises
        payload = pickle.dumps((fn, args), PICKLE_PROTOCOL)
    except Exception as exc:
        raise _initarg_error(initializer, initargs, exc) from exc
    if len(fds) > MAX_INHERITED_FDS:
        for fd in fds:
            os.close(fd)
        raise ValueError(
            f"WorkerPool(): initargs hold {len(fds)} file descriptors for the workers to inherit; "
            f"at most {MAX_INHERITED_FDS} are supported (a Queue holds 2, a Value or Array 1)"
        )
    return payload, fds
