"""The pruning methods, one file each, and their registry.

A new method is one new file here that defines `METHOD = Method(...)`, plus its line below.
"""

from __future__ import annotations

from ..errors import PrunerError
from . import flap, magnitude, pg, taylor, wanda_sp
from .base import Method, Selection, UnitScores

METHODS: dict[str, Method] = {m.name: m for m in (magnitude.METHOD, wanda_sp.METHOD, flap.METHOD, taylor.METHOD,
                                                   pg.METHOD)}


def get_method(name: str) -> Method:
    """The registered method `name`, or a PrunerError listing them."""
    if name not in METHODS:
        raise PrunerError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "Selection", "UnitScores", "get_method"]
