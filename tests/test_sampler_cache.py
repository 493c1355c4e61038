"""The JAX sampler's decode path: its head-major KV cache and the attention that reads it, token draws with one
uniform per row, and weight pushes that compile nothing."""
from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimina_jax.models import PagedKVCache, Qwen3Config, Qwen3ForCausalLM
from kimina_jax.models.attention import xla_attention
from kimina_jax.models.paged import init_pools
from kimina_jax.models.qwen3.model import rotary
from kimina_jax.parallel import make_mesh, param_shardings
from kimina_jax.rollout import JaxSampler, SamplingParams
from kimina_jax.rollout.sampling import pick_tokens

CONFIG = Qwen3Config(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
)
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_events: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, *_, **__: _compile_events.append(event) if event == COMPILE_EVENT else None
)


def tiny_model(seed: int = 0) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(CONFIG, attention_impl="xla", rngs=nnx.Rngs(seed))


def full_forward_kv(model: Qwen3ForCausalLM, ids: jax.Array) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer the keys and values a forward without cache computes, head-major [B, kv_heads, T, D]."""
    cfg, (b, t) = model.config, ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segments = jnp.ones((b, t), jnp.int32)
    x = model.model._embed(ids)
    kv = []
    for layer in model.model.layers:
        attn, h = layer.self_attn, layer.input_layernorm(x)
        k = attn.k_norm(attn.k_proj(h).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim))
        v = attn.v_proj(h).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        kv.append((np.asarray(rotary(k, positions, cfg.rope_theta).swapaxes(1, 2)), np.asarray(v.swapaxes(1, 2))))
        x = layer(x, positions, segments)[0]
    return kv


def test_paged_cache_after_prefill_and_decode_holds_the_full_forwards_keys_and_values_in_its_blocks():
    """The sampler's prefill path then decode steps: each row's blocks (the XLA path's split layout: keys and
    values [kv_heads, blocks, block_size, D]) hold what a forward without cache computes, slot p of the row's
    blocks for position p; blocks no row owns stay empty."""
    model = tiny_model()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(2, 9)), jnp.int32)
    prefix, block_size = 5, 4
    tables = jnp.asarray([[5, 1, 3], [0, 4, 2]], jnp.int32)
    pools = init_pools(CONFIG.num_hidden_layers, CONFIG.num_key_value_heads, CONFIG.head_dim, 7, block_size,
                       jnp.float32, "xla")
    cache = PagedKVCache(pools, tables, jnp.zeros(2, jnp.int32), pairs=8, prefill=True)
    _, cache = model(ids[:, :prefix], None, None, cache=cache)
    cache = cache.replace(prefill=False)
    for t in range(prefix, ids.shape[1]):
        _, cache = model(ids[:, t : t + 1], jnp.full((2, 1), t), jnp.ones((2, 1), jnp.int32), cache=cache)
    for (keys, values), (key_pool, value_pool) in zip(full_forward_kv(model, ids), cache.pools):
        key_pool, value_pool = np.asarray(key_pool), np.asarray(value_pool)  # [kv_heads, blocks, block_size, D]
        for row in range(2):
            for expected, pool in ((keys[row], key_pool), (values[row], value_pool)):
                slots = pool[:, np.asarray(tables[row])].reshape(CONFIG.num_key_value_heads, -1, CONFIG.head_dim)
                np.testing.assert_allclose(slots[:, :9], expected, atol=1e-5)
                assert not slots[:, 9:].any()
        assert not key_pool[:, 6].any() and not value_pool[:, 6].any()


def masked_attention_reference(q, k, v, mask, scale) -> np.ndarray:
    """numpy: q [B, T, heads, D], k/v [B, S, kv_heads, D] (query head h reads KV head h // group), mask [B, T, S]."""
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) * scale
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("queries", [1, 2], ids=["decode-step", "two-queries"])
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 0.05)])
def test_cached_attention_reads_the_head_major_cache(dtype, atol, queries):
    from kimina_jax.models.attention import cached_attention

    rng = np.random.default_rng(1)
    b, t, s, heads, kv_heads, d = 3, queries, 11, 6, 2, 16
    q, k, v = (rng.normal(size=shape).astype(np.float32)
               for shape in [(b, t, heads, d), (b, s, kv_heads, d), (b, s, kv_heads, d)])
    mask = (rng.random((b, t, s)) < 0.6)
    mask[:, :, 0] = True
    expected = masked_attention_reference(q, k, v, mask, 0.25)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    got = jax.jit(cached_attention, static_argnums=4)(
        cast(q), cast(k.transpose(0, 2, 3, 1)), cast(v.swapaxes(1, 2)), jnp.asarray(mask), 0.25)
    assert got.dtype == dtype  # bfloat16 with float32 scores runs on CPU too
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=atol, rtol=0)
    np.testing.assert_allclose(np.asarray(xla_attention(cast(q), cast(k), cast(v), jnp.asarray(mask), 0.25),
                                          np.float32), expected, atol=atol, rtol=0)


