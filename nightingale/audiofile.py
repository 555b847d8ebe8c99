"""Audio files for `nsay -o`: say-style format options and an atomic streaming writer.

The format options are parsed with the standard library only, so that nsay can reject a bad
`-o`/`--file-format`/`--data-format` before it connects; numpy, soundfile and soxr are
imported by the writer, after the request is on its way.

`--data-format` follows say(1): `[BE|LE][F|I|UI]BITS[@RATE]`, e.g. `LEI16@24000`, `F32`,
`BEI24`, or `@16000` alone to change only the sample rate.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from pathlib import Path

# File extension or --file-format name -> libsndfile container. AIFC is AIFF with float or
# little-endian samples; libsndfile picks the AIFC form itself when the samples need it.
FILE_FORMATS = {
    "wav": "WAV",
    "wave": "WAV",
    "aif": "AIFF",
    "aiff": "AIFF",
    "aifc": "AIFF",
    "flac": "FLAC",
}

# (kind, bits) -> libsndfile subtype.
SUBTYPES = {
    ("I", 8): "PCM_S8",
    ("UI", 8): "PCM_U8",
    ("I", 16): "PCM_16",
    ("I", 24): "PCM_24",
    ("I", 32): "PCM_32",
    ("F", 32): "FLOAT",
    ("F", 64): "DOUBLE",
}

# What each container can hold (libsndfile 1.2), and its byte order when none is asked for.
CONTAINER_SUBTYPES = {
    "WAV": ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"),
    "AIFF": ("PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"),
    "FLAC": ("PCM_S8", "PCM_16", "PCM_24"),
}
NATIVE_ENDIAN = {"WAV": "LE", "AIFF": "BE", "FLAC": None}
DEFAULT_SUBTYPE = "PCM_16"

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000

_DATA_FORMAT = re.compile(r"^(?:(?P<endian>BE|LE)?(?P<kind>UI|I|F)(?P<bits>\d+))?(?:@(?P<rate>\d+))?$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class DataFormat:
    """A parsed `--data-format`: sample kind and width, byte order, rate (None: unchanged)."""

    kind: str | None = None  # "I", "UI" or "F"
    bits: int | None = None
    endian: str | None = None  # "LE", "BE" or None (the container's own)
    sample_rate: int | None = None


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """Everything needed to write the file: container, libsndfile subtype and byte order,
    and the sample rate to resample to (None: keep the daemon's rate)."""

    path: Path
    container: str  # "WAV", "AIFF" or "FLAC"
    subtype: str  # libsndfile subtype, e.g. "PCM_16"
    endian: str  # libsndfile endian: "FILE", "LITTLE" or "BIG"
    sample_rate: int | None


def parse_data_format(text: str) -> DataFormat:
    """`LEI16@24000` -> DataFormat("I", 16, "LE", 24000); ValueError on anything else."""
    m = _DATA_FORMAT.match(text.strip())
    if not text.strip() or m is None:
        raise ValueError(f"bad --data-format {text!r} (expected e.g. LEI16@24000, F32, BEI24 or @16000)")
    rate = int(m["rate"]) if m["rate"] else None
    if rate is not None and not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"sample rate {rate} out of range ({MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz)")
    kind = m["kind"].upper() if m["kind"] else None
    bits = int(m["bits"]) if m["bits"] else None
    if kind is not None and (kind, bits) not in SUBTYPES:
        raise ValueError(f"unsupported sample format {kind}{bits} (use I8, UI8, I16, I24, I32, F32 or F64)")
    return DataFormat(kind, bits, m["endian"].upper() if m["endian"] else None, rate)


def container_for(path: str | os.PathLike[str], file_format: str | None = None, format_option: str | None = "--file-format") -> str:
    """The container for `path`: from --file-format when given, else from the extension.
    format_option: the caller's option that names a format (None: it has none)."""
    if file_format is not None:
        name = file_format.strip().lower()
        if name not in FILE_FORMATS:
            raise ValueError(f"unsupported --file-format {file_format!r} (use WAVE, AIFF, AIFC or FLAC)")
        return FILE_FORMATS[name]
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in FILE_FORMATS:
        raise ValueError(
            f"cannot tell the audio format of {os.fspath(path)!r}: use .wav, .aiff or .flac"
            + (f", or {format_option}" if format_option else "")
        )
    return FILE_FORMATS[ext]


