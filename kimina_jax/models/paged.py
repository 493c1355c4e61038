"""A paged KV cache for decoding: one pool of fixed-size blocks per layer, a block table per row (vLLM's design,
SPEC 13), and attention that reads each row's own blocks up to its own length.

The pool of a layer has one of two layouts, the one its attention reads as it is stored:
- `combined` [blocks, block_size, 2 x KV heads, head_dim], keys at the even heads and values at the odd ones: the
  layout of JAX's TPU kernel (`ragged_paged_attention`);
- `split`, keys and values each [KV heads, blocks, block_size, head_dim]: the layout of JAX's GPU kernel
  (`jax.experimental.pallas.ops.gpu.paged_attention`) and of the plain-XLA path (on CPU, 128 rows over 1024
  blocks: 4.2 ms a layer, against 14 ms gathering keys and values together from the combined layout).

`PAGED_IMPLS`: `xla` (any platform) gathers the (row, block) pairs of all rows into one ragged list, `pairs`
long (a static bound the engine buckets), and takes a softmax per row over them: a step costs the tokens the rows
hold, not rows x the longest row; `tpu` and `gpu` call JAX's kernels (off their platform: the GPU kernel in Pallas
interpret mode; the TPU kernel has no working interpret mode in JAX 0.10.2, see `paged_impl`).

Under a mesh (`jax.set_mesh`) the pool's blocks are split like a batch's rows and its heads like KV heads; block
ids in the tables are local to the row's data shard (the engine allocates per shard), and writes and attention
run per shard (`jax.shard_map`), so no device reads another's blocks.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention
from jax.sharding import PartitionSpec

from kimina_jax.models.attention import target_platform
from kimina_jax.models.mesh_hints import active_mesh
from kimina_jax.parallel.rules import mesh_axes

PAGED_IMPLS: tuple[str, ...] = ("xla", "tpu", "gpu")
TPU_LANES = 128
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def paged_impl(attention_impl: str, head_dim: int) -> str:
    """The paged decode attention that goes with `model.attention_impl`: `xla` with `xla`; JAX's GPU kernel with
    the GPU ones (`cudnn`, `triton`), its TPU kernel with `splash` (for a head_dim multiple of 128, the TPU
    kernel's lane width; `xla` otherwise); `auto`: by the platform compiled for (`target_platform`). The TPU kernel
    is checked on CPU against its own plain-JAX reference of the same contract (`ref_ragged_paged_attention`) and
    by compiling it for a TPU with libtpu: neither Pallas TPU interpreter of JAX 0.10.2 runs it (the new one fails
    on its reshaped refs, the old one on its scalar prefetch)."""
    if attention_impl == "xla":
        return "xla"
    if attention_impl in ("cudnn", "triton"):
        return "gpu"
    platform = "tpu" if attention_impl == "splash" else target_platform()
    if platform == "tpu":
        return "tpu" if head_dim % TPU_LANES == 0 else "xla"
    return "gpu" if platform == "gpu" else "xla"


def pool_layout(impl: str) -> str:
    return "combined" if impl == "tpu" else "split"


@struct.dataclass
class PagedKVCache:
    """Per-layer block pools (`layout`), each row's block table and cached length.

    `tables` [rows, blocks per row] int32: block ids (local to the row's data shard); entries past a row's blocks
    are any valid id. `lengths` [rows] int32: tokens already cached per row; a token at position p goes to slot
    p % block_size of block tables[row, p // block_size]. `pairs` (static, `xla` only): the most (row, block) pairs
    one data shard's rows hold. `prefill` (static): the tokens written are whole sequences from position 0, which
    attend among themselves (flash kernels) rather than through the pool.
    """

    pools: tuple[tuple[jax.Array, ...], ...]  # per layer: (keys and values,) combined, or (keys, values) split
    tables: jax.Array
    lengths: jax.Array
    impl: str = struct.field(pytree_node=False, default="xla")
    pairs: int = struct.field(pytree_node=False, default=0)
    prefill: bool = struct.field(pytree_node=False, default=False)


def pool_shape(pool: tuple[jax.Array, ...], layout: str) -> tuple[int, int]:
    """(blocks, block_size) of a layer's pool in `layout`."""
    return pool[0].shape[:2] if layout == "combined" else pool[0].shape[1:3]


def init_pools(layers: int, kv_heads: int, head_dim: int, blocks: int, block_size: int, dtype, impl: str):
    """Empty pools of `blocks` blocks for every layer, in `impl`'s layout."""
    if pool_layout(impl) == "combined":
        return tuple((jnp.zeros((blocks, block_size, 2 * kv_heads, head_dim), dtype),) for _ in range(layers))
    shape = (kv_heads, blocks, block_size, head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(layers))


def pool_specs(pool: tuple[jax.Array, ...], layout: str, mesh, kv_heads: int) -> tuple[PartitionSpec, ...]:
    """How a layer's pool is split on `mesh`: blocks like a batch's rows, heads like KV heads (combined: whole
    key/value pairs only)."""
    rows = mesh_axes("batch", mesh)
    heads = mesh_axes("kv_heads", mesh, kv_heads)
    if layout == "combined":
        return (PartitionSpec(rows, None, heads, None),)
    return (PartitionSpec(heads, rows, None, None),) * len(pool)


def write_and_attend(cache: PagedKVCache, layer: int, q, k, v, positions, segment_ids, scale):
    """Write this layer's new keys and values (tokens with segment id 0 are not written) into the layer's pool and,
    for a decode step (one token per row), attend each row's query over its own cached tokens.

    q [B, T, heads, D], k/v [B, T, kv_heads, D], positions/segment_ids [B, T]. Returns (the new pool, the attention
    output [B, T, heads, D], or None when `cache.prefill`: the caller attends over the tokens themselves)."""
    kv_heads = k.shape[2]
    fn = functools.partial(_write_and_attend_shard, impl=cache.impl, pairs=cache.pairs, prefill=cache.prefill,
                           scale=scale)
    args = (cache.pools[layer], cache.tables, cache.lengths, q, k, v, positions, segment_ids)
    mesh = active_mesh()
    if mesh is None:
        return fn(*args)
    rows, heads = mesh_axes("batch", mesh), mesh_axes("kv_heads", mesh, kv_heads)
    per_row = PartitionSpec(rows)
    tokens = PartitionSpec(rows, None, heads, None)
    pools = pool_specs(cache.pools[layer], pool_layout(cache.impl), mesh, kv_heads)
    in_specs = (pools, PartitionSpec(rows, None), per_row, tokens, tokens, tokens, PartitionSpec(rows, None),
                PartitionSpec(rows, None))
    out_specs = (pools, None if cache.prefill else tokens)
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def _write_and_attend_shard(pool, tables, lengths, q, k, v, positions, segment_ids, *, impl, pairs, prefill, scale):
    layout = pool_layout(impl)
    blocks, block_size = pool_shape(pool, layout)
    block = jnp.take_along_axis(tables, jnp.clip(positions // block_size, 0, tables.shape[1] - 1), axis=1)
    block = jnp.where(segment_ids > 0, block, blocks).reshape(-1)  # out of range: dropped
    offset = (positions % block_size).reshape(-1)
    k_new, v_new = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
    if layout == "combined":
        pairs_new = jnp.stack([k_new, v_new], axis=2).reshape(k_new.shape[0], -1, k_new.shape[-1])
        pool = (pool[0].at[block, offset].set(pairs_new.astype(pool[0].dtype), mode="drop"),)
    else:
        pool = tuple(p.at[:, block, offset].set(new.swapaxes(0, 1).astype(p.dtype), mode="drop")
                     for p, new in zip(pool, (k_new, v_new)))
    if prefill:
        return pool, None
    lengths = lengths + (segment_ids[:, 0] > 0).astype(jnp.int32)  # the new token's key is read too
    query = q[:, 0]
    if impl == "xla":
        out = xla_paged_attention(query, pool, layout, tables, lengths, pairs, scale)
    elif impl == "tpu":
        out = _tpu_paged_attention(query, pool[0], tables, lengths, scale)
    else:
        out = _gpu_paged_attention(query, *pool, tables, lengths, scale)
    return pool, out[:, None].astype(q.dtype)


def xla_paged_attention(q, pool, layout: str, tables, lengths, pairs: int, scale):
    """Decode attention in plain XLA over the blocks of all rows as one ragged list: q [B, heads, D], lengths [B]
    (tokens to attend to, per row); at most `pairs` (row, block) pairs in all. Rows with length 0 give zeros."""
    rows, heads, dim = q.shape
    _, block_size = pool_shape(pool, layout)
    row_blocks = -(-lengths // block_size)
    ends = jnp.cumsum(row_blocks)
    pair = jnp.arange(pairs, dtype=jnp.int32)
    owner = jnp.searchsorted(ends, pair, side="right").astype(jnp.int32)  # == rows past the last pair
    row = jnp.minimum(owner, rows - 1)
    nth = pair - (ends - row_blocks)[row]  # the block's place in its row
    block = tables[row, jnp.clip(nth, 0, tables.shape[1] - 1)]
    if layout == "combined":  # keys and values interleaved by head: [P, block_size, kv_heads, 2, D]
        gathered = pool[0].reshape(*pool[0].shape[:2], -1, 2, dim)[block]
        keys, values = gathered[..., 0, :], gathered[..., 1, :]
    else:
        keys, values = (p[:, block].transpose(1, 2, 0, 3) for p in pool)  # [P, block_size, kv_heads, D]
    kv_heads = keys.shape[2]
    queries = q[row].reshape(pairs, kv_heads, heads // kv_heads, dim)
    # Multiply-and-sum rather than dot_general: on CPU the tiny batched matmuls (groups x D by D x block_size per
    # pair) ran 1.7x slower.
    keys = keys.astype(jnp.float32).transpose(0, 2, 1, 3)[:, :, None]  # [P, kv_heads, 1, block_size, D]
    scores = jnp.sum(queries.astype(jnp.float32)[:, :, :, None, :] * keys, axis=-1) * scale
    slot = nth[:, None] * block_size + jnp.arange(block_size)[None, :]
    seen = (owner < rows)[:, None] & (slot < lengths[row][:, None])  # [P, block_size]
    scores = jnp.where(seen[:, None, None, :], scores, _MASKED)
    row_max = jax.ops.segment_max(jnp.max(scores, axis=-1), owner, num_segments=rows + 1, indices_are_sorted=True)
    probs = jnp.where(seen[:, None, None, :], jnp.exp(scores - row_max[owner][..., None]), 0.0)
    total = jax.ops.segment_sum(jnp.sum(probs, axis=-1), owner, num_segments=rows + 1, indices_are_sorted=True)[:rows]
    values = values.astype(jnp.float32).transpose(0, 2, 1, 3)[:, :, None]  # [P, kv_heads, 1, block_size, D]
    weighted = jnp.sum(probs[..., None] * values, axis=3)
    out = jax.ops.segment_sum(weighted, owner, num_segments=rows + 1, indices_are_sorted=True)[:rows]
    out = out / jnp.where(total > 0, total, 1.0)[..., None]
    return out.reshape(rows, heads, dim)


def _tpu_paged_attention(q, pool, tables, lengths, scale):
    rows = q.shape[0]
    # One query per row; a row with nothing cached (a free batch row) reads one slot of some block (ignored).
    # Block sizes given: the kernel's own lookup asks jax.devices() for the TPU generation, which is the host's CPU
    # when compiling ahead of time (`kimina_jax.plan`); 32 x 32 is its untuned choice that fits every generation.
    return ragged_paged_attention(q, pool, jnp.maximum(lengths, 1), tables, jnp.arange(rows + 1, dtype=jnp.int32),
                                  jnp.array([rows], jnp.int32), sm_scale=scale,
                                  num_kv_pages_per_block=min(32, tables.shape[1]), num_queries_per_block=min(32, rows))


def _gpu_paged_attention(q, keys, values, tables, lengths, scale):
    width = tables.shape[1]
    splits = min(16, width)
    out = gpu_paged.paged_attention(
        (q * scale).astype(keys.dtype), keys, values, tables, jnp.maximum(lengths, 1), k_splits=splits,
        pages_per_compute_block=min(8, width // splits), interpret=target_platform() != "gpu",
    )
    return out


def copy_blocks(pools, source, target, *, impl: str):
    """`pools` with block target[i] of every layer a copy of block source[i] (copy on write of a shared partial
    block); ids are local to a data shard and split like a batch's rows (each shard copies its own), targets out
    of range are dropped."""
    layout = pool_layout(impl)

    def copy(pools, source, target):
        if layout == "combined":
            return tuple((p[0].at[target].set(p[0][source], mode="drop"),) for p in pools)
        return tuple(tuple(a.at[:, target].set(a[:, source], mode="drop") for a in p) for p in pools)

    mesh = active_mesh()
    if mesh is None:
        return copy(pools, source, target)
    kv_heads = pools[0][0].shape[2] // 2 if layout == "combined" else pools[0][0].shape[0]
    specs = tuple(pool_specs(p, layout, mesh, kv_heads) for p in pools)
    ids = PartitionSpec(mesh_axes("batch", mesh))
    return jax.shard_map(copy, in_specs=(specs, ids, ids), out_specs=specs, check_vma=False)(pools, source, target)
