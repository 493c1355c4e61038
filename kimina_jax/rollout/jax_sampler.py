"""The built-in rollout engine: batched sampling on the Flax Qwen3 with a KV cache, continuously batched.

The rows of a call (prompt i, sample j) are decoded in one batch of a fixed power-of-two number of rows
(`max_batch_rows`, fewer when their KV cache would exceed `kv_cache_bytes` on a device). Every row of the cache
holds its own sequence and advances on its own: when rows finish, the decode loop stops, their results are copied
out, and waiting rows are prefilled (one jitted call, right-padded to a power-of-two prompt length) and copied
into the freed rows while the others keep their place: a long response does not hold its batch hostage. Once
nothing waits, the rows still running are gathered into the smallest power-of-two batch that holds them, so
finished samples stop costing decode steps.

The decode batch's KV cache holds only `window` slots, the smallest power of two (at least `first_decode_window`)
beyond every running row's last token, capped at the rows' capacity (prompt bucket + max_tokens): a step costs
about the longest context so far, not the whole capacity (with 24k-token responses that is most of the decode
time). The decode loop stops when a row reaches the window; the cache is then grown (or, once long rows have
left, shrunk) to the new window between decode calls, one layer's array at a time, rather than a window being
sliced out of a full-capacity cache at every step (that copy cost more than the attention reading it).

A prompt is prefilled once for all its samples admitted together (their cache rows are copies). Compilations:
one prefill per (prompts, prompt length) bucket, one decode loop per (batch rows, window), one insert per
(batch rows, window, new rows, prompts, prompt length) buckets, one resize per (array shape, window), one gather
per pair of row buckets; shapes and max_tokens, greedy or not, filtered or not and the number of stop ids pick
them, while temperature, top-p and top-k values are traced (changing them does not recompile).

Every row draws from its own key, fold_in(call key, prompt index, sample index, tokens so far), so a seeded call
gives the same samples however the rows are batched. A draw takes one uniform number per row and inverts the
(filtered) distribution's cumulative sum (`_inverse_cdf`), not a vocabulary of Gumbel noise.

The KV cache is head-major (`models.KVCache`: keys [rows, KV heads, head dim, slots], values [rows, KV heads,
slots, head dim]), the layouts decode attention reads, and the decode loop updates it in place (its batch is
donated).

On a mesh (the trainer's parameters split over several devices) sampling is data-parallel: the sampler keeps a
copy of the weights split over the model-parallel axes only (`parallel.SAMPLING_RULES`; weight matrices in the
compute dtype, which is what the model casts them to), so a decode step gathers no weights; the model's sharding
hints split the batch rows (and so the KV cache) like a batch's. Pushed weights land on the shardings and dtypes
the sampler already compiled for when they are on the same devices (a push then compiles nothing); a trainer on a
mesh builds the sampler from its parameters as placed there, so that they are.
"""
from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from kimina_jax.errors import KiminaError
from kimina_jax.models import KVCache, Qwen3ForCausalLM
from kimina_jax.parallel import SAMPLING_RULES, logical_to_mesh, num_shards, param_shardings
from kimina_jax.rollout.base import (
    RolloutEngine,
    SamplingParams,
    as_model,
    check_prompts,
    make_completion,
    resolve_eos_token_ids,
)
from kimina_jax.types import Completion

MIN_PROMPT_BUCKET = 16
FIRST_DECODE_WINDOW = 512
SAMPLING_BLOCK = 256  # tokens per block of the two-level inverse CDF (`_inverse_cdf`)
REFILL_FRACTION = 8  # with rows waiting, the loop stops to refill once 1/8 of the batch (at least one row) is free


