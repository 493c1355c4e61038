"""Multi-host runs: join JAX's multi-controller runtime (`jax.distributed.initialize`) when there is one, and
move Python objects and parameters between its processes.

Every process of a multi-host job runs the same program; after initialization `jax.devices()` lists the
devices of all processes and a mesh spans them. A single process does nothing here, and the exchange helpers
return at once. The exchange helpers are collectives: every process must call them at the same points of the
program, from the main thread.
"""
from __future__ import annotations

import argparse
import os
import pickle
import urllib.request
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from kimina_jax.errors import KiminaError
from kimina_jax.parallel.mesh import make_mesh
from kimina_jax.parallel.sharding import param_shardings

DistributedMode = Literal["auto", "on", "off"]
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")


def maybe_initialize_distributed(mode: DistributedMode = "auto", environ: Mapping[str, str] | None = None) -> bool:
    """Initialize the multi-process runtime if wanted; return whether this is a multi-process run.

    Call it first thing, before any JAX computation (JAX refuses to initialize once its backend is up).

    mode "auto": initialize when the environment describes several processes (`environment_process_count`);
    "on": always initialize and let JAX find the cluster (e.g. a Cloud TPU pod from its metadata);
    "off": never. Explicit `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` take precedence
    over what JAX detects. Idempotent: a second call returns True without initializing again.
    """
    if mode not in ("auto", "on", "off"):
        raise KiminaError(f"distributed mode must be 'auto', 'on' or 'off', got {mode!r}")
    if jax.distributed.is_initialized():
        return True
    environ = os.environ if environ is None else environ
    if mode == "off" or (mode == "auto" and environment_process_count(environ) <= 1):
        return False
    explicit = {
        "coordinator_address": environ.get("JAX_COORDINATOR_ADDRESS"),
        "num_processes": _int_var(environ, "JAX_NUM_PROCESSES"),
        "process_id": _int_var(environ, "JAX_PROCESS_ID"),
    }
    try:
        jax.distributed.initialize(**explicit)
    except (ValueError, RuntimeError) as error:
        raise KiminaError(f"jax.distributed.initialize failed ({error}); set JAX_COORDINATOR_ADDRESS, "
                          "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under SLURM / Open MPI / a TPU pod") from error
    return True


def parse_distributed_flags(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split `--coordinator-address HOST:PORT --num-processes N --process-id I` off a command line.

    Returns them as the environment variables `maybe_initialize_distributed` reads (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID) and the rest of the arguments.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--coordinator-address", dest="JAX_COORDINATOR_ADDRESS")
    parser.add_argument("--num-processes", dest="JAX_NUM_PROCESSES", type=int)
    parser.add_argument("--process-id", dest="JAX_PROCESS_ID", type=int)
    flags, rest = parser.parse_known_args(list(argv))
    return {name: str(value) for name, value in vars(flags).items() if value is not None}, rest


def allgather_objects(obj: Any) -> list[Any]:
    """`obj` of every process, in process order (pickled, through JAX collectives); `[obj]` for one process."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)  # the collective needs the same shape everywhere
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(gathered[i, : sizes[i]].tobytes()) for i in range(len(sizes))]


def broadcast_object(obj: Any) -> Any:
    """Process 0's `obj` on every process (what the others pass is ignored)."""
    if jax.process_count() == 1:
        return obj
    main = jax.process_index() == 0
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8) if main else None
    size = int(np.asarray(multihost_utils.broadcast_one_to_all(np.array([0 if data is None else data.size])))[0])
    buffer = data if main else np.zeros(size, np.uint8)
    return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (e.g. a stop signal that reached only some of them)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.array([flag]))).any())


def barrier(name: str) -> None:
    """Wait until every process got here (e.g. until process 0 has written files the others read)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def local_replica(params: Any) -> Any:
    """Parameters sharded across processes, gathered whole and placed on this process's devices alone (split
    over them like on an `fsdp` mesh), e.g. for a rollout engine that samples on its own host."""
    host = multihost_utils.process_allgather(params, tiled=True)
    local_mesh = make_mesh(data=1, fsdp=-1, tensor=1, devices=jax.local_devices())
    return jax.device_put(host, param_shardings(host, local_mesh))


def environment_process_count(environ: Mapping[str, str]) -> int:
    """How many processes the environment says this job has (1 when it says nothing).

    Read from, in order: JAX_NUM_PROCESSES, SLURM (as launched by srun), Open MPI (mpirun),
    TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES, and on a Cloud TPU VM the pod's metadata.
    """
    if "JAX_NUM_PROCESSES" in environ:
        return _int_var(environ, "JAX_NUM_PROCESSES")
    if all(var in environ for var in _SLURM_VARS):
        return _int_var(environ, "SLURM_NTASKS")
    if "OMPI_MCA_orte_hnp_uri" in environ and "OMPI_COMM_WORLD_SIZE" in environ:
        return _int_var(environ, "OMPI_COMM_WORLD_SIZE")
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        return len(hosts.split(","))
    if any(Path(path).exists() for path in _TPU_DEVICE_FILES):
        return _tpu_pod_worker_count(environ)
    return 1


def _tpu_pod_worker_count(environ: Mapping[str, str]) -> int:
    """Workers of this Cloud TPU slice according to the GCE metadata server; 1 when it cannot be asked."""
    host = environ.get("GCE_METADATA_IP", "metadata.google.internal")
    request = urllib.request.Request(
        f"http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints",
        headers={"Metadata-Flavor": "Google"},
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as reply:
            endpoints = reply.read().decode().strip()
    except OSError:
        return 1
    return max(1, len([entry for entry in endpoints.split(",") if entry]))


def _int_var(environ: Mapping[str, str], name: str) -> int | None:
    if name not in environ:
        return None
    try:
        return int(environ[name])
    except ValueError:
        raise KiminaError(f"environment variable {name}={environ[name]!r} is not an integer") from None
