"""Keep a long stream's memory flat under glibc: hand freed heap pages back between batches,
and (for the command line) stop the allocator's mmap threshold from drifting.

glibc's allocator raises its mmap threshold each time a large block is freed (up to 32 MB),
so after the first batches a model's mid-sized temporaries (activations, gradients, decoded
images) come from the heap, whose free space fragments and is not returned: a process
streaming 20,000 images peaked up to ~270 MB above the same command on 1,000 images, differing
from run to run, the maximum over more batches being worse (bench/RESULTS.md).

* :func:`release_free_memory` (``malloc_trim(0)``, called by streams after every batch)
  returns every free page (glibc >= 2.8 uses ``madvise`` throughout the heap, not only at its
  top): enough when the batches themselves do not fragment (``evaluate``).
* :func:`bound_heap_growth` (``mallopt(M_MMAP_THRESHOLD, 16 MB)``) fixes the threshold, so
  blocks of 16 MB and more always come from ``mmap`` and go back whole when freed; that also
  bounds the fragmentation within one batch (``extract``'s backward passes). It costs page
  faults on every such block: measured ~4× slower on an in-memory ``sweep`` (25 MB
  activations), ≤ ~15% on a streamed ``extract``. So it is applied only where the data is a
  long stream: ``netcarve extract`` streaming an ``--images-dir`` folder. It changes a
  process-wide setting, so the library leaves it to the application;
  ``MALLOC_MMAP_THRESHOLD_=16777216`` in the environment does the same.

Elsewhere (macOS, musl, Windows) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

__all__ = ["MMAP_THRESHOLD", "bound_heap_growth", "release_free_memory"]

MMAP_THRESHOLD = 16 * 1024 * 1024
"""Blocks at least this large are mmapped once :func:`bound_heap_growth` ran."""
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _libc_function(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = getattr(libc, name)
    except (OSError, AttributeError):  # not glibc (e.g. musl has no malloc_trim)
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_TRIM = _libc_function("malloc_trim", [ctypes.c_size_t])
_MALLOPT = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])


def bound_heap_growth() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (process-wide; see module docs).

    Returns:
        True when the setting was applied (glibc), False elsewhere.

    Example:
        >>> bound_heap_growth() in (True, False)
        True
    """
    return _MALLOPT is not None and _MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def release_free_memory() -> None:
    """Return the allocator's free heap pages to the OS (glibc), else do nothing.

    Example:
        >>> release_free_memory()
    """
    if _TRIM is not None:
        _TRIM(0)
