"""vLLM's TPU backend (tpu-inference) fed the trainer's weights: a thin adapter that this project cannot run.

tpu-inference keeps the model as an `nnx.State` of JAX arrays sharded over its own mesh and, with the engine in
this process, hands that state out and takes a new one (`tpu_inference.runner.rl_utils.get_weights(llm)` /
`update_weights(llm, state)`). Its Qwen3 names parameters after the HF tensors (with or without `.weight`) and
stores Linear weights as [in, out] with the head axes split out (q_proj [hidden, heads, head_dim], o_proj
[heads, head_dim, hidden]). So every tensor of the shared HF stream (`models.iter_hf_tensors`) is turned back
to [in, out] where the name table says it is a Linear weight, reshaped to the target's shape and put with the
target's sharding: device to device, no host round trip. tpu-inference's head padding (head_dim to 128, heads
repeated when the mesh's model axis is larger than the KV heads) is not reproduced: such a shape is reported.

Not run in CI (no TPU, no tpu-inference): `to_tpu_inference_layout` is tested against tpu-inference's
documented HF -> TPU transforms on a stand-in state; `push_weights` itself is untested.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import jax
from flax import nnx

from kimina_jax.errors import KiminaError
from kimina_jax.models import Qwen3ForCausalLM, iter_hf_tensors, param_names


def to_tpu_inference_layout(
    model: Qwen3ForCausalLM, targets: Mapping[str, jax.Array]
) -> Iterator[tuple[str, jax.Array]]:
    """(target name, array with the target's shape, dtype and sharding) for every HF tensor of `model`."""
    linear = {spec.hf_name for spec in param_names(model.config) if spec.transpose}
    for hf_name, array in iter_hf_tensors(model):
        name = hf_name if hf_name in targets else hf_name.removesuffix(".weight")
        if name not in targets:
            raise KiminaError(f"tpu-inference state has no parameter {hf_name!r} (nor {name!r})")
        target = targets[name]
        value = array.T if hf_name in linear else array
        if value.size != target.size:
            raise KiminaError(
                f"tpu-inference parameter {name!r} has shape {target.shape}, ours {value.shape} "
                "(padded heads or head_dim are not supported)"
            )
        yield name, jax.device_put(value.reshape(target.shape).astype(target.dtype), target.sharding)


def push_weights(llm, model: Qwen3ForCausalLM) -> None:
    """Replaces the weights of an in-process tpu-inference `vllm.LLM` with `model`'s."""
    from tpu_inference.runner.rl_utils import get_weights, update_weights

    state = get_weights(llm)
    variables = {".".join(map(str, path)): variable for path, variable in nnx.to_flat_state(state)}
    current = {name: variable.get_value() for name, variable in variables.items()}
    for name, value in to_tpu_inference_layout(model, current):
        variables[name].set_value(value)
    update_weights(llm, state)
