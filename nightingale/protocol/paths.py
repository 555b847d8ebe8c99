"""Where the daemon's socket is: `--socket PATH`, else $NIGHTINGALE_SOCKET, else per user."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

SOCKET_ENV = "NIGHTINGALE_SOCKET"
SOCKET_NAME = "nightingale.sock"
APP_NAME = "nightingale"
# sockaddr_un.sun_path holds 104 bytes on macOS and 108 on Linux, including the NUL.
MAX_SOCKET_PATH_BYTES = 103 if sys.platform == "darwin" else 107


def default_socket_path() -> Path:
    """The per-user socket: platformdirs' runtime dir (Linux: $XDG_RUNTIME_DIR or a
    private fallback) or app-support dir (macOS), plus SOCKET_NAME."""
    import platformdirs

    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset and it falls back to /tmp/runtime-UID.
        warnings.simplefilter("ignore")
        if sys.platform == "darwin":
            base = platformdirs.user_data_dir(APP_NAME, appauthor=False)  # ~/Library/Application Support
        else:
            base = platformdirs.user_runtime_dir(APP_NAME, appauthor=False)
    return Path(base) / SOCKET_NAME


def socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the daemon listens: `--socket PATH`, else $NIGHTINGALE_SOCKET, else the default.
    Raises ValueError when the path is too long for a Unix socket address."""
    raw = explicit or os.environ.get(SOCKET_ENV) or default_socket_path()
    path = Path(raw).expanduser()
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH_BYTES} bytes; choose a shorter --socket"
        )
    return path

