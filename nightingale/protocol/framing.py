"""Framing: a 4-byte big-endian length, then one msgpack map of at most MAX_FRAME_BYTES.

FrameDecoder splits a byte stream into frame bodies without doing IO (the daemon feeds it
from asyncio); FrameReader reads whole bodies from a blocking socket (clients, tests).
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Iterator

import msgpack

from .messages import E_BAD_FRAME, E_BAD_UTF8, E_FRAME_TOO_LARGE, MAX_FRAME_BYTES, Message, ProtocolError

HEADER = struct.Struct(">I")  # body length, unsigned 32-bit big-endian


def pack_body(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode_frame(message: Message | dict[str, Any]) -> bytes:
    """Header + msgpack body of a message (or of a raw map, for tests of bad input)."""
    body = pack_body(message.to_wire() if isinstance(message, Message) else message)
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"frame body of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)) + body


def unpack_body(body: bytes) -> Any:
    """A frame body as Python objects; raises ProtocolError (E_BAD_UTF8 / E_BAD_FRAME)."""
    try:
        return msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except UnicodeDecodeError as err:
        raise ProtocolError(E_BAD_UTF8, f"a string in the frame is not valid UTF-8 ({err.reason})") from None
    except msgpack.ExtraData:
        raise ProtocolError(E_BAD_FRAME, "the frame holds more than one msgpack object") from None
    except Exception as err:  # msgpack raises ValueError, TypeError, FormatError, StackError...
        raise ProtocolError(E_BAD_FRAME, f"the frame is not valid msgpack ({type(err).__name__})") from None


class FrameDecoder:
    """Incremental, sans-IO frame splitter.

    feed() bytes as they arrive; frames() yields each complete body (bytes) or a
    ProtocolError for an oversized frame. An oversized body is skipped as it streams in,
    never buffered, so the next frame is read correctly.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES):
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized body still to discard

    def feed(self, data: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes held in memory for an unfinished frame."""
        return len(self._buf)

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame (or of an oversized body still being skipped)."""
        return len(self._buf) + self._skip

    def frames(self) -> Iterator[bytes | ProtocolError]:
        while True:
            if self._skip:
                dropped = min(self._skip, len(self._buf))
                del self._buf[:dropped]
                self._skip -= dropped
                if self._skip:
                    return
            if len(self._buf) < HEADER.size:
                return
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame_bytes:
                del self._buf[: HEADER.size]
                self._skip = length
                yield ProtocolError(
                    E_FRAME_TOO_LARGE, f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes} bytes"
                )
                continue
            if len(self._buf) < HEADER.size + length:
                return
            body = bytes(self._buf[HEADER.size : HEADER.size + length])
            del self._buf[: HEADER.size + length]
            yield body



class FrameReader:
    """Whole frame bodies from a connected blocking socket (FrameDecoder's blocking twin).

    read() returns the next body, None at a clean end of stream; it raises ProtocolError
    for an oversized frame or one cut short by the peer's close, and TimeoutError when
    `timeout` passes with no complete frame. `peer` names the other side in those errors.
    """

    def __init__(self, sock: socket.socket, peer: str = "the peer"):
        self.sock = sock
        self.peer = peer
        self._decoder = FrameDecoder()
        self._frames: Iterator[bytes | ProtocolError] = iter(())

    def read(self, timeout: float | None = None) -> bytes | None:
        """The next body; `timeout` (seconds) becomes the socket's timeout, None keeps it."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while True:
            for item in self._frames:
                if isinstance(item, ProtocolError):
                    raise item
                return item
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                raise TimeoutError(f"no frame from {self.peer} within {timeout} s") from None
            if not data:
                if self._decoder.pending:
                    raise ProtocolError(E_BAD_FRAME, f"{self.peer} closed the connection in the middle of a frame")
                return None
            self._decoder.feed(data)
            self._frames = self._decoder.frames()
