"""The daemon's Unix socket: bind it once per path, replace a stale one, rebind a vanished one.

`PATH.lock` is flock()ed for the daemon's lifetime, so a second daemon fails with the first
one's pid instead of stealing the socket; the socket's directory must be writable by this
user alone (docs/protocol.md, "Socket").
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
from pathlib import Path

from nightingale import protocol as p

log = logging.getLogger(__name__)

LISTEN_BACKLOG = max(socket.SOMAXCONN, 1024)  # the kernel caps it at net.core.somaxconn


class SocketInUse(RuntimeError):
    """Another daemon serves the socket, or the path is taken by something else."""


class UnsafeDirectory(SocketInUse):
    """The socket's directory or lock file could let another user take the socket over."""


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
