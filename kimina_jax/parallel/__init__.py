"""Device mesh, logical-axis rules (parameters via their model's table, batches, activations), multi-host start."""
from kimina_jax.parallel.distributed import (
    allgather_objects,
    any_process,
    barrier,
    broadcast_object,
    environment_process_count,
    local_replica,
    maybe_initialize_distributed,
    parse_distributed_flags,
)
from kimina_jax.parallel.mesh import MESH_AXES, make_mesh
from kimina_jax.parallel.rules import (
    LOGICAL_AXIS_RULES,
    SAMPLING_RULES,
    batch_sharding,
    logical_sharding,
    logical_to_mesh,
    mesh_axes,
    num_shards,
)
from kimina_jax.parallel.sharding import (
    param_logical_axes,
    param_partition_specs,
    param_shardings,
    path_to_str,
    shard_params,
)

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "SAMPLING_RULES",
    "allgather_objects",
    "any_process",
    "barrier",
    "batch_sharding",
    "broadcast_object",
    "environment_process_count",
    "local_replica",
    "logical_sharding",
    "logical_to_mesh",
    "make_mesh",
    "maybe_initialize_distributed",
    "mesh_axes",
    "num_shards",
    "parse_distributed_flags",
    "param_logical_axes",
    "param_partition_specs",
    "param_shardings",
    "path_to_str",
    "shard_params",
]
