"""`nightingale serve`: the speech daemon (anyio on asyncio).

Lifecycle: bind the socket first (one daemon per socket, stale sockets replaced), answer
`loading` while the engine thread loads and warms the model, broadcast `ready`, serve,
and on SIGTERM/SIGINT/`shutdown` drain: cancel the queue, let the current utterance finish
(or cancel it after --drain-timeout), close clients, unlink the socket.

The event loop owns all policy (sessions, queue, priorities, bookkeeping); it never runs
model code. The engine thread (engine.py) synthesizes; the player (playback.py) plays.
Their results arrive here through loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import itertools
import logging
import math
import os
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import anyio
import anyio.abc

from nightingale import __version__
from nightingale import protocol as p

from .engine import Engine, EngineInfo
from .frontend import Frontdoor, build_frontends
from .playback import DeviceNotFound, Player, ProbeResult, probe_output
from .queue import DEFAULT_MAX_QUEUE, SpeechQueue
from .utterance import Utterance

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 5.0  # how long a drain lets the current utterance finish
CLOSE_TIMEOUT_S = 2.0  # how long a drain waits for clients to receive their last events
MAX_OUTBOX_BYTES = 16 << 20  # events queued for one client before it counts as not reading
HISTORY = 50  # utterances kept for status metrics
SAMPLE_RATE = 24000  # the model's output rate (models/chunks.py); the player opens at it
LISTEN_BACKLOG = max(socket.SOMAXCONN, 1024)  # the kernel caps it at net.core.somaxconn
MAX_CONNECTIONS = 256  # clients at once; more are told `busy` and closed
MAX_PENDING_BYTES = 64 << 20  # bytes of unfinished frames buffered over all clients
FRAME_TIMEOUT_S = 30.0  # an unfinished frame must complete within this (slowloris)
IDLE_TIMEOUT_S = 600.0  # a client with no live utterance that sends nothing is closed
SLOW_CLIENT_GRACE_S = 5.0  # after `slow_client` is queued, time to read it before the drop
SOCKET_CHECK_S = 2.0  # how often the daemon checks that its socket file still exists


class SocketInUse(RuntimeError):
    """Another daemon serves the socket, or the path is taken by something else."""


class UnsafeDirectory(SocketInUse):
    """The socket's directory or lock file could let another user take the socket over."""


@dataclass
class DaemonConfig:
    socket: Path
    device: str | int | None = None
    playback: bool = True
    max_queue: int = DEFAULT_MAX_QUEUE
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    warmup: bool = True
    latency: float | str | None = None  # output latency in seconds (None: playback.DEFAULT_LATENCY)
    max_connections: int = MAX_CONNECTIONS
    max_pending_bytes: int = MAX_PENDING_BYTES
    frame_timeout_s: float = FRAME_TIMEOUT_S
    idle_timeout_s: float = IDLE_TIMEOUT_S
    slow_client_grace_s: float = SLOW_CLIENT_GRACE_S
    socket_check_s: float = SOCKET_CHECK_S
    max_outbox_bytes: int = MAX_OUTBOX_BYTES
    # In-process front ends (openai_api.HttpFrontend, wyoming_server.WyomingFrontend): each has
    # `async serve(door, *, task_status)`, binds, reports started, and serves until cancelled.
    frontends: list = field(default_factory=list)


# ----------------------------------------------------------------------------- socket