def kept_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The probabilities sampling should follow: softmax(logits / T) on the top-k, then on the nucleus (the
    most likely tokens up to the first whose preceding mass reaches top_p) of the renormalised rest."""
    scaled = logits / temperature
    order = np.argsort(-scaled, kind="stable")
    k = top_k if top_k > 0 else len(logits)
    probs = np.exp(scaled[order[:k]] - scaled[order[0]])
    probs /= probs.sum()
    kept = order[:k][(np.cumsum(probs) - probs) < top_p]
    out = np.zeros(len(logits))
    out[kept] = np.exp(scaled[kept] - scaled[kept].max())
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 20, 1.0), (1.0, 0, 0.6),
                                                     (0.8, 50, 0.9)])
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
    """Frequencies over many draws (vocabulary of several sampling blocks) pass a chi-square test; filtered-out
    tokens never come; log-probs are the unfiltered log_softmax(logits / T); the draws of a key are fixed."""
    rng = np.random.default_rng(2)
    vocab, draws = 600, 40_000
    logits = rng.normal(size=vocab) * 2.0
    expected = kept_distribution(logits, temperature, top_k, top_p)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(draws))
    filters = top_k > 0 or top_p < 1.0
    pick = jax.jit(pick_tokens, static_argnums=(5, 6))
    tokens, logprobs = pick(jnp.asarray(np.broadcast_to(logits, (draws, vocab)), jnp.float32), keys,
                            jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k), False, filters)
    tokens = np.asarray(tokens)
    counts = np.bincount(tokens, minlength=vocab)
    assert not counts[expected == 0].any()
    scaled = logits / temperature
    full_logprobs = scaled - scaled.max() - np.log(np.exp(scaled - scaled.max()).sum())
    np.testing.assert_allclose(np.asarray(logprobs), full_logprobs[tokens], atol=1e-4)
    # Chi-square over the tokens expected at least 5 times, the rest lumped into one cell.
    frequent = expected * draws >= 5
    observed = np.append(counts[frequent], counts[~frequent].sum())
    wanted = np.append(expected[frequent], expected[~frequent].sum()) * draws
    observed, wanted = observed[wanted > 0], wanted[wanted > 0]
    chi2, dof = float(((observed - wanted) ** 2 / wanted).sum()), len(wanted) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof) + 10, (chi2, dof)
    again, _ = pick(jnp.asarray(np.broadcast_to(logits, (8, vocab)), jnp.float32), keys[:8],
                    jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k), False, filters)
    assert np.asarray(again).tolist() == tokens[:8].tolist()


def test_greedy_takes_the_argmax():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 300)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 4)
    tokens, logprobs = pick_tokens(logits, keys, 1.0, 1.0, 0, True, False)
    assert np.asarray(tokens).tolist() == np.argmax(np.asarray(logits), axis=-1).tolist()
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(jax.nn.log_softmax(logits)).max(axis=-1), atol=1e-6)


def _random_bits_sizes(jaxpr) -> list[int]:
    """Output sizes of every random-bits generation in a jaxpr, nested ones included."""
    sizes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("random_bits", "threefry2x32"):
            sizes += [int(np.prod(var.aval.shape)) for var in eqn.outvars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            sizes += _random_bits_sizes(sub)
    return sizes


@pytest.mark.parametrize("filters", [False, True])
def test_a_draw_takes_one_random_number_per_row_not_per_token(filters):
    rows, vocab = 4, 1000
    logits = jnp.zeros((rows, vocab), jnp.float32)
    keys = jax.random.split(jax.random.key(0), rows)
    jaxpr = jax.make_jaxpr(lambda logits, keys: pick_tokens(
        logits, keys, jnp.float32(1.0), jnp.float32(0.9), jnp.int32(5), False, filters))(logits, keys)
    sizes = _random_bits_sizes(jaxpr.jaxpr)
    assert sizes and max(sizes) <= rows, sizes


def _generate_twice_around_a_push(sampler: JaxSampler, updated) -> int:
    """Compilations of a weight push and of a generate call shaped like one made before it."""
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    params = SamplingParams(n=3, temperature=0.9, top_p=0.95, max_tokens=6, seed=1)
    sampler.generate(prompts, params)
    before = len(_compile_events)
    sampler.update_weights(updated)
    sampler.generate(prompts, params)
    return len(_compile_events) - before


def _trainer_update(state, mesh):
    """`state` as an optimizer update leaves it: placed by the trainer's rules on `mesh`, output of a jitted call."""
    shardings = param_shardings(state, mesh)
    step = jax.jit(lambda params: jax.tree.map(lambda x: x * 0.5, params), out_shardings=shardings)
    return jax.device_put(state, shardings, may_alias=False), step


def test_weight_push_after_an_update_on_a_one_device_mesh_compiles_nothing():
    """The sampler built on the model's own arrays (uncommitted, one device), then pushed the train step's
    (committed, the trainer's shardings of a one-device mesh): the jitted functions see the same placement."""
    model = tiny_model()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, state = nnx.split(model)
    placed, step = _trainer_update(state, mesh)
    updated = step(placed)
    sampler = JaxSampler(model)
    shardings = [leaf.sharding for leaf in jax.tree.leaves(sampler._state)]
    assert _generate_twice_around_a_push(sampler, updated) == 0
    assert [leaf.sharding for leaf in jax.tree.leaves(sampler._state)] == shardings
    pushed = jax.tree.leaves(sampler._state)[0]
    np.testing.assert_array_equal(np.asarray(pushed), np.asarray(jax.tree.leaves(updated)[0]))


def test_engine_built_from_the_trainers_placement_compiles_nothing_after_a_sharded_update():
    """How the trainer should build the engine: from its parameters as placed on the 8-device mesh; pushing the
    update's arrays then reuses every compilation."""
    mesh = make_mesh(2, 2, 2)
    graphdef, state = nnx.split(tiny_model())
    placed, step = _trainer_update(state, mesh)
    sampler = JaxSampler(nnx.merge(graphdef, placed))
    assert sampler._mesh is not None
    assert _generate_twice_around_a_push(sampler, step(placed)) == 0
