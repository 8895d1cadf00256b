"""Exception types. Every error a user can cause derives from :class:`NetcarveError`,
so the CLI can print it as a message (no traceback) and exit with a meaningful code."""

from __future__ import annotations


class NetcarveError(Exception):
    """Base class for errors caused by user input (bad names, files, arguments)."""

    exit_code = 2


class DataError(NetcarveError):
    """A data file or folder is missing, truncated, corrupt or unreadable."""

    exit_code = 3


class WeightsError(NetcarveError):
    """A weight file does not match the architecture or cannot be read safely."""

    exit_code = 4


class ModelSpecError(NetcarveError):
    """A model name or ``package.module:factory`` spec cannot be resolved."""

    exit_code = 2
