"""The frozen reference policy of the KL loss (SPEC 3): built only when `algorithm.kl.enabled`.

Its parameters are the policy's initial weights, or those of `algorithm.kl.ref_path` (any HF folder of the same
architecture), placed with the policy's shardings. With `algorithm.kl.ref_offload` they wait in host memory
(`pinned_host`) between uses and visit the devices only for the reference log-prob pass. Checkpoints do not hold
them: both sources give the same weights at every start, so a resumed run rebuilds the same reference.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from kimina_jax.config import KlConfig
from kimina_jax.errors import KiminaError
from kimina_jax.grpo.packing import PackedBatch
from kimina_jax.grpo.step import TrainStep


class ReferencePolicy:
    """Reference log-probs for packed batches, through the train step's chunked log-prob pass."""

    def __init__(self, params: nnx.State, step_fn: TrainStep, offload: bool = False):
        self.step_fn = step_fn
        self.offload = offload
        self._device = step_fn.state_shardings.params
        # A copy: the policy's own buffers are donated to (and overwritten by) its updates.
        self._params = jax.device_put(params, self._host_shardings() if offload else self._device, may_alias=False)

    @classmethod
    def from_config(cls, kl: KlConfig, policy_params: nnx.State, step_fn: TrainStep, load_model=None):
        """`kl.ref_path` loaded with `load_model(path)` (a model of the policy's architecture), else a copy of
        `policy_params` (the initial weights)."""
        params = policy_params
        if kl.ref_path is not None:
            _, params = nnx.split(load_model(kl.ref_path))
            expected = jax.tree.map(lambda a: (a.shape, a.dtype), policy_params)
            got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
            if jax.tree.structure(expected) != jax.tree.structure(got) or jax.tree.leaves(expected) != jax.tree.leaves(got):
                raise KiminaError(f"algorithm.kl.ref_path {kl.ref_path!r}: its parameters do not have the policy's "
                                  "names, shapes and dtypes (the reference must be the policy's architecture)")
        return cls(params, step_fn, offload=kl.ref_offload)

    def logprobs(self, batch: PackedBatch) -> np.ndarray:
        """[rows, length] reference log-probs of `batch.targets`, aligned like `batch.loss_mask`."""
        params = jax.device_put(self._params, self._device) if self.offload else self._params
        return self.step_fn.logprobs(params, batch)

    def _host_shardings(self):
        return jax.tree.map(lambda sharding: sharding.with_memory_kind("pinned_host"), self._device)
