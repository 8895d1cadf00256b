"""Freed heap memory goes back to the OS between stream batches (glibc), and streams still
give the same batches with the release in place."""

from __future__ import annotations

import pytest
import torch

from netcarve.core import _memory
from netcarve.data import as_stream


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(_memory._TRIM is None, reason="malloc_trim needs glibc on Linux")
def test_release_returns_fragmented_heap_pages() -> None:
    # 1,000 heap blocks of 100 KB; keeping every 10th pins the heap, so free() alone cannot
    # shrink it and the freed pages stay resident until they are released
    blocks = [bytearray(100 * 1024) for _ in range(1000)]
    for b in blocks:
        b[::4096] = b"\x01" * len(b[::4096])  # touch every page
    kept = blocks[::10]
    del blocks
    before = _rss_mb()
    _memory.release_free_memory()
    after = _rss_mb()
    assert before - after > 40, (before, after)  # about 88 MB were freed
    assert all(b[0] == 1 for b in kept)


def test_streams_give_the_same_batches_with_the_release() -> None:
    x = torch.rand(10, 1, 4, 4)
    y = torch.arange(10)
    batches = [(x[i:i + 3], y[i:i + 3]) for i in range(0, 10, 3)]
    stream = as_stream(batches)
    for _ in range(2):  # two passes: the release never drops a batch the caller holds
        got = list(stream.batches(labels=True))
        assert len(got) == 4
        torch.testing.assert_close(torch.cat([g for g, _ in got]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([lab for _, lab in got]), y)


def test_only_streamed_folders_fix_the_mmap_threshold(monkeypatch, tmp_path) -> None:
    import numpy as np
    from PIL import Image

    from netcarve.cli.main import _load_for_analysis
    from netcarve.data import SHAPE_CLASSES, make_shapes

    calls: list[tuple[int, int]] = []

    def fake(param: int, value: int) -> int:
        calls.append((param, value))
        return 1

    monkeypatch.setattr(_memory, "_MALLOPT", fake)
    images, labels = make_shapes(8, seed=1)
    for i, (img, lab) in enumerate(zip(images, labels.tolist(), strict=True)):
        folder = tmp_path / SHAPE_CLASSES[lab]
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy())).save(
            folder / f"{i}.png")
    # built-in data in memory, or a folder loaded whole: glibc's default stays
    _load_for_analysis("shapes_cnn", None, None, None, 4, 4, "cpu", 0)
    _load_for_analysis("shapes_cnn", None, None, tmp_path, 4, 4, "cpu", 0)
    assert calls == []
    # a folder streamed through DataLoaders: the threshold is fixed (M_MMAP_THRESHOLD, 16 MB)
    _load_for_analysis("shapes_cnn", None, None, tmp_path, 4, 4, "cpu", 0, workers=0)
    assert calls == [(-3, _memory.MMAP_THRESHOLD)]
