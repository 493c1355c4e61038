"""The built-in rollout engine: batched sampling on the Flax Qwen3 with a KV cache.

Rows (prompt i, sample j) are cut into batches of at most `max_batch_rows`; each batch is right-padded to a
power-of-two row count and prompt length, prefilled by one jitted call, then decoded by jitted `lax.while_loop`s
that stop early once every row has stopped. Shapes and max_tokens, greedy or not, filtered or not and the number
of stop ids pick the compilation; temperature, top-p and top-k values are traced, so changing them does not
recompile.

Decoding runs in phases of doubling length (`first_decode_window` new tokens, then twice as many, ... up to
max_tokens), each a jitted while loop whose attention reads only the cache slots that phase can have filled: a
step costs about the context so far, not the cache's whole capacity (with 24k-token responses the difference is
most of the decode time). Between phases the rows still running are gathered into the smallest power-of-two
batch that holds them, so finished samples stop costing decode steps. The prefill attends among the prompt
tokens alone (flash kernels where they apply). Compilations: one prefill per (rows, prompt length) bucket, one
phase per (rows bucket, phase), one gather per pair of row buckets.

Every row draws from its own key, fold_in(call key, prompt index, sample index, step), so a seeded call gives
the same samples however the rows are batched.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

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
        self._jitted = _Jitted(self._graphdef)
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
            self._graphdef, self._jitted = graphdef, _Jitted(graphdef)
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
        run = self._jitted
        decode = run.prefill(self._state, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(live), row_keys,
                             max_tokens=params.max_tokens)
        sampling = (stop_ids, jnp.float32(params.temperature), jnp.float32(params.top_p), jnp.int32(params.top_k))
        origin = np.arange(n_rows)  # the row of `rows` each batch row holds (-1: a filler)
        finished: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        for limit in _phase_limits(params.max_tokens, self.first_decode_window):
            decode = run.phase(self._state, decode, *sampling, limit=limit, window=prompt_len + limit,
                               greedy=params.greedy, filters=params.filters)
            if limit == params.max_tokens:
                break
            done = np.asarray(decode.done)
            running = np.flatnonzero(~done)
            size = _bucket(len(running), 1) if len(running) else 0
            if size < len(done):  # gather the running rows into a smaller batch; keep what the others made
                _keep_finished(decode, origin, done, finished)
                if not size:
                    break
                index = np.concatenate([running, np.full(size - len(running), running[0])])
                filler = np.arange(size) >= len(running)
                decode = run.take_rows(decode, jnp.asarray(index), jnp.asarray(filler))
                origin = np.where(filler, -1, origin[index])
        _keep_finished(decode, origin, np.ones(len(origin), bool), finished)
        stops = set(np.asarray(stop_ids).tolist())
        for r, row in enumerate(rows):
            ids, logprobs, count = finished[r]
            yield row, ids[:count], logprobs[:count], bool(count) and int(ids[count - 1]) in stops


class _Decode(NamedTuple):
    """A batch being decoded (arrays on the device; B rows)."""

    step: jax.Array  # int32: tokens generated so far by every running row
    cache: KVCache
    logits: jax.Array  # [B, vocab] float32: the next token's logits
    tokens: jax.Array  # [B, max_tokens] int32
    logprobs: jax.Array  # [B, max_tokens] float32
    count: jax.Array  # [B] int32: tokens generated per row
    done: jax.Array  # [B] bool: stopped, out of tokens, or a filler
    row_keys: jax.Array  # [B] keys: a row's draws depend on its (prompt, sample) and the step only
    lengths: jax.Array  # [B] int32 prompt lengths


def _keep_finished(decode: _Decode, origin: np.ndarray, rows: np.ndarray, finished: dict) -> None:
    """Copy to the host what the chosen batch rows (not fillers, not yet kept) generated."""
    chosen = [r for r in np.flatnonzero(rows) if origin[r] >= 0 and origin[r] not in finished]
    if not chosen:
        return
    tokens, logprobs, count = (np.asarray(a) for a in (decode.tokens, decode.logprobs, decode.count))
    for r in chosen:
        finished[int(origin[r])] = (tokens[r], logprobs[r], int(count[r]))


def _bucket(size: int, minimum: int) -> int:
    """The next power of two >= size (and >= minimum)."""
    return max(minimum, 1 << (size - 1).bit_length())


class _Jitted:
    """The jitted pieces of sampling for one model graph (closed over, not a static argument: the model config
    it holds is not hashable)."""

    def __init__(self, graphdef: nnx.GraphDef):
        self.prefill = jax.jit(functools.partial(_prefill, graphdef), static_argnames=("max_tokens",))
        self.phase = jax.jit(functools.partial(_decode_phase, graphdef),
                             static_argnames=("limit", "window", "greedy", "filters"))
        self.take_rows = jax.jit(_take_rows)


def _prefill(graphdef, state, tokens, lengths, live, row_keys, *, max_tokens: int) -> _Decode:
    """Prefill right-padded prompts [B, P] into a cache with room for `max_tokens` more tokens per row. Decode
    tokens share the prompt's segment id, so the cache mask hides only the padding slots."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = tokens.shape
    cache = KVCache.init(model.config, batch, prompt_len + max_tokens, model.dtype).replace(window=prompt_len)
    segments = (jnp.arange(prompt_len)[None, :] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), tokens.shape)
    hidden, cache = model.hidden_states(tokens, positions, segments, cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return _Decode(
        step=jnp.int32(0), cache=cache, logits=model.logits(last),
        tokens=jnp.zeros((batch, max_tokens), jnp.int32), logprobs=jnp.zeros((batch, max_tokens), jnp.float32),
        count=jnp.zeros((batch,), jnp.int32), done=~live, row_keys=row_keys, lengths=lengths,
    )


def _decode_phase(
    graphdef, state, decode: _Decode, stop_ids, temperature, top_p, top_k, *,
    limit: int, window: int, greedy: bool, filters: bool,
) -> _Decode:
    """Decode until every row is done or `limit` tokens are generated, attention reading `window` cache slots."""
    model = nnx.merge(graphdef, state)
    batch = decode.done.shape[0]

    def step_once(d: _Decode) -> _Decode:
        step_keys = jax.vmap(lambda key: jax.random.fold_in(key, d.step))(d.row_keys)
        token, logprob = _pick_tokens(d.logits, step_keys, temperature, top_p, top_k, greedy, filters)
        hidden, cache = model.hidden_states(
            token[:, None], (d.lengths + d.step)[:, None], jnp.ones((batch, 1), jnp.int32), d.cache
        )
        return d._replace(
            step=d.step + 1, cache=cache, logits=model.logits(hidden[:, 0]),
            tokens=d.tokens.at[:, d.step].set(jnp.where(d.done, 0, token)),
            logprobs=d.logprobs.at[:, d.step].set(jnp.where(d.done, 0.0, logprob)),
            count=d.count + (~d.done).astype(jnp.int32),
            done=d.done | jnp.isin(token, stop_ids),
        )

    decode = decode._replace(cache=decode.cache.replace(window=window))
    return jax.lax.while_loop(lambda d: (d.step < limit) & ~jnp.all(d.done), step_once, decode)


def _take_rows(decode: _Decode, index: jax.Array, filler: jax.Array) -> _Decode:
    """The batch rows `index` (fillers marked done), the cache's rows with them."""
    take = functools.partial(jnp.take, indices=index, axis=0)
    cache = decode.cache
    cache = cache.replace(keys=tuple(map(take, cache.keys)), values=tuple(map(take, cache.values)),
                          segment_ids=take(cache.segment_ids))
    return decode._replace(
        cache=cache, logits=take(decode.logits), tokens=take(decode.tokens), logprobs=take(decode.logprobs),
        count=take(decode.count), done=take(decode.done) | filler, row_keys=take(decode.row_keys),
        lengths=take(decode.lengths),
    )


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
