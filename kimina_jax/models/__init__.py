"""The policy network (Flax NNX Qwen3) and its Hugging Face import/export."""
from kimina_jax.models.config import Qwen3Config
from kimina_jax.models.hf import (
    abstract_model,
    iter_hf_tensors,
    load_hf_checkpoint,
    param_names,
    save_hf_checkpoint,
)
from kimina_jax.models.qwen3 import KVCache, Qwen3ForCausalLM

__all__ = [
    "KVCache",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "abstract_model",
    "iter_hf_tensors",
    "load_hf_checkpoint",
    "param_names",
    "save_hf_checkpoint",
]
