"""Reading many messages per system call from a worker's pipe, and writing a batch whole.

The framing is procpool.protocol's (multiprocessing.Connection's), so either side may still
write with ``Connection.send_bytes``. What changes is reading: ``Connection.recv_bytes`` makes two
system calls per message, which at tens of thousands of small items per second is most of
the parent's time. A ``FrameReader`` reads whatever the pipe holds in one call and hands
back every complete message in it; several results, or a batch of work items, cost one read.
"""

from __future__ import annotations

import os
import select
import time

from .protocol import frame as frame
from .protocol import split_frames

CHUNK = 64 * 1024  # below malloc's mmap threshold: os.read allocates this much per call


def write_all(fd: int, data: bytes) -> None:
    """Write every byte (a pipe may take a large batch in several writes)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FrameReader:
    """Buffered reader of framed messages on one file descriptor (one reader per fd)."""

    __slots__ = ("fd", "_buf", "_poller")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()
        self._poller: select.poll | None = None  # made on the first spin

    def _fill(self) -> None:
        data = os.read(self.fd, CHUNK)
        if not data:
            raise EOFError("the other end closed the pipe")
        self._buf += data

    def pop_ready(self) -> list[bytes]:
        """Every complete message already buffered (no system call)."""
        return split_frames(self._buf)

    def read_ready(self) -> list[bytes]:
        """One read (the caller knows the fd is readable), then every complete message.
        EOFError once the other end is closed and nothing complete is left."""
        self._fill()
        return self.pop_ready()

    def next_batch(self, spin: float = 0.0) -> list[bytes]:
        """Block until at least one whole message is here; return all complete ones. With
        ``spin`` > 0, first poll the fd for up to that many seconds before sleeping in read."""
        ready = self.pop_ready()
        if ready:
            return ready
        if spin > 0:
            poller = self._poller
            if poller is None:
                poller = self._poller = select.poll()
                poller.register(self.fd, select.POLLIN)
            deadline = time.perf_counter() + spin
            while not poller.poll(0) and time.perf_counter() < deadline:
                pass
        while True:
            self._fill()
            ready = self.pop_ready()
            if ready:
                return ready
