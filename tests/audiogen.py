"""Generate test audio with numpy and PyAV's encoders (no files committed)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

#: extension -> (container format, codec)
FORMATS: dict[str, tuple[str | None, str]] = {
    "mp3": ("mp3", "libmp3lame"),
    "flac": ("flac", "flac"),
    "ogg": ("ogg", "vorbis"),
    "opus": ("ogg", "libopus"),
    "m4a": ("ipod", "aac"),
    "wav": ("wav", "pcm_s16le"),
    "aiff": ("aiff", "pcm_s16be"),
}


def tone(
    seconds: float,
    *,
    rate: int = 22050,
    freqs: tuple[float, ...] = (220.0, 330.0),
    channels: int = 2,
    seed: int = 0,
    noise: float = 0.02,
) -> np.ndarray:
    """A few sines plus a little noise, shape ``(channels, samples)``, float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    mono = sum(np.sin(2 * np.pi * f * t) for f in freqs) / max(len(freqs), 1) * 0.5
    # a slow amplitude envelope so the signal is not stationary
    mono = mono * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
    out = np.stack([mono + noise * rng.standard_normal(t.size) for _ in range(channels)])
    return out.astype(np.float32)


def write_audio(
    path: Path,
    samples: np.ndarray,
    *,
    rate: int,
    codec: str | None = None,
    sample_format: str | None = None,
    tags: dict[str, str] | None = None,
) -> Path:
    """Encode ``samples`` (``(channels, n)`` float32 in [-1, 1]) to ``path``.

    The container and codec follow the extension (see :data:`FORMATS`) unless
    ``codec`` is given.
    """
    ext = path.suffix.lstrip(".").lower()
    fmt, default_codec = FORMATS[ext]
    codec = codec or default_codec
    if codec == "vorbis" and samples.shape[0] == 1:
        samples = np.repeat(samples, 2, axis=0)  # FFmpeg's own Vorbis encoder is stereo-only
    channels = samples.shape[0]
    layout = "mono" if channels == 1 else "stereo"
    out_rate = 48000 if codec == "libopus" else rate
    with av.open(str(path), "w", format=fmt) as container:
        options = {"strict": "experimental"} if codec == "vorbis" else {}
        stream = container.add_stream(codec, rate=out_rate, options=options)
        stream.layout = layout
        if sample_format is not None:
            stream.format = sample_format
        for key, value in (tags or {}).items():
            container.metadata[key] = value
        ctx = stream.codec_context
        resampler = av.AudioResampler(format=ctx.format.name, layout=layout, rate=out_rate)
        frame_size = ctx.frame_size or 1024
        fifo = av.AudioFifo()
        block = 4096
        interleaved = np.ascontiguousarray(samples.T.reshape(1, -1))
        for start in range(0, samples.shape[1], block):
            chunk = interleaved[:, start * channels : (start + block) * channels]
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout=layout)
            frame.sample_rate = rate
            for converted in resampler.resample(frame):
                fifo.write(converted)
            while fifo.samples >= frame_size:
                for packet in stream.encode(fifo.read(frame_size)):
                    container.mux(packet)
        for converted in resampler.resample(None):
            fifo.write(converted)
        if fifo.samples:
            for packet in stream.encode(fifo.read()):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_flac_chunks(path: Path, chunks: object, *, rate: int) -> Path:
    """Encode an iterable of mono float32 chunks to FLAC without holding them all."""
    with av.open(str(path), "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate)
        stream.layout = "mono"
        for chunk in chunks:  # type: ignore[attr-defined]
            pcm = (np.clip(chunk, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_video_only(path: Path, *, frames: int = 10) -> Path:
    """A tiny MPEG-4 video with no audio stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(frames):
            image = np.full((64, 64, 3), (i * 20) % 255, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])
