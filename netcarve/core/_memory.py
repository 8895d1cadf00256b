"""Hand freed heap memory back to the operating system between batches of a stream.

glibc's allocator raises its mmap threshold each time a large block is freed, so after the
first batches a model's mid-sized temporaries (activations, decoded images) come from the heap,
whose free space fragments and is not returned: a process streaming 20,000 images then peaked
up to ~270 MB above the same command on 1,000 images, differing from run to run
(bench/RESULTS.md). ``malloc_trim(0)`` between batches returns every free page (glibc >= 2.8
uses ``madvise`` throughout the heap, not only at its top), which keeps the peak set by one
batch's working set. Elsewhere (macOS, musl, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

__all__ = ["release_free_memory"]


def _load_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _load_trim()


def release_free_memory() -> None:
    """Return the allocator's free heap pages to the OS (glibc), else do nothing.

    Example:
        >>> release_free_memory()
    """
    if _TRIM is not None:
        _TRIM(0)
