"""Device mesh, sharding rules for the Qwen3 parameters and batches, multi-host start and exchange."""
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
from kimina_jax.parallel.sharding import (
    LOGICAL_AXIS_RULES,
    PARAM_RULES,
    batch_sharding,
    logical_sharding,
    logical_to_mesh,
    param_logical_axes,
    param_partition_specs,
    param_shardings,
    path_to_str,
    shard_params,
)

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "PARAM_RULES",
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
    "parse_distributed_flags",
    "param_logical_axes",
    "param_partition_specs",
    "param_shardings",
    "path_to_str",
    "shard_params",
]