def resolve_output(
    path: str | os.PathLike[str], file_format: str | None = None, data_format: str | None = None,
    format_option: str | None = "--file-format",
) -> OutputSpec:
    """Check the -o options together, with no third-party import; ValueError names the problem."""
    container = container_for(path, file_format, format_option)
    fmt = parse_data_format(data_format) if data_format else DataFormat()
    subtype = SUBTYPES[(fmt.kind, fmt.bits)] if fmt.kind else DEFAULT_SUBTYPE
    if subtype not in CONTAINER_SUBTYPES[container]:
        raise ValueError(f"{container} cannot hold {fmt.kind}{fmt.bits} samples")
    native = NATIVE_ENDIAN[container]
    if fmt.endian is not None and native is not None and fmt.endian != native:
        # RIFX (big-endian WAV) and little-endian AIFF exist but few programs read them.
        raise ValueError(f"{container} is {'little' if native == 'LE' else 'big'}-endian; drop {fmt.endian} or pick another format")
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"no such directory for -o: {os.fspath(parent)!r}")
    if out.is_dir():
        raise ValueError(f"-o {os.fspath(out)!r} is a directory")
    return OutputSpec(out, container, subtype, "FILE", fmt.sample_rate)


class AudioFileWriter:
    """Writes a mono float stream to `spec.path` atomically.

    Samples go to a temporary file beside the target, renamed over it by `commit`; `abort`
    (or leaving a `with` block by an exception) deletes it, so a failed or cancelled
    request never leaves a half-written file. The file is opened at the first `write`,
    which gives the stream's sample rate; resampling to `spec.sample_rate` is streamed.
    """

    def __init__(self, spec: OutputSpec):
        self.spec = spec
        self._file = None  # soundfile.SoundFile, opened at the first write
        self._fileobj = None  # the temporary file under it
        self._tmp: str | None = None
        self._resampler = None
        self._source_rate: int | None = None
        self.frames_written = 0

    def __enter__(self) -> "AudioFileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    @property
    def sample_rate(self) -> int | None:
        """Rate of the file (None until the first write)."""
        if self._source_rate is None:
            return None
        return self.spec.sample_rate or self._source_rate

    def _open(self, source_rate: int) -> None:
        import soundfile
        import soxr

        self._source_rate = source_rate
        out_rate = self.spec.sample_rate or source_rate
        if out_rate != source_rate:
            self._resampler = soxr.ResampleStream(source_rate, out_rate, 1, dtype="float32", quality="HQ")
        directory = os.fspath(self.spec.path.parent) or "."
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.spec.path.name}.", suffix=".part", dir=directory)
        self._fileobj = os.fdopen(fd, "w+b")
        try:
            self._file = soundfile.SoundFile(
                self._fileobj,
                mode="w",
                samplerate=out_rate,
                channels=1,
                format=self.spec.container,
                subtype=self.spec.subtype,
                endian=self.spec.endian,
            )
        except BaseException:
            self.abort()
            raise

    def write(self, samples, sample_rate: int) -> None:
        """Append mono samples ((n,) float, -1..1) produced at `sample_rate` Hz."""
        import numpy as np

        if self._file is None:
            self._open(sample_rate)
        elif sample_rate != self._source_rate:
            raise ValueError(f"sample rate changed mid-stream ({self._source_rate} -> {sample_rate} Hz)")
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x, last=False)
        self._write_frames(x)

    def _write_frames(self, x) -> None:
        import numpy as np

        if self.spec.subtype not in ("FLOAT", "DOUBLE"):
            # libsndfile wraps out-of-range floats around when it converts to integers.
            x = np.clip(x, -1.0, 1.0)
        if x.size:
            self._file.write(x)
            self.frames_written += x.size

    def commit(self, sample_rate_if_empty: int = 24000) -> Path:
        """Finish the file and move it into place; an empty stream gives a valid empty file."""
        if self._file is None:
            self._open(sample_rate_if_empty)
        if self._resampler is not None:
            import numpy as np

            self._write_frames(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
            self._resampler = None
        try:
            self._file.close()  # writes the final header sizes
            self._file = None
            self._fileobj.flush()
            os.fsync(self._fileobj.fileno())  # data on disk before the rename makes it visible
            self._fileobj.close()
            self._fileobj = None
            # mkstemp makes the file 0600; give it the mode a plain open() would have.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp, 0o666 & ~umask)
            os.replace(self._tmp, self.spec.path)
        except BaseException:
            self.abort()
            raise
        self._tmp = None
        return self.spec.path

    def abort(self) -> None:
        """Drop the partial file; the target path is left as it was."""
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # the file is being thrown away; its close error does not matter
                pass
            self._file = None
        if self._fileobj is not None:
            self._fileobj.close()
            self._fileobj = None
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None
