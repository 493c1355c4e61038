"""Attention for Qwen3: a plain XLA version for every case, and flash kernels for full forwards over packed
rows (training and log-prob passes), where materialising [heads, T, T] scores is what limits long rows.

`model.attention_impl` picks one:
- `xla`: scores in float32, any shape, the KV-cache path of the sampler always uses it;
- `cudnn`: cuDNN flash attention (NVIDIA GPUs, bfloat16/float16) in its packed layout: each segment is its own
  causal sequence given by offset and length, at most `MAX_SEGMENTS_PER_ROW` per row (`pack_samples` keeps
  to that bound);
- `triton`: the Pallas (Triton) flash-attention kernel shipped with JAX, with native segment ids (GPUs);
- `splash`: the Pallas splash-attention kernel shipped with JAX, with native segment ids (TPUs);
- `auto`: `cudnn` on GPU (`triton` for float32 compute or a cuDNN older than 9.6), `splash` on TPU, `xla`
  elsewhere.
Flash kernels need rows whose length is a multiple of `FLASH_BLOCK`; shorter or odd rows, cheap anyway, use
`xla`. Off their platform the Pallas kernels run in Pallas interpret mode (slow; that is how CPU tests check
them against `xla`). Under a mesh set with `jax.set_mesh` the kernels run per shard (`jax.shard_map`): rows and
heads split as the logical-axis rules split a batch's rows and the KV heads.
"""
from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fused_attention
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_attention
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from kimina_jax.models.mesh_hints import active_mesh
from kimina_jax.parallel.rules import logical_to_mesh

AttentionImpl = Literal["auto", "xla", "cudnn", "triton", "splash"]
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla", "cudnn", "triton", "splash")
FLASH_BLOCK = 128
MAX_SEGMENTS_PER_ROW = 32
CUDNN_PACKED_MIN_VERSION = 90600  # cuDNN 9.6: flash attention over packed (ragged) sequences
_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_segments, k_segments, q_slots, k_slots) -> jax.Array:
    """[B, T, S] bool: same non-padding segment, key slot not after the query slot (slots: queries [B or 1, T],
    keys [S])."""
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    return same & (k_slots[None, None, :] <= q_slots[:, :, None])


