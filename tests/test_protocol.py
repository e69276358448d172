"""procpool.protocol, the wire format, without processes: every message is built by the side
that sends it and read back by the function the other side uses, as bytes."""

from __future__ import annotations

import os
import pickle
import struct

import pytest
import tasks

from procpool import protocol
from procpool.errors import CallNotUnpicklable, RemoteTraceback, ResultNotPicklable, ResultNotUnpicklable
from procpool.frames import FrameReader

pytestmark = pytest.mark.timeout(60)


class BreaksOnLoad:
    """Pickles fine; unpickling it raises (a result the program cannot load)."""

    def __reduce__(self):
        return (_refuse, ("this class stays in the worker",))


def _refuse(why: str):
    raise RuntimeError(why)


class HoldsALock:
    """An exception that cannot be pickled back (it holds a lock)."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()


class UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.held = HoldsALock()


def _body(work: bytes) -> memoryview:
    return memoryview(work)[protocol.SEQ_BYTES :]


# -- work messages --------------------------------------------------------------------------------


def test_a_work_message_round_trips():
    work = protocol.encode_work(41, tasks.add, (1,), {"b": 2})
    assert int.from_bytes(work[: protocol.SEQ_BYTES], "little") == 41
    fn, args, kwargs, tag = protocol.decode_call(_body(work))
    assert (fn, args, kwargs, tag) == (tasks.add, (1,), {"b": 2}, None)
    assert fn(*args, **kwargs) == 3


def test_a_workqueue_item_carries_its_tag():
    work = protocol.encode_work(2**64 - 2, tasks.square, (7,), {}, tag="events")
    assert int.from_bytes(work[: protocol.SEQ_BYTES], "little") == 2**64 - 2
    assert protocol.decode_call(_body(work)) == (tasks.square, (7,), {}, "events")


def test_die_is_never_a_work_message():
    shortest = protocol.encode_work(0, tasks.whoami, (), {})
    assert protocol.DIE != shortest and len(protocol.DIE) < protocol.SEQ_BYTES + protocol.FN_LEN.size


def test_the_program_caches_the_pickle_of_a_module_level_function_only():
    protocol._function_pickles.clear()
    part = protocol.function_part(tasks.square)
    assert protocol.function_part(tasks.square) is part  # the cached bytes, not a new pickle
    assert protocol.FN_LEN.unpack_from(part)[0] == len(part) - protocol.FN_LEN.size
    counter = tasks.Counter()
    protocol.function_part(counter.get)  # a bound method carries state that may change
    assert list(protocol._function_pickles) == [tasks.square]


def test_the_program_cache_starts_over_when_full(monkeypatch):
    monkeypatch.setattr(protocol, "FN_CACHE_MAX", 2)
    protocol._function_pickles.clear()
    for fn in (tasks.square, tasks.identity, tasks.add):
        protocol.function_part(fn)
    assert list(protocol._function_pickles) == [tasks.add]


def test_the_worker_loads_each_function_pickle_once():
    protocol._functions.clear()
    first = protocol.encode_work(1, tasks.square, (2,), {})
    second = protocol.encode_work(2, tasks.square, (3,), {})
    fn, start = protocol.load_function(_body(first))
    assert fn is tasks.square and len(protocol._functions) == 1
    key = next(iter(protocol._functions))
    protocol._functions[key] = tasks.identity  # a cache hit must not unpickle again
    assert protocol.load_function(_body(second))[0] is tasks.identity
    assert pickle.loads(_body(second)[start:]) == ((3,), {})


def test_a_call_that_cannot_be_unpickled_is_answered_as_such():
    work = protocol.encode_work(5, tasks.identity, (BreaksOnLoad(),), {})
    with pytest.raises(RuntimeError, match="stays in the worker") as info:
        protocol.decode_call(_body(work))
    answer = protocol.unpicklable_call_answer(info.value)
    _, _, ok, value = protocol.decode_result(protocol.encode_result(work, 0.0, answer))
    assert not ok and isinstance(value, CallNotUnpicklable)
    assert "stays in the worker" in str(value)


# -- results --------------------------------------------------------------------------------------


def test_a_result_round_trips_with_its_sequence_number_and_cpu_time():
    work = protocol.encode_work(123456789, tasks.square, (3,), {})
    msg = protocol.encode_result(work, 0.25, protocol.value_answer(tasks.square, 9))
    assert len(msg) > protocol.RESULT_HEAD
    assert protocol.decode_result(msg) == (123456789, 0.25, True, 9)


def test_an_error_carries_the_worker_traceback_as_its_cause():
    try:
        tasks.fail("boom")
    except Exception as exc:  # noqa: BLE001 - any exception becomes the answer
        answer = protocol.error_answer(exc)
    work = protocol.encode_work(9, tasks.fail, ("boom",), {})
    seq, _, ok, value = protocol.decode_result(protocol.encode_result(work, 0.0, answer))
    assert (seq, ok) == (9, False)
    assert str(value) == "boom"
    assert isinstance(value.__cause__, RemoteTraceback)
    assert "in fail" in str(value.__cause__)


def test_an_error_that_cannot_be_pickled_arrives_as_its_repr():
    answer = protocol.error_answer(UnpicklableError())
    _, _, ok, value = protocol.decode_result(protocol.encode_result(b"\0" * 8, 0.0, answer))
    assert not ok and isinstance(value, protocol.RemoteError)
    assert "UnpicklableError" in str(value)


def test_a_result_that_cannot_be_pickled_fails_its_item_in_the_worker():
    answer = protocol.value_answer(tasks.return_unpicklable, HoldsALock())
    _, _, ok, value = protocol.decode_result(protocol.encode_result(b"\1" + b"\0" * 7, 0.0, answer))
    assert not ok and isinstance(value, ResultNotPicklable)
    assert "return_unpicklable" in str(value)


def test_a_result_that_cannot_be_unpickled_fails_only_its_item():
    work = protocol.encode_work(77, tasks.identity, (), {})
    msg = protocol.encode_result(work, 0.5, protocol.value_answer(tasks.identity, BreaksOnLoad()))
    seq, cpu, ok, value = protocol.decode_result(msg)
    assert (seq, cpu, ok) == (77, 0.5, False)  # the header still says which item it was
    assert isinstance(value, ResultNotUnpicklable)
    assert isinstance(value.__cause__, RuntimeError)


def test_init_failed_is_no_item_and_carries_the_error():
    msg = protocol.init_failed(ValueError("bad initializer"))
    assert msg.startswith(protocol.INIT_FAILED)
    seq, cpu, ok, value = protocol.decode_result(msg)
    assert (seq, cpu, ok) == (None, 0.0, False)
    assert isinstance(value, ValueError) and str(value) == "bad initializer"
    assert isinstance(value.__cause__, RemoteTraceback)


# -- framing --------------------------------------------------------------------------------------


def test_frames_split_across_reads_come_out_whole_and_in_order():
    messages = [b"", b"x", os.urandom(300), b"y" * 70_000]
    stream = b"".join(protocol.frame(m) for m in messages)
    buf = bytearray()
    out: list[bytes] = []
    for i in range(0, len(stream), 7):  # 7-byte reads: every header and body split somewhere
        buf += stream[i : i + 7]
        out += protocol.split_frames(buf)
    assert out == messages and not buf


def test_a_long_frame_header_is_understood():
    # A message over 2 GiB gets -1 and an 8-byte length; the reader must follow that form
    # (built by hand here: no 2 GiB payload).
    payload = b"long form"
    data = struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload
    buf = bytearray(data[:11])
    assert protocol.split_frames(buf) == [] and len(buf) == 11
    buf += data[11:]
    assert protocol.split_frames(buf) == [payload]


def test_the_frame_reader_reassembles_messages_written_in_pieces():
    r, w = os.pipe()
    try:
        reader = FrameReader(r)
        stream = protocol.frame(b"first") + protocol.frame(b"second")
        os.write(w, stream[:6])  # the first message's header and part of its body
        os.write(w, stream[6:12])
        assert reader.read_ready() == [b"first"]
        os.write(w, stream[12:])
        assert reader.next_batch() == [b"second"]
        os.close(w)
        w = -1
        with pytest.raises(EOFError):
            reader.next_batch()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
