"""Training, fine-tuning and evaluating classifiers.

:mod:`~netcarve.training.train` trains the bundled models with the project's own recipes
(``netcarve train NAME``), :mod:`~netcarve.training.finetune` is the small seeded fine-tuning
loop for pruned models, and :mod:`~netcarve.training.evaluation` holds the reference data of a
preset and accuracy on it.
"""

from netcarve.training.train import Recipe, TrainResult, train_model

__all__ = ["Recipe", "TrainResult", "train_model"]