class JaxSampler(RolloutEngine):
    """Samples with the trainer's own NNX model: `update_weights` points at the new arrays on one device, and makes
    the sampling copy on a mesh, placed and typed as the arrays it replaces (module docstring).

    `max_len` bounds prompt + response (default: the config's max_position_embeddings). EOS ids default to
    config.json's and the tokenizer's (`find_eos_token_ids`). `max_batch_rows` bounds the rows decoded together
    (the batch is the largest power of two within it); `kv_cache_bytes` (None: no bound) bounds the memory their
    KV cache takes on each device at its largest, (prompt bucket + max_tokens) slots for every row (while the cache
    grows, one layer's keys or values exist twice).
    """

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        *,
        tokenizer=None,
        eos_token_ids: Sequence[int] | None = None,
        max_len: int | None = None,
        max_batch_rows: int = 128,
        kv_cache_bytes: int | None = None,
        seed: int = 0,
        first_decode_window: int = FIRST_DECODE_WINDOW,
    ):
        if min(max_batch_rows, first_decode_window, 1 if kv_cache_bytes is None else kv_cache_bytes) < 1:
            raise KiminaError(f"JaxSampler: max_batch_rows, first_decode_window and kv_cache_bytes must be >= 1, got "
                              f"{max_batch_rows}, {first_decode_window}, {kv_cache_bytes}")
        self.config = model.config
        self._cache_dtype = model.dtype
        self._graphdef, state = nnx.split(model)
        self._state, self._mesh = _sampling_weights(state, model.dtype)
        self.first_decode_window = first_decode_window
        self._jitted = _Jitted(self._graphdef)
        self.tokenizer = tokenizer
        self.eos_token_ids = resolve_eos_token_ids(eos_token_ids, model.config, tokenizer)
        self.max_len = max_len or model.config.max_position_embeddings
        self.max_batch_rows = max_batch_rows
        self.kv_cache_bytes = kv_cache_bytes
        self._key = jax.random.key(seed)
        self._calls = 0

    @classmethod
    def from_config(cls, cfg, model: Qwen3ForCausalLM, **kwargs) -> JaxSampler:
        """From the recipe's `rollout.jax` section (`config.JaxSamplerConfig`); `kwargs` as for the constructor."""
        return cls(model, max_batch_rows=cfg.max_batch_rows, kv_cache_bytes=cfg.kv_cache_bytes,
                   first_decode_window=cfg.first_decode_window, **kwargs)

    def update_weights(self, model_or_params: Any) -> None:
        model = as_model(model_or_params, self._graphdef)
        graphdef, state = nnx.split(model)
        if jax.tree.structure(state) != jax.tree.structure(self._state):
            raise KiminaError("update_weights: the new parameters do not have the structure of the sampler's model")
        new_state, mesh = _sampling_weights(state, model.dtype)
        if graphdef == self._graphdef and mesh == self._mesh and _devices(new_state) == _devices(self._state):
            # Exactly the placement and dtypes the jitted functions were compiled for (the trainer's shardings of a
            # one-device mesh, say, are not the model's own): pushing weights compiles nothing.
            new_state = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding),
                                     new_state, self._state)
        elif graphdef != self._graphdef:  # another dtype or attention implementation: compile anew
            self._graphdef, self._jitted = graphdef, _Jitted(graphdef)
        self._state, self._mesh, self._cache_dtype = new_state, mesh, model.dtype

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        prompts = check_prompts(prompt_token_ids, params, self.max_len, self.config.vocab_size)
        if params.seed is None:
            call_key = jax.random.fold_in(self._key, self._calls)
            self._calls += 1
        else:
            call_key = jax.random.key(params.seed)
        stop_ids = params.stop_ids(self.eos_token_ids)
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        with jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext():
            outputs = _Batch(self, prompts, rows, call_key, stop_ids, params).run()
        results = {}
        for (i, j), (ids, logprobs) in zip(rows, outputs):
            reason = "stop" if len(ids) and int(ids[-1]) in stop_ids else "length"
            results[i, j] = make_completion(i, j, ids, logprobs, reason, self.tokenizer)
        return [[results[i, j] for j in range(params.n)] for i in range(len(prompts))]

    def batch_rows(self, rows: int, slots: int) -> int:
        """The batch size for `rows` waiting rows with `slots` cache slots each (`decode_batch_rows`)."""
        return decode_batch_rows(self.config, self._cache_dtype, self._mesh, self.max_batch_rows, self.kv_cache_bytes,
                                 rows, slots)


