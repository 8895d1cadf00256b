"""netcarve: interpret convolutional networks by pruning them.

The public API, re-exported here; everything else is internal.

Example:
    >>> import netcarve as nc
    >>> lm = nc.load_model("fmnist_vgg")  # doctest: +SKIP
    >>> scoring, heldout = nc.analysis_data(lm.preset, 1000, 1000)  # doctest: +SKIP
    >>> circuit = nc.extract(lm.model, "features.11:5", scoring, heldout=heldout)  # doctest: +SKIP
"""

__version__ = "0.1.0"

# __version__ comes first: submodules read it while this package is still initialising.
from .car import car_compress, car_scores, classwise_car, greedy_prune
from .circuit import Circuit, extract, select_top_k
from .colour import colour_selectivity
from .compress import PrunedModel, load_pruned, prune_filters
from .criteria import CRITERIA, get_criterion
from .data import ImageFolderDataset, ImageStream, as_stream, image_folder_loader
from .diagram import write_diagram
from .errors import NetcarveError
from .evaluation import analysis_data, analysis_streams, evaluate, reference_data
from .featureviz import dataset_examples, receptive_field, visualize
from .finetune import finetune
from .fold import fold_lstsq
from .functional import (
    class_preference,
    cluster_filters,
    defection,
    describe_filters,
    functional_prune,
)
from .graph import ModelGraph
from .hooks import apply_filter_masks, apply_kernel_masks, capture, forward_until
from .subcircuits import subcircuits
from .sweep import sweep
from .targets import Target
from .zoo import ZOO, Preset, load_model

__all__ = [
    "CRITERIA",
    "ZOO",
    "Circuit",
    "ImageFolderDataset",
    "ImageStream",
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
    "select_top_k",
    "subcircuits",
    "sweep",
    "visualize",
    "write_diagram",
]
