"""``netcarve reproduce subfeatures``: sub-feature circuits of a polysemantic-looking unit.

The circuits paper splits a polysemantic unit's images into groups and carves, from within
the unit's circuit, one sparser circuit per group that preserves the unit on that group only.
This experiment does the same on a bundled model:

1. **Scan.** Candidate units are drawn at random (seeded) from the deeper conv layers. For
   each, the images the unit responds to most (top ``top_images`` of a pool of train images, by
   the maximum of its response map) are taken, the unit's general circuit is extracted from them
   (actgrad), and every image gets a vector of kernel scores over the general circuit. These
   vectors are normalised, projected by PCA and split in two by k-means (as
   :func:`netcarve.circuits.subcircuits.subcircuits` does).
2. **Pick.** The unit whose two groups separate best is chosen: the highest silhouette
   coefficient of the two k-means groups in PCA space, among units whose smaller group holds at
   least ``min_group_share`` of the images (a lopsided split is an outlier, not a sub-feature).
   The class make-up of each group is reported beside it (different classes per group is what
   makes a unit look polysemantic to a person).
3. **Sub-circuits.** For the best units, one sub-circuit per group is extracted from within
   the general circuit; each group's images are split in halves (one scores, the other
   measures), and each sub-circuit's preservation is measured on its own group and on the other
   group (Pearson r and normalised mean absolute difference), with its keep relative to the
   general circuit and to the whole model, and the per-layer IoU of the two sub-circuits. A
   control splits the same images into two random groups of the same sizes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from netcarve.core._csv import write_rows
from netcarve.reproduce.report import (
    Logger,
    Report,
    ReproduceError,
    draw,
    pyplot,
    quiet,
    run_context,
    save_figure,
    start_report,
)

__all__ = ["SubfeatureSettings", "run_subfeatures", "scan_units"]


@dataclass(frozen=True)
class SubfeatureSettings:
    """What the sub-feature experiment runs.

    Attributes:
        model: bundled model name.
        layers: layers candidate units are drawn from.
        units_per_layer: candidates per layer.
        pool_images: train images the top-activating ones are picked from.
        top_images: images kept per unit (its strongest responses).
        heldout_pool: test images the general circuit's held-out images are picked from.
        heldout_images: held-out images (top-activating test images) for the general circuit.
        criterion: saliency criterion.
        keep: keep fraction of the general circuit (of the relevant kernels).
        sub_keep: keep fraction of each sub-circuit (of the general circuit's kernels).
        components: PCA dimensions before k-means.
        min_group_share: the smaller group must hold at least this share of the images.
        detail_units: how many of the best-separated units get sub-circuits.
        batch_size: images per scoring batch.
        random_splits: random splits of the held-out double-difference control.
        bootstrap: bootstrap resamples of its interval.
    """

    model: str = "fmnist_vgg"
    layers: tuple[str, ...] = ("features.7", "features.11", "features.14")
    units_per_layer: int = 8
    pool_images: int = 2000
    top_images: int = 200
    heldout_pool: int = 1000
    heldout_images: int = 100
    criterion: str = "actgrad"
    keep: float = 0.2
    sub_keep: float = 0.5
    components: int = 10
    min_group_share: float = 0.25
    detail_units: int = 3
    batch_size: int = 64
    random_splits: int = 20
    bootstrap: int = 1000

    @classmethod
    def quick(cls) -> SubfeatureSettings:
        """Smoke-test settings: 2 candidates, few images, one detailed unit."""
        return cls(layers=("features.14",), units_per_layer=2, pool_images=300, top_images=40,
                   heldout_pool=200, heldout_images=30, detail_units=1, random_splits=4,
                   bootstrap=100)

    def check(self) -> None:
        """Raise :class:`ReproduceError` for settings that cannot run."""
        from netcarve.criteria import get_criterion
        from netcarve.zoo import ZOO

        if self.model not in ZOO:
            raise ReproduceError(f"unknown model {self.model!r}; bundled: {', '.join(ZOO)}")
        get_criterion(self.criterion)
        if not self.layers:
            raise ReproduceError("give at least one layer to draw candidate units from")
        if self.top_images < 8 or self.top_images > self.pool_images:
            raise ReproduceError("top_images must be at least 8 and at most pool_images")
        if self.heldout_images < 2 or self.heldout_images > self.heldout_pool:
            raise ReproduceError("heldout_images must be at least 2 and at most heldout_pool")
        if not (0 < self.keep <= 1 and 0 < self.sub_keep <= 1):
            raise ReproduceError("keep and sub_keep must lie in (0, 1]")
        if not 0 <= self.min_group_share < 0.5:
            raise ReproduceError("min_group_share must lie in [0, 0.5)")
        if min(self.units_per_layer, self.detail_units, self.components, self.batch_size) < 1:
            raise ReproduceError("units_per_layer, detail_units, components and batch_size "
                                 "must be at least 1")


# --------------------------------------------------------------------------- data


@torch.no_grad()
def _peak_responses(model: torch.nn.Module, layer: str, images: torch.Tensor,
                    batch_size: int = 500) -> torch.Tensor:
    """``float [N, C]``: each channel's largest raw response over positions, per image."""
    from netcarve.core.hooks import forward_until, preserved_state

    out = []
    with preserved_state(model):
        model.eval()
        for start in range(0, len(images), batch_size):
            z = forward_until(model, layer, images[start:start + batch_size])
            out.append(z.flatten(2).amax(2))
    return torch.cat(out)


def _embed(features: torch.Tensor, components: int, seed: int) -> Any:
    """The PCA embedding k-means sees in :func:`netcarve.circuits.subcircuits.find_groups`."""
    import numpy as np
    from sklearn.decomposition import PCA

    x = features.double().numpy()
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = max(1, min(components, x.shape[0] - 1, x.shape[1]))
    return PCA(n_components=k, random_state=seed).fit_transform(x)


def _class_mix(labels: torch.Tensor, names: tuple[str, ...]) -> list[tuple[str, float]]:
    """Classes of a group, most frequent first, with their shares."""
    counts = torch.bincount(labels, minlength=len(names)).double()
    share = counts / counts.sum().clamp(min=1)
    order = torch.argsort(-share, stable=True)
    return [(names[int(i)] if int(i) < len(names) else str(int(i)), float(share[i]))
            for i in order if share[i] > 0]


def _tv_distance(a: torch.Tensor, b: torch.Tensor, n_classes: int) -> float:
    """Total-variation distance between two groups' class distributions (0 same, 1 disjoint)."""
    pa = torch.bincount(a, minlength=n_classes).double()
    pb = torch.bincount(b, minlength=n_classes).double()
    return float(0.5 * (pa / pa.sum().clamp(min=1) - pb / pb.sum().clamp(min=1)).abs().sum())


# --------------------------------------------------------------------------- scan


@dataclass
class Candidate:
    """One scanned unit: its images, general circuit, groups and how well they separate."""

    target: str
    image_index: torch.Tensor
    heldout_index: torch.Tensor
    general: Any
    groups: list[int]
    embedding: Any
    silhouette: float
    min_share: float
    class_separation: float
    mixes: list[list[tuple[str, float]]]
    seconds: float

    def row(self) -> dict[str, Any]:
        """A CSV / JSON row."""
        sizes = [self.groups.count(g) for g in (0, 1)]
        pres = self.general.preservation
        return {"unit": self.target, "silhouette": self.silhouette,
                "group_sizes": sizes, "min_group_share": self.min_share,
                "class_separation": self.class_separation,
                "group0_classes": _mix_text(self.mixes[0]),
                "group1_classes": _mix_text(self.mixes[1]),
                "general_kept_kernels": self.general.kept_kernels,
                "general_relevant_kernels": self.general.relevant_kernels,
                "general_heldout_r": None if pres is None else pres.pearson,
                "seconds": self.seconds}


def _mix_text(mix: list[tuple[str, float]], top: int = 3) -> str:
    return ", ".join(f"{name} {share:.0%}" for name, share in mix[:top])


def scan_units(lm: Any, graph: Any, settings: SubfeatureSettings, seed: int,
               data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               log: Logger) -> list[Candidate]:
    """Scan candidate units: general circuit, per-image scores, 2-means groups, silhouette.

    Args:
        lm: the loaded model.
        graph: its graph.
        settings: the experiment settings.
        seed: seeds the candidate draw, PCA and k-means.
        data: ``(pool images, pool labels, held-out pool images)``, normalised.
        log: progress messages.

    Returns:
        the candidates in scan order.
    """
    from sklearn.metrics import silhouette_score

    from netcarve.circuits.extract import extract
    from netcarve.circuits.subcircuits import find_groups, per_image_scores
    from netcarve.circuits.sweep import pick_units

    pool_x, pool_y, held_x = data
    names = lm.preset.class_names
    targets = pick_units(graph, list(settings.layers), settings.units_per_layer, seed=seed)
    peaks = {layer: _peak_responses(lm.model, layer, pool_x) for layer in settings.layers}
    held_peaks = {layer: _peak_responses(lm.model, layer, held_x) for layer in settings.layers}
    out = []
    for target in targets:
        start = time.perf_counter()
        top = torch.argsort(-peaks[target.layer][:, target.channel],
                            stable=True)[:settings.top_images]
        held = torch.argsort(-held_peaks[target.layer][:, target.channel],
                             stable=True)[:settings.heldout_images]
        general = extract(lm.model, target, pool_x[top], heldout=held_x[held],
                          criterion=settings.criterion, keep=settings.keep,
                          batch_size=settings.batch_size, seed=seed, graph=graph)
        if general.collapsed:
            log(f"{target}: general circuit collapsed; skipped")
            continue
        feats = per_image_scores(lm.model, graph, general.target, pool_x[top], general.masks,
                                 criterion=settings.criterion)
        groups = find_groups(feats, 2, components=settings.components, seed=seed)
        emb = _embed(feats, settings.components, seed)
        labels = torch.tensor(groups)
        sil = float(silhouette_score(emb, groups)) if len(set(groups)) == 2 else 0.0
        sizes = [groups.count(g) for g in (0, 1)]
        ys = pool_y[top]
        out.append(Candidate(
            target=str(general.target), image_index=top, heldout_index=held, general=general,
            groups=groups, embedding=emb, silhouette=sil, min_share=min(sizes) / len(groups),
            class_separation=_tv_distance(ys[labels == 0], ys[labels == 1], len(names)),
            mixes=[_class_mix(ys[labels == g], names) for g in (0, 1)],
            seconds=time.perf_counter() - start))
        log(f"{general.target}: silhouette {sil:.3f}, groups {sizes}, "
            f"{time.perf_counter() - start:.1f} s")
    return out


def rank_candidates(cands: list[Candidate], min_share: float) -> list[Candidate]:
    """Best-separated first: eligible units (smaller group ≥ ``min_share``) by silhouette, then
    the others by silhouette."""
    return sorted(cands, key=lambda c: (c.min_share < min_share, -c.silhouette, c.target))


# --------------------------------------------------------------------------- sub-circuits


def _subcircuit_rows(unit: str, split: str, report: Any) -> list[dict[str, Any]]:
    """One row per (sub-circuit, group it is measured on)."""
    rows = []
    n = len(report.subcircuits)
    kept_general = max(report.general.kept_kernels, 1)
    for i, sc in enumerate(report.subcircuits):
        for j in range(n):
            p = report.preservation[i][j]
            rows.append({"unit": unit, "split": split, "subcircuit": i, "measured_on": j,
                         "own_group": i == j, "images": report.groups.count(i),
                         "kept_kernels": sc.kept_kernels,
                         "keep_vs_general": sc.kept_kernels / kept_general,
                         "keep_vs_model": sc.effective_keep, "collapsed": sc.collapsed,
                         "pearson": p.pearson, "nmad": p.nmad,
                         "heldout_images": p.n_images})
    return rows


def _mean_iou(report: Any) -> float:
    vals = [mat[0][1] for mat in report.iou.values() if len(mat) > 1]
    return sum(vals) / len(vals) if vals else float("nan")


def _own_other(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    own = [r[key] for r in rows if r["own_group"]]
    other = [r[key] for r in rows if not r["own_group"]]
    return sum(own) / len(own), sum(other) / len(other)


# --------------------------------------------------------------------------- figures


def _plot_groups(lm: Any, cand: Candidate, pool_x: torch.Tensor, pool_y: torch.Tensor,
                 peaks: torch.Tensor, path: Path, per_group: int = 8) -> Path:
    """Each group's strongest images (rows), with class names."""
    plt = pyplot()
    names = lm.preset.class_names
    fig, axes = plt.subplots(2, per_group, figsize=(1.25 * per_group, 3.0), squeeze=False)
    mean = torch.tensor(lm.preset.mean).view(-1, 1, 1)
    std = torch.tensor(lm.preset.std).view(-1, 1, 1)
    for g in (0, 1):
        idx = [int(cand.image_index[i]) for i, v in enumerate(cand.groups) if v == g]
        idx = sorted(idx, key=lambda i: -float(peaks[i]))[:per_group]
        for j in range(per_group):
            ax = axes[g][j]
            ax.axis("off")
            if j >= len(idx):
                continue
            img = (pool_x[idx[j]] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1)
            label = int(pool_y[idx[j]])
            ax.set_title(names[label] if label < len(names) else str(label), fontsize=7)
        axes[g][0].text(-0.15, 0.5, f"group {g}", transform=axes[g][0].transAxes,
                        ha="right", va="center", fontsize=9)
    fig.suptitle(f"{cand.target}: strongest images of each group", fontsize=10)
    return save_figure(fig, path)


def _plot_embedding(cand: Candidate, path: Path) -> Path:
    """The first two PCA components of the per-image score vectors, coloured by group."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    emb = cand.embedding
    for g, marker in ((0, "o"), (1, "^")):
        sel = [i for i, v in enumerate(cand.groups) if v == g]
        ys = emb[sel, 1] if emb.shape[1] > 1 else [0.0] * len(sel)
        ax.scatter(emb[sel, 0], ys, s=12, marker=marker, label=f"group {g}", alpha=0.7)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"{cand.target}: silhouette {cand.silhouette:.2f}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _plot_preservation(rows: list[dict[str, Any]], path: Path) -> Path:
    """Own-group vs other-group preservation of every sub-circuit (k-means and random)."""
    plt = pyplot()
    labels, own, other = [], [], []
    for unit in dict.fromkeys(r["unit"] for r in rows):
        for split in ("k-means", "random"):
            for i in (0, 1):
                sel = [r for r in rows if r["unit"] == unit and r["split"] == split
                       and r["subcircuit"] == i]
                if not sel:
                    continue
                labels.append(f"{unit}\n{split} g{i}")
                own.append(next(r["pearson"] for r in sel if r["own_group"]))
                other.append(next(r["pearson"] for r in sel if not r["own_group"]))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1), 3.8))
    xs = torch.arange(len(labels)).float()
    ax.bar(xs - 0.2, own, width=0.4, label="own group")
    ax.bar(xs + 0.2, other, width=0.4, label="other group")
    ax.set_xticks(xs.tolist())
    ax.set_xticklabels(labels, fontsize=6, rotation=45, ha="right")
    ax.set_ylabel("held-out preservation (Pearson r)")
    ax.set_ylim(min(0.0, *own, *other) - 0.05, 1.02)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- run


def run_subfeatures(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    threads: int | None = 1,
    command: str | None = None,
    settings: SubfeatureSettings | None = None,
    log: Logger | None = None,
) -> dict[str, Any]:
    """Scan units for two clear image groups, extract sub-feature circuits, write the report.

    Args:
        out_dir: output folder (created).
        quick: smoke-test settings (:meth:`SubfeatureSettings.quick`).
        seed: seeds the candidate draw, the image pools, PCA, k-means and the halves.
        threads: torch threads.
        command: the command line recorded in the report.
        settings: override the settings entirely (``quick`` is then ignored).
        log: progress messages.

    Returns:
        the summary written to ``summary.json`` (``report``, ``chosen``, ``scan``, ...).

    Raises:
        ReproduceError: bad settings, or every candidate's general circuit collapsed.

    Example:
        >>> run_subfeatures("out/reproduce/subfeatures", quick=True)  # doctest: +SKIP
    """
    from netcarve.circuits.subcircuits import subcircuits
    from netcarve.core.graph import ModelGraph
    from netcarve.zoo import load_model

    settings = settings or (SubfeatureSettings.quick() if quick else SubfeatureSettings())
    settings.check()
    log = log or quiet()
    out, rep = start_report(
        "subfeatures", "Reproduce: sub-feature circuits of a polysemantic-looking unit",
        out_dir, quick=quick, seed=seed, threads=threads, command=command)
    with run_context(seed, threads):
        lm = load_model(settings.model)
        pool_x, pool_y = draw(lm.preset, "train", settings.pool_images, seed)
        pool_x = lm.preset.normalize(pool_x)
        held_x = lm.preset.normalize(draw(lm.preset, "test", settings.heldout_pool, seed)[0])
        graph = ModelGraph.build(lm.model, pool_x[:1])
        cands = scan_units(lm, graph, settings, seed, (pool_x, pool_y, held_x), log)
        if not cands:
            raise ReproduceError("every candidate's general circuit collapsed: raise keep")
        ranked = rank_candidates(cands, settings.min_group_share)
        detail = ranked[:settings.detail_units]
        sub_rows: list[dict[str, Any]] = []
        iou_rows: list[dict[str, Any]] = []
        reports: dict[str, dict[str, Any]] = {}
        for cand in detail:
            images = pool_x[cand.image_index]
            gen = torch.Generator().manual_seed(seed)
            shuffled = [cand.groups[int(i)] for i in torch.randperm(len(cand.groups),
                                                                    generator=gen)]
            for split, groups in (("k-means", cand.groups), ("random", shuffled)):
                res = subcircuits(lm.model, cand.general.target, images, groups=groups,
                                  general=cand.general, criterion=settings.criterion,
                                  keep=settings.keep, sub_keep=settings.sub_keep,
                                  batch_size=settings.batch_size, seed=seed, graph=graph)
                sub_rows += _subcircuit_rows(cand.target, split, res)
                for layer, mat in res.iou.items():
                    iou_rows.append({"unit": cand.target, "split": split, "layer": layer,
                                     "general_kernels": int(cand.general.masks[layer].sum()),
                                     "iou": mat[0][1]})
                reports.setdefault(cand.target, {})[split] = res
            log(f"{cand.target}: sub-circuits done")
    chosen = detail[0]
    peaks = _peak_responses(lm.model, chosen.general.target.layer, pool_x)[
        :, chosen.general.target.channel]
    _plot_groups(lm, chosen, pool_x, pool_y, peaks, out / "groups.png")
    _plot_embedding(chosen, out / "embedding.png")
    _plot_preservation(sub_rows, out / "preservation.png")
    scan = [c.row() for c in ranked]
    write_rows(out / "scan.csv", scan)
    write_rows(out / "subcircuits.csv", sub_rows)
    write_rows(out / "iou.csv", iou_rows)
    headline = _write_report(rep, settings, ranked, detail, sub_rows, iou_rows, reports)
    from netcarve.reproduce.subfeature_dd import double_difference_section

    with run_context(seed, threads):
        headline["double_difference"] = double_difference_section(
            rep, lm, graph, ranked, pool_x, held_x, settings, seed, out, log)
    summary = {"settings": asdict(settings), "chosen": chosen.target, "scan": scan,
               "headline": headline}
    path = rep.write(out, summary)
    return {"report": str(path), **summary}


def _write_report(rep: Report, settings: SubfeatureSettings, ranked: list[Candidate],
                  detail: list[Candidate], sub_rows: list[dict[str, Any]],
                  iou_rows: list[dict[str, Any]], reports: dict[str, dict[str, Any]],
                  ) -> dict[str, Any]:
    chosen = detail[0]
    rep.p("A unit whose strongest images fall into two groups that use different parts of its "
          "circuit is split into one sub-circuit per group, carved from within the unit's "
          "general circuit. A sub-circuit should preserve the unit on its own group better "
          "than on the other group.")
    rep.h2("Setting")
    rep.bullets([
        f"Model {settings.model}; {len(ranked)} candidate units drawn at random (seed) from "
        f"{', '.join(settings.layers)} ({settings.units_per_layer} per layer).",
        f"Images of a unit: its {settings.top_images} strongest of {settings.pool_images} "
        f"random train images (by the maximum of its response map); general circuit: "
        f"{settings.criterion}, keep {settings.keep:g}, held-out preservation on the unit's "
        f"{settings.heldout_images} strongest of {settings.heldout_pool} random test images.",
        "Groups: per-image kernel-score vectors over the general circuit, normalised, PCA to "
        f"{settings.components} dimensions, k-means with 2 groups.",
        "**Choice of unit**: the highest silhouette coefficient of the two groups in PCA space, "
        f"among units whose smaller group holds at least {settings.min_group_share:.0%} of "
        "the images. Class separation = total-variation distance between the two groups' "
        "class distributions (0: same mix, 1: no class in common), shown for reading only.",
        f"Sub-circuits: keep {settings.sub_keep:g} of the general circuit's kernels, scored "
        "on one half of the group's images; preservation measured on the other half of every "
        "group (own group vs other group). Control: the same images split into two random "
        "groups of the same sizes.",
    ])
    rep.h2("Scan: how well each candidate's images separate")
    share = settings.min_group_share
    rep.p(f"Ranked by the choice rule: eligible units (smaller group ≥ {share:.0%}) by "
          "silhouette, then the others.")
    rep.table(["unit", "eligible", "silhouette", "group sizes", "class separation",
               "group 0 classes", "group 1 classes", "general circuit r (held-out)"],
              [[r["unit"], "yes" if r["min_group_share"] >= share else "no",
                r["silhouette"], "/".join(str(s) for s in r["group_sizes"]),
                r["class_separation"], r["group0_classes"], r["group1_classes"],
                r["general_heldout_r"]] for r in (c.row() for c in ranked)])
    gen = chosen.general
    rep.h2(f"Chosen unit: {chosen.target}")
    rep.p(f"Silhouette {chosen.silhouette:.3f}; groups of "
          f"{chosen.groups.count(0)} and {chosen.groups.count(1)} images "
          f"(group 0: {_mix_text(chosen.mixes[0])}; group 1: {_mix_text(chosen.mixes[1])}). "
          f"General circuit: {gen.kept_kernels:,} of {gen.relevant_kernels:,} relevant kernels "
          f"(effective keep {gen.effective_keep:.3f}), held-out r = "
          f"{gen.preservation.pearson:.3f}.")
    rep.image("groups.png", "strongest images of each group")
    rep.image("embedding.png", "PCA of per-image kernel scores")
    headline: dict[str, Any] = {"unit": chosen.target, "silhouette": chosen.silhouette}
    for cand in detail:
        rep.h3(f"{cand.target}: sub-circuits")
        rows = []
        for split in ("k-means", "random"):
            for r in sub_rows:
                if r["unit"] != cand.target or r["split"] != split or not r["own_group"]:
                    continue
                other = next(o for o in sub_rows if o["unit"] == cand.target
                             and o["split"] == split and o["subcircuit"] == r["subcircuit"]
                             and not o["own_group"])
                rows.append([split, f"group {r['subcircuit']}", r["images"],
                             f"{r['kept_kernels']:,}", r["keep_vs_general"], r["keep_vs_model"],
                             r["pearson"], other["pearson"], r["nmad"], other["nmad"]])
        rep.table(["groups", "sub-circuit", "images", "kernels", "keep vs general",
                   "keep vs model", "own-group r", "other-group r", "own-group NMAD",
                   "other-group NMAD"], rows)
        for split in ("k-means", "random"):
            sel = [r for r in sub_rows if r["unit"] == cand.target and r["split"] == split]
            own_r, other_r = _own_other(sel, "pearson")
            own_n, other_n = _own_other(sel, "nmad")
            iou = _mean_iou(reports[cand.target][split])
            rep.p(f"{split} groups: mean own-group r {own_r:.3f} vs other-group r "
                  f"{other_r:.3f}; NMAD {own_n:.3f} vs {other_n:.3f}; mean per-layer IoU of "
                  f"the two sub-circuits {iou:.2f}.")
            if cand is chosen:
                headline[split] = {"own_r": own_r, "other_r": other_r, "own_nmad": own_n,
                                   "other_nmad": other_n, "mean_iou": iou}
    wins = {}
    for split in ("k-means", "random"):
        own = [r for r in sub_rows if r["split"] == split and r["own_group"]]
        wins[split] = sum(
            r["pearson"] > next(o["pearson"] for o in sub_rows if o["unit"] == r["unit"]
                                and o["split"] == split and o["subcircuit"] == r["subcircuit"]
                                and not o["own_group"])
            for r in own)
        headline[f"own_beats_other_{split}"] = [wins[split], len(own)]
    n_sub = headline["own_beats_other_k-means"][1]
    rep.p(f"Over the {len(detail)} detailed unit(s): own-group r exceeds other-group r for "
          f"{wins['k-means']} of {n_sub} sub-circuits with k-means groups, and for "
          f"{wins['random']} of {headline['own_beats_other_random'][1]} with random groups.")
    rep.h3(f"Per-layer IoU of the two sub-circuits of {chosen.target}")
    layers = list(dict.fromkeys(r["layer"] for r in iou_rows if r["unit"] == chosen.target))
    look = {(r["split"], r["layer"]): r for r in iou_rows if r["unit"] == chosen.target}
    rep.table(["layer", "kernels in general circuit", "IoU (k-means groups)",
               "IoU (random groups)"],
              [[layer, look[("k-means", layer)]["general_kernels"],
                look[("k-means", layer)]["iou"], look[("random", layer)]["iou"]]
               for layer in layers], digits=2)
    rep.image("preservation.png", "own-group vs other-group preservation")
    rep.h2("Files")
    rep.bullets(["`scan.csv`: every candidate unit (silhouette, groups, classes)",
                 "`subcircuits.csv`: one row per sub-circuit × group measured on",
                 "`iou.csv`: per-layer IoU of the two sub-circuits",
                 "`groups.png`, `embedding.png`, `preservation.png`"])
    return headline
