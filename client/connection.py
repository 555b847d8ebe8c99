"""The blocking client of the daemon's socket: nsay, `nightingale service status`, tests, bench.

A Connection connects (retrying while the daemon is flooded), reads the daemon's `hello`,
then sends requests and reads typed events. Standard library and nightingale.protocol
only: nsay imports it at every start.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from nightingale import protocol as p

CONNECT_RETRY_S = 5.0  # how long a full listen backlog (EAGAIN) or a `busy` greeting is retried


class DaemonUnavailable(ConnectionError):
    """No daemon answers at the socket path."""


def _connect_retrying(sock: socket.socket, path: str) -> None:
    """connect(), retried with backoff while the daemon's listen backlog is full: a local
    connect flood then delays a client instead of failing it."""
    deadline = time.monotonic() + CONNECT_RETRY_S
    delay = 0.005
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:  # EAGAIN on a Unix socket: the backlog is full
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(0.2, delay * 2)


class Connection:
    """A blocking framed connection to the daemon.

    `hello` holds the daemon's first event. recv() returns typed events, None at a clean
    end of stream, and raises ProtocolError for a frame cut short or malformed, and
    TimeoutError when `timeout` passes with no complete frame.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, timeout: float | None = 10.0):
        self.path = p.socket_path(path)
        self._send_lock = threading.Lock()  # whole frames when threads share the connection
        deadline = time.monotonic() + CONNECT_RETRY_S
        delay = 0.05
        while True:
            first = self._open(timeout)
            if isinstance(first, p.Hello):
                break
            self.close()
            if isinstance(first, p.Error) and first.code == p.E_BUSY and time.monotonic() + delay < deadline:
                time.sleep(delay)  # the daemon is at its connection cap: a flood, usually brief
                delay = min(0.5, delay * 2)
                continue
            if isinstance(first, p.Error):
                raise p.ProtocolError(first.code, first.message)
            raise p.ProtocolError(p.E_BAD_FRAME, f"expected hello from the daemon, got {first!r}")
        self.hello: p.Hello = first

    def _open(self, timeout: float | None) -> p.Event | None:
        """Connect a new socket and return the daemon's first event."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            _connect_retrying(self._sock, str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as err:
            self._sock.close()
            raise DaemonUnavailable(
                f"no nightingale daemon at {self.path} ({err.strerror}); start one with `nightingale serve`"
            ) from None
        except OSError:
            self._sock.close()
            raise
        self._reader = p.FrameReader(self._sock, peer="the daemon")
        return self.recv(timeout)

    def send(self, message: p.Message | dict[str, Any]) -> None:
        """Thread-safe: a frame is written whole before another thread's frame starts."""
        frame = p.encode_frame(message)
        with self._send_lock:
            self._sock.sendall(frame)

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are (for tests of malformed input)."""
        with self._send_lock:
            self._sock.sendall(data)

    def recv(self, timeout: float | None = None) -> p.Event | None:
        body = self._reader.read(timeout)
        if body is None:
            return None
        return p.decode_event(p.unpack_body(body))

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
