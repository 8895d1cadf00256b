"""A module of the test suite that records being imported and its factory being called.

Tests point ``NETCARVE_CANARY`` at a file and name ``_import_canary:build`` somewhere netcarve
must treat as data (a circuit file's metadata); the file staying absent proves netcarve never
imported the module. The same spec typed as ``--model`` must import it, which shows that the
canary would have caught an import.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn


def _record(event: str) -> None:
    path = os.environ.get("NETCARVE_CANARY")
    if path:
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(event + "\n")


_record("imported")


def build() -> nn.Module:
    """A tiny model (it need not fit any circuit: being called is the event recorded)."""
    _record("called")
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
