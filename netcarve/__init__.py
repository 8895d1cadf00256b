"""netcarve: interpret convolutional networks by pruning them.

The public API, re-exported here; everything else is internal.

Example:
    >>> import netcarve as nc
    >>> lm = nc.load_model("fmnist_vgg")  # doctest: +SKIP
    >>> scoring, heldout = nc.analysis_data(lm.preset, 1000, 1000)  # doctest: +SKIP
    >>> circuit = nc.extract(lm.model, "features.11:5", scoring, heldout=heldout)  # doctest: +SKIP
"""

from netcarve._compat import install as _install_old_paths
from netcarve._version import __version__
from netcarve.car.colour import colour_selectivity
from netcarve.car.compress import car_compress
from netcarve.car.greedy import greedy_prune
from netcarve.car.scores import car_scores, classwise_car
from netcarve.circuits.circuit import Circuit, select_top_k
from netcarve.circuits.extract import extract
from netcarve.circuits.keep_search import KeepSearch, find_keep
from netcarve.circuits.subcircuits import subcircuits
from netcarve.circuits.subfeature_stats import subfeature_statistic
from netcarve.circuits.sweep import sweep
from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import apply_filter_masks, apply_kernel_masks, capture, forward_until
from netcarve.core.targets import Target
from netcarve.criteria import CRITERIA, get_criterion
from netcarve.data import ImageFolderDataset, ImageStream, as_stream, image_folder_loader
from netcarve.diagram import write_diagram
from netcarve.function.clustering import cluster_filters
from netcarve.function.defection import defection
from netcarve.function.descriptors import class_preference, describe_filters
from netcarve.function.pruning import functional_prune
from netcarve.surgery.fold import fold_lstsq
from netcarve.surgery.prune import prune_filters
from netcarve.surgery.pruned import PrunedModel, load_pruned
from netcarve.training.evaluation import analysis_data, analysis_streams, evaluate, reference_data
from netcarve.training.finetune import finetune
from netcarve.viz.examples import dataset_examples
from netcarve.viz.receptive_field import receptive_field
from netcarve.viz.render import visualize
from netcarve.zoo import ZOO, Preset, load_model

_install_old_paths()  # netcarve.ablation, netcarve.circuit, ... work for one more release

# The atlas needs its extra (Ray, pyarrow, DuckDB): imported on first use, so that
# `import netcarve` works without them.
_LAZY = {"AtlasConfig": "netcarve.atlas", "atlas_query": "netcarve.atlas",
         "run_atlas": "netcarve.atlas"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'netcarve' has no attribute {name!r}")
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ImportError(f"netcarve.{name} needs the atlas extra ({exc.name} is missing): "
                          "pip install 'netcarve[atlas]'") from exc

__all__ = [
    "CRITERIA",
    "ZOO",
    "AtlasConfig",
    "Circuit",
    "ImageFolderDataset",
    "ImageStream",
    "KeepSearch",
    "ModelGraph",
    "NetcarveError",
    "Preset",
    "PrunedModel",
    "Target",
    "__version__",
    "analysis_data",
    "analysis_streams",
    "apply_filter_masks",
    "apply_kernel_masks",
    "as_stream",
    "atlas_query",
    "capture",
    "car_compress",
    "car_scores",
    "class_preference",
    "classwise_car",
    "cluster_filters",
    "colour_selectivity",
    "dataset_examples",
    "defection",
    "describe_filters",
    "evaluate",
    "extract",
    "find_keep",
    "finetune",
    "fold_lstsq",
    "forward_until",
    "functional_prune",
    "get_criterion",
    "greedy_prune",
    "image_folder_loader",
    "load_model",
    "load_pruned",
    "prune_filters",
    "receptive_field",
    "reference_data",
    "run_atlas",
    "select_top_k",
    "subcircuits",
    "subfeature_statistic",
    "sweep",
    "visualize",
    "write_diagram",
]
