"""The held-out sub-feature test of ``reproduce subfeatures``: for every scanned unit and both
groupings, the double difference of its sub-circuits on held-out images against random
splits (:func:`netcarve.circuits.subfeature_stats.subfeature_statistic`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from netcarve.circuits.subfeature_stats import GROUPINGS, subfeature_statistic
from netcarve.core._csv import write_rows
from netcarve.reproduce.report import Logger, Report

__all__ = ["double_difference_section"]


def _fmt(v: float) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:+.3f}"


def double_difference_section(rep: Report, lm: Any, graph: Any, cands: list[Any],
                              pool_x: torch.Tensor, held_x: torch.Tensor, settings: Any,
                              seed: int, out: Path, log: Logger) -> dict[str, Any]:
    """Run the test on every candidate, write ``double_difference.csv`` and the report part.

    Returns:
        the headline: per grouping, units tested, units with DD above every random split and
        with the bootstrap interval above 0, and the median DD against the median random DD.
    """
    rows = []
    for cand in cands:
        for grouping in GROUPINGS:
            st = subfeature_statistic(
                lm.model, cand.general.target, pool_x[cand.image_index],
                held_x[cand.heldout_index], cand.general, grouping=grouping,
                sub_keep=settings.sub_keep, criterion=settings.criterion,
                components=settings.components, bootstrap=settings.bootstrap,
                random_splits=settings.random_splits, seed=seed, graph=graph)
            rows.append(st.row())
            log(f"{cand.target} [{grouping}]: DD {st.double_difference:+.3f} "
                f"[{st.ci[0]:+.3f}, {st.ci[1]:+.3f}], random {st.random_mean:+.3f}, "
                f"p = {st.p_value:.3f}")
    write_rows(out / "double_difference.csv", rows)
    rep.h2("Do the sub-features hold on held-out images? (double difference vs random splits)")
    rep.p("For every scanned unit: groups fitted (normalised vectors, PCA, 2-means) on the "
          "unit's scoring images, then the fitted PCA and k-means assign its held-out test "
          "images (no re-clustering); one sub-circuit per group from the group's scoring "
          f"images (keep {settings.sub_keep:g} of the general circuit). DD = mean over "
          "sub-circuits of own-group minus other-group held-out r; 95% bootstrap interval "
          "over held-out images; control: "
          f"{settings.random_splits} random splits of the same sizes. Groupings: kernel-score "
          "vectors (`scores`) and the unit's response map (`responses`).")
    rep.table(["unit", "grouping", "held-out groups", "DD", "95% CI", "random DD mean",
               "random 95% range", "p"],
              [[r["unit"], r["grouping"], r["groups_heldout"], _fmt(r["double_difference"]),
                f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]", _fmt(r["random_mean"]),
                f"[{_fmt(r['random_low'])}, {_fmt(r['random_high'])}]",
                "—" if not math.isfinite(r["p_value"]) else f"{r['p_value']:.3f}"]
               for r in rows])
    headline: dict[str, Any] = {}
    for grouping in GROUPINGS:
        sel = [r for r in rows if r["grouping"] == grouping
               and math.isfinite(r["double_difference"])]
        above = sum(r["double_difference"] > r["random_high"] for r in sel)
        ci_pos = sum(r["ci_low"] > 0 for r in sel)
        dds = sorted(r["double_difference"] for r in sel)
        rnd = sorted(r["random_mean"] for r in sel)
        med = dds[len(dds) // 2] if dds else float("nan")
        med_r = rnd[len(rnd) // 2] if rnd else float("nan")
        headline[grouping] = {"units": len(sel), "above_random_range": above,
                              "ci_above_zero": ci_pos, "median_dd": med,
                              "median_random_dd": med_r}
        rep.p(f"`{grouping}`: {len(sel)} units with a defined DD; DD above the random splits' "
              f"95% range for {above}, bootstrap interval above 0 for {ci_pos}; median DD "
              f"{_fmt(med)} vs median random DD {_fmt(med_r)}.")
    best = max(GROUPINGS, key=lambda g: (headline[g]["above_random_range"],
                                         headline[g]["median_dd"]))
    rep.p(f"The grouping whose sub-features hold on held-out images more often: `{best}`.")
    headline["better_grouping"] = best
    return headline
