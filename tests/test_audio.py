from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from audiogen import (
    FORMATS,
    dominant_frequency,
    tone,
    write_audio,
    write_flac_chunks,
    write_video_only,
)
from conftest import SHARED

from deepsim import audio
from deepsim.audio import decode_middle
from deepsim.errors import AudioError

SR = 16000


def sectioned(seconds_each: float, rate: int, freqs: tuple[float, ...]) -> np.ndarray:
    """Consecutive sections, each a pure tone of its own frequency (stereo)."""
    parts = []
    for f in freqs:
        t = np.arange(int(seconds_each * rate)) / rate
        parts.append(0.5 * np.sin(2 * np.pi * f * t))
    mono = np.concatenate(parts).astype(np.float32)
    return np.stack([mono, mono])


@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_every_format_decodes_the_middle_window(tmp_path: Path, ext: str) -> None:
    # 3 sections of 30 s: 300 Hz, 1000 Hz, 2500 Hz; the middle window is the 1000 Hz one.
    path = write_audio(
        tmp_path / f"t.{ext}", sectioned(30.0, 22050, (300.0, 1000.0, 2500.0)), rate=22050
    )
    samples = decode_middle(path, sample_rate=SR)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert len(samples) == 30 * SR
    # Away from the edges (seek precision, codec delay), only the middle tone is there.
    inner = samples[SR : 29 * SR]
    assert dominant_frequency(inner, SR) == pytest.approx(1000.0, abs=5)


def test_short_track_is_used_whole(tmp_path: Path) -> None:
    path = write_audio(tmp_path / "short.flac", tone(2.0, rate=44100), rate=44100)
    samples = decode_middle(path, sample_rate=SR)
    assert len(samples) == pytest.approx(2 * SR, abs=SR // 50)


def test_mono_8khz_and_96khz_24bit(tmp_path: Path) -> None:
    low = write_audio(
        tmp_path / "low.wav", tone(40.0, rate=8000, channels=1, freqs=(440.0,)), rate=8000
    )
    high = write_audio(
        tmp_path / "high.flac",
        tone(35.0, rate=96000, freqs=(440.0,)),
        rate=96000,
        sample_format="s32",
    )
    with av.open(str(high)) as container:
        assert container.streams.audio[0].rate == 96000
    for path in (low, high):
        samples = decode_middle(path, sample_rate=SR)
        assert len(samples) == 30 * SR
        assert dominant_frequency(samples, SR) == pytest.approx(440.0, abs=3)


def test_non_ascii_path(tmp_path: Path) -> None:
    path = write_audio(tmp_path / "Björk – Jóga 日本語.ogg", tone(5.0), rate=22050)
    assert len(decode_middle(path, sample_rate=SR)) == pytest.approx(5 * SR, abs=SR // 20)
    # beets hands paths over as bytes
    assert len(decode_middle(bytes(path), sample_rate=SR)) > 0


def test_eight_hour_track_decodes_only_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rate = 8000
    hours = 8
    marker_start = hours * 3600 / 2 - 15

    def chunks():  # silence with a 1 kHz tone in the middle 30 s, one minute at a time
        for minute in range(hours * 60):
            t0 = minute * 60.0
            t = t0 + np.arange(60 * rate) / rate
            inside = (t >= marker_start) & (t < marker_start + 30)
            yield np.where(inside, 0.5 * np.sin(2 * np.pi * 1000 * t), 0.0)

    path = write_flac_chunks(tmp_path / "long.flac", chunks(), rate=rate)
    with av.open(str(path)) as container:
        assert container.duration / av.time_base == pytest.approx(hours * 3600, abs=1)

    decoded_samples = 0
    real = audio._Resampler

    class Counting:
        def __init__(self, *args: object, **kwargs: Any) -> None:
            self.inner = real(*args, **kwargs)

        def resample(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
            nonlocal decoded_samples
            if frame is not None:
                decoded_samples += frame.samples
            return self.inner.resample(frame)

    monkeypatch.setattr(audio, "_Resampler", Counting)
    samples = decode_middle(path, sample_rate=SR)
    assert len(samples) == 30 * SR
    assert dominant_frequency(samples[SR:-SR], SR) == pytest.approx(1000, abs=3)
    assert decoded_samples < 60 * rate  # far less than 8 hours


# -- bad input: each gets samples or one AudioError naming the file -----------------


def _error(path: Path) -> AudioError:
    with pytest.raises(AudioError) as info:
        decode_middle(path, sample_rate=SR)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    return info.value


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "nope.mp3").reason


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp3"
    path.touch()
    assert "empty" in _error(path).reason


def test_text_file_named_mp3(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp3"
    path.write_text("these are not the droids you are looking for\n" * 50)
    assert "not a readable audio file" in _error(path).reason


def test_video_without_audio(tmp_path: Path) -> None:
    path = write_video_only(tmp_path / "clip.mp4")
    assert "no audio stream" in _error(path).reason


def test_digital_silence(tmp_path: Path) -> None:
    path = write_audio(tmp_path / "silence.flac", np.zeros((2, 22050 * 40), np.float32), rate=22050)
    assert "silence" in _error(path).reason


def _cut(full: Path, share: float) -> Path:
    cut = full.with_name(f"cut-{full.name}")
    shutil.copy(full, cut)
    with open(cut, "r+b") as fh:
        fh.truncate(int(full.stat().st_size * share))
    return cut


@pytest.mark.parametrize("ext", ["flac", "mp3", "ogg", "opus", "wav"])
def test_a_truncated_file_is_embedded_from_what_decodes(tmp_path: Path, ext: str) -> None:
    # 60 s cut to 30 %: about 18 s decode; the header still says 60 s, so the
    # middle window (15-45 s) would hold only 3 s of it
    cut = _cut(write_audio(tmp_path / f"full.{ext}", tone(60.0), rate=22050), 0.3)
    samples = decode_middle(cut, sample_rate=SR)
    assert 12 * SR <= len(samples) <= 30 * SR
    assert np.all(np.isfinite(samples))


def test_a_truncated_faststart_m4a_is_embedded_from_what_decodes(tmp_path: Path) -> None:
    path = tmp_path / "faststart.m4a"
    wave = tone(60.0)
    with av.open(str(path), "w", format="ipod", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("aac", rate=22050)
        stream.layout = "stereo" if wave.shape[0] == 2 else "mono"
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(wave, np.float32), format="fltp", layout=stream.layout.name
        )
        frame.sample_rate = 22050
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    samples = decode_middle(_cut(path, 0.3), sample_rate=SR)
    assert 12 * SR <= len(samples) <= 30 * SR


def test_a_truncated_m4a_without_its_index_says_why(tmp_path: Path) -> None:
    # FFmpeg (and most encoders) write the MP4 index (moov) last: cut, nothing is locatable
    cut = _cut(write_audio(tmp_path / "full.m4a", tone(60.0), rate=22050), 0.3)
    error = _error(cut)
    assert str(cut) in str(error) and "moov" in error.reason


def test_invalid_arguments_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="-5"):
        decode_middle(tmp_path / "x.mp3", sample_rate=-5)
    with pytest.raises(ValueError, match="0"):
        decode_middle(tmp_path / "x.mp3", sample_rate=SR, seconds=0)


def test_real_corpus_excerpts(corpus: Path) -> None:
    for path in sorted((corpus / "excerpts").iterdir())[:5]:
        samples = decode_middle(path, sample_rate=SR)
        assert len(samples) == 30 * SR
        assert 0.05 < float(np.abs(samples).max()) < 2.0


def _write_planar(path: Path, wave: np.ndarray, *, rate: int, layout: str) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("flac", rate=rate)
        stream.layout = layout
        stream.format = "s16"
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(wave, np.float32), format="fltp", layout=layout
        )
        frame.sample_rate = rate
        resampler = av.AudioResampler(format="s16", layout=layout, rate=rate)
        for packet in [
            *(p for f in resampler.resample(frame) for p in stream.encode(f)),
            *stream.encode(None),
        ]:
            out.mux(packet)
    return path


def _mean_then_reference(path: Path) -> np.ndarray:
    """Every channel resampled on its own, then their plain mean (the definition)."""
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="fltp", layout=None, rate=SR)
        chunks = [
            out.to_ndarray().mean(axis=0)
            for frame in container.decode(audio=0)
            for out in [*resampler.resample(frame)]
        ]
        chunks += [out.to_ndarray().mean(axis=0) for out in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32)


