"""The one exception tree of deepsim.

Every error names the value or file it is about and the reason, so that a
caller can print ``str(error)`` as a single, self-explaining line.
"""

from __future__ import annotations

import os


class DeepsimError(Exception):
    """Base class of every error deepsim raises on purpose."""


class AudioError(DeepsimError):
    """A file could not be turned into audio samples.

    Parameters
    ----------
    path
        The file.
    reason
        Why, in a few words (``"no audio stream"``, ``"file is empty"``...).
    """

    def __init__(self, path: str | os.PathLike[str] | bytes, reason: str) -> None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type[AudioError], tuple[str, str]]:
        return (type(self), (self.path, self.reason))


class ListeningDataError(DeepsimError):
    """A listening-data file is malformed.

    Parameters
    ----------
    path
        The file.
    line
        1-based line number of the offending record, or ``None`` when the
        problem concerns the whole file.
    reason
        What is wrong with it.
    """

    def __init__(self, path: str | os.PathLike[str], line: int | None, reason: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[type[ListeningDataError], tuple[str, int | None, str]]:
        return (type(self), (self.path, self.line, self.reason))


class ModelError(DeepsimError):
    """A model name, checkpoint or configuration is unusable."""


class AnnIndexError(DeepsimError):
    """The nearest-neighbour index is missing, corrupt or stale."""


class TrainingError(DeepsimError):
    """Training cannot proceed (too little data, no matches...)."""


class MpdError(DeepsimError):
    """MPD cannot be reached, refuses a command, or python-mpd2 is missing."""


class ParameterError(DeepsimError, ValueError):
    """A function was called with an unusable argument (the librosa convention).

    The message names the parameter, what it must be and the value given:
    ``"n_trees must be an integer >= 1, got 0"``.
    """
