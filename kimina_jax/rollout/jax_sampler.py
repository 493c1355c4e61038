"""The built-in rollout engine: batched sampling on the Flax Qwen3 with a KV cache.

Rows (prompt i, sample j) are cut into batches of at most `max_batch_rows`; each batch is right-padded to a
power-of-two row count and prompt length, then one jitted function runs the prefill and the whole decode loop
(`lax.while_loop`, left early once every row has stopped). It compiles once per (rows bucket, prompt-length
bucket, max_tokens, greedy or not, filtered or not, number of stop ids); temperature, top-p and top-k values
are traced, so changing them does not recompile.

Decoding runs in phases of doubling length (`first_decode_window` new tokens, then twice as many, ... up to
max_tokens), each a while loop whose attention reads only the cache slots that phase can have filled: a step
costs about the context so far, not the cache's whole capacity (with 24k-token responses the difference is
most of the decode time). The prefill attends among the prompt tokens alone (flash kernels where they apply).

Every row draws from its own key, fold_in(call key, prompt index, sample index, step), so a seeded call gives
the same samples however the rows are batched.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimina_jax.errors import KiminaError
from kimina_jax.models import KVCache, Qwen3ForCausalLM
from kimina_jax.rollout.base import (
    RolloutEngine,
    SamplingParams,
    as_model,
    check_prompts,
    find_eos_token_ids,
    make_completion,
)
from kimina_jax.types import Completion

MIN_PROMPT_BUCKET = 16
FIRST_DECODE_WINDOW = 512


class JaxSampler(RolloutEngine):
    """Samples with the trainer's own NNX model; `update_weights` just points at the new arrays (no copy).

    `max_len` bounds prompt + response (default: the config's max_position_embeddings). EOS ids default to
    config.json's and the tokenizer's (`find_eos_token_ids`).
    """

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        *,
        tokenizer=None,
        eos_token_ids: Sequence[int] | None = None,
        max_len: int | None = None,
        max_batch_rows: int = 128,
        seed: int = 0,
        first_decode_window: int = FIRST_DECODE_WINDOW,
    ):
        if max_batch_rows < 1 or first_decode_window < 1:
            raise KiminaError(f"JaxSampler: max_batch_rows and first_decode_window must be >= 1, got "
                              f"{max_batch_rows}, {first_decode_window}")
        self.config = model.config
        self._graphdef, self._state = nnx.split(model)
        self.first_decode_window = first_decode_window
        self._sample_batch = _compile(self._graphdef)
        self.tokenizer = tokenizer
        self.eos_token_ids = (
            tuple(int(t) for t in eos_token_ids) if eos_token_ids is not None
            else find_eos_token_ids(model.config, tokenizer)
        )
        self.max_len = max_len or model.config.max_position_embeddings
        self.max_batch_rows = max_batch_rows
        self._key = jax.random.key(seed)
        self._calls = 0

    def update_weights(self, model_or_params: Any) -> None:
        graphdef, state = nnx.split(as_model(model_or_params, self._graphdef))
        if jax.tree.structure(state) != jax.tree.structure(self._state):
            raise KiminaError("update_weights: the new parameters do not have the structure of the sampler's model")
        if graphdef != self._graphdef:  # another dtype or attention implementation: compile anew
            self._graphdef, self._sample_batch = graphdef, _compile(graphdef)
        self._state = state

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        prompts = check_prompts(prompt_token_ids, params, self.max_len, self.config.vocab_size)
        if params.seed is None:
            call_key = jax.random.fold_in(self._key, self._calls)
            self._calls += 1
        else:
            call_key = jax.random.key(params.seed)
        stop_ids = jnp.asarray(sorted(set(params.stop_token_ids) | set(self.eos_token_ids)) or [-1], jnp.int32)
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        results: dict[tuple[int, int], Completion] = {}
        for start in range(0, len(rows), self.max_batch_rows):
            chunk = rows[start : start + self.max_batch_rows]
            for (i, j), ids, logprobs, stopped in self._sample_rows(prompts, chunk, call_key, stop_ids, params):
                reason = "stop" if stopped else "length"
                results[i, j] = make_completion(i, j, ids, logprobs, reason, self.tokenizer)
        return [[results[i, j] for j in range(params.n)] for i in range(len(prompts))]

    def _sample_rows(self, prompts, rows, call_key, stop_ids, params: SamplingParams):
        n_rows = _bucket(len(rows), 1)
        prompt_len = _bucket(max(len(prompts[i]) for i, _ in rows), MIN_PROMPT_BUCKET)
        tokens = np.zeros((n_rows, prompt_len), np.int32)
        lengths = np.ones(n_rows, np.int32)  # padding rows: one dummy token, stopped from the start
        live = np.zeros(n_rows, bool)
        keys = np.zeros((n_rows, 2), np.int32)
        for r, (i, j) in enumerate(rows):
            tokens[r, : len(prompts[i])] = prompts[i]
            lengths[r] = len(prompts[i])
            live[r] = True
            keys[r] = (i, j)
        row_keys = jax.vmap(lambda ij: jax.random.fold_in(jax.random.fold_in(call_key, ij[0]), ij[1]))(keys)
        out_tokens, out_logprobs, n_out, stopped = self._sample_batch(
            self._state, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(live), row_keys,
            stop_ids, jnp.float32(params.temperature), jnp.float32(params.top_p), jnp.int32(params.top_k),
            max_tokens=params.max_tokens, greedy=params.greedy, filters=params.filters,
            first_window=self.first_decode_window,
        )
        out_tokens, out_logprobs = np.asarray(out_tokens), np.asarray(out_logprobs)
        n_out, stopped = np.asarray(n_out), np.asarray(stopped)
        for r, row in enumerate(rows):
            yield row, out_tokens[r, : n_out[r]], out_logprobs[r, : n_out[r]], bool(stopped[r])


def _bucket(size: int, minimum: int) -> int:
    """The next power of two >= size (and >= minimum)."""
    return max(minimum, 1 << (size - 1).bit_length())


def _compile(graphdef: nnx.GraphDef):
    # The graph definition is closed over, not a static argument: the model config it holds is not hashable.
    return jax.jit(functools.partial(_sample_batch, graphdef),
                   static_argnames=("max_tokens", "greedy", "filters", "first_window"))


def _sample_batch(
    graphdef, state, tokens, lengths, live, row_keys, stop_ids, temperature, top_p, top_k, *,
    max_tokens: int, greedy: bool, filters: bool, first_window: int,
):
    """Prefill right-padded prompts [B, P], then decode up to `max_tokens` tokens per row (in phases, see the
    module docstring).

    Returns tokens [B, max_tokens], their log-probs, the count generated per row, and whether the row stopped
    on a stop id. Decode tokens share the prompt's segment id, so the cache mask hides only the padding slots.
    """
    model = nnx.merge(graphdef, state)
    batch, prompt_len = tokens.shape
    cache = KVCache.init(model.config, batch, prompt_len + max_tokens, model.dtype).replace(window=prompt_len)
    segments = (jnp.arange(prompt_len)[None, :] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), tokens.shape)
    hidden, cache = model.hidden_states(tokens, positions, segments, cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = model.logits(last)

    def decode_step(carry):
        step, cache, logits, out_tokens, out_logprobs, n_out, done = carry
        step_keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(row_keys)
        token, logprob = _pick_tokens(logits, step_keys, temperature, top_p, top_k, greedy, filters)
        out_tokens = out_tokens.at[:, step].set(jnp.where(done, 0, token))
        out_logprobs = out_logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
        n_out = n_out + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_ids)
        hidden, cache = model.hidden_states(
            token[:, None], (lengths + step)[:, None], jnp.ones((batch, 1), jnp.int32), cache
        )
        return step + 1, cache, model.logits(hidden[:, 0]), out_tokens, out_logprobs, n_out, done

    carry = (
        jnp.int32(0), cache, logits,
        jnp.zeros((batch, max_tokens), jnp.int32), jnp.zeros((batch, max_tokens), jnp.float32),
        jnp.zeros((batch,), jnp.int32), ~live,
    )
    for limit in _phase_limits(max_tokens, first_window):
        step, cache, *rest = carry
        carry = (step, cache.replace(window=prompt_len + limit), *rest)
        carry = jax.lax.while_loop(
            lambda c, limit=limit: (c[0] < limit) & ~jnp.all(c[-1]), decode_step, carry
        )
    _, _, _, out_tokens, out_logprobs, n_out, done = carry
    last_token = jnp.take_along_axis(out_tokens, jnp.maximum(n_out - 1, 0)[:, None], axis=1)[:, 0]
    stopped = (n_out > 0) & jnp.isin(last_token, stop_ids)
    return out_tokens, out_logprobs, n_out, stopped


def _phase_limits(max_tokens: int, first: int) -> list[int]:
    """New-token counts at which the decode phases end: first, 2 * first, ... and max_tokens."""
    limits = [min(first, max_tokens)]
    while limits[-1] < max_tokens:
        limits.append(min(2 * limits[-1], max_tokens))
    return limits


def _pick_tokens(logits, keys, temperature, top_p, top_k, greedy: bool, filters: bool):
    """Next tokens [B] and their log-probs under the full distribution log_softmax(logits / temperature)."""
    if greedy:
        token = jnp.argmax(logits, axis=-1)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        logprobs = jax.nn.log_softmax(scaled, axis=-1)
        candidates = _top_k_top_p(scaled, top_k, top_p) if filters else scaled
        token = jax.vmap(jax.random.categorical)(keys, candidates)
    return token.astype(jnp.int32), jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]


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
