"""Figures of feature visualisations and dataset examples: grids per channel, one picture per
channel, and the pictures a circuit diagram embeds."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from netcarve.data.preset import Preset

if TYPE_CHECKING:
    from netcarve.circuits.circuit import Circuit

from netcarve.core.plotting import pyplot, save_figure
from netcarve.viz.examples import DatasetExamples, dataset_examples, to_display
from netcarve.viz.render import FeatureVisualization, visualize
from netcarve.viz.transforms import Transforms

__all__ = ["featureviz_pictures", "plot_channel", "plot_grid"]


# --------------------------------------------------------------------------- figures


def plot_grid(
    viz: FeatureVisualization,
    path: str | Path,
    *,
    compare: FeatureVisualization | None = None,
    examples: DatasetExamples | None = None,
    images: torch.Tensor | None = None,
    preset: Preset | None = None,
    columns: int | None = None,
    title: str | None = None,
) -> Path:
    """A PNG grid: for every objective its visualisation, next to the circuit's version
    (``compare``) and its best data-set example patch when given.

    Args:
        viz: the visualisations.
        path: PNG file to write.
        compare: a second visualisation of the same objectives (e.g. as a circuit computes
            them), shown right of each image.
        examples: data-set examples of the same channels (the best patch is shown).
        images: the images ``examples`` indexes into.
        preset: to display the examples.
        columns: cells per row (default about square).
        title: figure title.

    Returns:
        the path written.

    Example:
        >>> plot_grid(viz, "out/features.4.png")  # doctest: +SKIP
    """
    plt = pyplot()

    patches = None
    if examples is not None and images is not None:
        patches = [[p[0]] for p in examples.patches(images, preset)]
    per = 1 + (compare is not None) + (patches is not None)
    n = len(viz)
    cols = columns or max(1, math.ceil(math.sqrt(n * per) / per))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols * per, figsize=(1.15 * cols * per, 1.35 * rows + 0.4),
                             squeeze=False)
    cmap = "gray" if viz.images.shape[1] == 1 else None
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        cells = [(viz.picture(i), viz.targets[i].split(":")[-1])]
        if compare is not None:
            cells.append((compare.picture(i), "circuit"))
        if patches is not None:
            cells.append((patches[i][0], "data"))
        for j, (img, label) in enumerate(cells):
            ax = axes[r, c * per + j]
            ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(label, fontsize=7, pad=2)
    layer = viz.targets[0].rsplit(":", 1)[0] if viz.targets else ""
    height = fig.get_size_inches()[1]
    fig.suptitle(title or f"{layer}: activation maximisation", fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - 0.35 / height))
    return save_figure(fig, path, dpi=110)


def plot_channel(
    viz: FeatureVisualization,
    index: int,
    path: str | Path,
    *,
    compare: FeatureVisualization | None = None,
    examples: DatasetExamples | None = None,
    images: torch.Tensor | None = None,
    preset: Preset | None = None,
) -> Path:
    """A PNG for one objective: its visualisation (and the circuit's), and beside them the
    top data-set examples as receptive-field patches and as full images with the box drawn.

    Args:
        viz: the visualisations.
        index: which objective of ``viz``.
        path: PNG file to write.
        compare: the same objective as a circuit computes it.
        examples: data-set examples; the row for ``viz.targets[index]``'s channel is used.
        images: the images ``examples`` indexes into.
        preset: to display the examples.

    Returns:
        the path written.

    Example:
        >>> plot_channel(viz, 0, "out/features.4_0.png", examples=ex, images=x)
        ...     # doctest: +SKIP
    """
    plt = pyplot()
    from matplotlib.patches import Rectangle

    target = viz.targets[index]
    row = None
    if examples is not None and images is not None:
        channel = int(target.split(":")[-1].split("@")[0]) if ":" in target else None
        if channel in examples.channels:
            row = examples.channels.index(channel)
    k = 0 if row is None else examples.values.shape[1]  # type: ignore[union-attr]
    big = 1 + (compare is not None)
    cols = big + max(k, 0)
    fig = plt.figure(figsize=(1.9 * big + 1.05 * max(k, 1) + 0.2, 3.0))
    grid = fig.add_gridspec(2, 2 * big + max(k, 1), hspace=0.35, wspace=0.15)
    cmap = "gray" if viz.images.shape[1] == 1 else None
    ax = fig.add_subplot(grid[:, 0:2])
    ax.imshow(viz.picture(index), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"visualisation\nobjective {float(viz.activations[index]):.3g}", fontsize=8)
    ax.axis("off")
    if compare is not None:
        ax = fig.add_subplot(grid[:, 2:4])
        ax.imshow(compare.picture(index), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"as the circuit computes it\nobjective "
                     f"{float(compare.activations[index]):.3g}", fontsize=8)
        ax.axis("off")
    if row is not None:
        assert examples is not None and images is not None
        patches = examples.patches(images, preset)[row]
        full = to_display(images[examples.indices[row]], preset)
        for r in range(k):
            ax = fig.add_subplot(grid[0, 2 * big + r])
            ax.imshow(patches[r], cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{examples.reduce} {float(examples.values[row, r]):.3g}", fontsize=7)
            ax.axis("off")
            ax = fig.add_subplot(grid[1, 2 * big + r])
            ax.imshow(full[r], cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            y0, x0, y1, x1 = (int(v) for v in examples.boxes[row, r])
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor="red", linewidth=1))
            ax.set_title(f"image {int(examples.indices[row, r])}", fontsize=6)
            ax.axis("off")
    del cols
    fig.suptitle(f"{target}: visualisation and top data-set examples", fontsize=9)
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


# --------------------------------------------------------------------------- diagrams


def featureviz_pictures(
    *,
    steps: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    top_k: int = 4,
    batch_size: int = 64,
    transforms: Transforms | None = None,
    circuit: Circuit | None = None,
) -> Callable[[Any], dict[str, Any]]:
    """A picture provider for circuit diagrams (:mod:`netcarve.diagram.pictures`).

    Every node of a layer gets its activation-maximisation image (kind
    ``"feature-visualisation"``) and, when the request carries images, its top data-set
    examples as exact receptive-field patches. Nodes of the model input are skipped (other
    providers picture them). All nodes of one layer are optimised in one batch.

    Use it first in a chain so that the other providers fill in what it skips (put
    ``kernel_pictures`` before it to keep showing first-layer kernels)::

        from netcarve.diagram.pictures import compose, default_pictures
        pictures = compose(featureviz_pictures(steps=128, circuit=circuit), default_pictures())
        write_diagram(circuit, model, out, images=x, preset=p, pictures=pictures)

    Args:
        steps, lr, seed, transforms, batch_size: as for :func:`visualize`.
        top_k: data-set examples per node.
        circuit: picture every node as this circuit computes it (its kernel masks applied),
            for both the visualisation and the data-set examples.

    Returns:
        ``provider(request) -> {node id: NodePicture}``.

    Example:
        >>> provider = featureviz_pictures(steps=64)
        >>> callable(provider)
        True
    """

    def provider(request: Any) -> dict[str, Any]:
        from netcarve.diagram.pictures import Example, NodePicture

        by_layer: dict[str, list[Any]] = {}
        for node in request.nodes:
            if node.layer is not None:
                by_layer.setdefault(node.layer, []).append(node)
        out: dict[str, Any] = {}
        if not by_layer:
            return out
        shape = tuple(request.graph.input_shape)
        for layer, nodes in by_layer.items():
            chans = sorted({n.channel for n in nodes})
            viz = visualize(request.model, layer, channels=chans, preset=request.preset,
                            input_shape=shape, steps=steps, lr=lr, seed=seed,
                            transforms=transforms, batch_size=batch_size, graph=request.graph,
                            circuit=circuit)
            ex = None
            if request.images is not None and request.images.dim() == 4 and len(request.images):
                ex = dataset_examples(request.model, layer, request.images, channels=chans,
                                      top_k=top_k, batch_size=max(batch_size, 128),
                                      graph=request.graph, circuit=circuit)
                patches = ex.patches(request.images, request.preset)
            for node in nodes:
                i = chans.index(node.channel)
                examples = [] if ex is None else [
                    Example(patches[i][r], float(ex.values[i, r])) for r in range(len(patches[i]))
                ]
                out[node.id] = NodePicture(viz.picture(i), "feature-visualisation", examples)
        return out

    return provider
