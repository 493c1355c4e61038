"""Device mesh, sharding rules for the Qwen3 parameters and batches, multi-host start."""
from kimina_jax.parallel.distributed import environment_process_count, maybe_initialize_distributed
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
    "batch_sharding",
    "environment_process_count",
    "logical_sharding",
    "logical_to_mesh",
    "make_mesh",
    "maybe_initialize_distributed",
    "param_logical_axes",
    "param_partition_specs",
    "param_shardings",
    "path_to_str",
    "shard_params",
]
