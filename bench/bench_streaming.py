"""Peak memory of the CLI on an image folder of 1,000 vs 20,000 images (streamed, flat).

Writes two class-per-folder trees of shapes images (64×64 PNGs, the shapes data set's
generator, one seed per block of 1,000), then runs each command in a fresh process on both
and prints the peak resident memory of the largest process (the command or one of its
decoding workers: ``ru_maxrss`` of the children, measured by a wrapper process) and the
difference. Every image of the folder is used: ``--images N/2 --heldout N/2`` for
``extract``, all of them for ``evaluate``, and for ``car`` ``--images 500`` (the scoring
set, decoded into memory: greedy CAR re-evaluates it for every removal) with
``--eval-images N-500`` streamed for the accuracies and the curves.

    PYTHONPATH=$PWD python bench/bench_streaming.py [--sizes 1000,20000] [--workers 2]
        [--commands extract,evaluate,car] [--root /tmp/netcarve_stream_bench]

Target (issue 13): the two peaks differ by less than 100 MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from netcarve.data import SHAPE_CLASSES, make_shapes

_BLOCK = 1000
_CAR_SCORING = 500  # greedy CAR re-evaluates its scoring images for every removal
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def write_shapes_folder(root: Path, n: int, *, size: int = 64, seed: int = 0) -> Path:
    """``root/<shape>/<index>.png`` for ``n`` shapes images (skipped when already complete)."""
    done = root / ".complete"
    if done.exists() and done.read_text() == str(n):
        return root
    for name in SHAPE_CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for block, start in enumerate(range(0, n, _BLOCK)):
        images, labels = make_shapes(min(_BLOCK, n - start), seed=seed + block, size=size)
        pixels = images.permute(0, 2, 3, 1).numpy()
        for i, (array, label) in enumerate(zip(pixels, labels.tolist(), strict=True)):
            Image.fromarray(np.ascontiguousarray(array)).save(
                root / SHAPE_CLASSES[label] / f"{start + i:06d}.png", compress_level=1)
    done.write_text(str(n))
    return root


def _command(name: str, folder: Path, n: int, workers: int, out: Path) -> list[str]:
    base = [sys.executable, "-c", "from netcarve.cli import main; main()"]
    common = ["--images-dir", str(folder), "--workers", str(workers), "--device", "cpu"]
    if name == "extract":
        return [*base, "extract", "shapes_cnn", "features.4:3", "--images", str(n // 2),
                "--heldout", str(n // 2), "--keep", "0.2", "--batch-size", "256",
                "--out", str(out), *common]
    if name == "evaluate":
        return [*base, "evaluate", "shapes_cnn", "--batch-size", "256", *common]
    if name == "car":  # the scoring set is the method's (in memory); the rest is streamed
        return [*base, "car", "shapes_cnn", "--layers", "features.4", "--prune", "4",
                "--images", str(_CAR_SCORING), "--eval-images", str(n - _CAR_SCORING),
                "--batch-size", "256", "--curve-points", "3", "--out", str(out), *common]
    raise SystemExit(f"unknown command {name!r}")


def _peak_mb(cmd: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True,
                            text=True, check=True)
    rc, kb = (int(v) for v in result.stdout.split())
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {rc}:\n{result.stderr}")
    return kb / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,20000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--commands", default="extract,evaluate")
    parser.add_argument("--root", type=Path, default=Path("/tmp/netcarve_stream_bench"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        start = time.perf_counter()
        write_shapes_folder(args.root / f"shapes_{n}", n)
        print(f"folder of {n:,} images ready ({time.perf_counter() - start:.0f} s)", flush=True)
    for name in args.commands.split(","):
        peaks = {}
        for n in sizes:
            cmd = _command(name, args.root / f"shapes_{n}", n, args.workers,
                           args.root / f"out_{name}_{n}")
            peak, seconds = _peak_mb(cmd)
            peaks[n] = peak
            rows.append({"command": name, "images": n, "peak_rss_mb": round(peak, 1),
                         "seconds": round(seconds, 1)})
            print(f"{name:<9} {n:>7,} images: peak RSS {peak:7.1f} MB  ({seconds:.0f} s)",
                  flush=True)
        lo, hi = min(sizes), max(sizes)
        diff = peaks[hi] - peaks[lo]
        verdict = "OK" if diff < 100 else "OVER the 100 MB target"
        print(f"{name:<9} peak RSS difference {hi:,} vs {lo:,} images: {diff:+.1f} MB "
              f"({verdict})", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
