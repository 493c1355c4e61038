"""Paged decode attention (`models.paged`): the plain-XLA ragged path against a numpy softmax over each row's own
tokens, JAX's GPU kernel (Pallas interpret mode on CPU) and the TPU kernel's own reference against the XLA path,
and the block copy of copy on write."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

from kimina_jax.models.paged import (
    PagedKVCache, _gpu_paged_attention, copy_blocks, init_pools, paged_impl, write_and_attend, xla_paged_attention,
)

HEADS, KV_HEADS, DIM, BLOCK, BLOCKS, WIDTH = 8, 2, 64, 16, 48, 8
LENGTHS = [1, 16, 17, 45, 0, 128]  # one token, a whole block, one past it, ragged, a free row, a full table


def paged_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(len(LENGTHS), HEADS, DIM)).astype(np.float32)
    pool = rng.normal(size=(BLOCKS, BLOCK, 2 * KV_HEADS, DIM)).astype(np.float32)
    tables = rng.permutation(BLOCKS)[: len(LENGTHS) * WIDTH].reshape(len(LENGTHS), WIDTH).astype(np.int32)
    return q, pool, tables, np.asarray(LENGTHS, np.int32)


def numpy_reference(q, pool, tables, lengths, scale):
    out = np.zeros_like(q)
    group = HEADS // KV_HEADS
    for row, length in enumerate(lengths):
        if not length:
            continue
        slots = pool[tables[row]].reshape(-1, 2 * KV_HEADS, DIM)[:length]
        keys, values = np.repeat(slots[:, 0::2], group, axis=1), np.repeat(slots[:, 1::2], group, axis=1)
        scores = np.einsum("hd,shd->hs", q[row], keys) * scale
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[row] = np.einsum("hs,shd->hd", probs / probs.sum(-1, keepdims=True), values)
    return out


def xla_path(q, pool, tables, lengths, scale, pairs=64):
    return np.asarray(jax.jit(xla_paged_attention, static_argnums=(2, 5, 6))(
        jnp.asarray(q), (jnp.asarray(pool),), "combined", jnp.asarray(tables), jnp.asarray(lengths), pairs, scale))


def test_the_xla_path_attends_each_row_over_its_own_blocks():
    q, pool, tables, lengths = paged_inputs()
    np.testing.assert_allclose(xla_path(q, pool, tables, lengths, 0.125), numpy_reference(q, pool, tables, lengths,
                                                                                         0.125), atol=1e-5)
    # The pairs bound is the blocks the rows hold (1 + 1 + 2 + 3 + 0 + 8 = 15): at it, the same.
    np.testing.assert_allclose(xla_path(q, pool, tables, lengths, 0.125, pairs=15),
                               numpy_reference(q, pool, tables, lengths, 0.125), atol=1e-5)


def test_the_tpu_kernels_reference_contract_equals_the_xla_path():
    """`ref_ragged_paged_attention` is JAX's plain-JAX statement of what `ragged_paged_attention` computes, called
    with the arguments `_tpu_paged_attention` builds (one query per row; the kernel itself has no working
    interpret mode in JAX 0.10.2, and is compiled for a TPU by the plan tests)."""
    q, pool, tables, lengths = paged_inputs(1)
    live = lengths > 0
    rows = int(live.sum())
    got = ref_ragged_paged_attention(
        jnp.asarray(q[live]), jnp.asarray(pool), jnp.asarray(lengths[live]), jnp.asarray(tables[live]),
        jnp.arange(rows + 1, dtype=jnp.int32), jnp.array([rows], jnp.int32), sm_scale=0.125)
    np.testing.assert_allclose(np.asarray(got), xla_path(q, pool, tables, lengths, 0.125)[live], atol=1e-5)


def test_the_gpu_kernel_in_interpret_mode_equals_the_xla_path():
    q, pool, tables, lengths = paged_inputs(2)
    live = lengths > 0
    keys, values = (jnp.asarray(pool[:, :, half::2].transpose(2, 0, 1, 3)) for half in (0, 1))  # split layout
    got = jax.jit(_gpu_paged_attention, static_argnums=5)(jnp.asarray(q), keys, values, jnp.asarray(tables),
                                                           jnp.asarray(lengths), 0.125)
    np.testing.assert_allclose(np.asarray(got)[live], xla_path(q, pool, tables, lengths, 0.125)[live], atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "gpu"])
def test_a_decode_step_writes_its_token_where_the_table_says_in_either_layout(impl):
    """Row r's token at position p lands in slot p % 16 of block tables[r, p // 16]; a row whose segment id is 0
    (done, free) writes nothing; the step attends over the row's tokens including the new one."""
    q, pool, tables, lengths = paged_inputs(3)
    rng = np.random.default_rng(3)
    k_new, v_new = (rng.normal(size=(len(LENGTHS), 1, KV_HEADS, DIM)).astype(np.float32) for _ in range(2))
    live = lengths > 0
    cached = lengths - live  # the new token is the row's last
    pools = tuple(jnp.asarray(pool[:, :, half::2].transpose(2, 0, 1, 3)) for half in (0, 1))  # split layout
    cache = PagedKVCache((pools,), jnp.asarray(tables), jnp.asarray(cached), impl=impl, pairs=64)
    new_pools, out = write_and_attend(
        cache, 0, jnp.asarray(q)[:, None], jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(cached)[:, None],
        jnp.asarray(live[:, None].astype(np.int32)), 0.125)
    expected_pool = pool.copy()
    for row in np.flatnonzero(live):
        block, slot = tables[row, cached[row] // BLOCK], cached[row] % BLOCK
        expected_pool[block, slot, 0::2], expected_pool[block, slot, 1::2] = k_new[row, 0], v_new[row, 0]
    written = np.stack([np.asarray(a).transpose(1, 2, 0, 3) for a in new_pools], axis=3).reshape(pool.shape)
    np.testing.assert_array_equal(written, expected_pool)
    expected = numpy_reference(q, expected_pool, tables, lengths, 0.125)
    np.testing.assert_allclose(np.asarray(out)[live, 0], expected[live], atol=1e-5)


@pytest.mark.parametrize("impl", ["tpu", "xla"])  # the combined layout, the split one
def test_copy_blocks_copies_every_layer_and_drops_out_of_range_targets(impl):
    pools = init_pools(2, KV_HEADS, DIM, 6, 4, jnp.float32, impl)
    block_axis = 0 if impl == "tpu" else 1
    ids = jnp.arange(6, dtype=jnp.float32).reshape([-1 if a == block_axis else 1 for a in range(4)])
    pools = tuple(tuple(a + ids * (layer + 1) for a in p) for layer, p in enumerate(pools))
    copied = copy_blocks(pools, jnp.asarray([1, 2, 0]), jnp.asarray([4, 5, 6]), impl=impl)
    for layer, (before, after) in enumerate(zip(pools, copied)):
        for old, new in zip(before, after):
            new = np.moveaxis(np.asarray(new), block_axis, 0)
            assert [float(new[b, 0, 0, 0]) / (layer + 1) for b in range(6)] == [0, 1, 2, 3, 1, 2]
            np.testing.assert_array_equal(new[:4], np.moveaxis(np.asarray(old), block_axis, 0)[:4])


@pytest.mark.parametrize("impl,head_dim,expected", [
    ("xla", 128, "xla"), ("cudnn", 128, "gpu"), ("triton", 64, "gpu"), ("splash", 128, "tpu"), ("splash", 64, "xla"),
    ("auto", 128, "xla"),  # auto: by the platform compiled for, CPU here
])
def test_the_paged_kernel_follows_the_attention_impl(impl, head_dim, expected):
    assert paged_impl(impl, head_dim) == expected


def test_a_prefill_writes_whole_sequences_into_the_combined_layout():
    """The TPU kernel's layout: keys at the even combined heads, values at the odd ones, position p of row r in
    slot p % 16 of block tables[r, p // 16]; padding (segment 0) writes nothing; a prefill leaves attention to the
    caller."""
    _, pool, tables, _ = paged_inputs(4)
    rng = np.random.default_rng(4)
    k_new, v_new = (rng.normal(size=(2, 20, KV_HEADS, DIM)).astype(np.float32) for _ in range(2))
    segments = (np.arange(20)[None, :] < np.array([[20], [7]])).astype(np.int32)
    cache = PagedKVCache(((jnp.asarray(pool),),), jnp.asarray(tables[:2]), jnp.zeros(2, jnp.int32), impl="tpu",
                         prefill=True)
    positions = jnp.broadcast_to(jnp.arange(20), (2, 20))
    (written,), out = write_and_attend(cache, 0, jnp.zeros((2, 20, HEADS, DIM)), jnp.asarray(k_new),
                                       jnp.asarray(v_new), positions, jnp.asarray(segments), 0.125)
    assert out is None
    expected = pool.copy()
    for row, length in enumerate((20, 7)):
        for p in range(length):
            block, slot = tables[row, p // BLOCK], p % BLOCK
            expected[block, slot, 0::2], expected[block, slot, 1::2] = k_new[row, p], v_new[row, p]
    np.testing.assert_array_equal(np.asarray(written), expected)
