"""Dense Qwen3 as a Flax NNX module, computing what Hugging Face's `Qwen3ForCausalLM` computes (SPEC 2).

Rows may be packed: `segment_ids` (0 = padding) keep attention inside one sequence, and `positions`
restart per sequence. Decoding writes keys and values into a paged KV cache (`models.paged.PagedKVCache`): a
token at position p of a row goes to slot p of the row's blocks, and a decode step reads the row's own blocks.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kimina_jax.models.attention import (
    ATTENTION_IMPLS, AttentionImpl, segment_attention,
)
from kimina_jax.models.config import Qwen3Config
from kimina_jax.models.mesh_hints import constrain
from kimina_jax.models.paged import PagedKVCache, write_and_attend

# Activation recomputation in the backward pass, per decoder layer: none; everything (only each layer's input is
# kept); or all but the outputs of the weight matmuls (q/k/v/o and MLP projections: more memory, less compute).
RematPolicy = Literal["none", "full", "save_dots"]
REMAT_POLICIES: tuple[str, ...] = ("none", "full", "save_dots")


class PagedLayer(NamedTuple):
    """A decoder layer's view of a `PagedKVCache`."""

    cache: PagedKVCache
    layer: int


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, in float32 whatever the compute dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs | None = None):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """RoPE in HF's half-rotation layout; x [B, T, heads, D], positions [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, attention_impl: AttentionImpl, rngs: nnx.Rngs):
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {attention_impl!r}")
        self.cfg = cfg
        self.attention_impl = attention_impl
        d, h = cfg.head_dim, cfg.hidden_size
        linear = lambda i, o: nnx.Linear(  # noqa: E731
            i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=nnx.initializers.normal(0.02),
        )
        self.q_proj = linear(h, cfg.num_attention_heads * d)
        self.k_proj = linear(h, cfg.num_key_value_heads * d)
        self.v_proj = linear(h, cfg.num_key_value_heads * d)
        self.o_proj = linear(cfg.num_attention_heads * d, h)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x, positions, segment_ids, paged: PagedLayer | None = None):
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, t, cfg.num_attention_heads, cfg.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim))
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q = rotary(q, positions, cfg.rope_theta)
        k = rotary(k, positions, cfg.rope_theta)
        scale = cfg.head_dim**-0.5
        if paged is None:
            out = segment_attention(q, k, v, segment_ids, scale, self.attention_impl)
            return self.o_proj(out.reshape(b, t, -1)), None
        pool, out = write_and_attend(paged.cache, paged.layer, q, k, v, positions, segment_ids, scale)
        if out is None:  # prefill: whole sequences from position 0 attend among themselves
            out = segment_attention(q, k, v, segment_ids, scale, self.attention_impl)
        return self.o_proj(out.reshape(b, t, -1)), pool


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = lambda i, o: nnx.Linear(  # noqa: E731
            i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=nnx.initializers.normal(0.02),
        )
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, attention_impl, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(
            cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, segment_ids, paged: PagedLayer | None = None):
        attn, pool = self.self_attn(self.input_layernorm(x), positions, segment_ids, paged)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), pool


class Qwen3Model(nnx.Module):
    """Embedding, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, attention_impl, remat: RematPolicy, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=nnx.initializers.normal(0.02),
        )
        self.layers = nnx.List(
            DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)
            for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
        self.remat = remat

    def _embed(self, input_ids):
        # The table's hidden dimension is split like a parameter's (`embed`); gathered first (`act_embed`), the
        # lookup yields whole hidden vectors for the rows each device holds (else XLA splits activations by
        # hidden, then must undo it).
        table = constrain(self.embed_tokens.embedding[...].astype(self.embed_tokens.dtype), ("vocab", "act_embed"))
        return jnp.take(table, input_ids, axis=0)

    def __call__(self, input_ids, positions, segment_ids, cache: PagedKVCache | None = None):
        x = _constrain_hidden(self._embed(input_ids))
        if cache is not None:
            pools = []
            for i, layer in enumerate(self.layers):
                x, pool = layer(x, positions, segment_ids, PagedLayer(cache, i))
                pools.append(pool)
            written = jnp.sum(segment_ids > 0, axis=1, dtype=jnp.int32)
            return self.norm(x), cache.replace(pools=tuple(pools), lengths=cache.lengths + written)
        for layer in self.layers:
            if self.remat == "none":
                x = layer(x, positions, segment_ids)[0]
            else:
                x = _rematted(layer, x, positions, segment_ids, self.remat)
            x = _constrain_hidden(x)
        return self.norm(x), None


def _constrain_hidden(x: jax.Array) -> jax.Array:
    """Pin hidden states [rows, length, hidden] to rows split like a batch and the rest whole. Without it XLA may
    split activations' hidden dimension like the weights' (FSDP) and later cannot undo that without replicating
    them ("involuntary full rematerialization"); with it, weights are gathered instead."""
    return constrain(x, ("batch", "length", "act_embed"))


def _rematted(layer: DecoderLayer, x, positions, segment_ids, policy: RematPolicy):
    """The layer's output, its activations recomputed in the backward pass (all of them, or all but the weight
    matmuls' outputs). A pure function of the layer's state (`jax.checkpoint`, not `nnx.remat`): it may run
    inside loops and jits that merged the model."""
    graphdef, state = nnx.split(layer)
    forward = lambda state, *args: nnx.merge(graphdef, state)(*args)[0]  # noqa: E731
    saved = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "save_dots" else None
    return jax.checkpoint(forward, policy=saved)(state, x, positions, segment_ids)


class Qwen3ForCausalLM(nnx.Module):
    """Qwen3 with its language-model head; tied heads reuse the embedding matrix."""

    def __init__(
        self,
        config: Qwen3Config,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl: AttentionImpl = "auto",
        remat: RematPolicy = "none",
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.model = Qwen3Model(
            config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat, rngs=rngs
        )
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs, kernel_init=nnx.initializers.normal(0.02),
            )

    def hidden_states(self, input_ids, positions=None, segment_ids=None, cache: PagedKVCache | None = None):
        """Final-normed hidden states [B, T, H] (and the updated cache). Defaults: one unpadded sequence. With a
        `PagedKVCache`, tokens are written at their positions' slots (a row's tokens fill its blocks from slot 0)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        if segment_ids is None:
            segment_ids = jnp.ones(input_ids.shape, jnp.int32)
        return self.model(input_ids, positions, segment_ids, cache)

    def lm_head_kernel(self) -> jax.Array:
        """The output projection as [hidden, vocab] in the compute dtype."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.embedding[...].T.astype(self.dtype)
        return self.lm_head.kernel[...].astype(self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits for hidden states [..., H]."""
        return jnp.dot(hidden.astype(self.dtype), self.lm_head_kernel(), preferred_element_type=jnp.float32)

    def __call__(self, input_ids, positions=None, segment_ids=None, cache: PagedKVCache | None = None):
        """(logits [B, T, vocab] float32, updated cache or None)."""
        hidden, new_cache = self.hidden_states(input_ids, positions, segment_ids, cache)
        return self.logits(hidden), new_cache
