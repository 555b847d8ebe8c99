"""The blocking client (nightingale.client.connection) over a real Unix socket, against a
stub daemon written with the protocol's framing (no daemon, no model)."""

from __future__ import annotations

import socket
import threading

import pytest

from nightingale import protocol as p
from nightingale.client.connection import Connection, DaemonUnavailable


def test_connection_reports_a_missing_daemon(tmp_path):
    with pytest.raises(DaemonUnavailable, match="nightingale serve"):
        Connection(tmp_path / "none.sock", timeout=2)


def test_connection_over_a_real_socket(tmp_path):
    """Connection reads hello, sends frames, and distinguishes EOF from a cut frame."""
    path = tmp_path / "t.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    got: list[bytes] = []

    def serve():
        conn, _ = srv.accept()
        conn.sendall(p.encode_frame(p.Hello(server="fake", state="ready")))
        dec = p.FrameDecoder()
        while not got:
            dec.feed(conn.recv(4096))
            got.extend(dec.frames())
        conn.sendall(p.encode_frame(p.Pong()) + p.encode_frame(p.Pong())[:5])  # second frame cut short
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    with Connection(path, timeout=5) as conn:
        assert conn.hello.server == "fake"
        conn.send(p.Ping(ref="q"))
        assert isinstance(conn.recv(5), p.Pong)
        with pytest.raises(p.ProtocolError, match="middle of a frame"):
            conn.recv(5)
    t.join(5)
    srv.close()
    assert p.decode_request(p.unpack_body(got[0])).ref == "q"


def test_connection_send_is_whole_frames_from_several_threads(tmp_path):
    """nsay's stdin feeder and its Ctrl-C cancel share one Connection: frames written from
    two threads at once must arrive whole, never interleaved."""
    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    received = bytearray()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(p.encode_frame(p.Hello(server="test", state="ready", sample_rate=24000)))
            while data := conn.recv(997):  # a slow, small-bite reader: writes go out in pieces
                received.extend(data)

    server = threading.Thread(target=serve)
    server.start()
    conn = Connection(path, timeout=30)
    text = "x" * (p.MAX_TEXT_BYTES - 16)  # frames far larger than one socket write

    def feed(uid: str) -> None:
        for _ in range(40):
            conn.send(p.SpeakText(id=uid, text=text))

    senders = [threading.Thread(target=feed, args=(uid,)) for uid in ("a", "b", "c")]
    for t in senders:
        t.start()
    for t in senders:
        t.join(60)
    conn.close()
    server.join(60)
    listener.close()
    decoder = p.FrameDecoder()
    decoder.feed(bytes(received))
    frames = [p.decode_request(p.unpack_body(f)) for f in decoder.frames()]
    assert sorted(f.id for f in frames) == ["a"] * 40 + ["b"] * 40 + ["c"] * 40
    assert all(f.text == text for f in frames) and not decoder.pending
