"""Tiny random Qwen3 models for CPU runs and tests (no download)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from kimina_jax.models.config import Qwen3Config
from kimina_jax.models.qwen3 import Qwen3ForCausalLM


def tiny_config(tiny_cfg, vocab_size: int, eos_token_id: int | None = None) -> Qwen3Config:
    """A Qwen3Config from the recipe's `model.tiny` section; `vocab_size` fills its `vocab_size: null`."""
    sizes = {k: v for k, v in dataclasses.asdict(tiny_cfg).items() if v is not None}
    sizes.setdefault("vocab_size", vocab_size)
    return Qwen3Config(**sizes, eos_token_id=eos_token_id)


def build_tiny_model(
    tiny_cfg, vocab_size: int, *, eos_token_id: int | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
    attention_impl: str = "auto", remat: str = "none", seed: int = 0,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 of the recipe's tiny sizes (deterministic for a seed)."""
    return Qwen3ForCausalLM(
        tiny_config(tiny_cfg, vocab_size, eos_token_id), dtype=dtype, param_dtype=param_dtype,
        attention_impl=attention_impl, remat=remat, rngs=nnx.Rngs(seed),
    )
