"""ADMM weight update with gradual pruning (Boza, arXiv 2401.02938; algorithms.md Sec. 3): per linear,
normalise by sqrt(diag X^T X), damp 0.1, rho = 1, `admm_iterations` rounds (20), the mask chosen on
|V + U| along the cubic ramp over the first min(15, iterations) rounds ("gradual"), or re-chosen at
full sparsity in those rounds as the released code does ("reselect"). Unstructured masks count over
the whole matrix (the released code's default); N:M within each group of M inputs."""

from __future__ import annotations

from ..reconstruction import admm_update
from .base import Method
from .sparse import sparse_select

RAMP_ITERATIONS, RHO, DAMP = 15, 1.0, 0.1


def rule(weight, inputs, config):
    return admm_update(weight, inputs.gram, config.ratio, config.sparsity_type, iterations=config.admm_iterations,
                       rho=RHO, damp=DAMP, gradual=True, ramp_iters=min(RAMP_ITERATIONS, config.admm_iterations),
                       reselect=config.admm_mask == "reselect")


def select(loaded, space, config, on_layer=None):
    return sparse_select(loaded, space, config, rule, on_layer)


METHOD = Method("admm", "ADMM weight update with gradual pruning (unstructured or N:M)", select, sparse=True)
