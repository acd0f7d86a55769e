"""The pruning methods, one file each, and their registry.

A new method is one new file here that defines `METHOD = Method(...)`, plus its line below.
"""

from __future__ import annotations

from ..errors import PrunerError
from . import admm, flap, magnitude, magnitude_unstructured, pg, sparsegpt, taylor, wanda, wanda_sp
from .base import Method, Selection, UnitScores

METHODS: dict[str, Method] = {m.name: m for m in (
    magnitude.METHOD, wanda_sp.METHOD, flap.METHOD, taylor.METHOD, pg.METHOD,  # structured: remove heads and channels
    magnitude_unstructured.METHOD, wanda.METHOD, sparsegpt.METHOD, admm.METHOD,  # unstructured / N:M
)}


def get_method(name: str) -> Method:
    """The registered method `name`, or a PrunerError listing them."""
    if name not in METHODS:
        raise PrunerError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def sparse_methods() -> list[str]:
    return [name for name, m in METHODS.items() if m.sparse]


def check_config(config):
    """The config validated, and its method-specific settings checked against the method's kind:
    a sparsity type belongs to the unstructured / N:M methods, a reconstruction to the structured
    ones (the others update weights themselves). Returns the config."""
    method = get_method(config.method)
    config.validate()
    if method.sparse and config.reconstruct != "none":
        raise PrunerError(f"reconstruction refits the columns a structured method removed; {config.method} "
                          "updates (or keeps) single weights itself: drop the reconstruction")
    if not method.sparse and config.sparsity_type != "unstructured":
        raise PrunerError(f"sparsity type {config.sparsity_type} is for the methods that zero single weights "
                          f"({', '.join(sparse_methods())}); {config.method} removes whole heads and channels")
    return config


__all__ = ["METHODS", "Method", "Selection", "UnitScores", "check_config", "get_method", "sparse_methods"]
