"""procpool's wire format, both directions: what the program and a worker say to each other.

This module owns every byte that crosses a worker's two pipes (and the spec a worker is
started with); nothing here does I/O, starts a process or holds a lock, so all of it is
unit-tested without processes (tests/test_protocol.py). The program side (procpool.calls,
procpool.pool) encodes work and decodes results; the worker side (procpool.worker) decodes
work and encodes results. Neither side imports the other's module for a constant.

Framing (both pipes): multiprocessing.Connection's, a 4-byte big-endian signed length (or
-1 and an 8-byte length for huge messages) before each message, so either side may still
write with ``Connection.send_bytes``; ``frame`` makes one, ``split_frames`` finds the
complete ones in a buffer (procpool.frames reads many of them per system call).

One item's path through the format::

    program: dumps_call ─► work message ──work pipe──► worker: load_function + decode_call
                            SEQ|FN_LEN|fn pickle|pickle((args, kwargs[, tag]))       │ runs it
    program: decode_result ◄──result pipe── SEQ|CPU_TIME|pickle((ok, value, tb)) ◄──┘

* program → worker: ``DIE`` (one byte), or a work message: 8-byte little-endian item sequence
  number + 4-byte length of the function's pickle + the function's pickle + pickle of
  ``(args, kwargs)``, or of ``(args, kwargs, tag)`` for a workqueue's item (the tag goes in the
  worker's title). The function travels apart so both sides can cache it: the program the
  pickle of a module-level function (a reference: ``function_part``), the worker the function
  loaded from those bytes (``load_function``).
* worker → program: the same 8 bytes + the item's CPU time in the worker (8-byte little-endian
  double) + pickle of ``(ok, value, traceback_text)``. The sequence number stays outside the
  pickle so the program knows which item a message answers even when the rest cannot be
  unpickled; ``INIT_FAILED`` in its place says the worker's set-up (attributes, initializer)
  failed: then the worker's first and last message.
"""

from __future__ import annotations

import functools
import pickle
import struct
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import faults
from .errors import CallNotUnpicklable, ProcpoolError, RemoteTraceback, ResultNotPicklable, ResultNotUnpicklable
from .lockname import LockName

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL

# -- framing -------------------------------------------------------------------------------------

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")


def frame(payload: bytes) -> bytes:
    """One message, framed as Connection.send_bytes would frame it."""
    n = len(payload)
    if n > 0x7FFFFFFF:
        return _SHORT.pack(-1) + _LONG.pack(n) + payload
    return _SHORT.pack(n) + payload


def split_frames(buf: bytearray) -> list[bytes]:
    """Every complete message at the start of ``buf``, removed from it; an incomplete one
    (a message split across reads) stays for the next call."""
    out = []
    pos, end = 0, len(buf)
    while end - pos >= 4:
        (n,) = _SHORT.unpack_from(buf, pos)
        head = 4
        if n == -1:
            if end - pos < 12:
                break
            (n,) = _LONG.unpack_from(buf, pos + 4)
            head = 12
        if end - pos - head < n:
            break
        out.append(bytes(buf[pos + head : pos + head + n]))
        pos += head + n
    if pos:
        del buf[:pos]
    return out


# -- program → worker ----------------------------------------------------------------------------

#: The message that tells a worker to take its exit path (never a work message: those are
#: at least SEQ_BYTES + FN_LEN long).
DIE = b"D"
SEQ_BYTES = 8
FN_LEN = struct.Struct("<I")
#: Functions cached on either side, by the function (program) or its pickle (worker): a
#: program runs few distinct functions; a cache starts over when it holds this many.
FN_CACHE_MAX = 256

# Module-level functions -> their part of a call: length + pickle, a reference (module and
# name) that never changes. Only plain functions pickled by plain pickle are kept: a bound
# method or a partial carries state that may change between submits, and cloudpickle pickles
# a closure by value.
_function_pickles: dict[Callable[..., Any], bytes] = {}
_CACHEABLE = (types.FunctionType, types.BuiltinFunctionType)
# In a worker: functions loaded from their pickles, by those bytes.
_functions: dict[bytes, Any] = {}


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
        return bytes(cp.dumps(obj, PICKLE_PROTOCOL))


def _with_length(data: bytes) -> bytes:
    return FN_LEN.pack(len(data)) + data


