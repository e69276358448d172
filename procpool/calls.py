"""Pickling a call in the submitting thread, so that a call which cannot cross the process
boundary fails there, with an error naming the part that cannot be pickled.

Wire format of a work message: see procpool.worker."""

from __future__ import annotations

import functools
import pickle
import types
from collections.abc import Callable
from typing import Any

from .errors import CallNotPicklable
from .worker import FN_CACHE_MAX, FN_LEN, PICKLE_PROTOCOL, SEQ_BYTES

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


def dumps_initializer(initializer: Callable[..., Any] | None, initargs: Any) -> bytes | None:
    """Pickle ``(initializer, initargs)`` once, when the pool is made, so a bad one is refused
    there and then rather than in every worker."""
    if initializer is None:
        return None
    if not callable(initializer):
        raise TypeError(f"initializer must be a callable, got {type(initializer).__name__}: {initializer!r}")
    initargs = tuple(initargs)
    try:
        return dumps((initializer, initargs))
    except Exception as exc:
        parts: list[tuple[str, Any]] = [(f"initializer {initializer!r}", initializer)]
        parts += [(f"initargs[{i}] ({type(a).__name__})", a) for i, a in enumerate(initargs)]
        raise unpicklable("WorkerPool()", parts, exc) from exc
