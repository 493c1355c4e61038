"""Flash-attention kernels (Pallas kernels in interpret mode on CPU) against plain float32 attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fused_attention
from jax.sharding import NamedSharding, PartitionSpec
from unittest import mock

from kimina_jax.models import load_hf_checkpoint
from kimina_jax.models.attention import (
    MAX_SEGMENTS_PER_ROW, XLA_BLOCK, _block_ranges, attention_mask, blockwise_attention, packed_segment_layout,
    resolve_attention_impl, segment_attention, xla_attention,
)
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


@pytest.mark.parametrize("impl", ["xla", "splash", "triton"])
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


def _packed_rows(rng, rows: int, length: int, kind: str) -> np.ndarray:
    """Segment ids of packed rows: contiguous segments numbered from 1, then padding (0)."""
    segments = np.zeros((rows, length), np.int32)
    for row in range(rows):
        used = length if kind == "single" else int(rng.integers(length // 2, length + 1))
        cuts = {"single": 0, "random": 5, "short": used // 6}[kind]
        starts = np.zeros(used, np.int32)
        starts[rng.choice(np.arange(1, used), cuts, replace=False)] = 1
        segments[row, :used] = np.cumsum(starts) + 1
    return segments


def _dense(q, k, v, segments, scale):
    slots = jnp.arange(q.shape[1], dtype=jnp.int32)
    return xla_attention(q, k, v, attention_mask(segments, segments, slots[None], slots), scale)


@pytest.mark.parametrize("kind, length, block, dtype", [
    ("random", 300, 64, jnp.float32),  # padding at the end of rows, a length that is no multiple of the block
    ("single", 256, 64, jnp.float32),
    ("short", 517, 32, jnp.float32),  # sequences of a few tokens
    ("random", 384, XLA_BLOCK, jnp.bfloat16),
])
def test_blockwise_xla_attention_matches_the_dense_masked_one(kind, length, block, dtype):
    """Outputs and gradients of the blockwise path equal the dense [T, T] masked path (padding outputs aside),
    and nothing is non-finite, padding included: zero loss weights there would not hide a NaN."""
    rng = np.random.default_rng(length)
    segments = jnp.asarray(_packed_rows(rng, 3, length, kind))
    q, k, v = (jnp.asarray(rng.normal(size=(3, length, n, D)), dtype) for n in (HEADS, KV_HEADS, KV_HEADS))
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * (segments > 0)[:, :, None, None]
    attentions = (lambda *a: blockwise_attention(*a, segments, SCALE, block), lambda *a: _dense(*a, segments, SCALE))
    outs, grads = [], []
    for attention in attentions:
        loss = lambda *a: jnp.sum(attention(*a).astype(jnp.float32) * weights)  # noqa: B023
        outs.append(np.asarray(jax.jit(attention)(q, k, v).astype(jnp.float32)))
        grads.append([np.asarray(g.astype(jnp.float32)) for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)])
    real = np.asarray(segments > 0)
    atol = 2e-5 if dtype == jnp.float32 else 3e-2
    assert np.isfinite(outs[0]).all() and all(np.isfinite(g).all() for g in grads[0])
    np.testing.assert_allclose(outs[0][real], outs[1][real], atol=atol)
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, atol=atol * 4)


def test_block_ranges_cover_exactly_the_blocks_with_visible_keys():
    """Query block i visits key blocks first[i]..i, key block j is visited by query blocks j..last[j]: for rows
    of contiguous segments these are exactly the block pairs holding a query and a key it may see."""
    rng = np.random.default_rng(3)
    block = 16
    for kind in ("random", "single", "short"):
        segments = _packed_rows(rng, 2, 20 * block, kind)
        first, last = (np.asarray(x) for x in _block_ranges(jnp.asarray(segments), block))
        slots = np.arange(segments.shape[1])
        sees = np.asarray(attention_mask(jnp.asarray(segments), jnp.asarray(segments), slots[None], slots))
        needed = sees.any(axis=0).reshape(20, block, 20, block).any(axis=(1, 3))  # [query block, key block]
        blocks = np.arange(20)
        visited = (first[:, None] <= blocks[None, :]) & (blocks[None, :] <= blocks[:, None])
        queries = needed.any(axis=1)  # blocks of padding alone visit their own block only
        np.testing.assert_array_equal(visited[queries], needed[queries])
        np.testing.assert_array_equal(visited[~queries], np.eye(20, dtype=bool)[~queries])
        np.testing.assert_array_equal(last, [max(np.flatnonzero(visited[:, j])) for j in blocks])


def test_xla_attention_of_a_long_packed_row_keeps_no_score_matrix():
    """The xla path's forward and backward over a 4096-token row plan far less scratch memory than one float32
    [heads, T, T] score matrix (64 MiB here), which the dense masked path materialises several times over."""
    t = 4096
    segments = jnp.asarray(np.repeat(np.arange(1, 33), t // 32)[None], jnp.int32)
    q, k, v = (jax.ShapeDtypeStruct((1, t, n, D), jnp.float32) for n in (HEADS, KV_HEADS, KV_HEADS))
    loss = lambda q, k, v: jnp.sum(segment_attention(q, k, v, segments, SCALE, "xla"))  # noqa: E731
    plan = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().memory_analysis()
    assert plan.temp_size_in_bytes < HEADS * t * t * 4 / 8


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
    with mock.patch.object(jax, "default_backend", lambda: "gpu"):
        for version, half, fp32 in ((90800, "cudnn", "triton"), (90500, "triton", "triton")):
            with mock.patch.object(cudnn_fused_attention, "check_cudnn_version", lambda version=version: version):
                assert (resolve_attention_impl("auto"), resolve_attention_impl("auto", jnp.float32)) == (half, fp32)
    with mock.patch.object(jax, "default_backend", lambda: "tpu"):
        assert resolve_attention_impl("auto") == "splash"
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


def test_packed_segment_layout_describes_the_segments():
    """cuDNN's packed layout (lengths and offsets) read back as a mask equals the segment-causal mask."""
    segments = np.zeros((4, 64), np.int32)
    segments[0, :10], segments[0, 10:11], segments[0, 11:60] = 1, 2, 3
    segments[1, 5:] = 1  # left padding
    segments[2, : 2 * MAX_SEGMENTS_PER_ROW] = np.repeat(np.arange(1, MAX_SEGMENTS_PER_ROW + 1), 2)
    lengths, offsets = (np.asarray(x) for x in packed_segment_layout(jnp.asarray(segments)))
    assert lengths.shape == (4, MAX_SEGMENTS_PER_ROW) and offsets.shape == (4, MAX_SEGMENTS_PER_ROW + 1)
    for row in range(4):
        present = lengths[row] > 0
        assert np.all(lengths[row][~present] == -1) and np.all(offsets[row][np.append(~present, True)] == -1)
        assert present.tolist() == sorted(present.tolist(), reverse=True)  # absent entries come last
        sequence = np.full(64, -1)
        for m in np.flatnonzero(present):
            sequence[offsets[row, m] : offsets[row, m] + lengths[row, m]] = m
        want = segments[row][:, None] == segments[row][None, :]
        want &= (segments[row] > 0)[None, :] & np.tril(np.ones((64, 64), bool))
        got = (sequence[:, None] == sequence[None, :]) & (sequence >= 0)[None, :] & np.tril(np.ones((64, 64), bool))
        np.testing.assert_array_equal(got, want)


