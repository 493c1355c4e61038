"""Chunked log-probs against a plain full-logits log-softmax written here in numpy float64."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimina_jax.grpo.logprobs import chunked_logprobs, token_logprobs
from kimina_jax.models import load_hf_checkpoint


def _reference(logits: np.ndarray, targets: np.ndarray, temperature: float):
    z = logits.astype(np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(logp_all)
    logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    return logp, -(p * logp_all).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_full_softmax(chunk_size, temperature):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 11, 16)).astype(np.float32)
    head = rng.normal(size=(16, 50)).astype(np.float32)
    targets = rng.integers(0, 50, size=(3, 11))
    logp, entropy = chunked_logprobs(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets),
                                     temperature, chunk_size)
    ref_logp, ref_entropy = _reference(hidden.astype(np.float64) @ head, targets, temperature)
    np.testing.assert_allclose(np.asarray(logp), ref_logp, atol=1e-4)
    np.testing.assert_allclose(np.asarray(entropy), ref_entropy, atol=1e-4)


def test_gradient_matches_unchunked():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 9, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(8, 30)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 30, size=(2, 9)))

    def plain(h):
        logp_all = jax.nn.log_softmax(h @ head, axis=-1)
        return jnp.take_along_axis(logp_all, targets[..., None], -1).sum()

    chunked = lambda h: chunked_logprobs(h, head, targets, 1.0, 4)[0].sum()  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.grad(chunked)(hidden)), np.asarray(jax.grad(plain)(hidden)), atol=1e-5)


def test_model_logprobs_match_full_logits(tiny_hf_folder):
    model = load_hf_checkpoint(tiny_hf_folder)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 128, size=(2, 10))
    targets = np.roll(tokens, -1, axis=1)
    positions = np.broadcast_to(np.arange(10), (2, 10))
    segments = np.ones((2, 10), np.int32)
    logp, entropy = nnx.jit(token_logprobs, static_argnames=("chunk_size",))(
        model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments), jnp.asarray(targets),
        chunk_size=8,
    )
    logits = np.asarray(model(jnp.asarray(tokens))[0])
    ref_logp, ref_entropy = _reference(logits, targets, 1.0)
    np.testing.assert_allclose(np.asarray(logp), ref_logp, atol=1e-4)
    np.testing.assert_allclose(np.asarray(entropy), ref_entropy, atol=1e-4)
