"""The built-in rollout engine: the Flax Qwen3 decoding over a paged KV cache, continuously batched.

The cache is one pool of KV blocks of `block_size` tokens (`models.paged`, sized by `kv_cache_bytes` per device),
each row holding only the blocks its tokens fill, shared prefix blocks included: rows are admitted by free blocks,
not by a maximum length, and the youngest are preempted (recomputed later) when the pool runs out
(`paged_scheduler`). Decode attention reads each row's own blocks (`models.paged.PAGED_IMPLS`: plain XLA over a
ragged list of blocks, or JAX's TPU/GPU paged kernels, picked with `model.attention_impl`). The decode batch has a
fixed power-of-two number of slots (`max_batch_rows` at most, fewer for fewer rows), shrinking to a smaller one
once nothing waits; the device programs are in `paged_steps`, token draws in `sampling`.

Compilations: one prefill per (sequences, length) bucket, one decode loop per (slots, pairs bucket; `xla` only),
one insert per (prefill rows, new rows) buckets; shapes, max_tokens, greedy or not, filtered or not and the number
of stop ids pick them, while temperature, top-p and top-k values are traced (changing them does not recompile).
A seeded call gives the same samples however its rows are batched, admitted or preempted (`paged_steps`).

On a mesh (the trainer's parameters split over several devices) sampling is data-parallel: the sampler keeps a
copy of the weights split over the model-parallel axes only (`parallel.SAMPLING_RULES`; weight matrices in the
compute dtype, which is what the model casts them to), so a decode step gathers no weights; batch slots, prefill
rows and the pool's blocks are split over the data-parallel axes alike (each data shard its own pool), KV heads
over the model-parallel ones. Pushed weights land on the shardings and dtypes the sampler already compiled for
when they are on the same devices (a push then compiles nothing); a trainer on a mesh builds the sampler from its
parameters as placed there, so that they are.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kimina_jax.errors import KiminaError
from kimina_jax.models import Qwen3ForCausalLM
from kimina_jax.models.paged import init_pools, paged_impl, pool_layout, pool_specs
from kimina_jax.parallel import SAMPLING_RULES, logical_to_mesh, num_shards, param_shardings
from kimina_jax.rollout.base import (
    OnFinished,
    RolloutEngine,
    SampleRequest,
    SampleResult,
    SamplingParams,
    as_model,
    check_prompts,
    check_requests,
    make_completion,
    resolve_eos_token_ids,
)
from kimina_jax.rollout.kv_blocks import pool_blocks
from kimina_jax.rollout.paged_scheduler import (
    MIN_PAIRS, MIN_PROMPT_BUCKET, Generation, GenerationStats, bucket, call_shape,
)
from kimina_jax.rollout.paged_steps import EngineSteps, Rows
from kimina_jax.types import Completion

KV_BLOCK_SIZE = 16


class JaxSampler(RolloutEngine):
    """Samples with the trainer's own NNX model: `update_weights` points at the new arrays on one device, and makes
    the sampling copy on a mesh, placed and typed as the arrays it replaces (module docstring).

    `max_len` bounds prompt + response (default: the config's max_position_embeddings). EOS ids default to
    config.json's and the tokenizer's (`find_eos_token_ids`). `max_batch_rows` bounds the rows decoded together
    (the batch is the largest power of two within it); `kv_cache_bytes` (None: what a call's rows could need at
    their longest) is the KV block pool's size on each device; `block_size` tokens per block.
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
        block_size: int = KV_BLOCK_SIZE,
        seed: int = 0,
    ):
        if min(max_batch_rows, block_size, 1 if kv_cache_bytes is None else kv_cache_bytes) < 1:
            raise KiminaError(f"JaxSampler: max_batch_rows, block_size and kv_cache_bytes must be >= 1, got "
                              f"{max_batch_rows}, {block_size}, {kv_cache_bytes}")
        self.config = model.config
        self._cache_dtype = model.dtype
        self._graphdef, state = nnx.split(model)
        self._state, self._mesh = _sampling_weights(state, model.dtype)
        self._steps = self._engine_steps(model)
        self.tokenizer = tokenizer
        self.eos_token_ids = resolve_eos_token_ids(eos_token_ids, model.config, tokenizer)
        self.max_len = max_len or model.config.max_position_embeddings
        self.max_batch_rows = max_batch_rows
        self.kv_cache_bytes = kv_cache_bytes
        self.block_size = block_size
        self.stats = GenerationStats()  # since the last `take_metrics`
        self.last_call = GenerationStats()
        self._pool_makers: dict = {}
        self._key = jax.random.key(seed)
        self._calls = 0

    @classmethod
    def from_config(cls, cfg, model: Qwen3ForCausalLM, **kwargs) -> JaxSampler:
        """From the recipe's `rollout.jax` section (`config.JaxSamplerConfig`); `kwargs` as for the constructor."""
        return cls(model, max_batch_rows=cfg.max_batch_rows, kv_cache_bytes=cfg.kv_cache_bytes,
                   block_size=cfg.kv_block_size, **kwargs)

    def _engine_steps(self, model: Qwen3ForCausalLM) -> EngineSteps:
        with self._mesh_context():  # `auto` picks by the platform of the engine's devices
            return EngineSteps(nnx.graphdef(model), paged_impl(_attention_impl(model), model.config.head_dim))

    def _mesh_context(self):
        return jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext()

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
        self._state, self._mesh, self._cache_dtype = new_state, mesh, model.dtype
        if graphdef != self._graphdef:  # another dtype or attention implementation: compile anew
            self._graphdef, self._steps = graphdef, self._engine_steps(model)

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        prompts = check_prompts(prompt_token_ids, params, self.max_len, self.config.vocab_size)
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        outputs, _ = self._run(prompts, [i for i, _ in rows], rows, params)
        stop_ids = params.stop_ids(self.eos_token_ids)
        results = {}
        for (i, j), (ids, logprobs) in zip(rows, outputs):
            results[i, j] = make_completion(i, j, ids, logprobs, _finish_reason(ids, stop_ids), self.tokenizer)
        return [[results[i, j] for j in range(params.n)] for i in range(len(prompts))]

    def continue_samples(
        self, requests: Sequence[SampleRequest], params: SamplingParams, on_finished: OnFinished | None = None
    ) -> list[SampleResult]:
        """Requests of one prompt that start afresh, next to each other, are prefilled once (as a prompt's samples
        are in `generate`); a continued one is prefilled with its response so far."""
        requests = check_requests(requests, params, self.max_len, self.config.vocab_size)
        index: dict[tuple[int, ...], int] = {}
        rows = [index.setdefault(r.prompt_token_ids, len(index)) for r in requests]
        caps = [r.cap(params) for r in requests]
        responses = {r: (np.asarray(q.response, np.int32), q.logprobs) for r, q in enumerate(requests) if q.response}
        stop_ids = params.stop_ids(self.eos_token_ids)

        def result(row: int, ids, logprobs, finished: bool = True) -> SampleResult:
            reason = _finish_reason(ids, stop_ids) if finished else None
            return SampleResult(tuple(int(t) for t in ids), np.asarray(logprobs, np.float32), reason)

        told = None if on_finished is None else lambda row, ids, logprobs: on_finished(row, result(row, ids, logprobs))
        outputs, finished = self._run(list(index), rows, [r.key for r in requests], params, caps=caps,
                                      responses=responses, on_finished=told)
        return [result(row, ids, logprobs, bool(done)) for row, ((ids, logprobs), done) in
                enumerate(zip(outputs, finished))]

    def _run(self, prompts, rows, keys, params: SamplingParams, **rows_options):
        """One call's rows through a `Generation`: each row's tokens and log-probs, and whether it finished."""
        if params.seed is None:
            call_key = jax.random.fold_in(self._key, self._calls)
            self._calls += 1
        else:
            call_key = jax.random.key(params.seed)
        stop_ids = params.stop_ids(self.eos_token_ids)
        row_split, head_split = _cache_split(self._mesh, self.config.num_key_value_heads)
        pool_size = None if self.kv_cache_bytes is None else pool_blocks(
            self.config, self._cache_dtype, self.block_size, self.kv_cache_bytes, head_split)
        with self._mesh_context():
            generation = Generation(self, prompts, rows, call_key, stop_ids, params, shards=row_split,
                                    pool_size=pool_size, keys=np.asarray(keys, np.int32).reshape(-1, 2),
                                    **rows_options)
            outputs, finished = generation.run()
        self.last_call = generation.stats
        self.stats.add(generation.stats)
        return outputs, finished

    def take_metrics(self) -> dict[str, float]:
        """`rollout/decode_steps` (sequential decode iterations), `rollout/rows_in_flight/{mean,max}`,
        `rollout/kv_blocks_used/max` (fraction of the pool), `rollout/preempted` over the calls since the last
        time."""
        metrics = self.stats.metrics() if self.stats.decode_steps else {}
        self.stats = GenerationStats()
        return metrics

    def new_pools(self, blocks: int):
        """Empty KV block pools of `blocks` blocks in all (split over the data shards on a mesh)."""
        key = (blocks, self._steps.impl, self._mesh, self._cache_dtype)
        if key not in self._pool_makers:  # one compilation per pool shape and placement
            c = self.config
            make = functools.partial(init_pools, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, blocks,
                                     self.block_size, self._cache_dtype, self._steps.impl)
            shardings = None
            if self._mesh is not None:
                layout = pool_layout(self._steps.impl)
                shardings = tuple(tuple(NamedSharding(self._mesh, spec) for spec in
                                        pool_specs(p, layout, self._mesh, c.num_key_value_heads))
                                  for p in jax.eval_shape(make))
            self._pool_makers[key] = jax.jit(make, out_shardings=shardings)
        return self._pool_makers[key]()


