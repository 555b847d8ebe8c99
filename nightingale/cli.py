"""The `nightingale` command: serve, synth, voices, models, service, dev.

Each subcommand's work lives in its own module, imported only when that subcommand runs,
so `nightingale --help` and the service commands start without loading MLX.
Exit codes: 0 success, 1 runtime failure, 2 usage or bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

QUANTIZE_CHOICES = ("8", "4", "none")


class CliError(Exception):
    """A failure reported as one line on stderr with an exit code (no traceback)."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


def default_model() -> str | None:
    return os.environ.get("NIGHTINGALE_MODEL") or None


def _add_model_args(parser: argparse.ArgumentParser, quantize: bool = True, decoder: bool = False) -> None:
    parser.add_argument(
        "--model",
        default=default_model(),
        metavar="PATH_OR_REPO",
        help="checkpoint directory or Hugging Face repo, e.g. ResembleAI/chatterbox-turbo "
        "(env NIGHTINGALE_MODEL; default ResembleAI/chatterbox)",
    )
    parser.add_argument(
        "--family",
        choices=("chatterbox", "multilingual"),
        default=None,
        help="which model of a repo that holds both: chatterbox (English, the default) or multilingual "
        "(23 languages); a directory's files say which it is",
    )
    if decoder:
        parser.add_argument(
            "--decoder",
            default=None,
            metavar="PATH_OR_REPO",
            help="use this Chatterbox Turbo checkpoint's MeanFlow S3Gen as the decoder "
            "(e.g. ResembleAI/chatterbox-turbo; a pairing Resemble does not ship)",
        )
    if quantize:
        parser.add_argument(
            "--quantize",
            choices=QUANTIZE_CHOICES,
            default="8",
            help="weight quantization bits for the Linear layers (default 8)",
        )


def parse_quantize(value: str) -> int | None:
    return None if value == "none" else int(value)


