"""The device mesh: axes ('data', 'fsdp', 'tensor'), sizes from config, -1 = the rest of the devices."""
from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

from kimina_jax.errors import KiminaError

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes) with axes `MESH_AXES`.

    At most one size may be -1 (it takes the devices the others leave); the sizes must multiply to the
    device count. The axes are `Auto` (the compiler propagates shardings from the parameters and the batch),
    which `jax.make_mesh` no longer makes by default.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = _resolve_axis_sizes({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _resolve_axis_sizes(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Replace a -1 by the rest of the devices and check that the sizes use every device exactly."""
    described = " x ".join(f"{name}={size}" for name, size in sizes.items())
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise KiminaError(f"mesh {described}: at most one axis may be -1 (the rest of the devices)")
    bad = [name for name, size in sizes.items() if size != -1 and (not isinstance(size, int) or size < 1)]
    if bad:
        raise KiminaError(f"mesh {described}: axis {bad[0]!r} must be a positive integer or -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise KiminaError(f"mesh {described}: {num_devices} devices do not divide by {fixed} for axis {free[0]!r}")
        sizes = {**sizes, free[0]: num_devices // fixed}
    elif fixed != num_devices:
        raise KiminaError(f"mesh {described} needs {fixed} devices, but {num_devices} are available")
    return tuple(sizes[name] for name in MESH_AXES)
