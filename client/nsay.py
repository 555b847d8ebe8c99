"""`nsay`: speak text through the Nightingale daemon, like macOS say(1).

    nsay "Build finished"
    make 2>&1 | tail -1 | nsay
    nsay -o note.wav -f notes.txt

Text comes from the arguments, from `-f FILE` (`-` for stdin), or from stdin when no text is
given; piped input is sent line by line as it arrives, so speech starts before the input
ends. The daemon plays the audio; with `-o` it streams the audio back and nsay writes the
file; with `-r` or `-a` nsay plays the streamed audio itself (time-stretched, on the chosen
device).

Start-up cost matters (nsay runs once per message), so this module imports only the
standard library and the msgpack protocol on its plain path. numpy, soundfile and
sounddevice load only for -o, -r and -a, and only after the request has been sent.

Exit codes: 0 done; 1 daemon-side failure (no daemon, synthesis failed, speech cancelled or
preempted); 2 usage (bad flags, unknown voice, bad field); 130 interrupted (the speech is
cancelled). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from collections.abc import Iterator

from nightingale import protocol as p
from nightingale.client.connection import Connection, DaemonUnavailable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# `-r` takes words per minute like say(1). Chatterbox's own pace is about NATURAL_WPM; the
# time-stretch (nightingale/timestretch.py) is clean between half and double speed.
NATURAL_WPM = 175
WPM_MIN = 90
WPM_MAX = 350

HELLO_TIMEOUT_S = 5.0  # a daemon that accepts but says nothing this long is hung
# Waiting for our turn in the queue may take any time; the socket timeout must only catch a
# daemon that is gone, which the kernel reports anyway, so this is effectively "forever".
EVENT_TIMEOUT_S = 24 * 3600.0
SPAWN_TIMEOUT_S = 900.0  # a first start may download the model (about 3 GB)
SPAWN_POLL_S = 0.1
STREAM_PIECE_CHARS = 8192  # text per speak_text frame: well under MAX_TEXT_BYTES in UTF-8
PREBUFFER_S = 0.3  # -r/-a: audio queued before playing starts, so a slow first chunk does not stutter
# Daemon errors that mean the request itself was wrong: reported as usage errors (exit 2).
USAGE_ERROR_CODES = frozenset({p.E_UNKNOWN_VOICE, p.E_BAD_FIELD, p.E_TEXT_TOO_LONG})
LIST = "?"  # `-v '?'` and `-a '?'` list instead of choosing


class NsayError(Exception):
    """Ends nsay with one line on stderr and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, not argparse's usage block: errors must fit one line of stderr.
        raise NsayError(f"{message} (see nsay --help)", EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nsay",
        description="Speak text with the Nightingale daemon (a say(1)-like client).",
        epilog=(
            f"Rates: -r takes {WPM_MIN}..{WPM_MAX} words per minute ({NATURAL_WPM} is the voice's own pace); "
            "the audio is time-stretched without changing pitch. "
            "Exit codes: 0 done, 1 daemon-side failure, 2 usage, 130 interrupted."
        ),
    )
    parser.add_argument("text", nargs="*", help="text to speak (default: read stdin)")
    parser.add_argument("-v", "--voice", metavar="VOICE", help="voice name or conds.pt path; '?' lists voices")
    parser.add_argument("-l", "--language", metavar="CODE", help="language to speak, e.g. fr (default: the voice's, else en)")
    parser.add_argument("-r", "--rate", type=float, metavar="WPM", help=f"speaking rate in words per minute ({WPM_MIN}..{WPM_MAX}; nsay then plays the audio itself)")
    parser.add_argument("-o", "--output-file", metavar="FILE", help="write the audio to FILE (.wav, .aiff, .flac) instead of playing it")
    parser.add_argument("-f", "--input-file", metavar="FILE", help="read the text from FILE ('-' for stdin)")
    parser.add_argument("-a", "--audio-device", metavar="DEVICE", help="play on DEVICE (name or index) from nsay itself; '?' lists devices")
    parser.add_argument("--file-format", metavar="FORMAT", help="file format for -o: WAVE, AIFF, AIFC or FLAC (default: from the extension)")
    parser.add_argument("--data-format", metavar="FORMAT", help="sample format for -o, e.g. LEI16@24000, F32, BEI24@48000, @16000")
    parser.add_argument("--progress", action="store_true", help="report queueing, synthesis, timing and the words being spoken on stderr")
    parser.add_argument("--priority", choices=p.PRIORITIES, default=p.DEFAULT_PRIORITY, help="speech-dispatcher priority (default message)")
    parser.add_argument("--no-wait", action="store_true", help="return once the speech is queued")
    parser.add_argument("--stop", action="store_true", help="cancel all speech now (then speak the given text, if any)")
    held = parser.add_mutually_exclusive_group()
    held.add_argument("--pause", action="store_true", help="hold the daemon's local playback until --resume")
    held.add_argument("--resume", action="store_true", help="continue the daemon's local playback after a pause")
    parser.add_argument("--spawn", action="store_true", help="start a daemon in the background if none is running")
    parser.add_argument("--socket", metavar="PATH", help="daemon socket (env NIGHTINGALE_SOCKET)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--exaggeration", type=float, metavar="X", help="emotion exaggeration (model default 0.5)")
    sampling.add_argument("--cfg-weight", type=float, metavar="W", help="classifier-free guidance weight (model default 0.5)")
    sampling.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (model default 0.8)")
    sampling.add_argument("--seed", type=int, metavar="N", help="sampling seed, for repeatable speech")
    sampling.add_argument("--max-new-tokens", type=int, metavar="N", help="cap on speech tokens per sentence piece")
    return parser


