"""Figures: matplotlib's pyplot on the non-interactive Agg backend, or one clear error.

Every figure netcarve draws goes through :func:`pyplot`, so no command ever opens a window or
needs a display, and a missing matplotlib is a message that says how to install it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netcarve.core.errors import NetcarveError

__all__ = ["PlottingError", "pyplot", "save_figure"]


class PlottingError(NetcarveError):
    """matplotlib is needed for a figure and is not installed."""


def pyplot(error: type[NetcarveError] = PlottingError) -> Any:
    """``matplotlib.pyplot`` with the Agg backend selected.

    Args:
        error: the exception type raised when matplotlib is missing (callers with an error
            type of their own pass it, so their users catch one type).

    Returns:
        the ``matplotlib.pyplot`` module.

    Raises:
        PlottingError (or ``error``): matplotlib is not installed; the message says
            ``pip install 'netcarve[report]'``.

    Example:
        >>> plt = pyplot()
        >>> plt.get_backend().lower()
        'agg'
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise error("drawing figures needs matplotlib: pip install 'netcarve[report]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110, **savefig: Any) -> Path:
    """Write a matplotlib figure (parent folders created) and close it.

    Args:
        fig: the figure.
        path: the file to write (its suffix picks the format).
        dpi: resolution.
        **savefig: further ``Figure.savefig`` arguments (``bbox_inches``, ``facecolor``, ...).

    Returns:
        the path written.

    Example:
        >>> plt = pyplot()
        >>> save_figure(plt.figure(), "out/empty.png")  # doctest: +SKIP
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, **savefig)
    pyplot().close(fig)
    return out
