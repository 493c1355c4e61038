"""Session-wide vLLM engines (each start costs seconds and about 1 GB: reuse them, don't start more), and the
trainer-side references the rollout tests compare engines with.

Tests may change an engine's weights: a test that needs particular weights pushes them itself.
"""
from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.vllm_support import VLLM_CPU_ARGS, set_vllm_env


@pytest.fixture(scope="session")
def vllm_engine(tiny_hf_folder):
    """fp32 VllmEngine started from the tiny HF folder's weights."""
    set_vllm_env()
    from kimina_jax.rollout import VllmEngine

    engine = VllmEngine(tiny_hf_folder, seed=0, **VLLM_CPU_ARGS)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_engine_bf16(tiny_hf_folder, tmp_path_factory):
    """bf16 VllmEngine with random (`dummy`) weights, started from a folder holding only the tiny config.json."""
    set_vllm_env()
    from kimina_jax.rollout import VllmEngine

    folder = tmp_path_factory.mktemp("config_only")
    shutil.copyfile(tiny_hf_folder / "config.json", folder / "config.json")
    # Sleep mode as the recipe asks for it: vLLM's CPU backend has none, the engine must start anyway.
    engine = VllmEngine(
        folder, load_format="dummy", seed=0, enable_sleep_mode=True, **{**VLLM_CPU_ARGS, "dtype": "bfloat16"}
    )
    yield engine
    engine.close()


def trainer_logprobs(model, prompt, tokens, temperature: float = 1.0) -> np.ndarray:
    """log_softmax(logits / temperature) of `tokens` after `prompt` (temperature 0: greedy, plain log_softmax),
    from one plain full forward with a float64 softmax."""
    sequence = list(prompt) + list(tokens)
    logits = np.asarray(model(jnp.asarray([sequence]))[0][0], np.float64) / (temperature or 1.0)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return logp[np.arange(len(prompt) - 1, len(sequence) - 1), list(tokens)]


def perturbed(model, scale: float, seed: int):
    """A copy of `model` with Gaussian noise of std `scale` added to every parameter."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))
