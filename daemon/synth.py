"""In-process commands of `nightingale`: synth, voices, models convert.

Errors the user can fix (bad text, unknown voice, unwritable output) end as one line on
stderr with exit code 2; failures of the model or the machine with exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from nightingale.cli import EXIT_FAILURE, EXIT_USAGE, CliError, parse_quantize

logger = logging.getLogger(__name__)


def running_daemon_model(timeout_s: float = 5.0) -> str | None:
    """The checkpoint the daemon at the default socket (NIGHTINGALE_SOCKET) has loaded, or
    None when no daemon answers or it has not loaded one yet."""
    import os
    import socket

    from nightingale import protocol as p

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(p.socket_path()))
            sock.sendall(p.encode_frame(p.GetStatus()))
            reader = p.FrameReader(sock, peer="the daemon")
            while (body := reader.read()) is not None:
                event = p.decode_event(p.unpack_body(body))
                if isinstance(event, p.Status):
                    path, source = event.model.get("path"), event.model.get("source")
                    return path if path and os.path.isdir(path) else source or None
    except (OSError, ValueError, p.ProtocolError):  # none running, or not one we understand
        return None
    return None


def _load(args: argparse.Namespace, quantize: int | None = None):
    from nightingale.models import hub, loading, load_model

    if args.model is None:  # no --model, no NIGHTINGALE_MODEL: what the running daemon uses
        args.model = running_daemon_model()
        if args.model:
            logger.info("using the running daemon's model %s", args.model)
    try:
        return load_model(args.model, quantize=quantize, dtype=getattr(args, "dtype", None),
                          decoder=getattr(args, "decoder", None), family=getattr(args, "family", None))
    except hub.CheckpointNotFoundError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    except loading.CheckpointError as err:
        raise CliError(f"bad checkpoint: {err}", EXIT_FAILURE) from None


def _voice(model, name: str | None):
    from nightingale.models import cloning, torchpickle, voice_store

    try:
        return model.resolve_voice(name)
    except (voice_store.VoiceStoreError, cloning.VoiceError, torchpickle.TorchPickleError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError's str() adds quotes
        raise CliError(str(message), EXIT_USAGE) from None


def _check_options(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """The daemon's bounds for sampling options (nightingale/protocol.py check_option)."""
    from nightingale.protocol import OptionError, check_option

    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        try:
            check_option(name, value)
        except OptionError as err:
            raise CliError(f"--{name.replace('_', '-')}: {err}", EXIT_USAGE) from None


def _language(model, language: str | None, voice: str | None) -> str | None:
    """The language to speak, checked against the model's (one-line error otherwise), with
    its front end ready (a missing optional package is named with its extra)."""
    from nightingale.models.mtl_tokenizer import MissingFrontEndError, UnsupportedLanguageError

    try:
        language = model.resolve_language(language, voice)
        if language is not None:
            model.text_tokens("a", language)  # loads the language's front end now
    except (UnsupportedLanguageError, MissingFrontEndError) as err:
        raise CliError(str(err), EXIT_USAGE) from None
    return language


def synth_main(args: argparse.Namespace) -> int:
    from nightingale.audiofile import AudioFileWriter, resolve_output

    _check_options(args, ("seed", "exaggeration", "cfg_weight", "temperature", "max_new_tokens"))
    if not args.text.strip():
        raise CliError("nothing to say: the text is empty", EXIT_USAGE)
    if not args.output and not args.play:
        raise CliError("say where the audio goes: -o FILE and/or --play", EXIT_USAGE)
    spec = None
    if args.output:
        try:
            spec = resolve_output(args.output, format_option=None)  # synth has no --file-format
        except ValueError as err:
            raise CliError(str(err), EXIT_USAGE) from None
    model = _load(args, parse_quantize(args.quantize))
    language = _language(model, getattr(args, "language", None), args.voice)
    voice = _voice(model, args.voice)
    # Options not given are left out: the model's family decides their defaults (models/sampling.py).
    given = dict(exaggeration=args.exaggeration, cfg_weight=args.cfg_weight, temperature=args.temperature,
                 max_new_tokens=args.max_new_tokens)
    sampling = {name: value for name, value in given.items() if value is not None} | {"language": language}
    writer = AudioFileWriter(spec) if spec else None
    player = _open_player(model.sample_rate) if args.play else None
    try:
        if args.stream:
            _synth_streamed(model, args, voice, sampling, writer, player)
        else:
            t0 = time.perf_counter()
            audio = model.synthesize(args.text, voice=voice, seed=args.seed, **sampling)
            elapsed = time.perf_counter() - t0
            if writer:
                writer.write(audio, model.sample_rate)
            if player:
                player.write("synth", audio)
            print(f"{len(audio) / model.sample_rate:.2f} s of audio in {elapsed:.2f} s", file=sys.stderr)
        if writer:
            writer.commit(model.sample_rate)
    except BaseException as err:
        if writer:
            writer.abort()
        if player:
            player.abort()
        if isinstance(err, OSError):
            raise CliError(f"cannot write {args.output}: {err.strerror or err}", EXIT_FAILURE) from None
        raise
    if player:
        player.finish()  # returns once the last sample has been played
    return 0


