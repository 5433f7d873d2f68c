"""Byte channels: the only thing a backend hands to the core.

A channel is a bidirectional byte stream connected to the stdin (host -> box) and stdout
(box -> host) of one freshly started runtime process inside the box. The host session speaks the
framed protocol of :mod:`rlm_sandbox.runtime` over it; backends never parse frames.
"""

from __future__ import annotations

import os
import select
from abc import ABC, abstractmethod

__all__ = ["Channel", "PipeChannel"]


class Channel(ABC):
    """A bidirectional byte stream to one runtime process.

    Implementations must be safe for one reader thread and several writer threads: the session
    serialises writes under its own lock, so ``send`` is never called concurrently, but ``recv`` may
    run in one thread while ``send`` runs in another.
    """

    #: True when the transport is not binary-safe (e.g. it decodes output as UTF-8 text). The
    #: runtime then base64-encodes every frame on one line in both directions.
    text_mode: bool = False

    @abstractmethod
    def send(self, data: bytes) -> None:
        """Write all of ``data`` to the runtime's stdin. Raise ``OSError`` if the stream is gone."""

    @abstractmethod
    def recv(self, timeout: float | None) -> bytes:
        """Return the next available bytes from the runtime's stdout (at least one byte).

        Return ``b""`` at end of stream. Raise ``TimeoutError`` if nothing arrives within
        ``timeout`` seconds (``None`` waits forever).
        """

    @abstractmethod
    def close(self) -> None:
        """Close both directions. Idempotent. The runtime sees EOF on stdin and exits."""


class PipeChannel(Channel):
    """A channel over two OS file descriptors (a pipe pair, a socket used twice, a pty)."""

    def __init__(self, write_fd: int, read_fd: int, *, chunk: int = 1 << 18) -> None:
        self._wfd = write_fd
        self._rfd = read_fd
        self._buf = bytearray(chunk)
        self._view = memoryview(self._buf)
        self._closed = False

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._wfd, view)
            view = view[n:]

    def recv(self, timeout: float | None) -> bytes:
        if timeout is not None:
            ready, _, _ = select.select([self._rfd], [], [], max(timeout, 0.0))
            if not ready:
                raise TimeoutError("no data from the runtime")
        # One reused buffer: no allocation (mmap + page faults for big sizes) per read.
        n = os.readv(self._rfd, [self._buf])
        return self._view[:n].tobytes()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in {self._wfd, self._rfd}:
            try:
                os.close(fd)
            except OSError:
                pass