class SamplingPlan(NamedTuple):
    """The sampler's programs lowered ahead of time (`lower_sampling`) and what they hold."""

    programs: dict[str, jax.stages.Lowered]  # prefill (a full batch's prompts), decode (every row at its longest)
    batch_rows: int  # decode batch slots
    slots: int  # cache slots a row may fill (prompt bucket + max_tokens)
    weights: Any  # the weights sampled with, as shape-dtype-sharding structs
    weights_are_copy: bool  # a copy beside the trainer's parameters (a mesh of several devices), not those arrays
    cache: Any  # the KV block pools, as structs


def lower_sampling(model: Qwen3ForCausalLM, mesh, *, rows: int, prompt_length: int, max_tokens: int, n: int,
                   max_batch_rows: int, kv_cache_bytes: int | None,
                   block_size: int = KV_BLOCK_SIZE) -> SamplingPlan:
    """The prefill and decode programs of a `generate` call of `rows` rows (`n` per prompt) with prompts up to
    `prompt_length` tokens, lowered for `mesh` (e.g. a TPU topology's devices) from `model` (an abstract model
    is enough), at their largest: a full batch of prompts prefilled, every slot decoding at its longest."""
    graphdef, state = nnx.split(model)
    copy = mesh.size > 1
    rules_mesh = mesh if copy else None
    if copy:  # as `_sampling_weights` places them
        shardings = param_shardings(state, mesh, SAMPLING_RULES)
        dtype = lambda leaf: _sampling_dtype(leaf, model.dtype)  # noqa: E731
    else:
        shardings = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), state)
        dtype = lambda leaf: leaf.dtype  # noqa: E731
    weights = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, dtype(leaf), sharding=sharding),
                           state, shardings)
    config = model.config
    row_split, head_split = _cache_split(rules_mesh, config.num_key_value_heads)
    prompt_bucket = bucket(prompt_length, MIN_PROMPT_BUCKET)
    slots = prompt_bucket + max_tokens
    batch, width, need = call_shape(rows, slots, block_size, max_batch_rows, row_split)
    blocks = need if kv_cache_bytes is None else min(need, pool_blocks(config, model.dtype, block_size,
                                                                        kv_cache_bytes, head_split))
    place = lambda shape, dtype, axes: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=NamedSharding(mesh, logical_to_mesh(axes, mesh, shape)))
    with jax.set_mesh(mesh):
        impl = paged_impl(_attention_impl(model), model.config.head_dim)
        layout = pool_layout(impl)
        shapes = jax.eval_shape(lambda: init_pools(config.num_hidden_layers, config.num_key_value_heads,
                                                   config.head_dim, blocks * row_split, block_size, model.dtype, impl))
        cache = tuple(tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec)) for a, spec in
                            zip(p, pool_specs(p, layout, mesh, config.num_key_value_heads))) for p in shapes)
        prompts = bucket(-(-batch // n), row_split)
        key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
        per_row = lambda *shape, dtype=jnp.int32: place((batch, *shape), dtype,  # noqa: E731
                                                        ("batch",) + (None,) * len(shape))
        decode_rows = Rows(tables=per_row(width), lengths=per_row(), capacity=per_row(),
                           logits=place((batch, config.vocab_size), jnp.float32, ("batch", "vocab")),
                           tokens=per_row(max_tokens), logprobs=per_row(max_tokens, dtype=jnp.float32),
                           count=per_row(), limit=per_row(), done=per_row(dtype=jnp.bool_),
                           row_keys=per_row(dtype=key_dtype))
        scalar = lambda dtype: place((), dtype, ())  # noqa: E731
        steps = EngineSteps(graphdef, impl)
        pairs = 0 if impl != "xla" else max(MIN_PAIRS, bucket((batch // row_split) * width))
        programs = {
            "prefill": steps.prefill.lower(
                weights, cache, place((prompts, prompt_bucket), jnp.int32, ("batch", None)),
                place((prompts,), jnp.int32, ("batch",)),
                place((prompts, -(-prompt_bucket // block_size)), jnp.int32, ("batch", None))),
            "decode": steps.decode.lower(weights, cache, decode_rows, place((1,), jnp.int32, (None,)),
                                         scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.int32),
                                         scalar(jnp.int32), greedy=False, filters=False, pairs=pairs),
        }
    return SamplingPlan(programs, batch, slots, weights, copy, cache)


def _finish_reason(ids, stop_ids) -> str:
    """"stop" when the response ends with a stop id, else "length" (it reached its cap)."""
    return "stop" if len(ids) and int(ids[-1]) in stop_ids else "length"


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


def _attention_impl(model: Qwen3ForCausalLM) -> str:
    return model.model.layers[0].self_attn.attention_impl


def _devices(state) -> set:
    return {device for leaf in jax.tree.leaves(state) for device in leaf.sharding.device_set}


def _cache_split(mesh, kv_heads: int) -> tuple[int, int]:
    """How many ways the mesh splits the KV cache's rows (as a batch's) and heads (as KV heads, where it divides)."""
    if mesh is None:
        return 1, 1
    return num_shards(mesh, "batch"), num_shards(mesh, "kv_heads", kv_heads)
