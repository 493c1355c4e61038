"""The engine's device programs over the paged KV cache (`models.paged`): prefill sequences into their blocks,
start rows in decode-batch slots, decode until a row needs a block it lacks, copy blocks, take rows.

The decode batch (`Rows`) has a fixed number of slots; a slot holds one row (prompt i, sample j) or is free
(done). Rows hold no KV themselves, only their block tables: inserting, removing or compacting rows moves a few
small arrays, never a cache. The pools and the batch are donated to the programs that update them.

Every row draws from its own key, fold_in(call key, group, sample, tokens so far): a row's samples do not
depend on which slot, batch or admission it decodes in, nor on a preemption and re-prefill in between.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kimina_jax.models.paged import PagedKVCache, copy_blocks
from kimina_jax.rollout.sampling import pick_tokens


class Rows(NamedTuple):
    """The decode batch on the device: B slots."""

    tables: jax.Array  # [B, W] int32: each slot's blocks (local to its data shard)
    lengths: jax.Array  # [B] int32: tokens in the cache (prompt + generated but the last)
    capacity: jax.Array  # [B] int32: cache slots its blocks hold
    logits: jax.Array  # [B, vocab] float32: the next token's logits
    tokens: jax.Array  # [B, max_tokens] int32: generated so far (before a preemption too)
    logprobs: jax.Array  # [B, max_tokens] float32
    count: jax.Array  # [B] int32: tokens generated
    limit: jax.Array  # [B] int32: the row's cap on tokens generated
    done: jax.Array  # [B] bool: stopped, out of tokens, or a free slot
    row_keys: jax.Array  # [B] keys of the rows' (group, sample) pairs


class NewRows(NamedTuple):
    """Rows to start in slots `at` (host arrays, k of them; fillers `at` = B: dropped)."""

    at: jax.Array  # [k] int32
    source: jax.Array  # [k] int32: the prefilled sequence whose last logits the row starts from
    tables: jax.Array  # [k, W] int32
    lengths: jax.Array  # [k] int32
    capacity: jax.Array  # [k] int32
    tokens: jax.Array  # [k, max_tokens] int32: what a preempted row had generated
    logprobs: jax.Array  # [k, max_tokens] float32
    count: jax.Array  # [k] int32
    limit: jax.Array  # [k] int32
    key: jax.Array  # [k, 2] int32: the row's (group, sample) pair, its random stream


class EngineSteps:
    """The jitted programs for one model graph and paged-attention implementation (the graph is closed over, not a
    static argument: the config it holds is not hashable)."""

    def __init__(self, graphdef: nnx.GraphDef, impl: str):
        self.impl = impl
        self.prefill = jax.jit(functools.partial(_prefill, graphdef, impl), donate_argnums=1)
        self.empty_rows = jax.jit(_empty_rows, static_argnames=("slots", "width", "max_tokens", "vocab"))
        self.insert = jax.jit(_insert, donate_argnums=0)
        self.decode = jax.jit(functools.partial(_decode, graphdef, impl), donate_argnums=(1, 2),
                              static_argnames=("greedy", "filters", "pairs"))
        self.copy_blocks = jax.jit(functools.partial(copy_blocks, impl=impl), donate_argnums=0)
        self.take = jax.jit(lambda rows, index: jax.tree.map(lambda a: a[index], rows))
        self.finish = jax.jit(lambda rows, slots: rows._replace(done=rows.done.at[slots].set(True, mode="drop")),
                              donate_argnums=0)
        self.set_blocks = jax.jit(lambda rows, tables, capacity: rows._replace(tables=tables, capacity=capacity),
                                  donate_argnums=0)


def _prefill(graphdef, impl, state, pools, tokens, lengths, tables):
    """Sequences [U, P] (right-padded to `lengths`) written into their blocks `tables` [U, P / block size];
    returns (pools, each sequence's last logits [U, vocab] float32)."""
    model = nnx.merge(graphdef, state)
    rows, length = tokens.shape
    segments = (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    cache = PagedKVCache(pools, tables, jnp.zeros((rows,), jnp.int32), impl=impl, prefill=True)
    hidden, cache = model.hidden_states(tokens, positions, segments, cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return cache.pools, model.logits(last)


def _empty_rows(call_key, *, slots: int, width: int, max_tokens: int, vocab: int) -> Rows:
    zeros = lambda *shape, dtype=jnp.int32: jnp.zeros(shape, dtype)  # noqa: E731
    return Rows(tables=zeros(slots, width), lengths=zeros(slots), capacity=zeros(slots),
                logits=zeros(slots, vocab, dtype=jnp.float32), tokens=zeros(slots, max_tokens),
                logprobs=zeros(slots, max_tokens, dtype=jnp.float32), count=zeros(slots), limit=zeros(slots),
                done=jnp.ones((slots,), jnp.bool_), row_keys=jax.random.split(call_key, slots))


def _insert(rows: Rows, logits, new: NewRows, call_key) -> Rows:
    """`rows` with new rows started in their slots from the prefilled sequences' `logits`."""
    keys = jax.vmap(lambda ij: jax.random.fold_in(jax.random.fold_in(call_key, ij[0]), ij[1]))(new.key)
    started = rows._replace(
        tables=new.tables, lengths=new.lengths, capacity=new.capacity, logits=logits[new.source], tokens=new.tokens,
        logprobs=new.logprobs, count=new.count, limit=new.limit, done=jnp.zeros(new.at.shape, jnp.bool_), row_keys=keys,
    )
    return jax.tree.map(lambda old, fresh: old.at[new.at].set(fresh, mode="drop"), rows, started)


def _decode(graphdef, impl, state, pools, rows: Rows, stop_ids, temperature, top_p, top_k, stop_at, *,
            greedy: bool, filters: bool, pairs: int):
    """Decode until `stop_at` slots are done or a running row's next token has no cache slot in its blocks."""
    model = nnx.merge(graphdef, state)
    slots, max_tokens = rows.tokens.shape

    def step_once(carry):
        pools, r = carry
        live = ~r.done
        step_keys = jax.vmap(jax.random.fold_in)(r.row_keys, r.count)
        token, logprob = pick_tokens(r.logits, step_keys, temperature, top_p, top_k, greedy, filters)
        # Done and free slots hold no tokens here: the XLA path's (row, block) pairs are the running rows' alone.
        cache = PagedKVCache(pools, r.tables, jnp.where(live, r.lengths, 0), impl=impl, pairs=pairs)
        hidden, cache = model.hidden_states(token[:, None], r.lengths[:, None], live[:, None].astype(jnp.int32),
                                            cache)
        # This step's column of each live row (a select, not a scatter: row-split buffers stay local).
        column = (jnp.arange(max_tokens)[None, :] == r.count[:, None]) & live[:, None]
        count = r.count + live.astype(jnp.int32)
        return cache.pools, r._replace(
            lengths=jnp.where(live, cache.lengths, r.lengths), logits=model.logits(hidden[:, 0]),
            tokens=jnp.where(column, token[:, None], r.tokens),
            logprobs=jnp.where(column, logprob[:, None], r.logprobs),
            count=count, done=r.done | jnp.isin(token, stop_ids) | (count >= r.limit),
        )

    def keep_going(carry):
        r = carry[1]
        room = jnp.all(r.done | (r.lengths < r.capacity))
        return room & (jnp.sum(r.done) < stop_at) & ~jnp.all(r.done)

    return jax.lax.while_loop(keep_going, step_once, (pools, rows))
