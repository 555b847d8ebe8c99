"""Protocol v1: framing, typed messages, validation, socket location (no daemon, no model)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from nightingale import protocol as p


def roundtrip_request(msg: p.Request) -> p.Request:
    dec = p.FrameDecoder()
    dec.feed(p.encode_frame(msg))
    (body,) = list(dec.frames())
    return p.decode_request(p.unpack_body(body))


def raw_map(*pairs: tuple[bytes, bytes]) -> bytes:
    """A msgpack map from already-packed keys and values (to build invalid strings)."""
    return bytes([0x80 | len(pairs)]) + b"".join(k + v for k, v in pairs)


@pytest.mark.parametrize(
    "msg",
    [
        p.Speak(id="a1", text="Hello.", voice="default", priority="important", output="both", audio_format="s16le",
                options={"seed": 3, "temperature": 0.7, "max_new_tokens": 20, "n_timesteps": 2, "chunk_schedule": "4,2,16"}, ref="r"),
        p.Speak(id="s", stream=True),
        p.SpeakText(id="s", text="more text "),
        p.SpeakEnd(id="s"),
        p.Cancel(id="a1"),
        p.Cancel(all=True),
        p.Pause(), p.Resume(), p.GetStatus(ref="x"), p.ListVoices(), p.Ping(), p.Shutdown(),
    ],
)  # fmt: skip
def test_requests_roundtrip(msg):
    assert roundtrip_request(msg) == msg


def test_events_roundtrip():
    events = [
        p.Hello(server="nightingale 0", state="ready", sample_rate=24000, playback=True),
        p.Ready(sample_rate=24000, model="tiny"),
        p.Loading(request="speak", id="a"),
        p.Accepted(id="a", position=2, priority="text", output="stream"),
        p.Started(id="a", wait_ms=1.5),
        p.Audio(id="a", seq=3, pcm=b"\x00\x01" * 10, format="s16le", start_s=0.5),
        p.Progress(id="a", chunk=0, tokens=12, audio_s=0.48, t3_ms=10.0, s3gen_ms=20.0),
        p.Done(id="a", reason="cancelled", ttfa_ms=100.0, rtf=0.5, tokens=12, audio_s=0.48),
        p.Error(code=p.E_BUSY, message="full", request="speak", id="a", ref="r"),
        p.Status(state="ready", version="0", pid=1, uptime_s=1.0, socket="/s", queue=[{"id": "a"}], current=None),
        p.Voices(voices=["default", "amy"]),
        p.Pong(state="loading"),
        p.Cancelled(ids=["a", "b"]),
        p.Paused(), p.Resumed(), p.ShuttingDown(),
    ]  # fmt: skip
    for ev in events:
        assert p.decode_event(p.unpack_body(p.pack_body(ev.to_wire()))) == ev


def test_every_frame_carries_the_version():
    body = p.unpack_body(p.encode_frame(p.Ping())[4:])
    assert body["v"] == p.PROTOCOL_VERSION == 1
    assert body["type"] == "ping"


def test_decoder_handles_partial_and_coalesced_frames():
    frames = b"".join(p.encode_frame(m) for m in (p.Ping(ref="1"), p.Speak(text="x" * 5000), p.Ping(ref="2")))
    dec = p.FrameDecoder()
    out = []
    for i in range(0, len(frames), 7):  # byte-by-few delivery
        dec.feed(frames[i : i + 7])
        out.extend(dec.frames())
    msgs = [p.decode_request(p.unpack_body(b)) for b in out]
    assert [m.TYPE for m in msgs] == ["ping", "speak", "ping"]
    assert msgs[2].ref == "2" and dec.pending == 0


def test_oversized_frame_is_reported_and_skipped_without_buffering():
    dec = p.FrameDecoder(max_frame_bytes=1000)
    big = 5000
    dec.feed(p.HEADER.pack(big) + b"z" * 100)
    (err,) = list(dec.frames())
    assert isinstance(err, p.ProtocolError) and err.code == p.E_FRAME_TOO_LARGE
    assert len(dec._buf) == 0  # the body is dropped as it arrives, never held
    dec.feed(b"z" * (big - 100) + p.encode_frame(p.Ping(ref="after")))
    (body,) = list(dec.frames())
    assert p.decode_request(p.unpack_body(body)).ref == "after"


@pytest.mark.parametrize(
    "body, code",
    [
        (b"\xc1", p.E_BAD_FRAME),  # a reserved msgpack byte
        (msgpack.packb([1, 2]), p.E_BAD_FRAME),  # not a map
        (msgpack.packb({"v": 1, "type": "ping"}) + b"\x00", p.E_BAD_FRAME),  # trailing data
        (msgpack.packb({"v": 1, "type": "speak"})[:-2], p.E_BAD_FRAME),  # cut short
        (raw_map((msgpack.packb("v"), msgpack.packb(1)), (msgpack.packb("type"), msgpack.packb("speak")),
                 (msgpack.packb("text"), b"\xa2\xff\xfe")), p.E_BAD_UTF8),
        (msgpack.packb({"v": 2, "type": "ping"}), p.E_VERSION),
        (msgpack.packb({"type": "ping"}), p.E_VERSION),
        (msgpack.packb({"v": 1, "type": "sing"}), p.E_UNKNOWN_TYPE),
        (msgpack.packb({"v": 1}), p.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "speak", "text": 5}), p.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "speak", "text": "hi", "priority": "urgent"}), p.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "speak", "text": "hi", "output": "file"}), p.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "speak", "text": "hi", "options": {"speed": 2.0}}), p.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "speak", "text": "hi", "options": {"seed": "1"}}), p.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "speak", "text": "hi", "options": {"max_new_tokens": 0}}), p.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "speak", "text": "hi", "options": {"seed": -1}}), p.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "speak", "text": "hi", "stream": 1}), p.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "speak", "stream": True}), p.E_BAD_FIELD),  # a stream needs an id
        (msgpack.packb({"v": 1, "type": "speak"}), p.E_BAD_FIELD),  # no text
        (msgpack.packb({"v": 1, "type": "speak", "text": "x", "id": ""}), p.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "speak", "text": "x", "id": "i" * 200}), p.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "speak", "text": "x" * (p.MAX_TEXT_BYTES + 1)}), p.E_TEXT_TOO_LONG),
        (msgpack.packb({"v": 1, "type": "speak_text", "id": "a"}), p.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "cancel"}), p.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "cancel", "id": "a", "all": True}), p.E_BAD_FIELD),
        (msgpack.packb({1: 2}), p.E_BAD_FRAME),  # non-string keys
    ],
)  # fmt: skip
def test_malformed_bodies_raise_protocol_errors(body, code):
    with pytest.raises(p.ProtocolError) as info:
        p.decode_request(p.unpack_body(body))
    assert info.value.code == code
    assert info.value.message  # a human message, not empty
    event = info.value.to_event()
    assert isinstance(event, p.Error) and event.code == code


def test_errors_name_the_request_and_id():
    with pytest.raises(p.ProtocolError) as info:
        p.decode_request({"v": 1, "type": "speak", "id": "u7", "text": "hi", "priority": "now"})
    assert info.value.request == "speak" and info.value.id == "u7"


def test_unknown_fields_are_ignored_for_forward_compatibility():
    msg = p.decode_request({"v": 1, "type": "ping", "future_field": [1, 2]})
    assert isinstance(msg, p.Ping)


def test_float_fields_accept_ints():
    msg = p.decode_request({"v": 1, "type": "speak", "text": "x", "options": {"temperature": 1}})
    assert msg.options["temperature"] == 1.0 and isinstance(msg.options["temperature"], float)


def test_socket_path_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(p.SOCKET_ENV, raising=False)
    default = p.socket_path()
    assert default.name == p.SOCKET_NAME and default == p.default_socket_path()
    monkeypatch.setenv(p.SOCKET_ENV, str(tmp_path / "env.sock"))
    assert p.socket_path() == tmp_path / "env.sock"
    assert p.socket_path(tmp_path / "arg.sock") == tmp_path / "arg.sock"
    with pytest.raises(ValueError, match="longer than"):
        p.socket_path(tmp_path / ("x" * 200))


def test_protocol_module_imports_neither_mlx_nor_numpy():
    code = "import sys; import nightingale.protocol; print(sorted(m for m in ('mlx', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# Folders of the installed packages (pyproject.toml's package-dir) and what each may never
# import, directly or through the repository's other modules, lazily imported ones included.
REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {
    "nightingale.models": REPO / "models",
    "nightingale.daemon": REPO / "daemon",
    "nightingale.client": REPO / "client",
    "nightingale": REPO / "nightingale",
}
FORBIDDEN = {
    "nightingale.protocol": ("nightingale.daemon", "nightingale.client", "nightingale.models", "mlx", "numpy"),
    "nightingale.daemon": ("nightingale.client",),
    "nightingale.client": ("nightingale.daemon", "nightingale.models", "mlx"),
    "nightingale.models": ("nightingale.daemon", "nightingale.client"),
}


def _module_files() -> dict[str, Path]:
    """Every module of the repository's packages by its import name."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(name: str, path: Path) -> set[str]:
    """The modules `path` imports anywhere in it; `from a import b` counts as a and a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_packages_import_only_what_the_layering_allows():
    """daemon/ and client/ never import each other (nor client/ the models), the protocol
    imports neither, models/ imports neither: checked by walking every import statement
    and following the repository's own modules, so a detour through a neutral module counts."""
    modules = _module_files()
    graph = {name: _imports(name, path) for name, path in modules.items()}
    assert "nightingale.protocol.messages" in graph and "nightingale.client.connection" in graph
    broken = []
    for start in modules:
        rule = next((r for r in FORBIDDEN if start == r or start.startswith(r + ".")), None)
        if rule is None:
            continue
        seen, todo = {start}, [start]
        while todo:
            for target in graph.get(todo.pop(), ()):
                if any(target == f or target.startswith(f + ".") for f in FORBIDDEN[rule]):
                    broken.append(f"{start} reaches {target}")
                elif target in modules and target not in seen:
                    seen.add(target)
                    todo.append(target)
    assert not broken, "\n".join(sorted(set(broken)))


def test_language_and_text_positions_are_optional_v1_fields():
    msg = p.decode_request({"v": 1, "type": "speak", "text": "Bonjour", "language": "fr"})
    assert msg.language == "fr"
    assert p.decode_request({"v": 1, "type": "speak", "text": "Hi"}).language is None  # old clients
    for bad in ("", "french!", "x", "e" * 20, "en us"):
        with pytest.raises(p.ProtocolError, match="speak.language must be a language code"):
            p.decode_request({"v": 1, "type": "speak", "text": "Hi", "language": bad})
    # a progress event from an older daemon (no text fields) still decodes
    old = p.decode_event({"v": 1, "type": "progress", "id": "u", "chunk": 0, "tokens": 4, "audio_s": 0.2})
    assert old.text_start is None and old.text is None
    new = p.decode_event(p.unpack_body(p.encode_frame(
        p.Progress(id="u", chunk=1, tokens=8, audio_s=0.4, text_start=3, text_end=9, text="allez"))[4:]))
    assert (new.text_start, new.text_end, new.text) == (3, 9, "allez")
