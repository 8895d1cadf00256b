"""CAR speed: the ablation engine vs the naive loop, and exact vs lazy vs racing greedy.

Run: .venv/bin/python bench/bench_car.py [--part speed|greedy|memo|profile|all] [--threads 1]
         [--layers features.7,features.11,features.14] [--repeats 1]
         [--greedy-layers features.4,features.7] [--greedy-images 2000] [--greedy-removals 8]

(1) speed: CAR of every filter of fmnist_vgg conv layers on 2,000 images (the first 2,000 of
    the train split), batch size 100 for all three: the engine with the linear shortcut (the
    default), the engine without it, the engine in plain NCHW layout (``channels_last=False``),
    the naive loop (one full forward pass per removal and chunk, masks applied by hooks) and
    the naive loop on a channels-last copy of the model and images (what the engine's layout
    alone would give a naive loop), timed one after the other in one process (--repeats, best
    time kept). Agreement is the engine's contract (``compare_stats``: loss sums to relative
    1e-5 in float32, top-1/top-5/class counts equal up to the naive loop's near-ties). One
    intra-op thread by default: on a shared machine two threads made timings swing by 10x.
(2) greedy: exact, lazy and racing greedy pruning of --greedy-removals filters of each
    --greedy-layers layer on the first --greedy-images train images (one engine per run):
    seconds, (removal, image) evaluations, racing's saved fraction and eliminations, and how
    often the lazy/racing choice differed from exact's at the same step.
(3) memo (not in ``all``): what the default ``netcarve car fmnist_vgg --prune 0.5`` spends
    before its curves -- CAR scores of the 5 conv layers, then lazy greedy pruning of half of
    each layer's filters, on the first --memo-images train images -- with the engine's logits
    memo (``memo_mb=64``, the default) and without it (``memo_mb=0``), alternating for
    --repeats rounds in one process: seconds, items reused, and whether both chose the same
    filters.
(4) profile (not in ``all``): the torch profiler over one engine evaluation of every single
    removal of each --layers layer on --profile-images images: the share of the engine's CPU
    time spent in each convolution, by input shape (what bounds the speed-up).
Prints Markdown and writes bench/out/bench_car*.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from netcarve.car.engine import AblationEngine
from netcarve.car.greedy import greedy_prune, order_agreement
from netcarve.car.naive import ablate_naive, single_removals
from netcarve.car.stats import compare_stats
from netcarve.training.evaluation import reference_data
from netcarve.zoo import load_model


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def speed(layers: list[str], n_images: int, batch_size: int, repeats: int) -> list[dict]:
    lm = load_model("fmnist_vgg")
    x, y = reference_data(lm.preset, "train", n_images)
    x = lm.preset.normalize(x)
    model_cl = copy.deepcopy(lm.model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    rows = []
    for layer in layers:
        c = lm.model.get_submodule(layer).out_channels
        cand = single_removals(c)
        best: dict[str, tuple[float, float]] = {}
        stats = {}
        for _ in range(repeats):
            runs = {
                "engine": lambda lay=layer, cd=cand: AblationEngine(
                    lm.model, x, y, batch_size=batch_size, cache_mb=0).evaluate(lay, cd),
                "no_shortcut": lambda lay=layer, cd=cand: AblationEngine(
                    lm.model, x, y, batch_size=batch_size, cache_mb=0,
                    linear_shortcut=False).evaluate(lay, cd),
                "nchw": lambda lay=layer, cd=cand: AblationEngine(
                    lm.model, x, y, batch_size=batch_size, cache_mb=0,
                    channels_last=False).evaluate(lay, cd),
                "naive": lambda lay=layer, cd=cand: ablate_naive(
                    lm.model, lay, cd, x, y, batch_size=batch_size),
                "naive_cl": lambda lay=layer, cd=cand: ablate_naive(
                    model_cl, lay, cd, x_cl, y, batch_size=batch_size),
            }
            for name, fn in runs.items():
                stats[name], wall, cpu = _timed(fn)
                old = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(old[0], wall), min(old[1], cpu))
            print(f"  {layer}: " + ", ".join(f"{k} {w:.1f} s ({c_:.1f} s CPU)"
                                            for k, (w, c_) in best.items()), flush=True)
        agree = compare_stats(stats["engine"], stats["naive"])
        agree_ns = compare_stats(stats["no_shortcut"], stats["naive"])
        p = stats["engine"].counts.to_dict()
        rows.append({"layer": layer, "filters": c, "images": n_images, "batch_size": batch_size,
                     **{f"{k}_s": w for k, (w, _) in best.items()},
                     **{f"{k}_cpu_s": c_ for k, (_, c_) in best.items()},
                     "speedup": best["naive"][0] / best["engine"][0],
                     "cpu_speedup": best["naive"][1] / best["engine"][1],
                     "no_shortcut_speedup": best["naive"][0] / best["no_shortcut"][0],
                     "nchw_speedup": best["naive"][0] / best["nchw"][0],
                     "vs_naive_cl": best["naive_cl"][0] / best["engine"][0],
                     "nchw_agree": compare_stats(stats["nchw"], stats["naive"]).ok,
                     "naive_cl_agree": compare_stats(stats["naive_cl"], stats["naive"]).ok,
                     "agree": agree.ok, "agreement": agree.describe(),
                     "no_shortcut_agree": agree_ns.ok, "max_loss_error": agree.max_loss_error,
                     "decision_changes": agree.decision_changes, "near_ties": agree.near_ties,
                     "engine_passes": p, "naive_passes": stats["naive"].counts.full_passes,
                     "base_accuracy": stats["engine"].base_metric("top1")})
        print("  " + json.dumps(rows[-1]), flush=True)
    return rows


def greedy(layer: str, n_images: int, batch_size: int, removals: int) -> dict:
    lm = load_model("fmnist_vgg")
    x, y = reference_data(lm.preset, "train", n_images)
    x = lm.preset.normalize(x)
    out, runs = {}, {}
    for mode in ("exact", "lazy", "racing"):
        engine = AblationEngine(lm.model, x, y, batch_size=batch_size)
        res = greedy_prune(lm.model, x, y, layer, amount=removals, mode=mode, engine=engine)
        runs[mode] = res
        out[mode] = {"seconds": res.seconds, "evaluations": res.evaluations,
                     "image_evaluations": res.image_evaluations,
                     "saved_fraction": res.saved_fraction, "eliminated": res.eliminated,
                     "accuracy_after": res.steps[-1].accuracy,
                     "order": [f for _, f in res.order]}
        if mode != "exact":
            ex = runs["exact"].order
            out[mode]["differs_at_steps"] = [i for i, (a, b) in enumerate(
                zip(res.order, ex, strict=True)) if a != b]
            out[mode].update(order_agreement(ex, res.order))
        print(f"  {layer} {mode}: {json.dumps(out[mode])}", flush=True)
    return {"layer": layer, "images": n_images, "removals": removals,
            "base_accuracy": runs["exact"].base_accuracy,
            "exact_image_evaluations": runs["exact"].exact_image_evaluations, **out}


def memo(n_images: int, batch_size: int, repeats: int) -> dict:
    from netcarve.car.scores import car_scores

    lm = load_model("fmnist_vgg")
    x, y = reference_data(lm.preset, "train", n_images)
    names = ["features.0", "features.4", "features.7", "features.11", "features.14"]
    best: dict[str, dict] = {}
    for r in range(repeats):
        for memo_mb in (64.0, 0.0):
            engine = AblationEngine(lm.model, x, y, preset=lm.preset, batch_size=batch_size,
                                    memo_mb=memo_mb)
            t = time.perf_counter()
            scores = car_scores(lm.model, x, y, names, preset=lm.preset, engine=engine)
            res = greedy_prune(lm.model, x, y, names, amount=0.5, mode="lazy",
                               preset=lm.preset, engine=engine)
            row = {"seconds": time.perf_counter() - t, "scores_s": scores.seconds,
                   "greedy_s": res.seconds, "reused_items": engine.counts.reused_items,
                   "suffix_items": engine.counts.suffix_items, "order": res.order}
            print(f"  round {r + 1} memo_mb={memo_mb:g}: {row['seconds']:.1f} s (scores "
                  f"{row['scores_s']:.1f}, greedy {row['greedy_s']:.1f}), reused "
                  f"{row['reused_items']:,} items", flush=True)
            key = f"memo_mb={memo_mb:g}"
            if key not in best or row["seconds"] < best[key]["seconds"]:
                best[key] = row
    with_, without = best["memo_mb=64"], best["memo_mb=0"]
    return {"images": n_images, "with": {k: v for k, v in with_.items() if k != "order"},
            "without": {k: v for k, v in without.items() if k != "order"},
            "same_order": with_["order"] == without["order"],
            "speedup": without["seconds"] / with_["seconds"]}


def profile(layer: str, n_images: int, batch_size: int) -> list[dict]:
    lm = load_model("fmnist_vgg")
    x, y = reference_data(lm.preset, "train", n_images)
    engine = AblationEngine(lm.model, lm.preset.normalize(x), y, batch_size=batch_size,
                            cache_mb=0)
    cand = single_removals(lm.model.get_submodule(layer).out_channels)
    engine.evaluate(layer, cand)  # warm up (plan, shortcut check)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        engine.evaluate(layer, cand)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    kernels = ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward")
    convs = [e for e in events if e.key in kernels and e.self_cpu_time_total > 0]
    return sorted(({"input_shapes": str(e.input_shapes[:2]), "calls": e.count,
                    "share": e.self_cpu_time_total / total} for e in convs),
                  key=lambda r: -r["share"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["speed", "greedy", "memo", "profile", "all"], default="all")
    ap.add_argument("--profile-images", type=int, default=500)
    ap.add_argument("--layers", default="features.7,features.11,features.14")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--greedy-layers", default="features.4,features.7")
    ap.add_argument("--greedy-images", type=int, default=2000)
    ap.add_argument("--greedy-removals", type=int, default=8)
    ap.add_argument("--memo-images", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"torch": torch.__version__, "threads": args.threads,
                    "machine": platform.processor() or platform.machine()}
    if args.part in ("speed", "all"):
        print(f"## CAR scores: engine vs naive loop ({args.images} images, batch "
              f"{args.batch_size}, {args.threads} thread(s))")
        result["speed"] = speed([s for s in args.layers.split(",") if s], args.images,
                                args.batch_size, args.repeats)
        print("| layer | filters | engine (s) | no shortcut (s) | NCHW engine (s) | naive (s) | "
              "naive channels-last (s) | speed-up (no shortcut, NCHW engine) | vs naive "
              "channels-last | CPU-time speed-up | agreement | items shortcut / skipped / run |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in result["speed"]:
            p = r["engine_passes"]
            print(f"| {r['layer']} | {r['filters']} | {r['engine_s']:.1f} | "
                  f"{r['no_shortcut_s']:.1f} | {r['nchw_s']:.1f} | {r['naive_s']:.1f} | "
                  f"{r['naive_cl_s']:.1f} | **{r['speedup']:.1f}×** "
                  f"({r['no_shortcut_speedup']:.1f}×, {r['nchw_speedup']:.1f}×) | "
                  f"{r['vs_naive_cl']:.1f}× | {r['cpu_speedup']:.1f}× | "
                  f"{r['agreement'].splitlines()[0]} | {p.get('shortcut_items', 0):,} / "
                  f"{p['skipped_items']:,} / {p['suffix_items']:,} |")
    if args.part in ("greedy", "all"):
        result["greedy"] = []
        for layer in [s for s in args.greedy_layers.split(",") if s]:
            print(f"## Exact vs lazy vs racing greedy: {args.greedy_removals} removals of "
                  f"{layer} ({args.greedy_images} images)")
            g = greedy(layer, args.greedy_images, args.batch_size, args.greedy_removals)
            result["greedy"].append(g)
            print("| mode | seconds | (removal, image) evaluations | saved vs exact | "
                  "eliminated | steps differing from exact | accuracy after |")
            print("|---|---|---|---|---|---|---|")
            for mode in ("exact", "lazy", "racing"):
                r = g[mode]
                diff = r.get("differs_at_steps")
                print(f"| {mode} | {r['seconds']:.1f} | {r['image_evaluations']:,} | "
                      f"{1 - r['image_evaluations'] / g['exact_image_evaluations']:.1%} | "
                      f"{r['eliminated']} | "
                      f"{'—' if diff is None else f'{len(diff)} of {args.greedy_removals}'} | "
                      f"{r['accuracy_after']:.4f} |")
    if args.part == "memo":
        print(f"## CAR scores + lazy greedy (half of every conv layer, {args.memo_images} "
              f"images, {args.threads} thread(s)): logits memo on vs off, best of "
              f"{args.repeats}")
        m = memo(args.memo_images, args.batch_size, args.repeats)
        result["memo"] = m
        print("| memo | seconds | CAR scores (s) | greedy (s) | items reused | suffix items run |")
        print("|---|---|---|---|---|---|")
        for label, r in (("on (64 MiB)", m["with"]), ("off", m["without"])):
            print(f"| {label} | {r['seconds']:.1f} | {r['scores_s']:.1f} | {r['greedy_s']:.1f} "
                  f"| {r['reused_items']:,} | {r['suffix_items']:,} |")
        print(f"speed-up {m['speedup']:.2f}×; same greedy order: {m['same_order']}")
    if args.part == "profile":
        result["profile"] = {}
        for layer in [s for s in args.layers.split(",") if s]:
            rows = profile(layer, args.profile_images, args.batch_size)
            result["profile"][layer] = rows
            print(f"## Engine CPU time by convolution: {layer} ({args.profile_images} images)")
            print("| conv input, weight shapes | calls | share of engine CPU time |")
            print("|---|---|---|")
            for r in rows:
                print(f"| {r['input_shapes']} | {r['calls']} | {r['share']:.1%} |")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    name = "bench_car.json" if args.part == "all" else f"bench_car_{args.part}.json"
    (out / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
