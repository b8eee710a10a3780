"""Python code run in a fresh interpreter: what a process imports or sets up from nothing."""

from __future__ import annotations

import subprocess
import sys


def run_fresh(code: str) -> str:
    """Run ``code`` with this Python in a new process; its stdout (a failure fails the test)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout
