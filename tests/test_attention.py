"""Flash-attention kernels (Pallas kernels in interpret mode on CPU) against plain float32 attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

from kimina_jax.models import load_hf_checkpoint
from kimina_jax.models.attention import _cudnn_attention, resolve_attention_impl, segment_attention
from kimina_jax.parallel import make_mesh

B, T, HEADS, KV_HEADS, D = 4, 256, 4, 2, 32
SCALE = D**-0.5


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, D)), jnp.float32) for n in (HEADS, KV_HEADS, KV_HEADS))
    segments = np.zeros((B, T), np.int32)
    segments[0, :100], segments[0, 100:230] = 1, 2  # two sequences, then padding
    segments[1, :] = 1
    segments[2, :3], segments[2, 3:131], segments[2, 131:255] = 1, 2, 3  # a 3-token sequence
    segments[3, :40] = 1
    return q, k, v, jnp.asarray(segments)


def _reference(q, k, v, segments):
    """Softmax attention written out per sequence in numpy float64, independent of the package."""
    out = np.zeros(q.shape, np.float64)
    q, k, v, segments = (np.asarray(x, np.float64) for x in (q, k, v, segments))
    groups = HEADS // KV_HEADS
    for row in range(B):
        for segment in set(segments[row].tolist()) - {0}:
            idx = np.flatnonzero(segments[row] == segment)
            for h in range(HEADS):
                scores = q[row, idx, h] @ k[row, idx, h // groups].T * SCALE
                scores = np.where(np.tril(np.ones((len(idx), len(idx)), bool)), scores, -np.inf)
                probs = np.exp(scores - scores.max(-1, keepdims=True))
                out[row, idx, h] = (probs / probs.sum(-1, keepdims=True)) @ v[row, idx, h // groups]
    return out


def _loss(attention, q, k, v, segments):
    """A loss on the non-padding outputs only (padding outputs are unspecified)."""
    out = attention(q, k, v, segments)
    weights = jnp.linspace(-1.0, 1.0, out.size).reshape(out.shape)
    return jnp.sum(jnp.where((segments > 0)[:, :, None, None], out * weights, 0.0))


KERNELS = {
    "xla": lambda q, k, v, s: segment_attention(q, k, v, s, SCALE, "xla"),
    "splash": lambda q, k, v, s: segment_attention(q, k, v, s, SCALE, "splash"),
    "triton": lambda q, k, v, s: segment_attention(q, k, v, s, SCALE, "triton"),
    # cuDNN itself needs a GPU; this checks that its mask + is_causal split means the same attention.
    "cudnn-semantics": lambda q, k, v, s: _cudnn_attention(q, k, v, s, SCALE, implementation="xla"),
}


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_matches_reference_with_gradients(name):
    q, k, v, segments = _inputs()
    attention = KERNELS[name]
    real = np.asarray(segments > 0)
    out = np.asarray(jax.jit(attention)(q, k, v, segments))
    np.testing.assert_allclose(out[real], _reference(q, k, v, segments)[real], atol=2e-5)
    grads = jax.jit(jax.grad(lambda *a: _loss(attention, *a, segments), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: _loss(KERNELS["xla"], *a, segments), argnums=(0, 1, 2))(q, k, v)
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=5e-5)


@pytest.mark.parametrize("impl", ["splash", "triton"])
def test_kernel_runs_per_shard_under_a_mesh(impl):
    q, k, v, segments = _inputs(1)
    mesh = make_mesh(2, 2, 2)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    q, k, v, segments = (jax.device_put(x, rows) for x in (q, k, v, segments))
    attention = jax.jit(lambda *a: segment_attention(*a, SCALE, impl))
    with jax.set_mesh(mesh):
        out = attention(q, k, v, segments)
    assert out.sharding.spec == PartitionSpec(("data", "fsdp"), None, "tensor")  # rows and heads split
    real = np.asarray(segments > 0)
    np.testing.assert_allclose(np.asarray(out)[real], _reference(q, k, v, segments)[real], atol=2e-5)


@pytest.mark.parametrize("impl", ["splash", "triton"])
def test_model_with_kernel_matches_transformers(hf_folder, impl):
    folder, hf_model = hf_folder
    model = load_hf_checkpoint(folder, attention_impl=impl)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, model.config.vocab_size, size=(2, 128))
    mask = np.ones_like(ids)
    mask[1, 90:] = 0  # right padding: segment 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours, _ = model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(np.asarray(ours)[real] - ref[real]).max() <= 1e-4


def test_choice_of_implementation():
    assert resolve_attention_impl("auto") == "xla"  # CPU
    assert resolve_attention_impl("splash") == "splash"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        resolve_attention_impl("flash")
    q, k, v, segments = _inputs()
    with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU and bfloat16/float16 compute"):
        segment_attention(q, k, v, segments, SCALE, "cudnn")
    # Rows that are not a multiple of the kernel block use plain attention.
    short = [x[:, :100] for x in (q, k, v, segments)]
    np.testing.assert_array_equal(
        np.asarray(segment_attention(*short, SCALE, "splash")), np.asarray(segment_attention(*short, SCALE, "xla"))
    )