def _add_socket_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        default=None,
        metavar="PATH",
        help="Unix socket path (env NIGHTINGALE_SOCKET; default in the per-user runtime directory)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nightingale", description="Streaming neural text-to-speech daemon.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    serve = sub.add_parser("serve", help="run the speech daemon")
    _add_model_args(serve, decoder=True)
    _add_socket_arg(serve)
    serve.add_argument("--device", default=None, help="audio output device (name or index)")
    serve.add_argument("--no-playback", action="store_true", help="never open an audio device")
    serve.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None, help="precision of non-quantized parts")
    serve.add_argument("--max-queue", type=int, default=64, metavar="N", help="waiting utterances before `busy` (default 64)")
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, let the current utterance finish this long before cancelling it (default 5)",
    )
    serve.add_argument(
        "--latency",
        type=float,
        default=None,
        metavar="SECONDS",
        help="audio output latency (default: the device's high latency on macOS, 0.1 elsewhere)",
    )
    serve.add_argument("--http", default=None, metavar="HOST:PORT", help="also serve the OpenAI-compatible speech API (e.g. 127.0.0.1:8880; needs the server extra)")
    serve.add_argument("--http-token", default=None, metavar="TOKEN", help="bearer token for --http (env NIGHTINGALE_HTTP_TOKEN; required off loopback)")
    serve.add_argument("--wyoming", default=None, metavar="tcp://HOST:PORT", help="also serve Wyoming for Home Assistant (e.g. tcp://127.0.0.1:10200)")
    serve.add_argument("--frontend-options", default=None, metavar="JSON", help='default speak options for HTTP and Wyoming requests, e.g. \'{"n_timesteps": 5}\'')
    serve.set_defaults(handler="nightingale.daemon.server:serve_main")

    synth = sub.add_parser("synth", help="synthesize text to a file in-process (no daemon)")
    synth.add_argument("text", help="text to speak")
    synth.add_argument("-o", "--output", help="output audio file (.wav, .flac, .aiff)")
    synth.add_argument("--voice", default=None, help="voice name or conds.pt path (default: built-in)")
    synth.add_argument("-l", "--language", default=None, help="language code, e.g. fr (default: the voice's, else en)")
    synth.add_argument("--seed", type=int, default=None, help="random seed: the same seed and text give the same audio")
    synth.add_argument("--stream", action="store_true", help="synthesize in streamed chunks; report TTFA and RTF")
    synth.add_argument("--play", action="store_true", help="play through the default audio device")
    synth.add_argument("--temperature", type=float, default=None, help="sampling temperature of the speech tokens (default: the model's, 0.8)")
    synth.add_argument("--cfg-weight", type=float, default=None, help="classifier-free guidance weight: higher follows the text more closely (default: the model's, 0.5)")
    synth.add_argument("--exaggeration", type=float, default=None, help="emotion exaggeration, 0 flat to 1 and above lively (default: the model's, 0.5)")
    synth.add_argument("--max-new-tokens", type=int, default=None, help="stop after this many speech tokens, 25 per second of audio (default 1000)")
    synth.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None, help="precision of non-quantized parts (default float32 on CPU, float16 on GPU)")
    _add_model_args(synth, decoder=True)
    synth.set_defaults(handler="nightingale.daemon.synth:synth_main")

    voices = sub.add_parser("voices", help="manage named voices")
    vsub = voices.add_subparsers(dest="voices_command", metavar="ACTION")
    vsub.required = True
    vadd = vsub.add_parser("add", help="compute a voice from reference audio and store it")
    vadd.add_argument("name", help="voice name: 1-64 letters, digits, '-' or '_'")
    vadd.add_argument("audio", help="reference audio file (WAV, FLAC, OGG, MP3), about 10 s")
    vadd.add_argument("--force", action="store_true", help="replace a voice of the same name")
    vadd.add_argument("--exaggeration", type=float, default=None, help="emotion exaggeration stored with the voice (default: the model's, 0.5)")
    vadd.add_argument("-l", "--language", default=None, help="the language this voice speaks unless told otherwise")
    _add_model_args(vadd, quantize=False)
    vlist = vsub.add_parser("list", help="list voices")
    _add_model_args(vlist, quantize=False)
    vrm = vsub.add_parser("remove", help="remove a stored voice")
    vrm.add_argument("name", help="voice name")
    voices.set_defaults(handler="nightingale.daemon.synth:voices_main")

    models = sub.add_parser("models", help="convert models ahead of time")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True
    conv = msub.add_parser("convert", help="convert an upstream checkpoint into an MLX-native directory")
    conv.add_argument("src", help="upstream checkpoint directory or Hugging Face repo")
    conv.add_argument("dst", help="output directory")
    conv.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="8", help="weight quantization bits for the Linear layers (default 8)")
    conv.add_argument("--group-size", type=int, default=64, help="weights sharing one quantization scale (default 64)")
    conv.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None, help="precision of non-quantized parts (default float32 on CPU, float16 on GPU)")
    models.set_defaults(handler="nightingale.daemon.synth:models_main")

    service = sub.add_parser("service", help="install the background service (LaunchAgent / systemd user unit)")
    ssub = service.add_subparsers(dest="service_command", metavar="ACTION")
    ssub.required = True
    service_actions = {
        "install": "write the service file and start the daemon at login",
        "uninstall": "stop the service and remove its file",
        "status": "say whether the service is installed and running, and whether the daemon answers",
    }
    for action, action_help in service_actions.items():
        sp = ssub.add_parser(action, help=action_help, description=action_help)
        if action != "status":
            sp.add_argument("--dry-run", action="store_true", help="print what would be written and run")
        sp.add_argument("--platform", choices=("macos", "linux"), default=None, help="render for this system")
        if action == "install":
            _add_model_args(sp, decoder=True)
            _add_socket_arg(sp)
            sp.add_argument("--device", default=None, help="audio output device for the service")
            sp.add_argument("--http", default=None, metavar="HOST:PORT", help="the service also serves the OpenAI-compatible API")
            sp.add_argument("--wyoming", default=None, metavar="tcp://HOST:PORT", help="the service also serves Wyoming (Home Assistant)")
    service.set_defaults(handler="nightingale.client.service:service_main")

    dev = sub.add_parser("dev", help="developer tools")
    dsub = dev.add_subparsers(dest="dev_command", metavar="ACTION")
    dsub.required = True
    mk = dsub.add_parser("make-checkpoint", help="write a random checkpoint in the upstream layout")
    mk.add_argument("dir", help="output directory")
    mk.add_argument("--size", choices=("tiny", "full"), default="tiny", help="tiny (tests) or the real model's shapes (default tiny)")
    mk.add_argument("--family", choices=("chatterbox", "multilingual", "turbo"), default="chatterbox",
                    help="checkpoint layout: ResembleAI/chatterbox (English or multilingual) or ResembleAI/chatterbox-turbo")
    mk.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    dev.set_defaults(handler="nightingale.dev.cli:dev_main")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "service" and argv is None:
        from nightingale.blas import reexec_with_openblas

        reexec_with_openblas()
    # The daemon's lifecycle is logged at INFO; one-shot commands only say what went wrong.
    quiet = logging.INFO if args.command == "serve" else logging.WARNING
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else quiet,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module_name, func_name = args.handler.split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(handler(args) or 0)
    except CliError as err:
        print(f"nightingale: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130
    except PermissionError as err:  # e.g. a runtime directory that belongs to another user
        print(f"nightingale: permission denied: {err.filename or err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    # Run the imported module's main, so CliError raised by subcommand modules (which
    # import nightingale.cli) is the class caught there, not __main__'s twin.
    from nightingale.cli import main as _main

    sys.exit(_main())
