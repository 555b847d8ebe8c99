"""The daemon's settings (`nightingale serve` fills them from its options) and their defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_QUEUE = 64  # utterances waiting at once; more are refused `busy`
DRAIN_TIMEOUT_S = 5.0  # how long a drain lets the current utterance finish
CLOSE_TIMEOUT_S = 2.0  # how long a drain waits for clients to receive their last events
MAX_OUTBOX_BYTES = 16 << 20  # events queued for one client before it counts as not reading
MAX_CONNECTIONS = 256  # clients at once; more are told `busy` and closed
MAX_PENDING_BYTES = 64 << 20  # bytes of unfinished frames buffered over all clients
FRAME_TIMEOUT_S = 30.0  # an unfinished frame must complete within this (slowloris)
IDLE_TIMEOUT_S = 600.0  # a client with no live utterance that sends nothing is closed
SLOW_CLIENT_GRACE_S = 5.0  # after `slow_client` is queued, time to read it before the drop
SOCKET_CHECK_S = 2.0  # how often the daemon checks that its socket file still exists
SAMPLE_RATE = 24000  # the model's output rate (models/chunks.py); the player opens at it


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
