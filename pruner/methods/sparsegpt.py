"""SparseGPT (Frantar & Alistarh, arXiv 2301.00774): OBS pruning with the lazy-batch weight update,
block size 128, damping 0.01 of the mean Hessian diagonal, on sequential calibration inputs."""

from __future__ import annotations

from ..reconstruction import sparsegpt_prune
from .base import Method
from .sparse import sparse_select

BLOCKSIZE, PERCDAMP = 128, 0.01


def rule(weight, inputs, config):
    return sparsegpt_prune(weight, inputs.gram, config.ratio, config.sparsity_type, BLOCKSIZE, PERCDAMP)


def select(loaded, space, config, on_layer=None):
    return sparse_select(loaded, space, config, rule, on_layer)


METHOD = Method("sparsegpt", "OBS pruning with weight update (unstructured or N:M)", select, sparse=True)
