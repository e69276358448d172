"""Pickling a call in the submitting thread, so that a call which cannot cross the process
boundary fails there, with an error naming the part that cannot be pickled.

Wire format of a work message: see procpool.worker."""

from __future__ import annotations

import functools
import os
import pickle
import types
from collections.abc import Callable
from typing import Any

from .errors import CallNotPicklable
from .spawner import MAX_INHERITED
from .worker import FN_CACHE_MAX, FN_LEN, PICKLE_PROTOCOL, SEQ_BYTES, InheritedFd

#: Descriptors an initializer's arguments may hold (they ride in every spawn request, beside
#: each worker's own three; SCM_RIGHTS carries at most 253). A Queue holds 2, a shared Value or
#: Array 1 (its arena); a Lock, Event or Semaphore none (reopened by name).
MAX_INHERITED_FDS = MAX_INHERITED

# Module-level functions -> their part of a call: length + pickle, a reference (module and
# name) that never changes. Only plain functions pickled by plain pickle are kept: a bound method or a partial carries
# state that may change between submits, and cloudpickle pickles a closure by value.
_function_pickles: dict[Callable[..., Any], bytes] = {}
_CACHEABLE = (types.FunctionType, types.BuiltinFunctionType)


@functools.cache
def cloudpickle_module() -> Any:
    """The cloudpickle module if it is installed (the optional extra), else None."""
    try:
        import cloudpickle
    except ImportError:
        return None
    return cloudpickle


def dumps(obj: Any) -> bytes:
    """Plain pickle; cloudpickle only where plain pickle fails (lambdas, closures, functions
    of an interactive ``__main__``) and it is installed. Plain pickle stays first because it is
    faster and pickles functions by reference, as the worker expects to import them. A worker
    loads cloudpickle's output with plain pickle, as long as it can import cloudpickle."""
    try:
        return pickle.dumps(obj, PICKLE_PROTOCOL)
    except Exception:
        cp = cloudpickle_module()
        if cp is None:
            raise
        return cp.dumps(obj, PICKLE_PROTOCOL)


def unpicklable(where: str, parts: list[tuple[str, Any]], exc: Exception) -> CallNotPicklable:
    """A ``CallNotPicklable`` (a TypeError and a ``pickle.PicklingError``) naming the first of
    ``parts`` (label, object) that cannot be pickled."""
    for what, obj in parts:
        try:
            dumps(obj)
        except Exception as part_exc:
            return CallNotPicklable(f"{where}: {what} cannot be pickled: {part_exc}")
    return CallNotPicklable(f"{where}: the call cannot be pickled: {exc}")


def function_part(fn: Callable[..., Any]) -> bytes:
    """``fn``'s part of the wire format (4-byte length + its pickle), from the cache when it
    is a plain module-level function."""
    if type(fn) not in _CACHEABLE:
        return _with_length(dumps(fn))
    part = _function_pickles.get(fn)
    if part is None:
        try:
            data = pickle.dumps(fn, PICKLE_PROTOCOL)
        except Exception:
            return _with_length(dumps(fn))  # a lambda or a closure: by value, with cloudpickle, never kept
        if len(_function_pickles) >= FN_CACHE_MAX:
            _function_pickles.clear()
        part = _function_pickles[fn] = _with_length(data)
    return part


def _with_length(data: bytes) -> bytes:
    return FN_LEN.pack(len(data)) + data


def dumps_call(seq: int, fn: Callable[..., Any], args: tuple, kwargs: dict, tag: str | None = None) -> bytes:
    """Pickle one call in the caller's thread (wire format: see procpool.worker); on failure,
    name the part that failed. A ``tag`` (a workqueue's name) rides along for the worker's
    title."""
    try:
        fn_part = function_part(fn)
        rest = dumps((args, kwargs) if tag is None else (args, kwargs, tag))
        return b"".join((seq.to_bytes(SEQ_BYTES, "little"), fn_part, rest))
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
    from multiprocessing import context, reduction

    inheritance = _Inheritance()
    context.set_spawning_popen(inheritance)
    try:
        return bytes(reduction.ForkingPickler.dumps(obj, PICKLE_PROTOCOL)), inheritance.fds
    except BaseException:
        inheritance.close()
        raise
    finally:
        context.set_spawning_popen(None)


def _initarg_error(initializer: Callable[..., Any], initargs: tuple, exc: Exception) -> CallNotPicklable:
    """The error for initargs that cannot reach a worker, naming the first that cannot, with
    what to use instead when it is a multiprocessing object of the 'fork' context."""
    for i, arg in enumerate(initargs):
        try:
            _, fds = _dumps_inherited(arg)
        except Exception as arg_exc:
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
        except Exception:
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
