"""Walking traced programs, for the tests that check what a program holds."""

from __future__ import annotations

from typing import Iterator

from jax.extend import core as jax_core


def eqns(jaxpr) -> Iterator:
    """Every equation of a jaxpr, inside scans, while loops, jits and custom rules too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    yield from eqns(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    yield from eqns(sub)
