"""Where inaflash keeps what it makes on this machine: $INAFLASH_HOME (converted stores, the device profile).

Read by the engine core (the probed coalescing gap) and written by the tools (`inaflash probe`), so it lives apart
from both: the core never imports a measuring tool.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .reader import DEFAULT_MAX_GAP

PROFILE_NAME = "device-profile.json"


def home() -> Path:
    return Path(os.environ.get("INAFLASH_HOME") or Path.home() / ".cache" / "inaflash")


def profile_path() -> Path:
    """The device profile `inaflash probe` writes."""
    return home() / PROFILE_NAME


def load_max_gap() -> int:
    """The probed coalescing gap if `inaflash probe` has run on this machine, else the reader's default."""
    path = profile_path()
    if path.exists():
        try:
            return int(json.loads(path.read_text())["max_gap"])
        except (ValueError, KeyError, TypeError):
            pass
    return DEFAULT_MAX_GAP
