"""The policy network: one folder per model family (its module and its parameter table), and HF import/export."""
from kimina_jax.models.config import Qwen3Config
from kimina_jax.models.hf import (
    abstract_model,
    iter_hf_tensors,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from kimina_jax.models.paged import PagedKVCache
from kimina_jax.models.qwen3 import Qwen3ForCausalLM, param_names

__all__ = [
    "PagedKVCache",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "abstract_model",
    "iter_hf_tensors",
    "load_hf_checkpoint",
    "param_names",
    "save_hf_checkpoint",
]
