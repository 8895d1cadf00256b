"""Atlas throughput: one layer mapped with 1 and with 2 Ray workers, side by side.

Maps every unit of ``--layer`` (default fmnist_vgg ``features.11``, 128 units) into a fresh
folder once per worker count, checks that both runs chose the same keep for every unit, and
prints units/minute, the speed-up and the measured per-unit cost (the unit's own compute
time inside its task, one thread), which is what an extrapolation to bigger models and more
workers starts from.

    PYTHONPATH=$PWD python bench/bench_atlas.py [--layer features.11] [--units all]
        [--workers 1,2] [--images 300] [--heldout 300] [--root /tmp/netcarve_atlas_bench]

Same settings as ``netcarve atlas`` by default (goal r >= 0.9 held-out, actgrad, comparison
with snip/magnitude/random at 0.5x/1x/2x the keep, 64 visualisation steps, class-wise CAR
on 500 test images).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from netcarve.atlas import AtlasConfig, AtlasStore, run_atlas
from netcarve.training.evaluation import analysis_data, reference_data
from netcarve.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist_vgg")
    ap.add_argument("--layer", default="features.11")
    ap.add_argument("--units", default="all")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--car-images", type=int, default=500)
    ap.add_argument("--root", type=Path, default=Path("/tmp/netcarve_atlas_bench"))
    args = ap.parse_args()
    lm = load_model(args.model)
    s, h = analysis_data(lm.preset, args.images, args.heldout)
    x, y = reference_data(lm.preset, "test", args.car_images)
    results = {}
    keeps = {}
    for w in (int(v) for v in args.workers.split(",")):
        out = args.root / f"workers{w}"
        shutil.rmtree(out, ignore_errors=True)
        run = run_atlas(lm.model, args.layer, out, s, h, units=args.units, config=AtlasConfig(),
                        car_images=x, car_labels=y, preset=lm.preset, model_name=lm.name,
                        workers=w, progress=False)
        assert not run.failed, run.failed
        keeps[w] = {r["unit"]: r["keep"] for r in AtlasStore(out).rows()}
        results[w] = {"units": run.mapped, "seconds": round(run.seconds, 1),
                      "units_per_minute": round(run.units_per_minute, 2),
                      "mean_unit_seconds": round(statistics.mean(run.unit_seconds), 2),
                      "median_unit_seconds": round(statistics.median(run.unit_seconds), 2)}
        print(json.dumps({"workers": w, **results[w]}), flush=True)
    base = min(results)
    ws = sorted(results)
    same = all(keeps[w] == keeps[base] for w in ws)
    print(f"\n{args.model} {args.layer}, {results[base]['units']} units, "
          f"{args.images}+{args.heldout} images, same keep chosen for every unit in every "
          f"run: {same}")
    print("| workers | wall s | units/minute | speed-up | mean s/unit (in task) |")
    print("|---|---|---|---|---|")
    for w in ws:
        r = results[w]
        speed = r["units_per_minute"] / results[base]["units_per_minute"]
        print(f"| {w} | {r['seconds']} | {r['units_per_minute']} | {speed:.2f}x | "
              f"{r['mean_unit_seconds']} |")
    du = sum(f.stat().st_size for f in (args.root / f"workers{base}").rglob("*") if f.is_file())
    print(f"\natlas folder: {du / 1e6:.1f} MB ({du / 1e6 / max(1, results[base]['units']):.2f}"
          " MB per unit)")


if __name__ == "__main__":
    main()