def speed_for_wpm(wpm: float) -> float:
    """The time-stretch speed for `-r WPM`: NATURAL_WPM -> 1.0, 350 -> 2.0 (twice as fast).
    Raises ValueError outside WPM_MIN..WPM_MAX."""
    if not WPM_MIN <= wpm <= WPM_MAX:
        raise ValueError(f"rate must be between {WPM_MIN} and {WPM_MAX} words per minute (got {wpm:g})")
    return wpm / NATURAL_WPM


def check_args(args: argparse.Namespace) -> None:
    """Combinations argparse cannot express; raises NsayError(EXIT_USAGE)."""
    if args.text and args.input_file is not None:
        raise NsayError("give text as arguments or with -f, not both", EXIT_USAGE)
    if (args.file_format or args.data_format) and not args.output_file:
        raise NsayError("--file-format and --data-format need -o FILE", EXIT_USAGE)
    if args.output_file and args.audio_device is not None and args.audio_device != LIST:
        raise NsayError("-o writes a file instead of playing: drop -a", EXIT_USAGE)
    if args.no_wait and (args.output_file or args.rate is not None or args.audio_device is not None):
        raise NsayError("--no-wait returns before any audio: it cannot go with -o, -r or -a", EXIT_USAGE)
    try:
        args.speed = 1.0 if args.rate is None else speed_for_wpm(args.rate)
    except ValueError as err:
        raise NsayError(str(err), EXIT_USAGE) from None
    for name, value in sampling_options(args).items():
        try:
            p.check_option(name, value)
        except p.OptionError as err:
            raise NsayError(f"--{name.replace('_', '-')}: {err}", EXIT_USAGE) from None
    if args.voice and (args.voice.endswith(".pt") or os.sep in args.voice):
        args.voice = os.path.abspath(args.voice)  # a file path: the daemon runs in another directory
    args.file_text = None
    if args.input_file not in (None, "-"):
        try:
            with open(args.input_file, "rb") as f:
                args.file_text = f.read().decode("utf-8", errors="replace")
        except OSError as err:
            raise NsayError(f"cannot read {args.input_file}: {err.strerror or err}", EXIT_USAGE) from None
    args.output_spec = None
    if args.output_file:
        from nightingale.audiofile import resolve_output  # stdlib-only checks

        try:
            args.output_spec = resolve_output(args.output_file, args.file_format, args.data_format)
        except ValueError as err:
            raise NsayError(str(err), EXIT_USAGE) from None


def sampling_options(args: argparse.Namespace) -> dict:
    names = ("exaggeration", "cfg_weight", "temperature", "seed", "max_new_tokens")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


# ----------------------------------------------------------------------------- text input


