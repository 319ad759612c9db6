"""Progress-bar settings shared by every long loop (training, benchmarking)."""

from __future__ import annotations

import sys
from typing import Any


def tqdm_options(progress: bool) -> dict[str, Any]:
    """Keyword arguments for ``tqdm``: bars on stderr; in a log file (not a terminal) one update per 30 s
    instead of a carriage-return line per step, so CI logs stay readable."""
    tty = sys.stderr.isatty()
    return {"file": sys.stderr, "disable": not progress, "mininterval": 0.1 if tty else 30.0, "leave": False,
            "dynamic_ncols": tty}
