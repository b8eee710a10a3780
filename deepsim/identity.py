"""What identifies the audio a vector was computed from.

Each stored vector records an :class:`AudioIdentity` of its file: the size
and modification time (``st_size``, ``st_mtime_ns``), and a digest of the
first 64 KiB of the file's *audio packets* plus the stream's codec, rate,
channel count and whole-second duration.

Checking a vector is then a ``stat`` (1 µs) in the common case.  When the
size or time changed, the digest decides: a tag edit (``beet modify``,
``beet write``, a tag editor) changes size and time but not the audio
packets, so the vector is kept and only the recorded size and time are
updated; a re-encode, another song at the same path or a cut file changes
the digest (or the duration), so the vector is stale.

Measured on the 60 files of the test corpus (``../shared/corpus``, 2 busy
cores): ``stat`` 0.001 ms a file, the packet digest 5.9 ms, a hash of the
whole file 10 ms, a hash of the decoded window ~200 ms (it is the decoding).
The digest is taken in the decoding worker, beside the decoding it
accompanies (about 3 % of its cost).

No SQL and no torch here; PyAV is imported on first use.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, replace
from typing import Literal

#: Bytes of audio packets the digest reads.
DIGEST_BYTES = 1 << 16

Change = Literal["same", "retagged", "changed", "missing"]


@dataclass(frozen=True)
class AudioIdentity:
    """``size:mtime_ns:digest`` of a file (the digest may be empty: not taken)."""

    size: int
    mtime_ns: int
    digest: str = ""

    @property
    def text(self) -> str:
        return f"{self.size}:{self.mtime_ns}:{self.digest}"

    @classmethod
    def parse(cls, text: str | bytes | None) -> AudioIdentity | None:
        """The identity written by :attr:`text`; None for anything else."""
        if text is None:
            return None
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        parts = str(text).split(":")
        if len(parts) != 3:
            return None
        try:
            return cls(int(parts[0]), int(parts[1]), parts[2])
        except ValueError:
            return None

    def same_stat(self, other: AudioIdentity) -> bool:
        return self.size == other.size and self.mtime_ns == other.mtime_ns


def _fs(path: str | bytes | os.PathLike[str]) -> str:
    return os.fsdecode(os.fspath(path))


def stat_identity(path: str | bytes | os.PathLike[str]) -> AudioIdentity | None:
    """Size and mtime of ``path`` (no digest); None when it is not a regular file."""
    try:
        st = os.stat(path if isinstance(path, (bytes, str)) else os.fspath(path))
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return AudioIdentity(int(st.st_size), int(st.st_mtime_ns))


def audio_digest(path: str | bytes | os.PathLike[str]) -> str:
    """Digest of the first :data:`DIGEST_BYTES` of audio packets; ``""`` if unreadable."""
    import av

    digest = hashlib.blake2b(digest_size=8)
    try:
        with av.open(_fs(path)) as container:
            if not container.streams.audio:
                return ""
            stream = container.streams.audio[0]
            ctx = stream.codec_context
            duration = container.duration // 1_000_000 if container.duration else -1
            digest.update(f"{ctx.name}|{ctx.sample_rate}|{ctx.channels}|{duration}|".encode())
            read = 0
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                digest.update(bytes(packet))
                read += packet.size
                if read >= DIGEST_BYTES:
                    break
    except Exception:  # any decoder complaint means "cannot tell": no digest
        return ""
    return digest.hexdigest()


def identify(path: str | bytes | os.PathLike[str]) -> AudioIdentity | None:
    """Full identity (stat and digest) of ``path``; None when it is not a readable file."""
    ident = stat_identity(path)
    if ident is None:
        return None
    return replace(ident, digest=audio_digest(path))


def compare(
    recorded: AudioIdentity | None, path: str | bytes | os.PathLike[str]
) -> tuple[Change, AudioIdentity | None]:
    """How the file at ``path`` relates to the ``recorded`` identity of its vector.

    Returns ``(change, current)``: ``"same"`` (size and mtime unchanged, or
    nothing recorded: the vector is trusted and ``current`` is what to
    record), ``"retagged"`` (size or mtime changed, audio packets did not:
    ``current`` is the identity to record), ``"changed"`` (the audio differs:
    the vector is stale) or ``"missing"`` (no readable file; ``current`` None).
    """
    current = stat_identity(path)
    if current is None:
        return "missing", None
    if recorded is None:
        return "same", current
    if recorded.same_stat(current):
        return "same", recorded
    if not recorded.digest:
        return "changed", current
    digest = audio_digest(path)
    current = replace(current, digest=digest)
    if digest and digest == recorded.digest:
        return "retagged", current
    return "changed", current
