"""Nightingale protocol v1: typed messages, option checks, framing and the socket location.

Neutral ground shared by the daemon and every client (`nsay`, tests, bench), so the wire
format is defined exactly once. It imports neither mlx nor numpy, nor the daemon or the
client packages: clients stay light. Use it as `from nightingale import protocol as p`;
the names below are re-exported from its modules:

    messages.py  the message classes, error codes, limits, decode_request / decode_event
    options.py   speak's sampling options and check_option()
    framing.py   frames on the wire: encode_frame, FrameDecoder (sans-IO), FrameReader
    paths.py     where the daemon's socket is: socket_path()

Wire format (docs/protocol.md is the full description):

    frame = length (4 bytes, unsigned big-endian) + body (`length` bytes)
    body  = one msgpack map: {"v": 1, "type": "<name>", ...fields}

Strings are msgpack str (UTF-8); PCM audio is msgpack bin. A frame longer than
MAX_FRAME_BYTES is refused without being buffered: the reader skips its body and reports
it, so one bad frame never desynchronises the stream. The blocking client (`Connection`)
is nightingale.client.connection.
"""

from .framing import HEADER, FrameDecoder, FrameReader, encode_frame, pack_body, unpack_body
from .messages import (
    AUDIO_FORMATS,
    DEFAULT_PRIORITY,
    DONE_REASONS,
    E_BAD_FIELD,
    E_BAD_FRAME,
    E_BAD_UTF8,
    E_BUSY,
    E_DUPLICATE_ID,
    E_FRAME_TOO_LARGE,
    E_IDLE,
    E_INTERNAL,
    E_LOAD_FAILED,
    E_NO_PLAYBACK,
    E_SHUTTING_DOWN,
    E_SLOW_CLIENT,
    E_SYNTHESIS,
    E_TEXT_TOO_LONG,
    E_UNKNOWN_ID,
    E_UNKNOWN_TYPE,
    E_UNKNOWN_VOICE,
    E_UNSUPPORTED_LANGUAGE,
    E_VERSION,
    ERROR_CODES,
    EVENTS,
    LANGUAGE_CODE,
    MAX_AUDIO_FRAME_SAMPLES,
    MAX_FRAME_BYTES,
    MAX_ID_CHARS,
    MAX_STREAM_TEXT_BYTES,
    MAX_TEXT_BYTES,
    OUTPUTS,
    PRIORITIES,
    PROTOCOL_VERSION,
    REQUESTS,
    STATES,
    Accepted,
    Audio,
    Cancel,
    Cancelled,
    Done,
    Error,
    Event,
    GetStatus,
    Hello,
    ListVoices,
    Loading,
    Message,
    Pause,
    Paused,
    Ping,
    Pong,
    Progress,
    ProtocolError,
    Ready,
    Request,
    Resume,
    Resumed,
    Shutdown,
    ShuttingDown,
    Speak,
    SpeakEnd,
    SpeakText,
    Started,
    Status,
    Voices,
    decode_event,
    decode_request,
    fields,
)
from .options import CHUNK_GROWTH_RANGE, CHUNK_TOKENS_RANGE, OPTION_RANGES, SPEAK_OPTIONS, OptionError, check_option
from .paths import APP_NAME, MAX_SOCKET_PATH_BYTES, SOCKET_ENV, SOCKET_NAME, default_socket_path, socket_path
