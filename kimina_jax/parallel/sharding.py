"""Sharding rules: logical axis names -> mesh axes, and the logical axes of every Qwen3 parameter.

Parameters are sharded ZeRO-3 style over `fsdp` (their hidden dimension) and Megatron style over `tensor`
(vocab, heads, MLP columns); batches are split over `data` x `fsdp`. A dimension that its mesh axes do not
divide stays whole (replicated) on that dimension, and attention heads are never split: e.g. 2 KV heads on
`tensor=8` replicate the K/V projections rather than cutting heads into pieces.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kimina_jax.errors import KiminaError

MeshAxes = str | tuple[str, ...] | None

LOGICAL_AXIS_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),  # rows of a batch
    "length": None,  # tokens of a row
    "embed": "fsdp",  # the hidden dimension of a parameter
    "act_embed": None,  # the hidden dimension of an activation (kept whole: the batch already uses fsdp)
    "vocab": "tensor",
    "heads": "tensor",  # query heads x head_dim, flattened
    "kv_heads": "tensor",  # key/value heads x head_dim, flattened
    "mlp": "tensor",
    "head_dim": None,
}
HEAD_AXES = ("heads", "kv_heads")

# (pattern on the parameter path, logical axes per dimension; None = replicated). Kernels are [in, out].
_LAYER = r"model\.layers\.\d+\."
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"model\.embed_tokens\.embedding", ("vocab", "embed")),
    (_LAYER + r"(input_layernorm|post_attention_layernorm)\.weight", (None,)),
    (_LAYER + r"self_attn\.q_proj\.kernel", ("embed", "heads")),
    (_LAYER + r"self_attn\.(k_proj|v_proj)\.kernel", ("embed", "kv_heads")),
    (_LAYER + r"self_attn\.o_proj\.kernel", ("heads", "embed")),
    (_LAYER + r"self_attn\.(q_norm|k_norm)\.weight", ("head_dim",)),
    (_LAYER + r"mlp\.(gate_proj|up_proj)\.kernel", ("embed", "mlp")),
    (_LAYER + r"mlp\.down_proj\.kernel", ("mlp", "embed")),
    (r"model\.norm\.weight", (None,)),
    (r"lm_head\.kernel", ("embed", "vocab")),
)
# A rule matches the end of a path, so trees that nest the parameters (optimizer moments) match too.
_COMPILED_RULES = [(re.compile(rf"(?:^|\.){pattern}$"), axes) for pattern, axes in PARAM_RULES]
_HEAD_DIM_PATH = re.compile(rf"(?:^|\.){_LAYER}self_attn\.q_norm\.weight$")


def logical_to_mesh(
    logical_axes: Sequence[str | None],
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
    head_dim: int = 1,
) -> PartitionSpec:
    """The PartitionSpec for dimensions named by logical axes.

    With `mesh` and `shape`, a dimension whose size the product of its mesh axes does not divide is left
    unsharded; for head axes the size must divide into whole heads of `head_dim`.
    """
    if shape is not None and len(shape) != len(logical_axes):
        raise KiminaError(f"logical axes {tuple(logical_axes)} do not match an array of shape {tuple(shape)}")
    spec: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        if name is not None and name not in LOGICAL_AXIS_RULES:
            raise KiminaError(f"unknown logical axis {name!r}; known: {', '.join(LOGICAL_AXIS_RULES)}")
        axes = None if name is None else LOGICAL_AXIS_RULES[name]
        if axes is not None and mesh is not None and shape is not None:
            ways = math.prod(mesh.shape[axis] for axis in ((axes,) if isinstance(axes, str) else axes))
            unit = head_dim if name in HEAD_AXES else 1
            if shape[dim] % (ways * unit):
                axes = None
        spec.append(axes)
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding for an activation or batch array whose dimensions carry these logical names."""
    return NamedSharding(mesh, logical_to_mesh(logical_axes, mesh, shape))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [rows, length] batch array (tokens, positions, masks, ...): rows over data x fsdp."""
    return logical_sharding(mesh, ("batch", "length"))


def param_logical_axes(path: str) -> tuple[str | None, ...]:
    """Logical axes of the parameter at this dotted path (e.g. `model.layers.3.mlp.up_proj.kernel`)."""
    for pattern, axes in _COMPILED_RULES:
        if pattern.search(path):
            return axes
    raise KiminaError(f"no sharding rule for parameter {path!r}: add one to PARAM_RULES in {__name__}")


def param_partition_specs(tree: Any, mesh: Mesh) -> Any:
    """A tree of PartitionSpecs shaped like `tree` (an `nnx.State`, nested dicts of arrays, or of
    `jax.ShapeDtypeStruct`); every leaf must be a known Qwen3 parameter (else KiminaError)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    head_dim = _head_dim(leaves)

    def spec(path, leaf):
        name = path_to_str(path)
        axes = param_logical_axes(name)
        if len(axes) != len(leaf.shape):
            raise KiminaError(f"parameter {name!r} has shape {tuple(leaf.shape)}, its rule expects {len(axes)} dims")
        if any(axis in HEAD_AXES for axis in axes) and head_dim is None:
            raise KiminaError(f"parameter {name!r} is split by attention heads, but the tree has no "
                              "self_attn.q_norm.weight to read head_dim from")
        return logical_to_mesh(axes, mesh, leaf.shape, head_dim or 1)

    return jax.tree_util.tree_map_with_path(spec, tree)


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """`param_partition_specs` as NamedShardings on `mesh` (for jit out_shardings or device_put)."""
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), param_partition_specs(tree, mesh))


def shard_params(state: Any, mesh: Mesh) -> Any:
    """Place every parameter of `state` on `mesh` by the rules. Across hosts, every process must pass the
    same values (or build the state under jit with `param_shardings` as out_shardings instead)."""
    return jax.device_put(state, param_shardings(state, mesh))


def path_to_str(path: Sequence[Any]) -> str:
    """Dotted name of a pytree key path; the `.value` that nnx Variables add is dropped."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        else:
            names.append(str(getattr(key, "key", key)))
    if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names.pop()
    return ".".join(names)


def _head_dim(leaves: list[tuple[Any, Any]]) -> int | None:
    for path, leaf in leaves:
        if _HEAD_DIM_PATH.search(path_to_str(path)):
            return int(leaf.shape[0])
    return None
