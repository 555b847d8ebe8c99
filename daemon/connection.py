"""One socket client: frames in, requests out to requests.Requests, events back through an
outbox drained by a writer task. It also enforces what one client may cost the daemon:
events it does not read (the outbox limit, then `slow_client`), bytes of unfinished frames
(over all clients), a frame left unfinished (slowloris) and idleness (reap_idle)."""

from __future__ import annotations

import logging
import time

import anyio
import anyio.abc

from nightingale import protocol as p

from .config import DaemonConfig
from .requests import Requests
from .peers import Peer
from .scheduler import Scheduler

log = logging.getLogger(__name__)

READ_BYTES = 1 << 16  # one receive() from the socket
_STREAM_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class PendingBytes:
    """Bytes of unfinished frames held for all clients together, and their bound."""

    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0


class ClientConnection(Peer):
    """One client of the socket. serve() runs it until it leaves; last_active is its
    last bytes received."""

    def __init__(self, number: int, stream: anyio.abc.ByteStream, requests: Requests, scheduler: Scheduler,
                 config: DaemonConfig, pending: PendingBytes):
        super().__init__(number, config.max_outbox_bytes)
        self.stream = stream
        self._requests = requests
        self._scheduler = scheduler
        self._config = config
        self._pending = pending
        self.pending_bytes = 0  # bytes of an unfinished frame held by the reader
        self.scope: anyio.CancelScope | None = None  # the connection's; cancelled to drop it

    # ------------------------------------------------------------------ outbox (what the scheduler calls)

    @property
    def closing(self) -> bool:
        return self.scope is None or self.scope.cancel_called

    def post(self, event: p.Event, force: bool = False) -> bool:
        frame = p.encode_frame(event)
        return self._enqueue(frame, len(frame), force)

    def drop(self, error: p.Error) -> None:
        """Send `error` after what is queued, then close; the client gets a short grace
        (slow_client_grace_s) to read it."""
        super().drop(error)
        if self.scope is not None:
            self.scope.deadline = min(self.scope.deadline, time.monotonic() + self._config.slow_client_grace_s)

    # ------------------------------------------------------------------ the connection's tasks

    async def serve(self) -> None:
        self._scheduler.attach(self)
        log.debug("client %d connected", self.number)
        try:
            self.post(self._requests.hello())
            async with anyio.create_task_group() as tg:
                self.scope = tg.cancel_scope
                tg.start_soon(self._read_then_stop, tg.cancel_scope)
                await self._write()
                if self.dropping:
                    # The last error is out: end our side and let the reader drain the
                    # client's input until it closes (or the drop deadline passes).
                    with anyio.move_on_after(1.0):
                        try:
                            await self.stream.send_eof()
                        except Exception:
                            pass
                else:
                    tg.cancel_scope.cancel()
        except Exception:
            log.exception("client %d: connection failed", self.number)
        finally:
            self._account_pending(0, 0)
            self._scheduler.detach(self)
            with anyio.CancelScope(shield=True):
                try:
                    await self.stream.aclose()
                except Exception:
                    pass
            log.debug("client %d disconnected", self.number)

    async def _write(self) -> None:
        try:
            async with self._recv:
                async for frame in self._recv:
                    await self.stream.send(frame)
                    self.outbox_bytes -= len(frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    async def _read_then_stop(self, scope: anyio.CancelScope) -> None:
        await self._read()
        self.close_outbox()
        if not self.dropping:  # else the writer delivers the last error first
            self.connected = False
            scope.cancel()

    async def _read(self) -> None:
        decoder = p.FrameDecoder()
        while True:
            try:
                data = await self.stream.receive(READ_BYTES)
            except _STREAM_GONE:
                if decoder.pending:
                    log.debug("client %d closed mid-frame", self.number)
                return
            self.last_active = time.monotonic()
            decoder.feed(data)
            for item in decoder.frames():
                if isinstance(item, p.ProtocolError):
                    self._scheduler.peers.send_error(self, item.to_event())
                    continue
                self._handle_frame(item)
            self._account_pending(decoder.buffered, decoder.pending)
            if self.slow:
                self._scheduler.drop_slow(self)
            elif self._pending.total > self._pending.limit:
                self._scheduler.peers.drop(self, p.E_BUSY, "busy: too many bytes of unfinished frames are buffered; send whole frames")
            if self.dropping:
                self._account_pending(0, 0)
                await self._discard_input()
                return

    async def _discard_input(self) -> None:
        """Read and discard until the last error is out: closing with unread input would
        reset the connection and lose the error."""
        while True:
            try:
                await self.stream.receive(READ_BYTES)
            except _STREAM_GONE:
                return

    def _handle_frame(self, body: bytes) -> None:
        ref = None
        try:
            obj = p.unpack_body(body)
            if isinstance(obj, dict) and isinstance(obj.get("ref"), str) and len(obj["ref"]) <= p.MAX_ID_CHARS:
                ref = obj["ref"]
            msg = p.decode_request(obj)
        except p.ProtocolError as err:
            event = err.to_event()
            event.ref = ref
            self._scheduler.peers.send_error(self, event)
            return
        self._requests.handle(self, msg)

    def _account_pending(self, buffered: int, pending: int) -> None:
        """Track the bytes of unfinished frames this client makes us hold (`buffered`) and
        how long its current frame has been unfinished (`pending` counts skipped bytes too)."""
        self._pending.total += buffered - self.pending_bytes
        self.pending_bytes = buffered
        if pending == 0:
            self.frame_started = None
        elif self.frame_started is None:
            self.frame_started = time.monotonic()


async def reap_idle(scheduler: Scheduler, config: DaemonConfig) -> None:
    """Close clients that hold an unfinished frame too long (slowloris) or that are idle (no
    live utterance, nothing received) for longer than the idle timeout. Walks every peer,
    front-end ones included."""
    period = max(0.05, min(config.frame_timeout_s, config.idle_timeout_s) / 4)
    while True:
        await anyio.sleep(period)
        now = time.monotonic()
        for peer in scheduler.peers:
            if peer.closing or not peer.connected:
                continue
            if peer.frame_started is not None and now - peer.frame_started > config.frame_timeout_s:
                scheduler.peers.drop(peer, p.E_BAD_FRAME, f"a frame was not completed within {config.frame_timeout_s:g} s")
            elif (
                scheduler.state == "ready"  # a client waiting for `ready` is not idle
                and not peer.utterances
                and peer is not scheduler.pause_owner
                and now - max(peer.last_active, scheduler.ready_at) > config.idle_timeout_s
            ):
                scheduler.peers.drop(peer, p.E_IDLE, f"no request for {config.idle_timeout_s:g} s; closing the connection")
