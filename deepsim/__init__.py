"""deepsim: content-based music similarity from audio (library part).

Importing this package is cheap: torch is imported only by the modules that
run networks (:mod:`deepsim.models`' implementations, :mod:`deepsim.embed`,
:mod:`deepsim.train`, :mod:`deepsim.pretrain`).
"""

from __future__ import annotations

__version__ = "0.1.0"