def split_piece(text: str, size: int = STREAM_PIECE_CHARS) -> list[str]:
    """Cut text into frames of at most `size` characters (a line may be longer than a frame)."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def iter_lines(stream) -> Iterator[str]:
    """Lines of a binary stream as they arrive, decoded as UTF-8 (bad bytes replaced).

    readline() on a pipe returns as soon as a newline is there, so each line goes out
    while the writer is still producing the next one.
    """
    for raw in iter(stream.readline, b""):
        yield raw.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- progress


class WordsShown:
    """--progress: the words of each chunk (progress events' text), shown when that chunk
    should be heard. The daemon synthesizes ahead of playback, so chunk k is shown at the
    first chunk's arrival plus the audio before it (the daemon starts playing the first
    chunk as soon as it exists); without local playback (-o, -r, -a) at once."""

    def __init__(self, reporter: "Reporter"):
        self.reporter = reporter
        self._t0: float | None = None
        self._heard_s = 0.0
        self._timers: list[threading.Timer] = []

    def add(self, event: p.Progress, played_here: bool) -> None:
        if not self.reporter.enabled:
            return
        line = f"speaking: «{event.text}»"
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        delay = 0.0 if played_here else max(0.0, self._t0 + self._heard_s - now)
        self._heard_s = event.audio_s
        if delay <= 0:
            self.reporter.show(line)
            return
        timer = threading.Timer(delay, self.reporter.show, args=(line,))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def cancel(self) -> None:
        for timer in self._timers:
            timer.cancel()


class Reporter:
    """--progress lines on stderr: redrawn in place on a terminal, one per event otherwise."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._open = False

    def show(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write(f"\r\x1b[Knsay: {text}" + ("\n" if final else ""))
            self._open = not final
        else:
            self.stream.write(f"nsay: {text}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def describe_done(done: p.Done) -> str:
    parts = [f"{done.audio_s:.1f} s of audio", f"{done.chunks} chunks"]
    if done.first_audio_ms is not None:
        parts.append(f"first audio after {done.first_audio_ms:.0f} ms")
    if done.rtf is not None:
        parts.append(f"RTF {done.rtf:.2f}")
    if done.underruns:
        parts.append(f"{done.underruns} underruns")
    return "done: " + ", ".join(parts)


# ----------------------------------------------------------------------------- connecting


def connect(args: argparse.Namespace, reporter: Reporter) -> tuple[Connection, p.Ready | None]:
    """A connection to the daemon (spawned first with --spawn when none answers), and its
    `ready` event if nsay already waited for it (None: see conn.hello.state)."""
    try:
        path = p.socket_path(args.socket)
    except ValueError as err:
        raise NsayError(str(err), EXIT_USAGE) from None
    try:
        conn = Connection(path, timeout=HELLO_TIMEOUT_S)
    except DaemonUnavailable as err:
        if not args.spawn:
            raise NsayError(
                f"no Nightingale daemon at {path}; start one with `nightingale serve` "
                "(or `nightingale service install`), or run nsay with --spawn"
            ) from err
        return spawn_daemon(path, reporter)
    except (TimeoutError, p.ProtocolError) as err:
        raise NsayError(f"the daemon at {path} did not greet: {err}") from None
    except OSError as err:
        raise NsayError(f"cannot connect to {path}: {err.strerror or err}") from None
    if conn.hello.state == "draining":
        conn.close()
        raise NsayError("the daemon is shutting down")
    return conn, None


def wait_ready(conn: Connection, reporter: Reporter, timeout_s: float, log_path=None, process=None) -> p.Ready:
    """Block until `ready` while the daemon loads, showing progress (elapsed time and the
    daemon's latest log line when we started it)."""
    start = time.monotonic()
    tty = sys.stderr.isatty()
    last_line = None
    while True:
        elapsed = time.monotonic() - start
        if elapsed > timeout_s:
            raise NsayError(f"the daemon did not become ready within {timeout_s:.0f} s")
        try:
            event = conn.recv(timeout=0.5)
        except TimeoutError:
            event = "tick"
        except p.ProtocolError as err:
            raise NsayError(f"bad frame from the daemon: {err}") from None
        if event is None:
            hint = f"; see {log_path}" if log_path else ""
            raise NsayError(f"the daemon closed the connection while loading{hint}")
        if isinstance(event, p.Ready):
            if tty:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
            return event
        if isinstance(event, p.Error) and event.code == p.E_LOAD_FAILED:
            raise NsayError(load_failure(event.message, log_path))
        if isinstance(event, p.ShuttingDown):
            raise NsayError("the daemon is shutting down")
        if process is not None and process.poll() is not None:
            raise NsayError(f"the daemon exited with status {process.returncode} while loading; see {log_path}")
        line = _last_log_line(log_path) if log_path else None
        if tty:
            detail = f": {line}" if line else ""
            sys.stderr.write(f"\r\x1b[Knsay: loading the model ({elapsed:.0f} s){detail}"[:200])
            sys.stderr.flush()
        elif reporter.enabled and line and line != last_line:
            reporter.show(f"loading the model: {line}")
        last_line = line


def load_failure(message: str, log_path=None) -> str:
    """The daemon's load error as one line a user of nsay can act on (nsay has no --model:
    the daemon's model comes from NIGHTINGALE_MODEL or `nightingale serve --model`)."""
    lines = message.strip().splitlines() or ["no reason given"]
    reason = re.sub(r"^the model could not be loaded: (\w+Error: )?", "", lines[0]).rstrip(".")
    hint = ""
    if "checkpoint" in reason.lower():
        hint = "; set NIGHTINGALE_MODEL=DIR (a checkpoint directory) or start the daemon with `nightingale serve --model DIR`"
    details = f" (details in {log_path})" if log_path and len(lines) > 1 else ""
    return f"the daemon could not load the model: {reason}{hint}{details}"


# A line of the daemon's log: "2026-01-02 03:04:05,678 INFO nightingale.daemon.server: message".
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(,\d+)? [A-Z]+ [\w.]+: ")


def _last_log_line(path) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    # tqdm redraws with carriage returns: the text after the last one is the current state.
    lines = [s.strip() for s in tail.replace("\r", "\n").splitlines() if s.strip()]
    return _LOG_RECORD.sub("", lines[-1])[:150] if lines else None  # the message, not the record


def spawn_log_path() -> str:
    import platformdirs

    directory = platformdirs.user_log_dir(p.APP_NAME, appauthor=False)
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, "daemon.log")


def spawn_daemon(path, reporter: Reporter) -> tuple[Connection, p.Ready | None]:
    """Start `nightingale serve --socket PATH` in its own session (it outlives nsay), then
    connect as soon as it binds and wait for `ready`."""
    import subprocess

    from nightingale.client.service import nightingale_program

    log_path = spawn_log_path()
    command = [*nightingale_program(), "serve", "--socket", str(path)]
    with open(log_path, "ab") as log:
        log.write(f"\n--- nsay --spawn {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True
        )
    if sys.stderr.isatty() or reporter.enabled:
        sys.stderr.write(f"nsay: started the daemon (pid {process.pid}, log {log_path})\n")
        sys.stderr.flush()
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while True:
        if process.poll() is not None:
            line = _last_log_line(log_path)
            raise NsayError(
                f"the daemon exited with status {process.returncode}" + (f": {line}" if line else f"; see {log_path}")
            )
        try:
            conn = Connection(path, timeout=HELLO_TIMEOUT_S)
            break
        except DaemonUnavailable:
            # It binds the socket before loading the model, so this wait is short.
            if time.monotonic() > deadline:
                raise NsayError(f"the daemon did not open {path} within {SPAWN_TIMEOUT_S:.0f} s; see {log_path}") from None
            time.sleep(SPAWN_POLL_S)
    if conn.hello.state == "loading":
        return conn, wait_ready(conn, reporter, deadline - time.monotonic(), log_path=log_path, process=process)
    return conn, None


# ----------------------------------------------------------------------------- audio sinks


class AudioSink:
    """Where streamed audio goes (-o file, or local playback for -r/-a), with the optional
    time-stretch in front. numpy & co. load here, after the request went out."""

    PLAY_KEY = "speech"  # the player's queue holds this one utterance

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._stretcher = None
        self._writer = None
        self._player = None
        self._rate: int | None = None
        self._np = None

    def _setup(self, sample_rate: int) -> None:
        import numpy as np

        self._np = np
        self._rate = sample_rate
        if self.args.speed != 1.0:
            from nightingale.timestretch import TimeStretcher

            self._stretcher = TimeStretcher(self.args.speed, sample_rate)
        if self.args.output_spec is not None:
            from nightingale.audiofile import AudioFileWriter

            self._writer = AudioFileWriter(self.args.output_spec)
        else:
            from nightingale.playback import AudioPlayer, PlaybackError

            player = AudioPlayer(sample_rate, parse_device(self.args.audio_device), latency="high", prebuffer_s=PREBUFFER_S)
            try:
                player.open()
            except (PlaybackError, OSError) as err:  # a bad device, or no PortAudio library
                raise NsayError(str(err)) from None
            self._player = player

    def prepare(self, sample_rate: int) -> None:
        """Load the audio modules (about 0.3 s) while the daemon synthesizes."""
        if self._np is None:
            self._setup(sample_rate)

    def add(self, event: p.Audio) -> None:
        if self._np is None:
            self._setup(event.sample_rate)
        if event.sample_rate != self._rate or event.channels != 1:
            raise NsayError(f"unexpected audio: {event.channels} channels at {event.sample_rate} Hz")
        dtype = "<f4" if event.format == "f32le" else "<i2"
        samples = self._np.frombuffer(event.pcm, dtype=dtype).astype(self._np.float32)
        if event.format == "s16le":
            samples /= 32768.0
        self._emit(samples if self._stretcher is None else self._stretcher.push(samples))

    def _emit(self, samples) -> None:
        if self._writer is not None:
            self._writer.write(samples, self._rate)
        else:
            self._player.write(self.PLAY_KEY, samples)

    def finish(self, sample_rate: int) -> None:
        """The stream ended normally: flush the stretch, commit the file / play out."""
        self.prepare(sample_rate)
        if self._stretcher is not None:
            self._emit(self._stretcher.flush())
        if self._writer is not None:
            self._writer.commit(sample_rate_if_empty=self._rate)
        else:
            self._player.finish()

    def abort(self) -> None:
        """Failure or cancel: no file (the target stays as it was), playback stops now."""
        if self._writer is not None:
            self._writer.abort()
        if self._player is not None:
            self._player.abort()


def parse_device(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else value


def list_devices() -> int:
    from nightingale.playback import output_devices

    try:
        devices = output_devices()
    except Exception as err:  # PortAudio missing or broken: one line, not a traceback
        raise NsayError(f"cannot list audio devices: {err}") from None
    for index, name, is_default in devices:
        print(f"{index:3d} {name}{'  (default)' if is_default else ''}")
    return EXIT_OK


# ----------------------------------------------------------------------------- requests


class NsayClient:
    """nsay's requests on an open connection: send one, then read events until its answer
    (for speech, until our `done`)."""

    def __init__(self, conn: Connection, args: argparse.Namespace, reporter: Reporter, ready: p.Ready | None):
        self.conn = conn
        self.args = args
        self.reporter = reporter
        self.ready = ready is not None or conn.hello.state == "ready"
        self.sample_rate = (ready.sample_rate if ready else conn.hello.sample_rate) or 24000
        self.uid = f"nsay-{os.getpid()}"
        self.accepted = False
        self.finished = False
        self.feed_error: BaseException | None = None
        self.words = WordsShown(reporter)

    def request(self, message: p.Request, answer: type[p.Event]) -> p.Event:
        """Send a request and return its answer, waiting out a model load (`loading`)."""
        while True:
            self.conn.send(message)
            while True:
                event = self._recv()
                if isinstance(event, answer):
                    return event
                if isinstance(event, p.Loading):
                    self.wait_ready()
                    break  # send again
                if isinstance(event, p.Error):
                    raise NsayError(event.message, EXIT_USAGE if event.code in USAGE_ERROR_CODES else EXIT_FAILURE)

    def _recv(self) -> p.Event:
        try:
            event = self.conn.recv(timeout=EVENT_TIMEOUT_S)
        except p.ProtocolError as err:
            raise NsayError(f"bad frame from the daemon: {err}") from None
        except OSError as err:
            raise NsayError(f"lost the daemon: {err}") from None
        if event is None:
            raise NsayError("the daemon closed the connection")
        if isinstance(event, p.ShuttingDown) and not self.accepted:
            raise NsayError("the daemon is shutting down")
        return event

    def wait_ready(self) -> None:
        ready = wait_ready(self.conn, self.reporter, SPAWN_TIMEOUT_S)
        self.ready = True
        self.sample_rate = ready.sample_rate

    def pause(self, paused: bool) -> None:
        if paused:
            self.request(p.Pause(keep=True, ref="pause"), p.Paused)
        else:
            self.request(p.Resume(ref="resume"), p.Resumed)
        self.reporter.show("playback paused" if paused else "playback resumed", final=True)

    def stop_all(self) -> None:
        answer = self.request(p.Cancel(all=True, ref="stop"), p.Cancelled)
        self.reporter.show(f"cancelled {len(answer.ids)} utterance(s)", final=True)

    def list_voices(self) -> int:
        answer = self.request(p.ListVoices(ref="voices"), p.Voices)
        if answer.family:  # on stderr, so stdout stays one voice name per line
            print(f"model family: {answer.family}", file=sys.stderr)
        for name in answer.voices:
            print(name)
        return EXIT_OK

    def speak(self) -> int:
        args = self.args
        streams_audio = args.output_spec is not None or args.speed != 1.0 or args.audio_device is not None
        text_pieces = self._text_pieces()
        whole = text_pieces if isinstance(text_pieces, str) else None
        speak = p.Speak(
            id=self.uid,
            text=whole,
            stream=whole is None,
            voice=args.voice,
            language=args.language,
            priority=args.priority,
            output="stream" if streams_audio else "play",
            audio_format="f32le",
            options=sampling_options(args),
        )
        self.conn.send(speak)
        sink = AudioSink(args) if streams_audio else None
        try:
            code = self._events(speak, text_pieces if whole is None else None, sink)
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        return code

    def _text_pieces(self):
        """The whole text (str) when it fits one speak, else an iterator of pieces for a
        text stream (files, stdin)."""
        args = self.args
        if args.text:
            text = " ".join(args.text)
            if len(text.encode("utf-8")) <= p.MAX_TEXT_BYTES:
                return text
            return iter(split_piece(text))
        if args.file_text is not None:
            return iter(split_piece(args.file_text))
        return (piece for line in iter_lines(sys.stdin.buffer) for piece in split_piece(line))

    def _feed(self, pieces) -> None:
        """Stream-mode text sender (a thread): speak_text per piece, then speak_end."""
        try:
            for piece in pieces:
                if self.finished:
                    return
                if piece:
                    self.conn.send(p.SpeakText(id=self.uid, text=piece))
            self.conn.send(p.SpeakEnd(id=self.uid))
        except BaseException as err:  # reading stdin failed, or the daemon went away
            self.feed_error = err
            try:
                self.conn.send(p.Cancel(id=self.uid))
            except OSError:
                pass
        finally:
            self._fed.set()

    def _events(self, speak: p.Speak, pieces, sink: AudioSink | None) -> int:
        args = self.args
        self._fed = threading.Event()
        if pieces is None:
            self._fed.set()
        sample_rate = self.sample_rate
        error: p.Error | None = None
        while True:
            event = self._recv()
            if getattr(event, "id", None) not in (self.uid, None):
                continue  # not ours (a broadcast has no id)
            if isinstance(event, p.Accepted):
                self.accepted = True
                ahead = f", {event.position} ahead" if event.position else ""
                self.reporter.show(f"queued ({event.priority}{ahead})")
                if pieces is not None:
                    threading.Thread(target=self._feed, args=(pieces,), name="nsay-stdin", daemon=True).start()
                if sink is not None:
                    sink.prepare(sample_rate)
                if args.no_wait:
                    self._fed.wait()  # a text stream must be complete, or the daemon cancels it
                    if self.feed_error is None:
                        self.reporter.close()
                        return EXIT_OK
            elif isinstance(event, p.Loading):
                # Not performed while the model loads: wait, then ask again.
                self.wait_ready()
                sample_rate = self.sample_rate
                self.conn.send(speak)
            elif isinstance(event, p.Started):
                self.reporter.show(f"speaking (voice {event.voice or 'default'}, waited {event.wait_ms / 1000:.1f} s)")
            elif isinstance(event, p.Progress):
                self.reporter.show(f"{event.audio_s:.1f} s of audio, {event.chunk + 1} chunks, {event.tokens} tokens")
                if event.text is not None:
                    self.words.add(event, played_here=sink is not None)
            elif isinstance(event, p.Audio):
                if sink is not None:
                    sink.add(event)
                sample_rate = event.sample_rate
            elif isinstance(event, p.Error):
                error = event
                # Refused outright, or an error about no utterance: no `done` will follow.
                if not self.accepted or event.id is None:
                    self.cancel()
                    break
            elif isinstance(event, p.Done):
                self.finished = True
                return self._finish(event, error, sink, sample_rate)
        self.finished = True
        return self._fail(error, sink)

    def _finish(self, done: p.Done, error: p.Error | None, sink: AudioSink | None, sample_rate: int) -> int:
        if done.reason != "completed":
            self.words.cancel()
        if done.reason == "completed":
            if self.feed_error is not None:
                raise NsayError(f"reading the text failed: {self.feed_error}")
            if sink is not None:
                sink.finish(sample_rate)
            self.reporter.show(describe_done(done), final=True)
            if self.args.output_spec is not None:
                self.reporter.show(f"wrote {self.args.output_spec.path}", final=True)
            return EXIT_OK
        if done.reason == "failed":
            return self._fail(error, sink, done)
        if sink is not None:
            sink.abort()
        self.reporter.close()
        if self.feed_error is not None:
            raise NsayError(f"reading the text failed: {self.feed_error}")
        why = f" ({done.detail})" if done.detail else ""
        raise NsayError(f"speech {done.reason}{why}")

    def _fail(self, error: p.Error | None, sink: AudioSink | None, done: p.Done | None = None) -> int:
        if sink is not None:
            sink.abort()
        self.reporter.close()
        if error is None:
            raise NsayError(f"speech failed{f' ({done.detail})' if done and done.detail else ''}")
        message = error.message
        if error.code == p.E_NO_PLAYBACK:  # the daemon's wording is for protocol clients; say what nsay can do
            reason = message.split("; ask for output", 1)[0]
            message = (f"{reason}; write to a file with -o FILE, or give the daemon an audio output "
                       "(Linux: apt-get install libportaudio2, then restart it)")
        raise NsayError(message, EXIT_USAGE if error.code in USAGE_ERROR_CODES else EXIT_FAILURE)

    def cancel(self) -> None:
        """Ctrl-C: cancel our utterance (a play request would otherwise go on)."""
        if self.accepted and not self.finished:
            try:
                self.conn.send(p.Cancel(id=self.uid))
            except OSError:
                pass


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.audio_device == LIST:
        return list_devices()
    reporter = Reporter(args.progress)
    conn, ready = connect(args, reporter)
    client = NsayClient(conn, args, reporter, ready)
    try:
        if args.pause or args.resume:  # work while the model loads; nothing else follows
            if args.text or args.input_file is not None:
                raise NsayError("--pause and --resume take no text", EXIT_USAGE)
            client.pause(args.pause)
            return EXIT_OK
        if args.stop:  # works while the model loads
            client.stop_all()
            # Only explicit text follows a stop: reading a stdin that is not ours would hang.
            if not args.text and args.input_file is None:
                return EXIT_OK
        if not client.ready:
            client.wait_ready()
        if args.voice == LIST:
            return client.list_voices()
        return client.speak()
    except KeyboardInterrupt:
        client.cancel()
        return EXIT_INTERRUPTED
    finally:
        reporter.close()  # end a progress line redrawn in place before any error line
        conn.close()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except NsayError as err:
        sys.stderr.write(f"nsay: {err}\n")
        return err.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_FAILURE
    except PermissionError as err:  # e.g. a runtime directory that belongs to another user
        sys.stderr.write(f"nsay: permission denied: {err.filename or err}\n")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