def decode_batch_rows(config, cache_dtype, mesh, max_batch_rows: int, kv_cache_bytes: int | None, rows: int,
                      slots: int) -> int:
    """The decode batch for `rows` waiting rows with `slots` cache slots each: a power of two within
    `max_batch_rows` whose KV cache takes at most `kv_cache_bytes` on any device of `mesh` (None: one device;
    rows and KV heads are split)."""
    batch = min(_bucket(rows, 1), _floor_pow2(max_batch_rows))
    if kv_cache_bytes is None:
        return batch
    row_split, head_split = _cache_split(mesh, config.num_key_value_heads)
    device_row_bytes = _row_bytes(config, cache_dtype, slots) // head_split
    per_device = kv_cache_bytes // device_row_bytes
    if per_device < 1:
        raise KiminaError(f"JaxSampler: kv_cache_bytes={kv_cache_bytes} holds no row of {slots} cache slots "
                          f"(prompt bucket + max_tokens), which needs {device_row_bytes} bytes per device: raise "
                          f"rollout.jax.kv_cache_bytes or lower data.max_response_length")
    batch = min(batch, _floor_pow2(per_device * row_split))
    return batch if batch % row_split == 0 else min(batch, _floor_pow2(per_device))  # rows not split


class SamplingPlan(NamedTuple):
    """The sampler's programs lowered ahead of time (`lower_sampling`) and what they hold."""

    programs: dict[str, jax.stages.Lowered]  # prefill (a full batch's prompts), decode (the loop at the full window)
    batch_rows: int  # rows decoded together
    weights: Any  # the weights sampled with, as shape-dtype-sharding structs
    weights_are_copy: bool  # a copy beside the trainer's parameters (a mesh of several devices), not those arrays
    cache: KVCache  # the decode batch's KV cache at its largest, as structs