@pytest.mark.parametrize(("layout", "channels"), [("stereo", 2), ("quad", 4)])
def test_mono_is_the_plain_mean_of_the_channels(tmp_path: Path, layout: str, channels: int) -> None:
    # Channels that differ (one in anti-phase): FFmpeg's own downmix would weigh them;
    # deepsim's mono is their plain mean, whether it mixes down first (stereo) or not.
    rate = 44100
    t = np.arange(12 * rate) / rate
    base = 0.4 * np.sin(2 * np.pi * 440 * t)
    rows = [base, -0.5 * base + 0.3 * np.sin(2 * np.pi * 1000 * t)]
    rows += [0.2 * np.sin(2 * np.pi * (200 + 300 * k) * t) for k in range(channels - 2)]
    path = _write_planar(tmp_path / f"{layout}.flac", np.stack(rows), rate=rate, layout=layout)
    samples = decode_middle(path, sample_rate=SR, seconds=30.0)  # shorter: the whole track
    reference = _mean_then_reference(path)
    assert len(samples) == len(reference) == 12 * SR
    np.testing.assert_allclose(samples, reference, atol=2e-6)


def _pyav_resampled(path: Path, layout: str | None) -> np.ndarray:
    """The whole file through ``av.AudioResampler`` (read after every frame)."""
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(
            format="flt", layout=layout, rate=SR, frame_size=audio.RESAMPLE_FRAME
        )
        frames = [out for frame in container.decode(audio=0) for out in resampler.resample(frame)]
        frames += resampler.resample(None)
    return np.concatenate([f.to_ndarray() for f in frames], axis=1).reshape(-1)


def _ours_resampled(path: Path, layout: str | None) -> np.ndarray:
    with av.open(str(path)) as container:
        resampler = audio._Resampler(layout=layout, rate=SR)
        frames = [out for frame in container.decode(audio=0) for out in resampler.resample(frame)]
        frames += resampler.resample(None)
    return np.concatenate([f.to_ndarray() for f in frames], axis=1).reshape(-1)


def test_resampler_gives_the_samples_of_pyavs(tmp_path: Path) -> None:
    # The same filter graph read every few frames instead of after each: the same
    # samples, sample for sample, whatever the codec, rate or layout.
    rate = 44100
    t = np.arange(7 * rate) / rate
    rows = np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 3000 * t)])
    paths = [
        _write_planar(tmp_path / "stereo.flac", rows, rate=rate, layout="stereo"),
        _write_planar(
            tmp_path / "quad.flac", np.vstack([rows, rows[::-1]]), rate=rate, layout="quad"
        ),
    ]
    paths += [write_audio(tmp_path / f"t.{ext}", tone(6.0), rate=22050) for ext in sorted(FORMATS)]
    excerpts = SHARED / "corpus" / "excerpts"  # real music where present
    if excerpts.is_dir():
        paths += sorted(excerpts.iterdir())[:8]
    for path in paths:
        for layout in ("mono", None):
            ours, theirs = _ours_resampled(path, layout), _pyav_resampled(path, layout)
            assert ours.shape == theirs.shape and np.array_equal(ours, theirs), (path, layout)


def test_resampler_refuses_a_format_change_mid_stream() -> None:
    resampler = audio._Resampler(layout="mono", rate=SR)
    one = av.AudioFrame.from_ndarray(
        np.zeros((2, 1024), np.float32), format="fltp", layout="stereo"
    )
    one.sample_rate = 44100
    other = av.AudioFrame.from_ndarray(
        np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
    )
    other.sample_rate = 44100
    resampler.resample(one)
    with pytest.raises(ValueError, match="changed mid-stream"):
        resampler.resample(other)