def test_cudnn_attention_lowers_for_gpu():
    """No GPU here: lower (not run) the forward and backward for CUDA, cuDNN's version checks patched, to check
    the call JAX's cuDNN wrapper accepts (shapes, GQA, packed layout) and the kernel it asks for."""
    q, k, v, segments = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in _inputs())
    q, k, v = (jnp.concatenate([x] * 4, axis=-1) for x in (q, k, v))  # head_dim 128, as Qwen3's
    loss = lambda q, k, v: jnp.sum(segment_attention(q, k, v, segments, SCALE, "cudnn").astype(jnp.float32))  # noqa: E731
    with mock.patch.object(jax, "default_backend", lambda: "gpu"), \
            mock.patch.object(cudnn_fused_attention, "check_cudnn_version", lambda: 90800), \
            mock.patch.object(cudnn_fused_attention, "check_compute_capability", lambda capability: True), \
            mock.patch.object(cudnn_fused_attention, "is_cuda_compute_capability_equal", lambda capability: False):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    for target in ("__cudnn$fmhaSoftmax(", "__cudnn$fmhaSoftmaxBackward("):
        call = next(line for line in text.splitlines() if target in line)
        assert "PADDING_CAUSAL" in call and f"max_seg_per_batch\\22: {MAX_SEGMENTS_PER_ROW}" in call