def lower_sampling(model: Qwen3ForCausalLM, mesh, *, rows: int, prompt_length: int, max_tokens: int, n: int,
                   max_batch_rows: int, kv_cache_bytes: int | None) -> SamplingPlan:
    """The prefill and decode programs of a `generate` call of `rows` rows (`n` per prompt) with prompts up to
    `prompt_length` tokens, lowered for `mesh` (e.g. a TPU topology's devices) from `model` (an abstract model
    is enough), at their largest: every row decoding at the full window (prompt bucket + `max_tokens` slots)."""
    graphdef, state = nnx.split(model)
    copy = mesh.size > 1
    rules_mesh = mesh if copy else None
    if copy:  # as `_sampling_weights` places them
        shardings = param_shardings(state, mesh, SAMPLING_RULES)
        dtype = lambda leaf: _sampling_dtype(leaf, model.dtype)  # noqa: E731
    else:
        shardings = jax.tree.map(lambda _: NamedSharding(mesh, jax.sharding.PartitionSpec()), state)
        dtype = lambda leaf: leaf.dtype  # noqa: E731
    weights = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, dtype(leaf), sharding=sharding),
                           state, shardings)
    prompt_bucket = _bucket(prompt_length, MIN_PROMPT_BUCKET)
    slots = prompt_bucket + max_tokens
    batch = decode_batch_rows(model.config, model.dtype, rules_mesh, max_batch_rows, kv_cache_bytes, rows, slots)
    place = lambda shape, dtype, axes: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=NamedSharding(mesh, logical_to_mesh(axes, mesh, shape)))
    prompts = _bucket(-(-batch // n), 1)
    config = model.config
    # The cache `KVCache.init` makes, rows split like a batch's and keys/values by KV head.
    cache_axes = {4: ("batch", "kv_heads", None, None), 2: ("batch", None), 1: ("batch",)}
    cache = jax.tree.map(lambda leaf: place(leaf.shape, leaf.dtype, cache_axes[leaf.ndim]),
                         jax.eval_shape(lambda: KVCache.init(config, batch, slots, model.dtype)))
    key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
    decode = _Decode(
        cache=cache, logits=place((batch, config.vocab_size), jnp.float32, ("batch", "vocab")),
        tokens=place((batch, max_tokens), jnp.int32, ("batch", None)),
        logprobs=place((batch, max_tokens), jnp.float32, ("batch", None)),
        count=place((batch,), jnp.int32, ("batch",)), done=place((batch,), jnp.bool_, ("batch",)),
        row_keys=place((batch,), key_dtype, ("batch",)),
    )
    scalar = lambda dtype: place((), dtype, ())  # noqa: E731
    jitted = _Jitted(graphdef)
    with jax.set_mesh(mesh):
        programs = {
            "prefill": jitted.prefill.lower(weights, place((prompts, prompt_bucket), jnp.int32, ("batch", None)),
                                            place((prompts,), jnp.int32, ("batch",))),
            "decode": jitted.decode.lower(weights, decode, place((1,), jnp.int32, (None,)), scalar(jnp.float32),
                                          scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.int32),
                                          greedy=False, filters=False),
        }
    return SamplingPlan(programs, batch, weights, copy, cache)


class _Batch:
    """One `generate` call's rows going through the decode batch: admitted as rows free up, harvested when done."""

    def __init__(self, sampler: JaxSampler, prompts, rows, call_key, stop_ids, params: SamplingParams):
        self.sampler, self.prompts, self.rows, self.params = sampler, prompts, rows, params
        self.run_jitted = sampler._jitted
        self.call_key = call_key
        self.slots = _bucket(max(len(prompts[i]) for i, _ in rows), MIN_PROMPT_BUCKET) + params.max_tokens
        self.sampling = (jnp.asarray(stop_ids or [-1], jnp.int32), jnp.float32(params.temperature),
                         jnp.float32(params.top_p), jnp.int32(params.top_k))
        self.waiting = collections.deque(range(len(rows)))
        self.origin = np.full(sampler.batch_rows(len(rows), self.slots), -1)  # row of `rows` per batch row; -1: free
        self.outputs: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(rows)

    def run(self) -> list[tuple[np.ndarray, np.ndarray]]:
        decode = self._admit(None)
        while (self.origin >= 0).any():
            if not self.waiting:
                decode = self._compact(decode)
            batch, index = len(self.origin), np.asarray(decode.cache.index)
            decode = self._resize(decode, self._window(index[self.origin >= 0].max()))
            free = int((self.origin < 0).sum())
            stop_at = free + max(1, batch // REFILL_FRACTION) if self.waiting else max(batch - batch // 2, free + 1)
            decode = self.run_jitted.decode(self.sampler._state, decode, *self.sampling, jnp.int32(stop_at),
                                            greedy=self.params.greedy, filters=self.params.filters)
            self._harvest(decode)
            if self.waiting:
                decode = self._admit(decode)
        return self.outputs

    def _window(self, last: int) -> int:
        """The cache slots rows need while the furthest of them writes its next token at slot `last`."""
        return min(self.slots, _bucket(max(last + 1, self.sampler.first_decode_window), 1))

    def _resize(self, decode: _Decode, window: int) -> _Decode:
        """`decode` with a cache of `window` slots, grown with empty slots or cut after the last written one.
        Array by array, each old one deleted once copied: the cache never exists twice."""
        if window == decode.window:
            return decode

        def resized(array, axis):
            new = self.run_jitted.resize(array, axis=axis, size=window)
            array.delete()
            return new

        return decode._replace(cache=decode.cache.map_slots(resized))

    def _admit(self, decode: _Decode | None) -> _Decode:
        """Prefill waiting rows into the free batch rows (the whole batch when `decode` is None). A prompt is
        prefilled once for all its admitted samples, which copy its cache rows."""
        free = np.flatnonzero(self.origin < 0)
        admitted = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        if not admitted:
            return decode
        unique = {i: u for u, i in enumerate(dict.fromkeys(self.rows[k][0] for k in admitted))}
        prompt_len = _bucket(max(len(self.prompts[i]) for i in unique), MIN_PROMPT_BUCKET)
        tokens = np.zeros((_bucket(len(unique), 1), prompt_len), np.int32)
        lengths = np.ones(len(tokens), np.int32)  # filler prompts: one dummy token
        for i, u in unique.items():
            tokens[u, : len(self.prompts[i])] = self.prompts[i]
            lengths[u] = len(self.prompts[i])
        prefilled = self.run_jitted.prefill(self.sampler._state, jnp.asarray(tokens), jnp.asarray(lengths))
        window = self._window(max(len(self.prompts[i]) for i in unique))
        size = len(self.origin) if decode is None else _bucket(len(admitted), 1)
        source = np.zeros(size, np.int32)  # the prefilled prompt each new row copies (filler rows: the first)
        prompt_sample = np.zeros((size, 2), np.int32)
        for r, k in enumerate(admitted):
            source[r], prompt_sample[r] = unique[self.rows[k][0]], self.rows[k]
        new_rows = (jnp.asarray(source), jnp.asarray(np.arange(size) < len(admitted)), self.call_key,
                    jnp.asarray(prompt_sample))
        at = free[: len(admitted)]
        self.origin[at] = admitted
        if decode is None:
            return self.run_jitted.start(prefilled, *new_rows, max_tokens=self.params.max_tokens, slots=window)
        decode = self._resize(decode, max(window, decode.window))
        at = np.concatenate([at, np.full(size - len(admitted), len(self.origin))])  # fillers: out of range, dropped
        return self.run_jitted.insert(decode, prefilled, *new_rows, jnp.asarray(at))

    def _harvest(self, decode: _Decode) -> None:
        """Copy out what the rows that finished generated, and free their batch rows."""
        finished = np.flatnonzero(np.asarray(decode.done) & (self.origin >= 0))
        if not len(finished):
            return
        index = np.concatenate([finished, np.full(_bucket(len(finished), 1) - len(finished), finished[0])])
        tokens, logprobs, count = jax.device_get(self.run_jitted.gather(decode, jnp.asarray(index)))
        for r, row in enumerate(finished):
            self.outputs[self.origin[row]] = (tokens[r, : count[r]], logprobs[r, : count[r]])
        self.origin[finished] = -1

    def _compact(self, decode: _Decode) -> _Decode:
        """Gather the running rows into the smallest power-of-two batch that holds them."""
        running = np.flatnonzero(self.origin >= 0)
        size = _bucket(len(running), 1)
        if size == len(self.origin):
            return decode
        index = np.concatenate([running, np.full(size - len(running), running[0])])
        filler = np.arange(size) >= len(running)
        self.origin = np.where(filler, -1, self.origin[index])
        return self.run_jitted.take_rows(decode, jnp.asarray(index), jnp.asarray(filler))


class _Decode(NamedTuple):
    """A batch being decoded (arrays on the device; B rows, each at its own cache slot)."""

    cache: KVCache
    logits: jax.Array  # [B, vocab] float32: the next token's logits
    tokens: jax.Array  # [B, max_tokens] int32
    logprobs: jax.Array  # [B, max_tokens] float32
    count: jax.Array  # [B] int32: tokens generated per row
    done: jax.Array  # [B] bool: stopped, out of tokens, or free
    row_keys: jax.Array  # [B] keys: a row's draws depend on its (prompt, sample) and its token count only

    @property
    def window(self) -> int:
        """Cache slots per row: a row may decode until its next token would land past them."""
        return self.cache.segment_ids.shape[1]


def _sampling_weights(state, dtype) -> tuple[Any, Any]:
    """(the weights to sample with, their mesh or None): on a mesh of several devices a copy placed by
    `SAMPLING_RULES` (split over the model-parallel axes alone), weight matrices cast to the compute `dtype`;
    elsewhere `state`'s arrays themselves, committed to their devices (as pushed arrays are: the jitted functions
    then see the same placement before and after a push)."""
    shardings = [leaf.sharding for leaf in jax.tree.leaves(state)]
    mesh = getattr(shardings[0], "mesh", None)
    if mesh is None or mesh.size == 1 or not all(isinstance(s, NamedSharding) for s in shardings):
        return jax.tree.map(lambda leaf: jax.device_put(leaf, leaf.sharding), state), None

    def copy(leaf, sharding):  # leaf by leaf: one cast copy alive at a time
        return jax.device_put(leaf.astype(_sampling_dtype(leaf, dtype)), sharding)

    return jax.tree.map(copy, state, param_shardings(state, mesh, SAMPLING_RULES)), mesh


def _sampling_dtype(leaf, dtype):
    """The dtype of a parameter in the sampling copy: weight matrices in the compute `dtype` (what the model casts
    them to), the rest (norms) as they are."""
    return dtype if leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype


def _devices(state) -> set:
    return {device for leaf in jax.tree.leaves(state) for device in leaf.sharding.device_set}


def _cache_split(mesh, kv_heads: int) -> tuple[int, int]:
    """How many ways the mesh splits the KV cache's rows (as a batch's) and heads (as KV heads, where it divides)."""
    if mesh is None:
        return 1, 1
    return num_shards(mesh, "batch"), num_shards(mesh, "kv_heads", kv_heads)


def _floor_pow2(size: int) -> int:
    return 1 << (int(size).bit_length() - 1)


def _row_bytes(config, dtype, slots: int) -> int:
    """Device bytes of one batch row: its KV cache of `slots` slots (keys and values of every layer)."""
    itemsize = jnp.dtype(dtype).itemsize
    return slots * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * itemsize


def _bucket(size: int, minimum: int) -> int:
    """The next power of two >= size (and >= minimum)."""
    return max(minimum, 1 << (int(size) - 1).bit_length())


class _Jitted:
    """The jitted pieces of sampling for one model graph (closed over, not a static argument: the model config
    it holds is not hashable). The decode batch is donated: updated in place, never copied."""

    def __init__(self, graphdef: nnx.GraphDef):
        self.prefill = jax.jit(functools.partial(_prefill, graphdef))
        self.start = jax.jit(_start, static_argnames=("max_tokens", "slots"))
        self.decode = jax.jit(functools.partial(_decode, graphdef), donate_argnums=1,
                              static_argnames=("greedy", "filters"))
        self.insert = jax.jit(_insert, donate_argnums=0)
        self.resize = jax.jit(_resize_slots, static_argnames=("axis", "size"))
        self.take_rows = jax.jit(_take_rows)
        self.gather = jax.jit(lambda d, index: (d.tokens[index], d.logprobs[index], d.count[index]))


class _Prefilled(NamedTuple):
    """Prompts prefilled into a cache: the rows that batch rows start from (U prompts)."""

    cache: KVCache  # prompt-length slots; each row's index is its prompt length: decode tokens go right after it
    logits: jax.Array  # [U, vocab] float32: the first new token's logits


def _prefill(graphdef, state, tokens, lengths) -> _Prefilled:
    """Prefill right-padded prompts [U, P] into a cache of P slots. A row's decode tokens follow its prompt
    (overwriting its padding) and share the prompt's segment id, so the cache mask hides only unwritten slots."""
    model = nnx.merge(graphdef, state)
    rows, prompt_len = tokens.shape
    cache = KVCache.init(model.config, rows, prompt_len, model.dtype).replace(prefill=True)
    segments = (jnp.arange(prompt_len)[None, :] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), tokens.shape)
    hidden, cache = model.hidden_states(tokens, positions, segments, cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return _Prefilled(cache=cache.replace(index=lengths), logits=model.logits(last))


def _start(prefilled: _Prefilled, source, live, call_key, prompt_sample, *, max_tokens: int, slots: int) -> _Decode:
    """Batch rows of `slots` cache slots, row r a copy of prefilled prompt source[r] drawing with the key of its
    (prompt, sample) in prompt_sample[r]; rows not `live` are fillers, done from the start."""
    take = functools.partial(jnp.take, indices=source, axis=0)
    batch = source.shape[0]
    row_keys = jax.vmap(lambda ij: jax.random.fold_in(jax.random.fold_in(call_key, ij[0]), ij[1]))(prompt_sample)
    cache = jax.tree.map(take, prefilled.cache).map_slots(lambda a, axis: _resize_slots(a, axis=axis, size=slots))
    return _Decode(
        cache=cache, logits=take(prefilled.logits),
        tokens=jnp.zeros((batch, max_tokens), jnp.int32), logprobs=jnp.zeros((batch, max_tokens), jnp.float32),
        count=jnp.zeros((batch,), jnp.int32), done=~live, row_keys=row_keys,
    )


def _decode(
    graphdef, state, decode: _Decode, stop_ids, temperature, top_p, top_k, stop_at, *, greedy: bool, filters: bool,
) -> _Decode:
    """Decode until `stop_at` rows are done or a running row reaches the end of the cache (the window)."""
    model = nnx.merge(graphdef, state)
    batch, max_tokens = decode.tokens.shape
    window = decode.window

    def step_once(d: _Decode) -> _Decode:
        live = ~d.done
        step_keys = jax.vmap(jax.random.fold_in)(d.row_keys, d.count)
        token, logprob = _pick_tokens(d.logits, step_keys, temperature, top_p, top_k, greedy, filters)
        slot = d.cache.index  # == the token's position: a row's tokens fill its slots from 0 on
        hidden, cache = model.hidden_states(token[:, None], slot[:, None], jnp.ones((batch, 1), jnp.int32), d.cache)
        # This step's column of each live row (a select, not a scatter: row-split buffers stay local).
        column = (jnp.arange(max_tokens)[None, :] == d.count[:, None]) & live[:, None]
        count = d.count + live.astype(jnp.int32)
        return d._replace(
            cache=cache.replace(index=jnp.where(live, cache.index, slot)), logits=model.logits(hidden[:, 0]),
            tokens=jnp.where(column, token[:, None], d.tokens),
            logprobs=jnp.where(column, logprob[:, None], d.logprobs),
            count=count, done=d.done | jnp.isin(token, stop_ids) | (count >= max_tokens),
        )

    def keep_going(d: _Decode):
        room = jnp.all(d.done | (d.cache.index < window))
        return room & (jnp.sum(d.done) < stop_at) & ~jnp.all(d.done)

    return jax.lax.while_loop(keep_going, step_once, decode)


def _insert(decode: _Decode, prefilled: _Prefilled, source, live, call_key, prompt_sample, at) -> _Decode:
    """`decode` with its rows `at` replaced by new rows started as `_start` does (indices out of range: dropped)."""
    new = _start(prefilled, source, live, call_key, prompt_sample, max_tokens=decode.tokens.shape[1],
                 slots=decode.window)
    return jax.tree.map(lambda old, rows: old.at[at].set(rows, mode="drop"), decode, new)


def _resize_slots(array, *, axis: int, size: int):
    """`array` with `size` slots along `axis`: its leading ones, then zeros (empty slots)."""
    kept = jax.lax.slice_in_dim(array, 0, min(size, array.shape[axis]), axis=axis)
    return jnp.pad(kept, [(0, size - kept.shape[axis] if a == axis else 0) for a in range(array.ndim)])


def _take_rows(decode: _Decode, index: jax.Array, filler: jax.Array) -> _Decode:
    """The batch rows `index` (fillers marked done)."""
    taken = jax.tree.map(lambda a: jnp.take(a, index, axis=0), decode)
    return taken._replace(done=taken.done | filler)


def _pick_tokens(logits, keys, temperature, top_p, top_k, greedy: bool, filters: bool):
    """Next tokens [B] and their log-probs under the full distribution log_softmax(logits / temperature)."""
    if greedy:
        token = jnp.argmax(logits, axis=-1)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        logprobs = jax.nn.log_softmax(scaled, axis=-1)
        candidates = _top_k_top_p(scaled, top_k, top_p) if filters else scaled
        token = _inverse_cdf(keys, candidates)
    return token.astype(jnp.int32), jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]


def _inverse_cdf(keys, candidates):
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