class SocketBinding:
    """The listening socket plus the lock that makes it ours.

    `PATH.lock` is flock()ed for the daemon's lifetime: a second daemon fails to take it
    and names the first one's pid. With the lock held, any socket file at PATH is a
    leftover of a crashed daemon (unless something still answers on it) and is replaced.
    """

    def __init__(self, path: Path):
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._lock_fd: int | None = None
        self._ino: int | None = None
        self.sock: socket.socket | None = None

    def bind(self) -> socket.socket:
        self._prepare_dir()
        fd = self._take_lock()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        try:
            self._clear_stale()
            return self._listen()
        except BaseException:
            self._release_lock()
            raise

    def _listen(self) -> socket.socket:
        """Bind and listen at the path (owner-only); remember the socket file's inode."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            # a deep backlog, so a connect flood queues instead of failing with EAGAIN
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._ino = os.stat(self.path).st_ino
        self.sock = sock
        return sock

    def _prepare_dir(self) -> None:
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(parents=True, mode=0o700)
            os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask
        elif parent == p.default_socket_path().parent and parent.stat().st_uid == os.getuid():
            os.chmod(parent, 0o700)
        st = parent.stat()
        # Another user who can write the directory can rename our socket and bind their
        # own in its place (and read what clients send), or plant links for the lock file.
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeDirectory(
                f"refusing socket directory {parent}: other users can write to it (mode {stat.S_IMODE(st.st_mode):o}); "
                "choose a directory only you can write, e.g. the default"
            )
        if st.st_uid not in (os.getuid(), 0):
            raise UnsafeDirectory(f"refusing socket directory {parent}: it belongs to another user (uid {st.st_uid})")

    def _take_lock(self) -> int:
        """Open and flock PATH.lock without following links; it must be our regular file."""
        for _ in range(10):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise UnsafeDirectory(f"refusing lock file {self.lock_path}: it is a symbolic link") from None
                raise
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                os.close(fd)
                raise UnsafeDirectory(f"refusing lock file {self.lock_path}: not a regular file of this user")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise SocketInUse(f"another nightingale daemon (pid {owner}) is already serving {self.path}") from None
            # A daemon that stopped between our open and flock unlinked the file: lock anew.
            try:
                if os.stat(self.lock_path, follow_symlinks=False).st_ino == st.st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise SocketInUse(f"could not take {self.lock_path}: it keeps being replaced")

    def check(self) -> bool:
        """Whether the socket file is still ours; if it vanished or was replaced, bind a new
        one at the path (we hold the lock, so the path is ours) and return False."""
        try:
            if os.stat(self.path, follow_symlinks=False).st_ino == self._ino:
                return True
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._listen()
        return False

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"{self.path} exists and is not a socket; remove it or choose another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError:
            log.warning("replacing stale socket %s (left by a daemon that did not shut down)", self.path)
            os.unlink(self.path)
        else:
            raise SocketInUse(f"a process that does not hold {self.lock_path} is listening on {self.path}")
        finally:
            probe.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        try:
            if self._ino is not None and os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._ino = None
        self._release_lock(unlink=True)

    def _release_lock(self, unlink: bool = False) -> None:
        if self._lock_fd is not None:
            if unlink:
                # Still holding the lock: a daemon starting now re-checks the inode it locked.
                try:
                    if os.stat(self.lock_path, follow_symlinks=False).st_ino == os.fstat(self._lock_fd).st_ino:
                        os.unlink(self.lock_path)
                except OSError:
                    pass
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None


# ----------------------------------------------------------------------------- memory


def process_rss_mb() -> float | None:
    """Resident memory of this process in MB (Linux /proc, macOS proc_pidinfo)."""
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
        if sys.platform == "darwin":
            import ctypes

            libc = ctypes.CDLL("/usr/lib/libproc.dylib")
            buf = (ctypes.c_uint64 * 12)()  # struct proc_taskinfo: virtual, resident, ...
            n = libc.proc_pidinfo(os.getpid(), 4, ctypes.c_uint64(0), buf, ctypes.sizeof(buf))  # PROC_PIDTASKINFO
            if n >= 16:
                return buf[1] / (1 << 20)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
    except Exception:
        return None


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncio's handler, minus a known harmless race: anyio's raw-socket reader/writer
    futures are set after a client vanished and the future was cancelled (InvalidStateError)."""
    if isinstance(context.get("exception"), asyncio.InvalidStateError):
        log.debug("ignored: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, max(0, math.ceil(q / 100.0 * len(s)) - 1))], 3)


def _plain(value: Any) -> Any:
    """A msgpack-safe copy of a describe() value."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


# ----------------------------------------------------------------------------- sessions


class Session:
    """One client connection: an outbox drained by a writer task, and its utterances."""

    def __init__(self, number: int, stream: anyio.abc.ByteStream, max_outbox_bytes: int = MAX_OUTBOX_BYTES):
        self.number = number
        self.max_outbox_bytes = max_outbox_bytes
        self.stream = stream
        self.utterances: dict[str, Utterance] = {}
        self.connected = True
        self.outbox_bytes = 0
        self.pending_bytes = 0  # bytes of an unfinished frame held by the reader
        self.last_active = time.monotonic()  # last bytes received
        self.frame_started: float | None = None  # when the unfinished frame began
        self.slow = False
        self.dropping = False
        self.scope: anyio.CancelScope | None = None  # the connection's; cancelled to drop it
        self._send, self._recv = anyio.create_memory_object_stream[bytes](math.inf)

    def post(self, event: p.Event, force: bool = False) -> bool:
        """Queue an event for this client; False if it is gone or not reading. `force`
        queues it past the outbox limit (the last error before a drop)."""
        if not self.connected or (self.slow and not force):
            return False
        frame = p.encode_frame(event)
        if not force and self.outbox_bytes + len(frame) > self.max_outbox_bytes:
            self.slow = True
            return False
        self.outbox_bytes += len(frame)
        try:
            self._send.send_nowait(frame)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

    def close_outbox(self) -> None:
        """No more events: the writer ends after sending what is queued."""
        self._send.close()

    async def writer(self) -> None:
        try:
            async with self._recv:
                async for frame in self._recv:
                    await self.stream.send(frame)
                    self.outbox_bytes -= len(frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


# ----------------------------------------------------------------------------- daemon


class Daemon:
    """The service. `await run()` serves until shutdown and returns the exit code.

    model_factory() is called on the engine thread and must return a loaded model.
    request_shutdown() may be called from any thread.
    """

    def __init__(self, config: DaemonConfig, model_factory: Callable[[], Any]):
        self.config = config
        self._model_factory = model_factory
        self.state = "loading"
        self.exit_code = 0
        self.queue = SpeechQueue(config.max_queue)
        self.sessions: set[Session] = set()
        self.paused = False
        self._pause_owner: Session | None = None  # a pause is lifted when this client leaves
        self._pending_total = 0  # unfinished-frame bytes over all clients
        self._ready_at = 0.0
        self.player: Player | None = None
        self.playback_reason = ""
        self.engine: Engine | None = None
        self.info: EngineInfo | None = None
        self._running: Utterance | None = None  # handed to the engine
        self._tails: list[Utterance] = []  # synthesized, last samples still playing
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._conn_numbers = itertools.count(1)
        self._history: collections.deque[dict] = collections.deque(maxlen=HISTORY)
        self._underruns_total = 0
        self.counters = dict.fromkeys(("accepted", "completed", "cancelled", "preempted", "failed", "errors", "connections"), 0)
        self._started_at = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: anyio.Event | None = None
        self._idle: anyio.Event | None = None
        self._no_clients: anyio.Event | None = None
        self._force = False
        self._binding = SocketBinding(config.socket)
        self.engine_left_behind = False  # serve_main then exits without running MLX teardown
        self.bound = threading.Event()  # set once the socket listens (tests wait on it)

    # ------------------------------------------------------------------ thread-safe entry points

    def request_shutdown(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._begin_shutdown)
            except RuntimeError:
                pass

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Schedule fn(*args) on the loop (engine and player threads use this)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._guarded, fn, *args)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("internal error in %s", getattr(fn, "__name__", fn))

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, handle_signals: bool = False) -> int:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(_loop_exception)
        self._shutdown = anyio.Event()
        sock = self._binding.bind()
        try:
            listener = await anyio.abc.SocketListener.from_socket(sock)
            log.info("listening on %s", self.config.socket)
            self.bound.set()
            await self._setup_playback()
            self.engine = Engine(self._model_factory, self, self._post, self.player, warmup=self.config.warmup)
            log.info("loading model")
            self.engine.start()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._accept_loop, listener)
                tg.start_soon(self._watch_socket, listener)
                tg.start_soon(self._reap_idle)
                for frontend in self.config.frontends:
                    await tg.start(frontend.serve, Frontdoor(self))
                if handle_signals:
                    tg.start_soon(self._watch_signals)
                await self._shutdown.wait()
                await self._drain()
                tg.cancel_scope.cancel()
        finally:
            await self._cleanup()
        log.info("stopped")
        return self.exit_code

    async def _setup_playback(self) -> None:
        if not self.config.playback:
            self.playback_reason = "local playback is disabled (--no-playback)"
            log.info("%s; serving streaming clients only", self.playback_reason)
            return
        probe: ProbeResult = await anyio.to_thread.run_sync(probe_output, self.config.device, SAMPLE_RATE)
        if not probe.available:
            self.playback_reason = f"local playback is unavailable: {probe.reason}"
            log.warning("%s; serving streaming clients only", self.playback_reason)
            return
        self.player = Player(
            SAMPLE_RATE, probe, on_played=lambda utt, n: self._post(self._on_played, utt, n), latency=self.config.latency
        )
        log.info("audio output: %s", probe.device_name)

    async def _cleanup(self) -> None:
        if self.engine is not None:
            stopped = await anyio.to_thread.run_sync(self.engine.stop, 5.0)
            if not stopped:
                log.warning("the engine thread is still loading the model; leaving it behind")
                self.engine_left_behind = True
        if self.player is not None:
            await anyio.to_thread.run_sync(self.player.close)
        self._binding.close()

    def _begin_shutdown(self) -> None:
        if self._shutdown is not None and not self._shutdown.is_set():
            self._shutdown.set()

    async def _watch_socket(self, listener: anyio.abc.SocketListener) -> None:
        """Rebind when the socket file is deleted or replaced under us: clients would
        otherwise find "no daemon" while a new daemon is refused (we hold the lock)."""
        while True:
            await anyio.sleep(self.config.socket_check_s)
            if self.state == "draining":
                return
            try:
                if self._binding.check():
                    continue
            except OSError as err:
                log.error("socket %s vanished and could not be recreated: %s", self.config.socket, err)
                continue
            log.warning("socket %s vanished or was replaced; listening on a new one", self.config.socket)
            old, listener = listener, await anyio.abc.SocketListener.from_socket(self._binding.sock)
            self._tg.start_soon(self._accept_loop, listener)
            await old.aclose()

    async def _reap_idle(self) -> None:
        """Close clients that hold an unfinished frame too long (slowloris) or that are idle
        (no live utterance, nothing received) for longer than the idle timeout."""
        cfg = self.config
        period = max(0.05, min(cfg.frame_timeout_s, cfg.idle_timeout_s) / 4)
        while True:
            await anyio.sleep(period)
            now = time.monotonic()
            for s in list(self.sessions):
                if s.scope is None or s.scope.cancel_called or not s.connected:
                    continue
                if s.frame_started is not None and now - s.frame_started > cfg.frame_timeout_s:
                    self._drop(s, p.E_BAD_FRAME, f"a frame was not completed within {cfg.frame_timeout_s:g} s")
                elif (
                    self.state == "ready"  # a client waiting for `ready` is not idle
                    and not s.utterances
                    and s is not self._pause_owner
                    and now - max(s.last_active, self._ready_at) > cfg.idle_timeout_s
                ):
                    self._drop(s, p.E_IDLE, f"no request for {cfg.idle_timeout_s:g} s; closing the connection")

    def _drop(self, session: Session, code: str, message: str) -> None:
        """Tell a client why, then close its connection (its writer gets a short grace)."""
        if session.dropping:
            return
        session.dropping = True
        log.info("client %d: dropping: %s", session.number, message)
        self.counters["errors"] += 1
        session.post(p.Error(code=code, message=message), force=True)
        session.slow = True  # nothing more is queued for it
        session.close_outbox()
        scope = session.scope
        if scope is not None:
            scope.deadline = min(scope.deadline, time.monotonic() + self.config.slow_client_grace_s)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self._shutdown is not None and self._shutdown.is_set():
                    log.warning("%s again: cancelling the current utterance now", name)
                    self._force = True
                    self._cancel_active("daemon stopped")
                else:
                    log.info("%s received", name)
                    self._begin_shutdown()

    async def _drain(self) -> None:
        was_loading = self.state == "loading"
        self.state = "draining"
        log.info("draining")
        self._broadcast(p.ShuttingDown())
        for utt in self.queue.remove_all():
            self._finish(utt, "cancelled", "the daemon is shutting down")
        if self._running is not None and self._running.text_stream:
            self._running.feed.end()  # speak what has arrived, then stop
        if not was_loading and not self._force:
            self._idle = anyio.Event()
            self._check_idle()
            with anyio.move_on_after(self.config.drain_timeout_s):
                await self._idle.wait()
            if not self._idle.is_set():
                log.warning("drain timeout (%.1f s): cancelling the current utterance", self.config.drain_timeout_s)
        self._cancel_active("the daemon is shutting down")
        if self._running is not None:
            # The engine stops within one chunk; wait for it so its last events go out.
            self._idle = anyio.Event()
            with anyio.move_on_after(5.0):
                await self._idle.wait()
        self._no_clients = anyio.Event()
        for s in list(self.sessions):
            s.close_outbox()
        if self.sessions:
            with anyio.move_on_after(CLOSE_TIMEOUT_S):
                await self._no_clients.wait()

    def _cancel_active(self, detail: str) -> None:
        for utt in [*([self._running] if self._running else []), *self._tails]:
            self._finish(utt, "cancelled", detail)

    def _check_idle(self) -> None:
        if self._idle is not None and self._running is None and not self._tails:
            self._idle.set()

    # ------------------------------------------------------------------ connections

    async def _accept_loop(self, listener: anyio.abc.SocketListener) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
                except OSError as err:  # e.g. EMFILE: keep serving those already connected
                    log.warning("accept failed: %s", err)
                    await anyio.sleep(0.1)
                    continue
                if len(self.sessions) >= self.config.max_connections:
                    self._tg.start_soon(self._refuse, stream)
                    continue
                self._tg.start_soon(self._connection, stream)

    async def _refuse(self, stream: anyio.abc.ByteStream) -> None:
        """Over the connection cap: one `busy` error, then close (bounded in time)."""
        self.counters["errors"] += 1
        with anyio.move_on_after(1.0):
            try:
                await stream.send(p.encode_frame(p.Error(code=p.E_BUSY, message=f"busy: {self.config.max_connections} clients are connected; try again later")))
            except Exception:
                pass
        with anyio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except Exception:
                pass

    async def _connection(self, stream: anyio.abc.ByteStream) -> None:
        session = Session(next(self._conn_numbers), stream, self.config.max_outbox_bytes)
        self.sessions.add(session)
        self.counters["connections"] += 1
        log.debug("client %d connected", session.number)
        try:
            session.post(
                p.Hello(
                    server=f"nightingale {__version__}",
                    state=self.state,
                    sample_rate=self.info.sample_rate if self.info else None,
                    playback=self.player is not None,
                    languages=self._languages(),
                )
            )
            async with anyio.create_task_group() as tg:
                session.scope = tg.cancel_scope

                async def read_then_stop() -> None:
                    await self._read_loop(session)
                    session.close_outbox()
                    if not session.dropping:  # else the writer delivers the last error first
                        session.connected = False
                        tg.cancel_scope.cancel()

                tg.start_soon(read_then_stop)
                await session.writer()
                if session.dropping:
                    # The last error is out: end our side and let the reader drain the
                    # client's input until it closes (or the drop deadline passes).
                    with anyio.move_on_after(1.0):
                        try:
                            await session.stream.send_eof()
                        except Exception:
                            pass
                else:
                    tg.cancel_scope.cancel()
        except Exception:
            log.exception("client %d: connection failed", session.number)
        finally:
            session.connected = False
            self.sessions.discard(session)
            self._on_disconnect(session)
            with anyio.CancelScope(shield=True):
                try:
                    await stream.aclose()
                except Exception:
                    pass
            log.debug("client %d disconnected", session.number)
            if self._no_clients is not None and not self.sessions:
                self._no_clients.set()

    async def _read_loop(self, session: Session) -> None:
        decoder = p.FrameDecoder()
        while True:
            try:
                data = await session.stream.receive(1 << 16)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                if decoder.pending:
                    log.debug("client %d closed mid-frame", session.number)
                return
            session.last_active = time.monotonic()
            decoder.feed(data)
            for item in decoder.frames():
                if isinstance(item, p.ProtocolError):
                    self._send_error(session, item.to_event())
                    continue
                self._handle_frame(session, item)
            self._account_pending(session, decoder.buffered, decoder.pending)
            if session.slow:
                self._drop_slow(session)
            elif self._pending_total > self.config.max_pending_bytes:
                self._drop(session, p.E_BUSY, "busy: too many bytes of unfinished frames are buffered; send whole frames")
            if session.dropping:
                self._account_pending(session, 0, 0)
                # Read and discard until the last error is out: closing with unread input
                # would reset the connection and lose the error.
                while True:
                    try:
                        await session.stream.receive(1 << 16)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        return

    def _handle_frame(self, session: Session, body: bytes) -> None:
        ref = None
        try:
            obj = p.unpack_body(body)
            if isinstance(obj, dict) and isinstance(obj.get("ref"), str) and len(obj["ref"]) <= p.MAX_ID_CHARS:
                ref = obj["ref"]
            msg = p.decode_request(obj)
        except p.ProtocolError as err:
            event = err.to_event()
            event.ref = ref
            self._send_error(session, event)
            return
        try:
            self._dispatch_request(session, msg)
        except Exception as err:
            log.exception("client %d: %s failed", session.number, msg.TYPE)
            self._send_error(session, p.Error(code=p.E_INTERNAL, message=f"internal error: {err}", request=msg.TYPE, ref=msg.ref))

    def _send_error(self, session: Session, event: p.Error) -> None:
        self.counters["errors"] += 1
        log.debug("client %d: error %s: %s", session.number, event.code, event.message)
        session.post(event)

    def _account_pending(self, session: Session, buffered: int, pending: int) -> None:
        """Track the bytes of unfinished frames this client makes us hold (`buffered`) and
        how long its current frame has been unfinished (`pending` counts skipped bytes too)."""
        self._pending_total += buffered - session.pending_bytes
        session.pending_bytes = buffered
        if pending == 0:
            session.frame_started = None
        elif session.frame_started is None:
            session.frame_started = time.monotonic()

    def _on_disconnect(self, session: Session) -> None:
        self._account_pending(session, 0, 0)
        if self._pause_owner is session:
            self._pause_owner = None
            if self.paused:
                log.info("the client that paused playback left; resuming")
                self._set_paused(False)
        for utt in list(session.utterances.values()):
            if utt.output == "stream" or (utt.text_stream and not utt.feed.ended) or session.slow:
                self._finish(utt, "cancelled", "the client disconnected")
            else:
                utt.streams = False  # keep playing locally; nobody to stream to

    def _drop_slow(self, session: Session) -> None:
        """A client let MAX_OUTBOX_BYTES of events pile up: cancel its utterances, queue a
        `slow_client` error after what it has not read, and close its connection once that
        is read or the grace time passes, so it cannot hold the daemon's memory."""
        if session.scope is None or session.scope.cancel_called or session.dropping:
            return
        log.warning("client %d stopped reading (%d bytes queued); disconnecting it", session.number, session.outbox_bytes)
        for utt in list(session.utterances.values()):
            self._finish(utt, "cancelled", f"{p.E_SLOW_CLIENT}: the client stopped reading")
        self._drop(session, p.E_SLOW_CLIENT, f"the client stopped reading ({session.outbox_bytes} bytes of events unread)")

    def _broadcast(self, event: p.Event) -> None:
        for s in list(self.sessions):
            s.post(event)

    # ------------------------------------------------------------------ in-process front ends (frontend.py)

    def attach(self, session: Any) -> None:
        """Register an in-process peer (frontend.LocalSession) as a connected client."""
        self.sessions.add(session)
        self.counters["connections"] += 1

    def detach(self, session: Any) -> None:
        """The peer went away: as a socket disconnect (its stream utterances are cancelled)."""
        if session not in self.sessions:
            return
        session.connected = False
        self.sessions.discard(session)
        self._on_disconnect(session)
        self._dispatch()
        if self._no_clients is not None and not self.sessions:
            self._no_clients.set()

    def handle(self, session: Any, msg: p.Request) -> None:
        """Perform a validated request for a peer, as if it had arrived on a socket."""
        try:
            self._dispatch_request(session, msg)
        except Exception as err:
            log.exception("client %s: %s failed", session.number, msg.TYPE)
            self._send_error(session, p.Error(code=p.E_INTERNAL, message=f"internal error: {err}", request=msg.TYPE, ref=msg.ref))

    # ------------------------------------------------------------------ requests

    def _dispatch_request(self, session: Session, msg: p.Request) -> None:
        handler = getattr(self, f"_req_{msg.TYPE}")
        handler(session, msg)

    def _req_speak(self, session: Session, msg: p.Speak) -> None:
        def error(code: str, text: str) -> None:
            self._send_error(session, p.Error(code=code, message=text, request="speak", id=msg.id, ref=msg.ref))

        if self.state == "loading":
            session.post(p.Loading(request="speak", id=msg.id, ref=msg.ref))
            return
        if self.state != "ready":
            return error(p.E_SHUTTING_DOWN, "the daemon is shutting down")
        if msg.output in ("play", "both") and self.player is None:
            return error(p.E_NO_PLAYBACK, f"{self.playback_reason}; ask for output 'stream' instead")
        uid = msg.id if msg.id is not None else f"u{next(self._ids)}"
        languages = self._languages()
        if msg.language is not None and languages and msg.language.lower() not in languages:
            return error(p.E_UNSUPPORTED_LANGUAGE, f"unsupported language {msg.language!r}; supported: {', '.join(languages)}")
        if uid in session.utterances:
            return error(p.E_DUPLICATE_ID, f"utterance id {uid!r} is still in use on this connection")
        utt = Utterance(
            id=uid,
            seq=next(self._seq),
            session=session,
            priority=msg.priority,
            output=msg.output,
            voice=msg.voice,
            options=dict(msg.options),
            language=msg.language.lower() if msg.language else None,
            audio_format=msg.audio_format,
            text_stream=msg.stream,
        )
        if not msg.stream:
            utt.feed.push(msg.text or "")
            utt.feed.end()
        admission = self.queue.admit(utt, self._speaking(), paused=self.paused)
        if admission.busy:
            return error(p.E_BUSY, f"busy: {admission.reason}; try again later")
        session.utterances[uid] = utt
        self.counters["accepted"] += 1
        position = 0
        if admission.accepted:
            running_stays = self._running is not None and self._running not in admission.preempted
            position = self.queue.position(utt) + int(running_stays)
        session.post(p.Accepted(id=uid, position=position, priority=utt.priority, output=utt.output, ref=msg.ref))
        log.debug("accepted %s/%s (%s, %s)", session.number, uid, utt.priority, utt.output)
        if not admission.accepted:
            self._finish(utt, "preempted", f"discarded on arrival: {admission.reason}")
        for victim in admission.preempted:
            self._finish(victim, "preempted", f"preempted by {utt.priority} message {uid!r}")
        self._dispatch()

    def _live(self, session: Session, uid: str, request: str, ref: str | None) -> Utterance | None:
        utt = session.utterances.get(uid)
        if utt is None:
            self._send_error(
                session, p.Error(code=p.E_UNKNOWN_ID, message=f"no live utterance {uid!r} on this connection", request=request, id=uid, ref=ref)
            )
        return utt

    def _req_speak_text(self, session: Session, msg: p.SpeakText) -> None:
        utt = self._live(session, msg.id, "speak_text", msg.ref)
        if utt is None:
            return
        if not utt.text_stream or utt.feed.ended:
            self._send_error(
                session, p.Error(code=p.E_UNKNOWN_ID, message=f"utterance {msg.id!r} has no open text stream", request="speak_text", id=msg.id, ref=msg.ref)
            )
            return
        if utt.feed.total_bytes + len(msg.text.encode("utf-8")) > p.MAX_STREAM_TEXT_BYTES:
            self._send_error(
                session,
                p.Error(code=p.E_TEXT_TOO_LONG, message=f"a text stream may carry at most {p.MAX_STREAM_TEXT_BYTES} bytes", request="speak_text", id=msg.id, ref=msg.ref),
            )
            self._finish(utt, "failed", "text stream too long")
            return
        utt.feed.push(msg.text)

    def _req_speak_end(self, session: Session, msg: p.SpeakEnd) -> None:
        utt = self._live(session, msg.id, "speak_end", msg.ref)
        if utt is not None:
            utt.feed.end()

    def _req_cancel(self, session: Session, msg: p.Cancel) -> None:
        if msg.all:
            targets = [*([self._running] if self._running else []), *self._tails, *self.queue]
            targets = [u for u in targets if not u.finished]
        else:
            utt = self._live(session, msg.id, "cancel", msg.ref)
            if utt is None:
                return
            targets = [utt]
        session.post(p.Cancelled(ids=[u.id for u in targets], ref=msg.ref))
        for utt in targets:
            self._finish(utt, "cancelled", "cancel request")
        self._dispatch()

    def _req_pause(self, session: Session, msg: p.Pause) -> None:
        # A pause lasts while its client stays connected, unless it asks to keep it.
        self._pause_owner = None if msg.keep else session
        self._set_paused(True)
        session.post(p.Paused(ref=msg.ref))

    def _req_resume(self, session: Session, msg: p.Resume) -> None:
        self._pause_owner = None
        self._set_paused(False)
        session.post(p.Resumed(ref=msg.ref))

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        if self.player is not None:
            self.player.pause() if paused else self.player.resume()
        log.info("playback %s", "paused" if paused else "resumed")

    def _req_status(self, session: Session, msg: p.GetStatus) -> None:
        session.post(self.status(ref=msg.ref))

    def _req_voices(self, session: Session, msg: p.ListVoices) -> None:
        if self.state == "loading" or self.engine is None:
            session.post(p.Loading(request="voices", ref=msg.ref))
            return

        def answer(value: Any, error: BaseException | None) -> None:
            if error is not None:
                self._send_error(session, p.Error(code=p.E_INTERNAL, message=f"listing voices failed: {error}", request="voices", ref=msg.ref))
            else:
                family = str((self.info.describe if self.info else {}).get("family", ""))
                session.post(p.Voices(voices=[str(v) for v in value], family=family, ref=msg.ref))

        self.engine.call(lambda model: list(model.list_voices()), answer)  # answer runs on the loop

    def _req_ping(self, session: Session, msg: p.Ping) -> None:
        session.post(p.Pong(state=self.state, ref=msg.ref))

    def _req_shutdown(self, session: Session, msg: p.Shutdown) -> None:
        log.info("shutdown requested by client %d", session.number)
        session.post(p.ShuttingDown(ref=msg.ref))
        self._begin_shutdown()

    # ------------------------------------------------------------------ scheduling

    def _speaking(self) -> list[Utterance]:
        out = [u for u in self._tails if not u.finished]
        if self._running is not None and not self._running.finished:
            out.insert(0, self._running)
        return out

    def _dispatch(self) -> None:
        """Hand the next utterance to the engine if it is free."""
        if self.state != "ready" or self._running is not None or self.engine is None:
            return
        utt = self.queue.pop()
        if utt is None:
            return
        self._running = utt
        utt.started_at = time.monotonic()
        self.engine.submit(utt)

    def _finish(self, utt: Utterance, reason: str, detail: str | None = None) -> None:
        """Send the utterance's one `done` and forget it (idempotent)."""
        if utt.finished:
            return
        utt.finished = True
        if reason != "completed":
            utt.cancel()
            if utt.plays and self.player is not None:
                self.player.flush(utt)
        self.queue.remove(utt)
        if utt in self._tails:
            self._tails.remove(utt)
        session: Session = utt.session
        if session.utterances.get(utt.id) is utt:
            del session.utterances[utt.id]
        st = utt.stats
        now = time.monotonic()
        done = p.Done(id=utt.id, reason=reason, detail=detail, tokens=st.get("tokens", utt.tokens), chunks=st.get("chunks", utt.chunks))
        done.audio_s = round(float(st.get("audio_s", utt.audio_s)), 3)
        if utt.started_at is not None:
            done.wait_ms = round((utt.started_at - utt.received_at) * 1000.0, 1)
        if st.get("ttfa_ms") is not None:
            done.ttfa_ms = round(st["ttfa_ms"], 1)
        if utt.first_audio_at is not None:
            done.first_audio_ms = round((utt.first_audio_at - utt.received_at) * 1000.0, 1)
        if st.get("audio_s") and st.get("synth_s") is not None:
            done.rtf = round(st["synth_s"] / st["audio_s"], 4)
        if st.get("t3_ms"):
            done.t3_tokens_per_s = round(st["tokens"] / (st["t3_ms"] / 1000.0), 1)
        if st.get("chunks") and st.get("s3gen_ms"):
            done.s3gen_ms_per_chunk = round(st["s3gen_ms"] / st["chunks"], 1)
        done.underruns = int(st.get("underruns", 0))
        session.post(done)
        self.counters[reason] = self.counters.get(reason, 0) + 1
        if reason == "completed":
            self._history.append(
                {
                    "ttfa_ms": done.ttfa_ms,
                    "first_audio_ms": done.first_audio_ms,
                    "rtf": done.rtf,
                    "t3_tokens_per_s": done.t3_tokens_per_s,
                    "s3gen_ms_per_chunk": done.s3gen_ms_per_chunk,
                }
            )
        log.debug("done %s/%s: %s%s (%.0f ms)", session.number, utt.id, reason, f" ({detail})" if detail else "", (now - utt.received_at) * 1e3)
        self._check_idle()

    # ------------------------------------------------------------------ engine and player callbacks (loop thread)

    def on_loaded(self, info: EngineInfo) -> None:
        self.info = info
        if self.state != "loading":
            return
        self.state = "ready"
        self._ready_at = time.monotonic()
        log.info("ready: %s (load %.1f s, warm-up %.1f s)", self._model_line(), info.load_s, info.warmup_s)
        if info.sample_rate != SAMPLE_RATE and self.player is not None:
            log.warning("model rate %d Hz differs from the player's %d Hz; playback disabled", info.sample_rate, SAMPLE_RATE)
            self.player.close()
            self.player = None
            self.playback_reason = "local playback is unavailable: unexpected model sample rate"
        self._broadcast(p.Ready(sample_rate=info.sample_rate, model=self._model_line()))
        log.info("serving on %s", self.config.socket)
        self._dispatch()

    def on_load_failed(self, error: BaseException) -> None:
        message = f"the model could not be loaded: {type(error).__name__}: {error}"
        log.error("%s", message)
        self._broadcast(p.Error(code=p.E_LOAD_FAILED, message=message))
        self.exit_code = 1
        self._begin_shutdown()

    def _languages(self) -> list[str]:
        """The loaded model's language codes (empty while loading or when it has none)."""
        return list((self.info.describe if self.info else {}).get("languages") or [])

    def on_started(self, utt: Utterance, language: str | None = None) -> None:
        if not utt.finished:
            utt.session.post(p.Started(id=utt.id, wait_ms=round((utt.started_at - utt.received_at) * 1000.0, 1),
                                       voice=utt.voice, language=language))

    def on_audio(self, utt: Utterance, seq: int, pcm: bytes, start_s: float) -> None:
        if utt.finished or not utt.streams:
            return
        session: Session = utt.session
        session.post(
            p.Audio(id=utt.id, seq=seq, pcm=pcm, format=utt.audio_format, sample_rate=self.info.sample_rate, start_s=round(start_s, 4))
        )
        if session.slow:
            self._drop_slow(session)

    def on_chunk(self, utt: Utterance, info: dict) -> None:
        if utt.first_audio_at is None:
            utt.first_audio_at = time.monotonic()
        utt.chunks = info["chunk"] + 1
        utt.tokens = info["tokens"]
        utt.audio_s = info["audio_s"]
        if utt.finished:
            return
        utt.session.post(
            p.Progress(
                id=utt.id,
                chunk=info["chunk"],
                segment=info["segment"],
                tokens=info["tokens"],
                audio_s=round(info["audio_s"], 3),
                t3_ms=info.get("t3_ms"),
                s3gen_ms=info.get("s3gen_ms"),
                text_start=info.get("text_start"),
                text_end=info.get("text_end"),
                text=info.get("text"),
            )
        )

    def on_generated(self, utt: Utterance, outcome: str, stats: dict, error: tuple[str, str] | None) -> None:
        if self._running is utt:
            self._running = None
        utt.generated = True
        utt.stats = {**stats, "underruns": utt.stats.get("underruns", 0)}
        if outcome == "completed" and not utt.finished:
            if utt.plays and stats.get("played") and not utt.played:
                self._tails.append(utt)  # done once its last sample is heard (on_played)
            else:
                self._finish(utt, "completed")
        elif outcome == "failed" and not utt.finished:
            code, message = error or (p.E_SYNTHESIS, "synthesis failed")
            self._send_error(utt.session, p.Error(code=code, message=message, request="speak", id=utt.id))
            self._finish(utt, "failed", message)
        else:
            self._finish(utt, "cancelled")
        self._dispatch()
        self._check_idle()

    def _on_played(self, utt: Utterance, underruns: int) -> None:
        utt.played = True
        utt.stats["underruns"] = underruns
        self._underruns_total += underruns
        if utt in self._tails:
            self._finish(utt, "completed")

    # ------------------------------------------------------------------ status

    def _model_line(self) -> str:
        if self.info is None:
            return ""
        d = self.info.describe
        parts = [f"{k}={v}" for k, v in d.items() if isinstance(v, (str, int, float, bool)) or v is None]
        return ", ".join(parts)[:300]

    def status(self, ref: str | None = None) -> p.Status:
        now = time.monotonic()
        hist = list(self._history)

        def series(key: str, pcts: tuple[int, ...] = (50,)) -> dict:
            vals = [h[key] for h in hist if h.get(key) is not None]
            out: dict[str, Any] = {"last": vals[-1] if vals else None}
            for q in pcts:
                out[f"p{q}"] = _percentile(vals, q)
            return out

        model: dict[str, Any] = {}
        if self.info is not None:
            model = _plain(self.info.describe)
            model.update(sample_rate=self.info.sample_rate, load_s=round(self.info.load_s, 2), warmup_s=round(self.info.warmup_s, 2))
        if self.player is not None:
            playback = self.player.stats()
        else:
            playback = {"available": False, "reason": self.playback_reason, "device": None, "active": False, "buffered_s": 0.0, "underruns": 0}
        memory: dict[str, Any] = {"rss_mb": None if (r := process_rss_mb()) is None else round(r, 1)}
        if self.engine is not None:
            memory.update(self.engine.memory)
        current = self._running if self._running is not None and not self._running.finished else None
        return p.Status(
            state=self.state,
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(now - self._started_at, 3),
            socket=str(self.config.socket),
            model=model,
            queue_depth=len(self.queue),
            queue=[u.describe(now) for u in self.queue],
            current=current.describe(now) if current else None,
            paused=self.paused,
            playback=playback,
            clients=len(self.sessions),
            metrics={
                "utterances": len(hist),
                "ttfa_ms": series("ttfa_ms", (50, 95)),
                "first_audio_ms": series("first_audio_ms", (50, 95)),
                "rtf": series("rtf"),
                "t3_tokens_per_s": series("t3_tokens_per_s"),
                "s3gen_ms_per_chunk": series("s3gen_ms_per_chunk"),
                "underruns": self._underruns_total,
            },
            memory=memory,
            counters=dict(self.counters),
            ref=ref,
        )


# ----------------------------------------------------------------------------- CLI entry


def _load_model(model: str | None, quantize: int | None, dtype: str | None, decoder: str | None = None,
                family: str | None = None) -> Any:
    from nightingale import models

    return models.load_model(model, quantize=quantize, dtype=dtype, decoder=decoder, family=family)


def serve_main(args: Any) -> int:
    """`nightingale serve` (see nightingale/cli.py for the options)."""
    from nightingale.cli import EXIT_FAILURE, EXIT_USAGE, CliError, parse_quantize

    try:
        path = p.socket_path(args.socket)
    except ValueError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    except OSError as err:
        raise CliError(f"cannot find the socket directory: {err}", EXIT_FAILURE) from None
    if getattr(args, "max_queue", 1) < 1:
        raise CliError("--max-queue must be at least 1", EXIT_USAGE)
    if getattr(args, "drain_timeout", 0.0) < 0:
        raise CliError("--drain-timeout must not be negative", EXIT_USAGE)
    if getattr(args, "latency", None) is not None and args.latency <= 0:
        raise CliError("--latency must be positive", EXIT_USAGE)
    try:
        frontends = build_frontends(
            getattr(args, "http", None), getattr(args, "http_token", None), getattr(args, "wyoming", None), getattr(args, "frontend_options", None)
        )
    except ValueError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    except ImportError as err:
        raise CliError(str(err), EXIT_FAILURE) from None
    device = args.device
    if isinstance(device, str) and device.isdigit():
        device = int(device)
    config = DaemonConfig(
        socket=path,
        device=device,
        playback=not args.no_playback,
        max_queue=getattr(args, "max_queue", DEFAULT_MAX_QUEUE),
        drain_timeout_s=getattr(args, "drain_timeout", DRAIN_TIMEOUT_S),
        latency=getattr(args, "latency", None),
        frontends=frontends,
    )
    factory = partial(_load_model, args.model, parse_quantize(args.quantize), args.dtype, getattr(args, "decoder", None),
                      getattr(args, "family", None))
    daemon = Daemon(config, factory)
    log.info("nightingale %s (pid %d), model %s, quantize %s", __version__, os.getpid(), args.model or "default", args.quantize)
    try:
        code = anyio.run(partial(daemon.run, handle_signals=True), backend="asyncio")
        if daemon.engine_left_behind:
            # The engine thread is inside a model load, which cannot be interrupted; MLX's
            # teardown at interpreter exit would then abort the process (exit 134). The
            # drain is done and the socket removed, so leave without that teardown.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except SocketInUse as err:
        raise CliError(str(err), EXIT_FAILURE) from None
    except DeviceNotFound as err:
        raise CliError(str(err), EXIT_USAGE) from None
    except OSError as err:
        raise CliError(f"cannot serve on {path}: {err}", EXIT_FAILURE) from None
