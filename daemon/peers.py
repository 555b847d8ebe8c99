"""A client as the daemon sees it, whichever front end it came through, and the set of
connected ones: what the daemon sends to all of them, or to one that misbehaves."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Iterator

import anyio

from nightingale import protocol as p

if TYPE_CHECKING:
    from .telemetry import Telemetry
    from .utterance import Utterance

log = logging.getLogger(__name__)


class Peer:
    """A client as the scheduler sees it: connection.ClientConnection (the socket) or
    frontend.LocalPeer (HTTP, Wyoming). The scheduler posts events to it; how they reach
    the client, and when its connection ends, is the subclass's business.

    Both queue events in an outbox bounded in bytes: past the bound the client counts as
    not reading (`slow`) and nothing more is queued but a forced last error.
    """

    def __init__(self, number: int, max_outbox_bytes: int):
        self.number = number  # logged as "client N"
        self.utterances: dict[str, Utterance] = {}  # its live utterances by id
        self.connected = True
        self.slow = False  # its outbox overflowed
        self.dropping = False  # drop() was called: its last error is on its way
        self.outbox_bytes = 0  # queued and not yet taken by the client
        self.last_active = time.monotonic()  # its last request (the idle reaper reads it)
        self.frame_started: float | None = None  # since when it holds an unfinished frame (socket only)
        self._max_outbox_bytes = max_outbox_bytes
        self._send, self._recv = anyio.create_memory_object_stream[Any](math.inf)

    @property
    def closing(self) -> bool:
        """Its connection is already ending."""
        raise NotImplementedError

    def post(self, event: p.Event, force: bool = False) -> bool:
        """Queue an event for the client; False if it is gone or not reading. `force`
        queues it past the outbox bound (the last error before a drop)."""
        raise NotImplementedError

    def drop(self, error: p.Error) -> None:
        """Send `error` after what is queued, then nothing more: the client's outbox ends."""
        self.dropping = True
        self.post(error, force=True)
        self.slow = True  # nothing more is queued for it
        self.close_outbox()

    def _enqueue(self, item: Any, size: int, force: bool) -> bool:
        if not self.connected or (self.slow and not force):
            return False
        if not force and self.outbox_bytes + size > self._max_outbox_bytes:
            self.slow = True
            return False
        self.outbox_bytes += size
        try:
            self._send.send_nowait(item)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

    def close_outbox(self) -> None:
        """No more events: the client gets what is queued, then the end."""
        self._send.close()


class Peers:
    """The connected clients. Errors sent here, and drops, count in the status counters."""

    def __init__(self, telemetry: Telemetry):
        self._telemetry = telemetry
        self._peers: set[Peer] = set()
        self._gone: anyio.Event | None = None  # set when the last one leaves (the drain waits)

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self._peers))

    def __len__(self) -> int:
        return len(self._peers)

    def add(self, peer: Peer) -> None:
        self._peers.add(peer)
        self._telemetry.count("connections")

    def remove(self, peer: Peer) -> bool:
        """Forget a peer that left; False if it was not here."""
        if peer not in self._peers:
            return False
        peer.connected = False
        self._peers.discard(peer)
        if self._gone is not None and not self._peers:
            self._gone.set()
        return True

    def broadcast(self, event: p.Event) -> None:
        for peer in list(self._peers):
            peer.post(event)

    def send_error(self, peer: Peer, event: p.Error) -> None:
        self._telemetry.count("errors")
        log.debug("client %d: error %s: %s", peer.number, event.code, event.message)
        peer.post(event)

    def drop(self, peer: Peer, code: str, message: str) -> None:
        """Tell a client why, then close its connection (the peer gives its last error a
        short grace to be read)."""
        if peer.dropping:
            return
        log.info("client %d: dropping: %s", peer.number, message)
        self._telemetry.count("errors")
        peer.drop(p.Error(code=code, message=message))

    async def close_all(self, timeout_s: float) -> None:
        """End every peer's outbox (each gets what is queued) and wait for all to leave."""
        self._gone = anyio.Event()
        for peer in list(self._peers):
            peer.close_outbox()
        if self._peers:
            with anyio.move_on_after(timeout_s):
                await self._gone.wait()
