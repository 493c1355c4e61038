"""Drawing the next token from logits: temperature, top-k and top-p filters, one uniform number per row.

A draw inverts the (filtered) distribution's cumulative sum at one uniform per row (`inverse_cdf`), not a
vocabulary of Gumbel noise per row.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SAMPLING_BLOCK = 256  # tokens per block of the two-level inverse CDF (`inverse_cdf`)


def pick_tokens(logits, keys, temperature, top_p, top_k, greedy: bool, filters: bool):
    """Next tokens [B] and their log-probs under the full distribution log_softmax(logits / temperature)."""
    if greedy:
        token = jnp.argmax(logits, axis=-1)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        logprobs = jax.nn.log_softmax(scaled, axis=-1)
        candidates = _top_k_top_p(scaled, top_k, top_p) if filters else scaled
        token = inverse_cdf(keys, candidates)
    return token.astype(jnp.int32), jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]


def inverse_cdf(keys, candidates):
    """One draw per row from softmax(candidates) ([B, vocab], -inf: never drawn) by its inverse CDF at one uniform
    per row (Gumbel-max would draw a vocabulary of noise per row). The cumulative sum is two-level, over blocks of
    `SAMPLING_BLOCK` tokens and then inside the block drawn (a full-vocabulary cumsum costs more than the rest)."""
    rows, vocab = candidates.shape
    weights = jnp.exp(candidates - jnp.max(candidates, axis=-1, keepdims=True))
    blocks = jnp.pad(weights, ((0, 0), (0, -vocab % SAMPLING_BLOCK))).reshape(rows, -1, SAMPLING_BLOCK)
    block_weights = jnp.sum(blocks, axis=-1)
    block_ends = jnp.cumsum(block_weights, axis=-1)
    threshold = jax.vmap(jax.random.uniform)(keys) * block_ends[:, -1]
    block = _first_above(block_ends, block_weights, threshold)
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(block_ends - block_weights, block[:, None], axis=1)[:, 0]
    return block * SAMPLING_BLOCK + _first_above(jnp.cumsum(inside, axis=-1), inside, threshold - before)


def _first_above(cumulative, weights, threshold):
    """Per row the first index whose cumulative weight exceeds the threshold. Weightless entries are never picked
    (rounding in the sums cannot make them so); should rounding leave no weighted entry above the threshold, the
    last weighted one is."""
    above = (cumulative > threshold[:, None]) & (weights > 0)
    last = weights.shape[-1] - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)
    return jnp.where(jnp.any(above, axis=-1), jnp.argmax(above, axis=-1), last)


def _top_k_top_p(scaled, top_k, top_p):
    """Logits outside the top-k, then outside the nucleus of the renormalised rest, set to -inf.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p; ties at the cut stay in.
    """
    vocab = scaled.shape[-1]
    ranked = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k = jnp.arange(vocab)[None, :] < k
    probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_top_k & (mass_before < top_p)
    cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)