def _synth_streamed(model, args, voice, sampling, writer, player) -> None:
    t0 = time.perf_counter()
    audio_s = 0.0
    ttfa_ms = None
    for chunk in model.stream(args.text, voice=voice, seed=args.seed, **sampling):
        if ttfa_ms is None:
            ttfa_ms = (time.perf_counter() - t0) * 1000
        audio_s += chunk.duration_s
        if writer:
            writer.write(chunk.samples, model.sample_rate)
        if player:
            player.write("synth", chunk.samples)
    elapsed = time.perf_counter() - t0
    rtf = elapsed / audio_s if audio_s else float("nan")
    print(
        f"TTFA {ttfa_ms if ttfa_ms is not None else float('nan'):.0f} ms, RTF {rtf:.2f} "
        f"({audio_s:.2f} s of audio in {elapsed:.2f} s)",
        file=sys.stderr,
    )


def _open_player(sample_rate: int):
    """The default output device for `synth --play`, as an AudioPlayer (the daemon's player
    is built on the same class)."""
    from nightingale.playback import AudioPlayer, PlaybackError

    player = AudioPlayer(sample_rate, latency="high")  # PortAudio's high latency: nothing waits on it
    try:
        player.open()
    except (OSError, PlaybackError) as err:  # no PortAudio library, or no device
        raise CliError(f"local playback unavailable: {err}", EXIT_FAILURE) from None
    return player


def voices_main(args: argparse.Namespace) -> int:
    from nightingale.models import cloning, voice_store
    from nightingale.models.model import DEFAULT_VOICE

    try:
        if args.voices_command == "remove":
            voice_store.remove(args.name)
            print(f"removed voice {args.name!r}")
            return 0
        if args.voices_command == "list":
            # `default` is the checkpoint's conds.pt; listed without loading the model
            print(f"{DEFAULT_VOICE}\t(built-in voice of the checkpoint, conds.pt)")
            for entry in voice_store.list_voices():
                print(voice_store.describe(entry))
            return 0
        # add: validate the name, the options and the slot before any expensive work
        _check_options(args, ("exaggeration",))
        voice_store.check_new_name(args.name, force=args.force)
        model = _load(args)
        language = getattr(args, "language", None)
        if language is not None:
            language = _language(model, language, None)
        given = {} if args.exaggeration is None else {"exaggeration": args.exaggeration}
        conds = model.prepare_voice(args.audio, **given)
        entry = voice_store.add(args.name, conds, args.audio, force=args.force, language=language)
        print(voice_store.describe(entry))
        return 0
    except (voice_store.VoiceStoreError, cloning.VoiceError) as err:
        raise CliError(str(err), EXIT_USAGE) from None


def models_main(args: argparse.Namespace) -> int:
    from nightingale.models import cache, hub, loading

    try:
        out = cache.convert(
            args.src,
            args.dst,
            quantize=parse_quantize(args.quantize),
            group_size=args.group_size,
            dtype=args.dtype,
        )
    except hub.CheckpointNotFoundError as err:  # its hint names --model: convert takes SRC instead
        raise CliError(str(err).replace("pass --model DIR, a directory", "give SRC as a directory"), EXIT_USAGE) from None
    except loading.CheckpointError as err:
        raise CliError(f"bad checkpoint: {err}", EXIT_FAILURE) from None
    print(out)
    return 0

