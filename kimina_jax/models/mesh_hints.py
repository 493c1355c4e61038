"""Sharding hints for the model's activations under the mesh of the enclosing computation (`jax.set_mesh`).

The model never sees a `Mesh` object; the train step sets one while it traces, and these helpers read it
(no mesh, or one device: they do nothing). Axis names are the mesh's (`kimina_jax.parallel.MESH_AXES`).
"""
from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec


def active_mesh():
    """The mesh set around the current computation, or None when there is none or it has one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def row_mesh_axes(mesh, rows: int) -> tuple[str, ...] | None:
    """The mesh axes that split the rows of a batch (`data` x `fsdp`), or None where they do not divide them."""
    axes = tuple(axis for axis in ("data", "fsdp") if axis in mesh.shape)
    return axes if rows % row_shards(mesh) == 0 else None


def row_shards(mesh) -> int:
    """How many ways the mesh's `data` x `fsdp` axes split a batch's rows."""
    return math.prod(mesh.shape[axis] for axis in ("data", "fsdp") if axis in mesh.shape)


def tensor_axis(mesh, size: int) -> str | None:
    """`tensor` where the mesh has that axis and it divides `size` (heads, vocabulary rows), else None."""
    return "tensor" if "tensor" in mesh.shape and size % mesh.shape["tensor"] == 0 else None


def constrain_rows(x: jax.Array) -> jax.Array:
    """Pin an activation [rows, ...] to rows split over `data` x `fsdp` and the rest whole. Without it XLA may
    split activations' hidden dimension like the weights' (FSDP) and later cannot undo that without
    replicating them ("involuntary full rematerialization"); with it, weights are gathered instead."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(row_mesh_axes(mesh, x.shape[0])))


def constrain_columns_whole(table: jax.Array) -> jax.Array:
    """Pin a [rows, columns] weight to rows split over `tensor` and columns whole, under the current mesh."""
    mesh = active_mesh()
    if mesh is None:
        return table
    return jax.lax.with_sharding_constraint(table, PartitionSpec(tensor_axis(mesh, table.shape[0]), None))
