"""`nightingale serve`: the speech daemon (anyio on asyncio).

Lifecycle: bind the socket first (one daemon per socket, stale sockets replaced), answer
`loading` while the engine thread loads and warms the model, broadcast `ready`, serve,
and on SIGTERM/SIGINT/`shutdown` drain: cancel the queue, let the current utterance finish
(or cancel it after --drain-timeout), close clients, unlink the socket.

This module owns only that lifecycle and the listeners. One request's path
(docs/architecture.md, "Request flow"): binding.py (the socket file), connection.py (one
client: frames in, events out), requests.py (what each request does), scheduler.py (the
queue, dispatch, `done`), engine.py (the model thread), playback.py (the speakers);
peers.py is what the scheduler sees of a client, telemetry.py answers `status`, and
frontend.py plugs HTTP and Wyoming into the same scheduler. The event loop owns all policy
and never runs model code; the engine and player threads reach it through
loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
import threading
from functools import partial
from typing import Any, Callable

import anyio
import anyio.abc

from nightingale import __version__
from nightingale import protocol as p
from nightingale.playback import DeviceNotFound, ProbeResult, probe_output

from .binding import SocketBinding, SocketInUse
from .config import CLOSE_TIMEOUT_S, DEFAULT_MAX_QUEUE, DRAIN_TIMEOUT_S, SAMPLE_RATE, DaemonConfig
from .connection import ClientConnection, PendingBytes, reap_idle
from .engine import Engine
from .frontend import Frontdoor, build_frontends
from .playback import Player
from .requests import Requests
from .scheduler import Scheduler
from .telemetry import Telemetry

log = logging.getLogger(__name__)

ACCEPT_RETRY_S = 0.1  # after a failed accept() (e.g. EMFILE)
REFUSE_TIMEOUT_S = 1.0  # how long a refused client may take to receive its `busy`
ENGINE_STOP_S = 5.0  # how long the drain waits for the engine to stop (it stops within a chunk)


class Daemon:
    """The service. `await run()` serves until shutdown and returns the exit code.

    model_factory() is called on the engine thread and must return a loaded model.
    request_shutdown() may be called from any thread.
    """

    def __init__(self, config: DaemonConfig, model_factory: Callable[[], Any]):
        self.config = config
        self._model_factory = model_factory
        self.exit_code = 0
        self.telemetry = Telemetry(str(config.socket))
        self.scheduler = Scheduler(config.max_queue, self.telemetry, announce_ready=self._announce_ready,
                                   stop_daemon=self._begin_shutdown)
        self.requests = Requests(self.scheduler, shutdown=self._begin_shutdown)
        self.pending = PendingBytes(config.max_pending_bytes)  # unfinished-frame bytes over all clients
        self.engine: Engine | None = None
        self._conn_numbers = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: anyio.Event | None = None
        self._force = False
        self._tg: anyio.abc.TaskGroup | None = None
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
            self.engine = Engine(self._model_factory, self.scheduler, self._post, self.scheduler.player, warmup=self.config.warmup)
            self.scheduler.engine = self.engine
            log.info("loading model")
            self.engine.start()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._accept_loop, listener)
                tg.start_soon(self._watch_socket, listener)
                tg.start_soon(reap_idle, self.scheduler, self.config)
                for frontend in self.config.frontends:
                    await tg.start(frontend.serve, Frontdoor(self.scheduler, self.requests))
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
        scheduler = self.scheduler
        if not self.config.playback:
            scheduler.playback_reason = "local playback is disabled (--no-playback)"
            log.info("%s; serving streaming clients only", scheduler.playback_reason)
            return
        probe: ProbeResult = await anyio.to_thread.run_sync(probe_output, self.config.device, SAMPLE_RATE)
        if not probe.available:
            scheduler.playback_reason = f"local playback is unavailable: {probe.reason}"
            log.warning("%s; serving streaming clients only", scheduler.playback_reason)
            return
        scheduler.player = Player(
            SAMPLE_RATE, probe, on_played=lambda utt, n: self._post(scheduler.on_played, utt, n), latency=self.config.latency
        )
        log.info("audio output: %s", probe.device_name)

    async def _cleanup(self) -> None:
        if self.engine is not None:
            stopped = await anyio.to_thread.run_sync(self.engine.stop, ENGINE_STOP_S)
            if not stopped:
                log.warning("the engine thread is still loading the model; leaving it behind")
                self.engine_left_behind = True
        if self.scheduler.player is not None:
            await anyio.to_thread.run_sync(self.scheduler.player.close)
        self._binding.close()

    def _announce_ready(self) -> None:
        log.info("serving on %s", self.config.socket)

    def _begin_shutdown(self, exit_code: int = 0) -> None:
        if exit_code:
            self.exit_code = exit_code
        if self._shutdown is not None and not self._shutdown.is_set():
            self._shutdown.set()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self._shutdown is not None and self._shutdown.is_set():
                    log.warning("%s again: cancelling the current utterance now", name)
                    self._force = True
                    self.scheduler.cancel_active("daemon stopped")
                else:
                    log.info("%s received", name)
                    self._begin_shutdown()

    async def _drain(self) -> None:
        scheduler = self.scheduler
        was_loading = scheduler.state == "loading"
        scheduler.begin_drain()
        if not was_loading and not self._force:
            if not await scheduler.wait_idle(self.config.drain_timeout_s):
                log.warning("drain timeout (%.1f s): cancelling the current utterance", self.config.drain_timeout_s)
        scheduler.cancel_active("the daemon is shutting down")
        if scheduler.running is not None:
            await scheduler.wait_idle(ENGINE_STOP_S)  # the engine stops within one chunk; its last events go out
        await scheduler.peers.close_all(CLOSE_TIMEOUT_S)

    # ------------------------------------------------------------------ the socket listener

    async def _watch_socket(self, listener: anyio.abc.SocketListener) -> None:
        """Rebind when the socket file is deleted or replaced under us: clients would
        otherwise find "no daemon" while a new daemon is refused (we hold the lock)."""
        while True:
            await anyio.sleep(self.config.socket_check_s)
            if self.scheduler.state == "draining":
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

    async def _accept_loop(self, listener: anyio.abc.SocketListener) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
                except OSError as err:  # e.g. EMFILE: keep serving those already connected
                    log.warning("accept failed: %s", err)
                    await anyio.sleep(ACCEPT_RETRY_S)
                    continue
                if len(self.scheduler.peers) >= self.config.max_connections:
                    self._tg.start_soon(self._refuse, stream)
                    continue
                conn = ClientConnection(next(self._conn_numbers), stream, self.requests, self.scheduler, self.config, self.pending)
                self._tg.start_soon(conn.serve)

    async def _refuse(self, stream: anyio.abc.ByteStream) -> None:
        """Over the connection cap: one `busy` error, then close (bounded in time)."""
        self.telemetry.count("errors")
        with anyio.move_on_after(REFUSE_TIMEOUT_S):
            try:
                await stream.send(p.encode_frame(p.Error(code=p.E_BUSY, message=f"busy: {self.config.max_connections} clients are connected; try again later")))
            except Exception:
                pass
        with anyio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except Exception:
                pass


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncio's handler, minus a known harmless race: anyio's raw-socket reader/writer
    futures are set after a client vanished and the future was cancelled (InvalidStateError)."""
    if isinstance(context.get("exception"), asyncio.InvalidStateError):
        log.debug("ignored: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


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
