"""Logical-axis rules (MaxText style): what a dimension holds (its logical axis) -> the mesh axes that split it.

Parameters are sharded ZeRO-3 style over `fsdp` (their hidden dimension) and Megatron style over `tensor` (vocab,
heads, MLP columns); batches are split over `data` x `fsdp`. A dimension that its mesh axes do not divide stays
whole (replicated) on that dimension, and a flattened dimension is split by its outermost axis in whole units
only: e.g. 2 KV heads on `tensor=8` replicate the K/V projections rather than cutting heads into pieces. Mesh
axes a mesh does not have are left out. Parameters (their model's table), batches, the model's activation hints,
the sampler's weight copy and the train step's micro-batch rows all name logical axes and go through these rules.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kimina_jax.errors import KiminaError

# Imports nothing of ours but errors: the network's activation hints read these rules while models/ is loading.
MeshAxes = str | tuple[str, ...] | None
# A dimension's logical axis; a tuple names axes flattened into one dimension, outermost first (a q_proj kernel's
# columns are heads x head_dim); None: a dimension no rule splits.
LogicalDim = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

LOGICAL_AXIS_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),  # rows of a batch
    "length": None,  # tokens of a row
    "embed": "fsdp",  # the hidden dimension of a parameter
    "act_embed": None,  # the hidden dimension of an activation (kept whole: the batch already uses fsdp)
    "norm": None,  # a norm's weight (small: every device keeps all of it)
    "vocab": "tensor",
    "heads": "tensor",  # query heads
    "kv_heads": "tensor",  # key/value heads
    "mlp": "tensor",
    "head_dim": None,
}
# The sampler's weight copy: split over the model-parallel axes alone, so a decode step gathers no weights (its
# batch rows, not its weights, take the data-parallel axes).
SAMPLING_RULES: dict[str, MeshAxes] = {**LOGICAL_AXIS_RULES, "embed": None}


def mesh_axes(name: str | None, mesh=None, size: int | None = None, rules: Rules = LOGICAL_AXIS_RULES) -> MeshAxes:
    """The mesh axes that split logical axis `name`. With `mesh` (a Mesh or AbstractMesh), only those it has;
    with `size` too, None where they do not divide it."""
    if name is None:
        return None
    if name not in rules:
        raise KiminaError(f"unknown logical axis {name!r}; known: {', '.join(rules)}")
    axes = rules[name]
    if mesh is None or axes is None:
        return axes
    kept = tuple(axis for axis in ((axes,) if isinstance(axes, str) else axes) if axis in mesh.shape)
    if not kept or (size is not None and size % _ways(mesh, kept)):
        return None
    return kept[0] if isinstance(axes, str) else kept


def num_shards(mesh, name: str, size: int | None = None) -> int:
    """Into how many pieces `mesh` splits logical axis `name` (of `size` elements, where given)."""
    return _ways(mesh, mesh_axes(name, mesh, size))


def logical_to_mesh(
    logical_axes: Sequence[LogicalDim],
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
    sizes: Mapping[str, int] | None = None,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """The PartitionSpec for dimensions named by logical axes (`mesh_axes` of each; a flattened dimension's
    outermost axis). With `shape`, a flattened dimension is split in whole units of its inner axes, whose
    sizes `sizes` gives (logical axis -> size)."""
    if shape is not None and len(shape) != len(logical_axes):
        raise KiminaError(f"logical axes {tuple(logical_axes)} do not match an array of shape {tuple(shape)}")
    spec: list[MeshAxes] = []
    for dim, axis in enumerate(logical_axes):
        outer, *inner = axis if isinstance(axis, tuple) else (axis,)
        size = None
        if shape is not None:
            unit = math.prod(_unit_size(sizes, name, axis) for name in inner)
            if shape[dim] % unit:
                raise KiminaError(f"a dimension of {shape[dim]} is not whole units of {axis} ({unit} each)")
            size = shape[dim] // unit
        spec.append(mesh_axes(outer, mesh, size, rules))
    return PartitionSpec(*spec)


def logical_sharding(
    mesh: Mesh, logical_axes: Sequence[LogicalDim], shape: Sequence[int] | None = None
) -> NamedSharding:
    """NamedSharding for an activation or batch array whose dimensions carry these logical names."""
    return NamedSharding(mesh, logical_to_mesh(logical_axes, mesh, shape))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [rows, length] batch array (tokens, positions, masks, ...): rows over data x fsdp."""
    return logical_sharding(mesh, ("batch", "length"))


def _ways(mesh, axes: MeshAxes) -> int:
    return math.prod(mesh.shape[axis] for axis in ((axes,) if isinstance(axes, str) else axes or ()))


def _unit_size(sizes: Mapping[str, int] | None, name: str, axis: LogicalDim) -> int:
    if sizes is None or name not in sizes:
        raise KiminaError(f"to split a dimension {axis} in whole units, the size of {name!r} must be known")
    return sizes[name]