def xla_attention(q, k, v, mask, scale):
    """q [B, T, heads, D], k/v [B, S, kv_heads, D], mask [B, T, S]; float32 scores, grouped KV heads."""
    b, t, n_q, d = q.shape
    n_kv = k.shape[2]
    q = q.reshape(b, t, n_kv, n_q // n_kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n_q, d).astype(v.dtype)


def segment_attention(q, k, v, segment_ids, scale, impl: AttentionImpl):
    """Causal self-attention inside the segments of packed rows: q [B, T, heads, D], k/v [B, T, kv_heads, D],
    segment_ids [B, T] (0 = padding, each segment contiguous). Outputs at padding positions are unspecified."""
    impl = resolve_attention_impl(impl, q.dtype)
    if impl == "cudnn" and (jax.default_backend() != "gpu" or q.dtype not in _HALF_DTYPES):
        raise ValueError(f"attention_impl 'cudnn' needs an NVIDIA GPU and bfloat16/float16 compute (model.dtype); "
                         f"here: backend {jax.default_backend()}, {q.dtype}. Use 'auto', 'triton' or 'xla'")
    if impl == "xla" or q.shape[1] % FLASH_BLOCK:
        slots = jnp.arange(q.shape[1], dtype=jnp.int32)
        return xla_attention(q, k, v, attention_mask(segment_ids, segment_ids, slots[None], slots), scale)
    kernel = {"cudnn": _cudnn_attention, "triton": _triton_attention, "splash": _splash_attention}[impl]
    return _per_shard(lambda *args: kernel(*args, scale), q, k, v, segment_ids)


def resolve_attention_impl(impl: AttentionImpl, dtype=jnp.bfloat16) -> str:
    """The implementation `auto` stands for on the default backend for this compute dtype (cuDNN's flash
    attention is half-precision only); others unchanged, unknown ones rejected."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu":
        return "cudnn" if jnp.dtype(dtype) in _HALF_DTYPES and _cudnn_has_packed_layout() else "triton"
    return "splash" if backend == "tpu" else "xla"


def _cudnn_has_packed_layout() -> bool:
    """Whether the GPU's cuDNN runs flash attention on packed sequences (cuDNN 9.6 or newer)."""
    try:
        return cudnn_fused_attention.check_cudnn_version() >= CUDNN_PACKED_MIN_VERSION
    except RuntimeError:  # no cuDNN found
        return False


def packed_segment_layout(segment_ids, max_segments: int = MAX_SEGMENTS_PER_ROW):
    """cuDNN's packed layout of rows of contiguous segments numbered 1..k: per row the length of each segment
    [B, max_segments] and its first position [B, max_segments + 1], absent entries -1."""
    ids = jnp.arange(1, max_segments + 1, dtype=segment_ids.dtype)
    member = segment_ids[:, None, :] == ids[None, :, None]  # [B, M, T]
    counts = jnp.sum(member, axis=-1, dtype=jnp.int32)
    present = counts > 0
    starts = jnp.where(present, jnp.argmax(member, axis=-1).astype(jnp.int32), -1)
    no_end = jnp.full((segment_ids.shape[0], 1), -1, jnp.int32)
    return jnp.where(present, counts, -1), jnp.concatenate([starts, no_end], axis=1)


def _cudnn_attention(q, k, v, segment_ids, scale):
    # jax.nn.dot_product_attention has no packed layout (a segment mask there becomes a dense [T, T] bias whose
    # gradient cuDNN also computes), so this calls JAX's cuDNN wrapper underneath it.
    seqlens, offsets = packed_segment_layout(segment_ids)
    out = cudnn_fused_attention.dot_product_attention(
        q, k, v, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets, kv_offsets=offsets, scale=scale,
        mask_type=cudnn_fused_attention.MaskType.PADDING_CAUSAL,
    )
    # Padding belongs to no sequence and cuDNN need not write it: zeros, so that no stray value reaches the
    # lm_head gradient (masked logits still multiply their hidden states there).
    out = jnp.where((segment_ids > 0)[:, :, None, None], out, 0)
    # Segments past the bound would be silently dropped: make such a row loudly non-finite instead.
    return jnp.where(jnp.max(segment_ids) > MAX_SEGMENTS_PER_ROW, jnp.nan, out)


def _triton_attention(q, k, v, segment_ids, scale):
    groups = q.shape[2] // k.shape[2]
    # The kernel wants as many KV heads as query heads; padding segment 0 attends to itself (never read).
    return pallas_gpu_attention.mha(
        q, jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2), segment_ids,
        sm_scale=scale, causal=True, interpret=jax.default_backend() != "gpu",
    )


def _splash_attention(q, k, v, segment_ids, scale):
    _, t, heads, _ = q.shape
    block = next(size for size in (512, 256, FLASH_BLOCK) if t % size == 0)
    blocks = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask([splash_mask.CausalMask((t, t))] * heads), block_sizes=blocks,
        head_shards=1, q_seq_shards=1, interpret=jax.default_backend() != "tpu",
    )

    def one_row(q_row, k_row, v_row, segments):  # the kernel takes [heads, T, D] and scales nothing itself
        out = kernel((q_row * scale).swapaxes(0, 1), k_row.swapaxes(0, 1), v_row.swapaxes(0, 1),
                     segment_ids=splash.SegmentIds(q=segments, kv=segments))
        return out.swapaxes(0, 1)

    return jax.vmap(one_row)(q, k, v, segment_ids)


def _per_shard(kernel: Callable, q, k, v, segment_ids):
    """Run a kernel (a custom call XLA cannot split) on each device's rows and heads of the current mesh."""
    mesh = active_mesh()
    if mesh is None:
        return kernel(q, k, v, segment_ids)
    # q, k, v [rows, length, heads, head_dim]: split as KV heads, since query heads are a multiple of them.
    spec = logical_to_mesh(("batch", "length", "kv_heads", "head_dim"), mesh, k.shape)
    segments = logical_to_mesh(("batch", "length"), mesh, segment_ids.shape)
    return jax.shard_map(kernel, in_specs=(spec, spec, spec, segments), out_specs=spec, check_vma=False)(
        q, k, v, segment_ids
    )

