"""Decode the middle of an audio file to mono float32 samples with PyAV.

Only the analysis window is decoded: the decoder seeks to the start of the
window, so an 8-hour file costs about as much as a 3-minute one, and stops
once the window is decoded.  Channels are averaged to mono, as librosa does,
and resampled once to the model's rate by FFmpeg's resampler
(the filter graph of ``av.AudioResampler``), mono first where that is exact
(mono and stereo).

Every failure is an :class:`~deepsim.errors.AudioError` naming the file and the
reason; nothing else escapes.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import av
import av.error
import av.filter
import numpy as np

from deepsim.errors import AudioError

PathLike = str | bytes | os.PathLike[str]

#: Samples per frame out of the resampler (fewer, larger frames: less per-frame overhead).
RESAMPLE_FRAME = 4096

_SQRT1_2 = 0.7071067811865476

#: A file whose duration cannot be read is decoded from its start, up to this
#: many seconds, and the middle of what was decoded is used.
MAX_UNKNOWN_DURATION = 20 * 60.0


def _fspath(path: PathLike) -> str:
    return os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)


def _open(path: str) -> av.container.InputContainer:
    try:
        size = Path(path).stat().st_size
    except FileNotFoundError:
        raise AudioError(path, "file not found") from None
    except OSError as exc:
        raise AudioError(path, f"cannot read file ({exc.strerror})") from None
    if size == 0:
        raise AudioError(path, "file is empty (0 bytes)")
    try:
        return av.open(path, metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        if _mp4_index_missing(path, size):
            raise AudioError(
                path,
                "truncated MP4/M4A file: its index (the moov box, written at the end of the file "
                "unless it was made with faststart) is missing, so no audio can be located",
            ) from None
        raise AudioError(path, f"not a readable audio file ({_reason(exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AudioError(path, f"cannot open file ({exc})") from None


def _mp4_index_missing(path: str, size: int) -> bool:
    """Whether ``path`` is an ISO-BMFF (MP4/M4A) file whose top-level boxes end without a moov."""
    try:
        with open(path, "rb") as handle:
            offset = 0
            seen: list[bytes] = []
            while offset + 8 <= size and len(seen) < 64:
                handle.seek(offset)
                header = handle.read(16)
                length, kind = int.from_bytes(header[:4], "big"), header[4:8]
                if length == 1 and len(header) == 16:
                    length = int.from_bytes(header[8:16], "big")
                seen.append(kind)
                if kind == b"moov":
                    return False
                if length < 8:
                    break
                offset += length
    except OSError:
        return False
    return bool(seen) and seen[0] == b"ftyp"


class _Resampler:
    """FFmpeg's resampler to packed float32 at ``rate``, fed decoded frames one by one.

    The filter graph of ``av.AudioResampler`` (``abuffer -> aformat ->
    abuffersink``, where FFmpeg inserts its ``aresample``; output frames of
    :data:`RESAMPLE_FRAME` samples), so the same samples; but its output is read
    every :attr:`READ_EVERY` input frames, not after each: reading an empty sink
    raises (and PyAV builds an exception for it), which cost about a quarter of the
    resampling time on 1,500 frames of a 30-s window.  The output lags the input by
    a few frames; :meth:`resample` with ``None`` flushes it all.  A frame whose
    format, layout or rate differs from the first raises ``ValueError`` (as
    ``av.AudioResampler`` does).
    """

    #: Input frames between reads of the output.
    READ_EVERY = 8

    def __init__(self, *, layout: str | None, rate: int) -> None:
        self.layout = layout
        self.rate = rate
        self.graph: av.filter.Graph | None = None
        self.first: tuple[str, str, int] | None = None
        self.pushed = 0

    def _start(self, frame: av.AudioFrame) -> av.filter.Graph:
        graph = av.filter.Graph()
        extra = {} if frame.time_base is None else {"time_base": str(frame.time_base)}
        source = graph.add(
            "abuffer",
            sample_rate=str(frame.sample_rate),
            sample_fmt=frame.format.name,
            channel_layout=frame.layout.name,
            **extra,
        )
        convert = graph.add(
            "aformat",
            sample_rates=str(self.rate),
            sample_fmts="flt",
            channel_layouts=self.layout or frame.layout.name,
        )
        sink = graph.add("abuffersink")
        source.link_to(convert)
        convert.link_to(sink)
        graph.configure()
        graph.set_audio_frame_size(RESAMPLE_FRAME)
        return graph

    def resample(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
        """Push ``frame`` (``None``: the end) and return the output frames ready to read."""
        if frame is None:
            if self.graph is None:
                return []
            self.graph.push(None)
            return self._read()
        shape = (frame.format.name, frame.layout.name, frame.sample_rate)
        if self.graph is None:
            self.graph, self.first = self._start(frame), shape
        elif shape != self.first:
            raise ValueError(f"audio format changed mid-stream ({self.first} -> {shape})")
        self.graph.push(frame)
        self.pushed += 1
        return self._read() if self.pushed % self.READ_EVERY == 0 else []

    def _read(self) -> list[av.AudioFrame]:
        assert self.graph is not None
        out: list[av.AudioFrame] = []
        while True:
            try:
                frame = self.graph.pull()
            except EOFError:
                return out
            except av.error.FFmpegError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
                return out
            assert isinstance(frame, av.AudioFrame)
            out.append(frame)


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(": '")[0].strip() or type(exc).__name__


def _audio_stream(container: av.container.InputContainer, path: str) -> av.audio.AudioStream:
    if not container.streams.audio:
        kinds: list[str] = sorted({s.type for s in container.streams}) or ["none"]
        raise AudioError(path, f"no audio stream (streams: {', '.join(kinds)})")
    return container.streams.audio[0]


def _duration(container: av.container.InputContainer, stream: av.audio.AudioStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _decode(
    path: str,
    *,
    sample_rate: int,
    start: float | None,
    seconds: float,
) -> np.ndarray:
    """Decode ``seconds`` of mono audio at ``sample_rate`` from ``start``.

    ``start=None`` centres the window on the middle of the track.
    """
    with _open(path) as container:
        stream = _audio_stream(container, path)
        stream.codec_context.thread_type = "AUTO"
        duration = _duration(container, stream)
        whole_unknown = duration is None and start is None
        if start is None:
            start = 0.0 if duration is None else max(0.0, (duration - seconds) / 2.0)
        span = MAX_UNKNOWN_DURATION if whole_unknown else seconds
        if start > 0:
            try:
                container.seek(int(start * av.time_base), backward=True, any_frame=False)
            except av.error.FFmpegError:
                container.seek(0)
                # Fall back to decoding from the start and skipping.
        # Mono is the plain mean of the channels, as librosa (and so musicnn's training
        # pipeline) does.  For mono and stereo FFmpeg's resampler mixes down first, then
        # resamples one channel: stereo comes out as (L + R) / sqrt(2), so a scale by
        # 1 / sqrt(2) gives the mean (equal to averaging after resampling within 1.2e-7).
        # Other layouts (whose FFmpeg downmix weighs the channels) are resampled whole
        # and averaged here.
        name = stream.layout.name
        downmix = name in ("mono", "stereo")
        channels = 1 if downmix else max(1, stream.channels or 1)
        resampler = _Resampler(layout="mono" if downmix else None, rate=sample_rate)
        want = round(span * sample_rate)
        need = want
        chunks: list[np.ndarray] = []
        have = 0
        first_time: float | None = None
        try:
            for frame in container.decode(stream):
                if first_time is None:
                    frame_time = frame.time
                    if frame_time is not None:
                        frame_end = frame_time + frame.samples / max(frame.sample_rate, 1)
                        if frame_end <= start:
                            continue  # before the window (the seek lands on a packet before it)
                    first_time = start if frame_time is None else frame_time
                    need = want + max(0, round((start - first_time) * sample_rate))
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    have += out.samples
                if have >= need:
                    break
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
        except av.error.FFmpegError as exc:
            if not chunks:
                raise AudioError(path, f"cannot decode audio ({_reason(exc)})") from None
            # A damaged stream: keep what decoded before the damage.
        except (MemoryError, ValueError) as exc:
            raise AudioError(path, f"cannot decode audio ({exc})") from None
    if not chunks:
        raise AudioError(path, "no decodable audio at the analysis window")
    samples = np.concatenate(chunks, axis=1).reshape(-1)
    if channels > 1:
        samples = samples[: len(samples) // channels * channels]
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    elif name == "stereo":
        samples *= np.float32(_SQRT1_2)
    skip = max(0, round((start - (first_time if first_time is not None else start)) * sample_rate))
    if skip >= len(samples):
        # Seeking overshot (a stream shorter than its header claims): use the end.
        skip = max(0, len(samples) - want)
    samples = samples[skip:]
    if whole_unknown and len(samples) > int(seconds * sample_rate):
        middle = (len(samples) - int(seconds * sample_rate)) // 2
        samples = samples[middle : middle + int(seconds * sample_rate)]
    return np.ascontiguousarray(samples[: round(seconds * sample_rate)])


def _check(path: str, samples: np.ndarray) -> np.ndarray:
    if samples.size == 0:
        raise AudioError(path, "no decodable audio at the analysis window")
    if not np.all(np.isfinite(samples)):
        raise AudioError(path, "decoded audio contains NaN or infinite samples")
    if float(np.max(np.abs(samples))) < 1e-5:
        raise AudioError(path, "digital silence (nothing to analyse in the window)")
    return samples


def decode_middle(path: PathLike, *, sample_rate: int, seconds: float = 30.0) -> np.ndarray:
    """Decode the ``seconds``-long window centred on the middle of a track.

    A track shorter than ``seconds`` is returned whole.  A track whose
    declared duration is longer than its decodable data (a truncated file)
    falls back to the middle of what can be decoded.

    Parameters
    ----------
    path
        The audio file (``str``, ``bytes`` as beets stores paths, or a path object).
    sample_rate
        Output rate in Hz; FFmpeg's resampler converts to it.
    seconds
        Window length.

    Returns
    -------
    numpy.ndarray
        Mono float32 samples in [-1, 1].

    Raises
    ------
    AudioError
        Missing, empty, unreadable or damaged file; no audio stream; digital silence.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate!r}")
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds!r}")
    name = _fspath(path)
    try:
        samples = _decode(name, sample_rate=sample_rate, start=None, seconds=seconds)
    except AudioError as exc:
        if not exc.reason.startswith("no decodable audio"):
            raise
        # Header promises more than the file holds (truncated): decode what exists.
        samples = _decode_all_middle(name, sample_rate=sample_rate, seconds=seconds)
    else:
        if len(samples) < int(seconds * sample_rate) * 0.9:
            # A short window: a short track, or one cut before the window's end (a
            # truncated file whose header keeps the full duration).  The middle of
            # everything that decodes is then at least as long.
            whole = _decode_all_middle(name, sample_rate=sample_rate, seconds=seconds)
            if len(whole) > len(samples):
                samples = whole
    return _check(name, samples)


def _decode_all_middle(path: str, *, sample_rate: int, seconds: float) -> np.ndarray:
    samples = _decode(path, sample_rate=sample_rate, start=0.0, seconds=MAX_UNKNOWN_DURATION)
    n = int(seconds * sample_rate)
    if len(samples) > n:
        middle = (len(samples) - n) // 2
        samples = samples[middle : middle + n]
    return samples