def function_part(fn: Callable[..., Any]) -> bytes:
    """``fn``'s part of a work message (4-byte length + its pickle), from the cache when it
    is a plain module-level function. Raises what pickling raises."""
    if type(fn) not in _CACHEABLE:
        return _with_length(dumps(fn))
    part = _function_pickles.get(fn)
    if part is None:
        try:
            data = pickle.dumps(fn, PICKLE_PROTOCOL)
        except Exception:  # noqa: BLE001 - not picklable by reference: by value, with cloudpickle
            return _with_length(dumps(fn))  # a lambda or a closure: by value, with cloudpickle, never kept
        if len(_function_pickles) >= FN_CACHE_MAX:
            _function_pickles.clear()
        part = _function_pickles[fn] = _with_length(data)
    return part


def encode_work(seq: int, fn: Callable[..., Any], args: tuple, kwargs: dict, tag: str | None = None) -> bytes:
    """A work message for item ``seq``. Raises what pickling raises (procpool.calls turns
    that into an error naming the part that cannot be pickled)."""
    fn_part = _function_pickles.get(fn) if type(fn) in _CACHEABLE else None
    if fn_part is None:
        fn_part = function_part(fn)
    call = (args, kwargs) if tag is None else (args, kwargs, tag)
    try:
        rest = pickle.dumps(call, PICKLE_PROTOCOL)
    except Exception:  # noqa: BLE001 - plain pickle first, as dumps() does; dumps() tells the rest
        rest = dumps(call)
    return b"".join((seq.to_bytes(SEQ_BYTES, "little"), fn_part, rest))


def load_function(body: memoryview) -> tuple[Any, int]:
    """In a worker: the function of a work message's body (the message less its sequence
    number), from the cache when its pickle was seen before, and where the rest starts."""
    (n,) = FN_LEN.unpack_from(body)
    end = FN_LEN.size + n
    key = bytes(body[FN_LEN.size : end])
    fn = _functions.get(key)
    if fn is None:
        fn = pickle.loads(key)
        if len(_functions) >= FN_CACHE_MAX:
            _functions.clear()
        _functions[key] = fn
    return fn, end


#: A decoded work message: (function, args, kwargs, tag or None). A plain tuple, not a
#: NamedTuple: it is made once per item on the worker's hot path.
Call = tuple[Any, tuple, dict, "str | None"]


def decode_call(body: memoryview) -> Call:
    """In a worker: the call in a work message's body (the message less its sequence
    number). Raises whatever unpickling raises (the worker then answers
    ``unpicklable_call_answer``)."""
    fn, start = load_function(body)
    call = pickle.loads(body[start:])
    return fn, call[0], call[1], call[2] if len(call) > 2 else None


# -- worker → program ----------------------------------------------------------------------------

#: Sequence-number field of the message that reports a failed set-up (never an item's).
INIT_FAILED = b"\xff" * SEQ_BYTES
#: After the sequence number of a result: the CPU time its call took in the worker.
CPU_TIME = struct.Struct("<d")
RESULT_HEAD = SEQ_BYTES + CPU_TIME.size
_NO_CPU = CPU_TIME.pack(0.0)


class RemoteError(ProcpoolError):
    """A worker-side exception that could not be pickled back; carries its repr."""


def error_answer(exc: BaseException, origin: BaseException | None = None) -> bytes:
    """``(False, exc, traceback)`` pickled; the traceback is ``origin``'s when ``exc`` wraps it."""
    tb = "".join(traceback.format_exception(origin or exc))
    try:
        return pickle.dumps((False, exc, tb), PICKLE_PROTOCOL)
    except Exception:  # noqa: BLE001 - the exception cannot cross: send its repr
        # The exception itself (or something it holds) cannot cross the process boundary:
        # send its repr instead, so the item still ends in an error that says what happened.
        return pickle.dumps((False, RemoteError(repr(exc)), tb), PICKLE_PROTOCOL)


def value_answer(fn: Any, value: Any) -> bytes:
    """``(True, value, None)`` pickled, or the ResultNotPicklable answer naming ``fn``."""
    try:
        return pickle.dumps((True, value, None), PICKLE_PROTOCOL)
    except BaseException as exc:  # noqa: BLE001 - a result's __reduce__ may raise anything
        name = getattr(fn, "__qualname__", None) or repr(fn)
        err = ResultNotPicklable(f"the result of {name} could not be pickled in the worker: {exc!r}")
        return error_answer(err, exc)


