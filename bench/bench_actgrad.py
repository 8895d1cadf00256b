"""Speed and memory of kernel-level ``actgrad`` against one plain forward + backward.

For each model, three methods run on the same images, each in its own fresh subprocess:

* ``plain``: forward to the target layer (later layers do not run), ``L`` (Σ|z_t|), and
  ``L.backward()`` (weight and input gradients), the cost of one ordinary training step;
* ``actgrad``: :meth:`netcarve.criteria.ActGrad.kernel_scores` on every relevant layer;
* ``naive``: the obvious implementation for context: gradients of every layer output in one
  ``autograd.grad`` call, then per layer ``unfold`` + ``einsum`` into per-kernel maps (chunked
  over output channels to bound memory), ``× g``, ``|·|``, mean.

Each method runs ``--rounds`` times, each time in a fresh subprocess, methods alternating
(plain, actgrad, naive, plain, ...) so that a change in machine load hits all of them alike.
Reported time is the best round, as wall-clock seconds (``time.perf_counter``) and as CPU
seconds of the process (``time.process_time``; with one thread this excludes the time the
process waited for a core on a shared machine); the wall-clock ratio of each round (plain and
actgrad run back to back) is printed too. Peak memory is the growth of the process's
maximum resident set size (``ru_maxrss``) over its value after the model and images were
built (best round).

Models: ``vgg16`` (torchvision-shaped VGG16 ``features``, random weights, target
``features.28:7``, the last conv of the last block), ``fmnist_vgg`` (the bundled trained
weights, 28×28 greyscale, target ``features.14:7``, the last conv).

Usage::

    python bench/bench_actgrad.py                       # both models, default sizes
    python bench/bench_actgrad.py --model vgg16 --images 8 --size 112
    python bench/bench_actgrad.py --model fmnist_vgg --images 256 --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULTS = {"vgg16": (32, 224), "fmnist_vgg": (256, 28)}
TARGETS = {"vgg16": "features.28:7", "fmnist_vgg": "features.14:7"}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _build(model_name: str, images: int, size: int):  # -> (model, x, graph, target)
    import torch

    from netcarve.core.graph import ModelGraph
    from netcarve.core.targets import Target

    torch.manual_seed(0)
    if model_name == "vgg16":
        from netcarve.zoo.torchvision_models import vgg16

        model = vgg16()
        channels = 3
    else:
        from netcarve.zoo import load_model

        model = load_model("fmnist_vgg").model
        channels = 1
    model.eval()
    x = torch.randn(images, channels, size, size)
    graph = ModelGraph.build(model, x[:1])
    target = Target.parse(TARGETS[model_name]).resolve(graph)
    return model, x, graph, target


def _plain(model, x, graph, target) -> None:
    from netcarve.core.hooks import forward_until

    z = forward_until(model, target.layer, x)
    target.objective_value(target.response(z)).backward()
    for p in model.parameters():
        p.grad = None


def _actgrad(model, x, graph, target) -> None:
    from netcarve.criteria import ScoringContext, get_criterion

    relevant = graph.relevant_kernels(target.layer, target.channels)
    ctx = ScoringContext(model, graph, target, lambda: iter([x]), layers=list(relevant),
                         relevant=relevant)
    get_criterion("actgrad").kernel_scores(ctx)


def _naive(model, x, graph, target) -> None:
    """unfold + einsum, chunked over output channels (context only; conv2d layers)."""
    import torch
    import torch.nn.functional as F

    from netcarve.core.hooks import forward_until

    relevant = graph.relevant_kernels(target.layer, target.channels)
    modules = dict(model.named_modules())
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def make(name: str):
        def hook(module, args, out):
            store[name] = (args[0].detach().clone(), out)
            return out.clone()  # later in-place ReLUs must not touch `out`

        return hook

    handles = [modules[n].register_forward_hook(make(n)) for n in relevant]
    try:
        z = forward_until(model, target.layer, x)
    finally:
        for h in handles:
            h.remove()
    loss = target.objective_value(target.response(z))
    names = list(relevant)
    grads = torch.autograd.grad(loss, [store[n][1] for n in names])
    with torch.no_grad():
        for name, g in zip(names, grads, strict=True):
            xin = store.pop(name)[0]
            m = modules[name]
            w = m.weight
            o_all, c_in = w.shape[0], w.shape[1]
            taps = w.shape[2] * w.shape[3]
            cols = F.unfold(xin, w.shape[2:], m.dilation, m.padding, m.stride)
            cols = cols.view(xin.shape[0], c_in, taps, -1)
            gv = g.reshape(g.shape[0], o_all, -1)
            chunk = max(1, (64 << 20) // max(1, xin.shape[0] * c_in * cols.shape[-1]))
            for o0 in range(0, o_all, chunk):
                wv = w[o0:o0 + chunk].reshape(-1, c_in, taps)
                a = torch.einsum("oit,nitp->noip", wv, cols)
                (a * gv[:, o0:o0 + chunk, None]).abs_().mean(dim=(0, 3))


METHODS = {"plain": _plain, "actgrad": _actgrad, "naive": _naive}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model, x, graph, target = _build(args.model, args.images, args.size)
    fn = METHODS[args.method]
    base = _maxrss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    fn(model, x, graph, target)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"seconds": wall, "cpu": cpu, "peak_mb": _maxrss_mb() - base,
                      "base_mb": base}))


def run_one(model: str, method: str, images: int, size: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model,
           "--method", method, "--images", str(images), "--size", str(size),
           "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{model}/{method} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of(model: str, methods: list[str], images: int, size: int, threads: int,
            rounds: int) -> tuple[dict[str, dict], list[float]]:
    """Alternate the methods for ``rounds`` rounds; keep each method's best values.

    Also returns the paired wall-clock ratio actgrad / plain of every round (both measured
    back to back, so under similar machine load).
    """
    best: dict[str, dict] = {}
    paired: list[float] = []
    for _ in range(rounds):
        this: dict[str, dict] = {}
        for m in methods:
            r = this[m] = run_one(model, m, images, size, threads)
            if m not in best:
                best[m] = r
            else:
                best[m] = {k: min(best[m][k], r[k]) for k in r}
        if "plain" in this and "actgrad" in this:
            paired.append(this["actgrad"]["seconds"] / this["plain"]["seconds"])
    return best, paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["vgg16", "fmnist_vgg", "all"], default="all")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default="plain,actgrad,naive")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="plain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    if args.worker:
        worker(args)
        return
    models = ["vgg16", "fmnist_vgg"] if args.model == "all" else [args.model]
    methods = args.methods.split(",")
    print(f"torch threads: {args.threads}; rounds: {args.rounds} (best of); "
          "s = wall seconds, cpu = process CPU seconds, MB = peak RSS growth")
    print(f"{'model':<11} {'images':>9} {'plain s':>8} {'actgrad s':>9} {'ratio':>6} "
          f"{'plain cpu':>9} {'act cpu':>8} {'cpu ratio':>9} {'naive ratio':>11} "
          f"{'plain MB':>8} {'act MB':>7} {'mem ratio':>9}")
    nan = math.nan
    for model in models:
        images, size = DEFAULTS[model]
        images = args.images or images
        size = args.size or size
        res, paired = best_of(model, methods, images, size, args.threads, args.rounds)
        plain = res["plain"]
        act = res.get("actgrad", {"seconds": nan, "cpu": nan, "peak_mb": nan})
        naive = res.get("naive", {"seconds": nan})
        print(f"{model:<11} {f'{images}x{size}²':>9} {plain['seconds']:>8.2f} "
              f"{act['seconds']:>9.2f} {act['seconds'] / plain['seconds']:>6.2f} "
              f"{plain['cpu']:>9.2f} {act['cpu']:>8.2f} {act['cpu'] / plain['cpu']:>9.2f} "
              f"{naive['seconds'] / plain['seconds']:>11.2f} {plain['peak_mb']:>8.0f} "
              f"{act['peak_mb']:>7.0f} {act['peak_mb'] / max(plain['peak_mb'], 1e-9):>9.2f}",
              flush=True)
        if paired:
            print(f"{'':<11} paired wall ratio per round: "
                  + ", ".join(f"{r:.2f}" for r in paired), flush=True)


if __name__ == "__main__":
    main()
