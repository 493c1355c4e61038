"""Per-token log-probs and entropies without ever holding [tokens, vocab] logits for a whole row.

The lm_head and log-softmax run over chunks of `chunk_size` tokens inside a scan whose body is
rematerialised, so forward and backward peak at one [chunk_size, vocab] float32 block. A micro-batch that fits
in one chunk is computed directly: a [chunk_size, vocab] block is the peak either way.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kimina_jax.grpo.math import entropy_from_logits
from kimina_jax.models import Qwen3ForCausalLM


def chunked_logprobs(
    hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, temperature: float = 1.0, chunk_size: int = 1024,
    with_entropy: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    """log p(target) and entropy of softmax(hidden @ lm_head / temperature), shapes [B, T].

    hidden [B, T, H] (compute dtype), lm_head [H, V], targets [B, T] int. A chunk holds about `chunk_size`
    tokens: the same `chunk_size // B` (at least 1) positions of every row. Chunks cut the length axis, not
    the rows, because rows are what a mesh shards: each device then works on its own rows (chunks of the
    flattened tokens would gather every row onto every device).
    """
    batch, length, _ = hidden.shape
    chunk = max(1, min(length, chunk_size // batch))
    padded = -(-length // chunk) * chunk

    def chunked(x):  # [B, T, ...] -> [chunks, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, padded // chunk, chunk, *x.shape[2:]), 1, 0)

    def unchunked(x):  # [chunks, B, chunk] -> [B, T]
        return jnp.moveaxis(x, 0, 1).reshape(batch, padded)[:, :length]

    def one_chunk(args):
        h, t = args
        logits = jnp.dot(h, lm_head.astype(h.dtype), preferred_element_type=jnp.float32) / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - lse
        if not with_entropy:
            return logp, jnp.zeros_like(logp)
        return logp, entropy_from_logits(logits, lse)

    targets = targets.astype(jnp.int32)
    if padded == chunk:  # one chunk: recomputing it for the backward pass would save no memory, only time
        logp, entropy = one_chunk((hidden, targets))
        return logp, entropy if with_entropy else None
    logp, entropy = jax.lax.map(jax.checkpoint(one_chunk), (chunked(hidden), chunked(targets)))
    return unchunked(logp), unchunked(entropy) if with_entropy else None


def token_logprobs(
    model: Qwen3ForCausalLM, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, targets: jax.Array,
    temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    """The policy's log-prob of `targets[b, t]` given tokens up to t (packed rows), and the entropy there."""
    hidden, _ = model.hidden_states(tokens, positions, segment_ids)
    return chunked_logprobs(hidden, model.lm_head_kernel(), targets, temperature, chunk_size, with_entropy)
