"""Qwen3: the network (`model.py`) and its parameter table (`params.py`)."""
from kimina_jax.models.qwen3.model import REMAT_POLICIES, Qwen3ForCausalLM, RematPolicy
from kimina_jax.models.qwen3.params import PARAMS, param_names

__all__ = ["PARAMS", "REMAT_POLICIES", "Qwen3ForCausalLM", "RematPolicy", "param_names"]
