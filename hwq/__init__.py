"""hwq: train low-bit networks whose accuracy is measured on a bit-exact accelerator model."""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"


class HwqError(Exception):
    """A problem with the user's input; the CLI prints it as one line and exits."""


def cache_dir() -> Path:
    """Where downloaded checkpoints and data are kept ($HWQ_CACHE, default ~/.cache/hwq)."""
    return Path(os.environ.get("HWQ_CACHE", Path.home() / ".cache" / "hwq"))
