"""Parameter shardings: each parameter's logical axes come from its model's table (`models/<family>/params.py`),
the mesh axes from the logical-axis rules (rules.py)."""
from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from kimina_jax.errors import KiminaError
from kimina_jax.parallel.rules import LOGICAL_AXIS_RULES, LogicalDim, Rules, logical_to_mesh


def known_params() -> tuple:
    """The `ParamSpec`s of every model family's table; a tree's leaves are found here by their paths."""
    # Imported here, not at the top: the models' network imports this package's rules while models/ loads.
    from kimina_jax.models.qwen3.params import PARAMS as QWEN3_PARAMS

    return QWEN3_PARAMS


def param_logical_axes(path: str) -> tuple[LogicalDim, ...]:
    """Logical axes of the parameter at this dotted path (e.g. `model.layers.3.mlp.up_proj.kernel`), alone or
    nested in a bigger tree (optimizer moments)."""
    for spec in known_params():
        if spec.matches(path):
            return spec.axes
    raise KiminaError(f"no sharding rule for parameter {path!r}: it is in no model's parameter table "
                      "(models/<family>/params.py)")


def param_partition_specs(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """A tree of PartitionSpecs shaped like `tree` (an `nnx.State`, nested dicts of arrays, or of
    `jax.ShapeDtypeStruct`); every leaf must be a known parameter (else KiminaError)."""
    named = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = path_to_str(path)
        axes = param_logical_axes(name)
        if len(axes) != len(leaf.shape):
            raise KiminaError(f"parameter {name!r} has shape {tuple(leaf.shape)}, its table expects {len(axes)} dims")
        named[name] = axes, leaf.shape
    # Flattened dimensions (heads x head_dim) split in whole units: the unit sizes are those of the dimensions
    # that carry the inner axes alone (q_norm's [head_dim]).
    sizes = {axis: size for axes, shape in named.values() for axis, size in zip(axes, shape)
             if isinstance(axis, str)}

    def spec(path, leaf):
        axes, shape = named[path_to_str(path)]
        return logical_to_mesh(axes, mesh, shape, sizes, rules)

    return jax.tree_util.tree_map_with_path(spec, tree)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """`param_partition_specs` as NamedShardings on `mesh` (for jit out_shardings or device_put)."""
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), param_partition_specs(tree, mesh, rules))


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
