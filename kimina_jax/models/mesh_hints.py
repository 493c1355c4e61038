"""Sharding hints for the model's activations under the mesh of the enclosing computation (`jax.set_mesh`).

The model never sees a `Mesh` object; the train step sets one while it traces, and these helpers read it
(no mesh, or one device: they do nothing). Activations name logical axes; the rules of `kimina_jax.parallel`
map them to mesh axes.
"""
from __future__ import annotations

from typing import Sequence

import jax

from kimina_jax.parallel.rules import LogicalDim, logical_to_mesh


def active_mesh():
    """The mesh set around the current computation, or None when there is none or it has one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def constrain(x: jax.Array, logical_axes: Sequence[LogicalDim]) -> jax.Array:
    """Pin `x` to the sharding its dimensions' logical axes give under the current mesh (a dimension its mesh
    axes do not divide stays whole)."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(logical_axes, mesh, x.shape))
