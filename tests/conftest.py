"""Shared test set-up: the tiny nets are importable as ``_nets``; one torch thread per worker.

The suite runs under pytest-xdist with one worker per core; a single intra-op thread per
worker avoids oversubscribing the cores (tiny convs slow down by orders of magnitude then).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