def unpicklable_call_answer(exc: BaseException) -> bytes:
    """The answer for a work message the worker could not decode."""
    return error_answer(CallNotUnpicklable(f"the call could not be unpickled in the worker: {exc!r}"), exc)


def encode_result(work: bytes, cpu: float, answer: bytes) -> bytes:
    """The result message for work message ``work`` (its sequence number is copied)."""
    return work[:SEQ_BYTES] + CPU_TIME.pack(cpu) + answer


def init_failed(exc: BaseException) -> bytes:
    """The message a worker sends when its set-up raised ``exc``."""
    return INIT_FAILED + _NO_CPU + error_answer(exc)


#: A decoded result message: (seq, cpu, ok, value); ``seq`` is None for ``INIT_FAILED``
#: (``value`` is the set-up's exception then). A plain tuple: one per item, on the arbiter.
Result = tuple["int | None", float, bool, Any]


def decode_result(data: bytes) -> Result:
    """In the program: a result message. A result that cannot be unpickled becomes a
    ``ResultNotUnpicklable`` for its item alone; a worker-side error gets the worker's
    traceback as its ``__cause__``."""
    head = data[:SEQ_BYTES]
    (cpu,) = CPU_TIME.unpack_from(data, SEQ_BYTES)
    try:
        ok, value, tb = pickle.loads(memoryview(data)[RESULT_HEAD:])
    except BaseException as exc:  # noqa: BLE001 - whatever a result's __reduce__ raises fails only its item
        ok, value, tb = False, ResultNotUnpicklable(f"the result could not be unpickled here: {exc!r}"), None
        value.__cause__ = exc
    if not ok and tb is not None and isinstance(value, BaseException):
        value.__cause__ = RemoteTraceback(tb)
    seq = None if head == INIT_FAILED else int.from_bytes(head, "little")
    return seq, cpu, ok, value


# -- program → spawner → worker: what a worker is started with -------------------------------------

#: W: descriptors this worker inherited for its pool's initializer (see procpool.calls
#: _Inheritance), by index; set by the spawner as it forks the worker.
inherited_fds: list[int] = []


class InheritedFd:
    """In the pickle of an initializer's arguments, one descriptor the worker inherits: what
    multiprocessing's ``reduction.DupFd`` becomes under procpool's stand-in for a Popen."""

    def __init__(self, ind: int) -> None:
        self.ind = ind

    def detach(self) -> int:
        """The inherited descriptor; the caller (a Connection being rebuilt) owns it now."""
        fd = inherited_fds[self.ind]
        inherited_fds[self.ind] = -1
        if fd < 0:
            raise ValueError(f"inherited descriptor {self.ind} was already taken")
        return fd


def worker_title(prefix: str, pool_id: int, wid: int) -> str:
    return f"{prefix}/u{pool_id}:{wid}"


def dying_title(prefix: str) -> str:
    return f"{prefix}/dying"


@dataclass
class WorkerSpec:
    """Everything a worker process is started with (pickled into the spawner's request)."""

    pool_id: int
    wid: int
    gen: int
    table_name: str
    title_prefix: str
    attach_lock: LockName  # the pool's attach lock, by name (procpool.lockname)
    # Set in the worker by the spawner from the descriptors it was handed:
    conn: Any = None  # Channel: the worker's ends of its work and result pipes
    completion: Any = None  # write end of the pool's detach completion pipe
    linger_dying: float = 0.0
    faults: faults.Spec = field(default_factory=dict)
    # Pickle of (initializer, initargs), made once in the program (with cloudpickle if plain
    # pickle cannot): bytes, so the spawner, which unpickles specs, never imports user code.
    initializer: bytes | None = None
    # Set in the worker by the spawner: the descriptors the initializer's arguments refer to.
    inherited_fds: list[int] = field(default_factory=list)
    nice: int = 0  # added to the worker's niceness at start
    cpus: frozenset[int] | None = None  # CPUs the worker binds itself to at start
    title: str | None = None  # the whole title instead of worker_title() (a workqueue's rescuer)
    spin: float = 0.0  # seconds to poll for the next item before sleeping (procpool.pool.SPIN)
