"""The zoo report written by ``netcarve demo``: measured accuracy of every bundled model and a
figure of sample test images with their predictions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from netcarve.core.plotting import pyplot
from netcarve.training.evaluation import evaluate, reference_data
from netcarve.zoo.registry import ZOO, load_model


@dataclass
class ModelReport:
    """Accuracy of one bundled model measured on its full test set."""

    name: str
    dataset: str
    measured_accuracy: float
    recorded_accuracy: float | None
    test_images: int
    parameters: int
    figure: str


def _sample_figure(name: str, images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor,
                   class_names: tuple[str, ...], path: Path, n: int = 16) -> None:
    plt = pyplot()

    cols = 8
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9))
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        img = images[k]
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())
        ok = bool(preds[k] == labels[k])
        ax.set_title(
            f"{class_names[int(preds[k])]}\n(true: {class_names[int(labels[k])]})",
            fontsize=7,
            color="darkgreen" if ok else "crimson",
        )
    fig.suptitle(f"{name}: predictions on test images (green right, red wrong)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_table(reports: list[ModelReport]) -> str:
    """Markdown table of measured vs recorded accuracy, one row per model."""
    lines = [
        "| model | data set | test images | measured top-1 | recorded at training | parameters |",
        "|---|---|---|---|---|---|",
    ]
    for r in reports:
        rec = "—" if r.recorded_accuracy is None else f"{r.recorded_accuracy:.2%}"
        lines.append(
            f"| {r.name} | {r.dataset} | {r.test_images:,} | {r.measured_accuracy:.2%} | {rec} "
            f"| {r.parameters:,} |"
        )
    return "\n".join(lines)


def zoo_report(
    out_dir: str | Path, *, progress: bool = False, limit: int | None = None
) -> tuple[Path, list[ModelReport]]:
    """Evaluate every bundled model on its full real test set and write a report.

    Args:
        out_dir: folder to write ``zoo.md``, ``zoo.json`` and one PNG per model into.
        progress: show progress bars.
        limit: evaluate only the first ``limit`` test images (None: the full test set).

    Returns:
        The path of the Markdown report and the per-model results.

    Example:
        >>> zoo_report("out/demo")  # doctest: +SKIP
        PosixPath('out/demo/zoo.md')
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for entry in ZOO.values():
        if not entry.bundled:
            continue
        lm = load_model(entry.name)
        x, y = reference_data(lm.preset, "test", limit=limit)
        result = evaluate(lm.model, x, y, lm.preset, progress=progress)
        fig_name = f"{entry.name}_samples.png"
        _sample_figure(entry.name, x, y, result.predictions, lm.preset.class_names,
                       out / fig_name)
        recorded = lm.metadata.get("test_accuracy")
        reports.append(
            ModelReport(
                name=entry.name,
                dataset=lm.preset.dataset,
                measured_accuracy=result.accuracy,
                recorded_accuracy=float(recorded) if recorded else None,
                test_images=result.n,
                parameters=sum(p.numel() for p in lm.model.parameters()),
                figure=fig_name,
            )
        )
    lines = [
        "# netcarve model zoo report",
        "",
        "Each bundled model evaluated on its full test set (Fashion-MNIST: the 10,000 official "
        "test images; coloured shapes: 10,000 images from the held-out seed).",
        "",
        accuracy_table(reports),
        "",
    ]
    for r in reports:
        lines += [f"## {r.name}", "", f"![{r.name} sample predictions]({r.figure})", ""]
    md = out / "zoo.md"
    md.write_text("\n".join(lines))
    (out / "zoo.json").write_text(json.dumps([r.__dict__ for r in reports], indent=2))
    return md, reports
