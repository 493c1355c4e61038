"""Trainer parameters -> a stream of (HF name, torch.Tensor), the input of every vLLM weight push.

Names and layouts come from the model's parameter table (`models/qwen3/params.py`, read by
`models.iter_hf_tensors`): each tensor is transposed and cast on the devices that hold it, then handed over alone,
so the extra memory at any moment is one tensor (plus what the consumer keeps; vLLM's layerwise reload keeps one
decoder layer). A tensor that lies whole on one device of the consumer's kind becomes a torch tensor without a
copy (DLPack); a sharded one is first gathered onto that device (device to device on a GPU), and across hosts
through host memory.

A tied model's stream also carries `lm_head.weight` (the embedding again). vLLM's layerwise reload re-runs the
weight processing only of layers that receive a tensor, and the lm_head that shares the embedding's parameter
receives none: its copy in the data is right, but what processing derived from it is not. On the CPU backend
that is a repacked GEMM weight (`dispatch_cpu_unquantized_gemm`), so the logits kept using the start weights.
Named, the head is loaded and processed like an untied one (during the reload the tie is undone, so vLLM's
loader does not skip it as an alias).
"""
from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
import torch
from jax.experimental import multihost_utils

from kimina_jax.models import Qwen3ForCausalLM, iter_hf_tensors
from kimina_jax.rollout.vllm_adapter import dtype_name

def hf_torch_tensors(
    model: Qwen3ForCausalLM, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor in HF layout on `device`), one at a time, cast to `dtype` before leaving the JAX devices;
    `lm_head.weight` included for tied models (see above)."""
    device = torch.device(device)
    jax_dtype = None if dtype is None else dtype_name(dtype, "weight push")
    for name, array in iter_hf_tensors(model, jax_dtype, tied_lm_head=True):
        yield name, to_torch(array, device)


def to_torch(array: jax.Array, device: torch.device) -> torch.Tensor:
    """`array` as a tensor on `device`: zero-copy when one JAX device of that kind holds all of it."""
    if not array.is_fully_addressable:
        # Spread over hosts: every process gathers the same tensor (a collective, so all must call in step).
        return _from_numpy(np.asarray(multihost_utils.process_allgather(array, tiled=True))).to(device)
    target = _jax_device(device)
    if array.sharding.device_set != {target}:
        array = jax.device_put(array, target)
    return torch.from_dlpack(array).to(device)


def _jax_device(device: torch.device) -> jax.Device:
    """The JAX device that is `device` (GPU i for cuda:i); the host CPU where JAX has no such device."""
    if device.type == "cuda" and _has_backend("gpu"):
        return jax.local_devices(backend="gpu")[device.index or 0]
    return jax.local_devices(backend="cpu")[0]


def _has_backend(name: str) -> bool:
    try:
        jax.local_devices(backend=name)
    except RuntimeError:
        return False
    return True


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, unknown to torch.from_numpy
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))
