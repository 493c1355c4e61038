"""The jitted GRPO update: against formulas written here, across micro-batch cuts and meshes, and learning.

Runs on 8 CPU devices (tests/conftest.py). Models are tiny random Qwen3s built in the test.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from kimina_jax.config import AlgorithmConfig, KlConfig, OptimConfig
from kimina_jax.errors import KiminaError
from kimina_jax.grpo import (
    PackItem,
    ReferencePolicy,
    TrainStep,
    accumulate_gradients,
    grpo_advantages,
    pack_samples,
)
from kimina_jax.grpo.optimizer import learning_rate_schedule, make_optimizer
from kimina_jax.grpo.packing import micro_batch_count
from kimina_jax.models import Qwen3Config, Qwen3ForCausalLM
from kimina_jax.parallel import make_mesh, path_to_str

# Every dimension divides by 2 (heads of 16 included) so a (2, 2, 2) mesh shards all of them.
CONFIG = Qwen3Config(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
MAX_RESPONSE = 8
BUCKETS = (16, 32)
OPTIM = OptimConfig(lr=1e-3)
# Adam divides by sqrt(v) + eps, so float32 reduction-order noise in a gradient entry near 0 becomes an
# update difference of up to a few % of lr there; a real error (a lost or doubled micro-batch) moves most
# entries by ~lr.
PARAM_ATOL = 0.02 * OPTIM.lr
KL_ON = KlConfig(enabled=True, coef=0.1, kind="low_var_kl")


def make_model(seed=0, config=CONFIG):
    return Qwen3ForCausalLM(config, rngs=nnx.Rngs(seed))


def algorithm(**overrides):
    base = dict(loss_agg_mode="seq-mean-token-sum-norm", loss_norm_length=MAX_RESPONSE, micro_batch_rows=1,
                logits_chunk_tokens=16)
    return AlgorithmConfig(**{**base, **overrides})


def flat_params(params) -> dict[str, np.ndarray]:
    return {path_to_str(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def random_items(seed, count=12, response_lengths=(1, MAX_RESPONSE)):
    """Items in groups of 4 with GRPO advantages of random 0/1 rewards."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 2, count).astype(np.float32)
    advantages = np.asarray(grpo_advantages(scores, np.arange(count) // 4))
    return [PackItem(rng.integers(0, CONFIG.vocab_size, rng.integers(2, 5)).tolist(),
                     rng.integers(0, CONFIG.vocab_size, rng.integers(*response_lengths, endpoint=True)).tolist(),
                     float(advantage))
            for advantage in advantages]


def packed_minibatch(step, params, items, seed=0, with_ref=False, rows_multiple=None):
    """Pack `items` with old log-probs = the current policy's plus noise (so ratios move off 1 and clipping
    happens) and, optionally, reference log-probs further off."""
    rng = np.random.default_rng(seed)
    pack = lambda items: pack_samples(  # noqa: E731
        items, BUCKETS, loss_agg_mode="seq-mean-token-sum-norm", max_response_len=MAX_RESPONSE,
        rows_multiple=rows_multiple or step.rows_multiple)
    plain = pack(items)
    current = plain.response_values(step.logprobs(params, plain))
    old, ref = ([(values + rng.normal(0, scale, values.shape)).astype(np.float32) for values in current]
                for scale in (0.3, 0.5))
    return pack([PackItem(i.prompt_ids, i.response_ids, i.advantage, o, r if with_ref else None)
                 for i, o, r in zip(items, old, ref)])


# --------------------------------------------------------------------------------------- direct formulas
def direct_terms(params, graphdef, batch, temperature):
    """Per-token log-probs and entropies from the full logits, no chunking."""
    return jax.jit(lambda p: _direct_terms(p, graphdef, batch, temperature))(params)


def direct_grad(params, graphdef, batch, alg, temperature):
    return jax.jit(jax.grad(lambda p: direct_loss(p, graphdef, batch, alg, temperature)))(params)


def _direct_terms(params, graphdef, batch, temperature):
    model = nnx.merge(graphdef, params)
    logits = model(jnp.asarray(batch.tokens), jnp.asarray(batch.positions), jnp.asarray(batch.segment_ids))[0]
    logp_all = jax.nn.log_softmax(logits / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, jnp.asarray(batch.targets)[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def direct_kl(logp, ref, kind):
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    x = jnp.clip(ref - logp, -20, 20)
    return jnp.clip(jnp.exp(x) - x - 1, -10, 10)


def direct_loss(params, graphdef, batch, alg, temperature):
    """SPEC 3 written out: dual-clip PPO + KL - entropy, each weighted by the packed loss weights."""
    logp, entropy = _direct_terms(params, graphdef, batch, temperature)
    a = jnp.asarray(batch.advantages)
    ratio = jnp.exp(jnp.clip(logp - jnp.asarray(batch.old_logp), -20, 20))
    pg = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 1 - alg.clip_low, 1 + alg.clip_high))
    pg = jnp.where(a < 0, jnp.minimum(pg, -a * alg.clip_c), pg)
    per_token = pg - alg.entropy_coeff * entropy
    if alg.kl.enabled:
        per_token = per_token + alg.kl.coef * direct_kl(logp, jnp.asarray(batch.ref_logp), alg.kl.kind)
    return jnp.sum(jnp.asarray(batch.loss_mask * batch.loss_weights) * per_token)


# ------------------------------------------------------------------------------------------------ tests
def test_optimizer_matches_torch_adamw_with_clipping():
    """make_optimizer == torch's clip_grad_norm_ + AdamW (verl's optimizer) over a few steps."""
    optim = OptimConfig(lr=0.05, weight_decay=0.1, b1=0.8, b2=0.95, eps=1e-6, grad_clip=1.0)
    rng = np.random.default_rng(0)
    start = rng.normal(size=(3, 4))
    grads = [rng.normal(0, scale, size=(3, 4)) for scale in (0.1, 2.0, 5.0)]
    tx = make_optimizer(optim)
    params = jnp.asarray(start, jnp.float32)
    opt_state = tx.init(params)
    for grad in grads:
        updates, opt_state = tx.update(jnp.asarray(grad, jnp.float32), opt_state, params)
        params = params + updates
    weight = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    reference = torch.optim.AdamW([weight], lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    for grad in grads:
        weight.grad = torch.tensor(grad)
        torch.nn.utils.clip_grad_norm_([weight], optim.grad_clip)
        reference.step()
    np.testing.assert_allclose(np.asarray(params), weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_learning_rate_schedules():
    lr = 1e-3
    constant = learning_rate_schedule(OptimConfig(lr=lr, warmup_steps=4))
    np.testing.assert_allclose([float(constant(n)) for n in range(6)], [0, lr / 4, lr / 2, 3 * lr / 4, lr, lr],
                               rtol=1e-6)
    cosine = learning_rate_schedule(OptimConfig(lr=lr, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1), 10)
    expected = [0, lr / 2] + [lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(n - 2, 8) / 8))) for n in range(2, 12)]
    np.testing.assert_allclose([float(cosine(n)) for n in range(12)], expected, rtol=1e-5)
    with pytest.raises(KiminaError, match="cosine"):
        learning_rate_schedule(OptimConfig(schedule="cosine", warmup_steps=5), total_steps=5)


@pytest.mark.parametrize(("entropy_coeff", "kl_kind"), [(0.05, None), (0.0, "low_var_kl"), (0.05, "k1")])
def test_gradient_matches_direct_formula(entropy_coeff, kl_kind):
    kl = KlConfig(enabled=True, coef=0.2, kind=kl_kind) if kl_kind else KlConfig()
    alg = algorithm(entropy_coeff=entropy_coeff, kl=kl, micro_batch_rows=2)
    model = make_model()
    step = TrainStep(model, alg, OPTIM, temperature=0.8)
    state = step.init_state(model)
    batch = packed_minibatch(step, state.params, random_items(1), with_ref=kl.enabled)
    micro = {name: jnp.asarray(value.reshape(-1, 2, batch.row_length)) for name, value in batch.token_arrays().items()}
    grads, _ = jax.jit(lambda params, totals, micro: accumulate_gradients(
        step.graphdef, params, totals, micro, alg, 0.8))(state.params, step._zero_totals(state.params), micro)
    expected = direct_grad(state.params, step.graphdef, batch, alg, 0.8)
    got, want = flat_params(grads), flat_params(expected)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=2e-6, rtol=1e-4, err_msg=name)
    if entropy_coeff or kl_kind:
        # The extra terms really move the gradient (a wrong sign or a dropped term would not pass above).
        plain = direct_grad(state.params, step.graphdef, batch, algorithm(), 0.8)
        assert max(np.abs(got[n] - flat_params(plain)[n]).max() for n in got) > 1e-4


def test_metrics_match_numpy():
    alg = algorithm(kl=KL_ON, micro_batch_rows=2)
    optim = OptimConfig(lr=1e-3, warmup_steps=2)
    model = make_model()
    step = TrainStep(model, alg, optim)
    state = step.init_state(model)
    batch = packed_minibatch(step, state.params, random_items(2), with_ref=True)
    logp = np.asarray(direct_terms(state.params, step.graphdef, batch, 1.0)[0], np.float64)
    grad_norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in flat_params(
        direct_grad(state.params, step.graphdef, batch, alg, 1.0)).values()))

    mask = batch.loss_mask.astype(bool)
    a, old, ref = batch.advantages.astype(np.float64), batch.old_logp, batch.ref_logp
    ratio = np.exp(np.clip(logp - old, -20, 20))
    unclipped, clipped = -a * ratio, -a * np.clip(ratio, 0.8, 1.3)
    pessimistic = np.maximum(unclipped, clipped)
    dual_taken = (a < 0) & (pessimistic > -a * 3.0)
    loss = np.where(dual_taken, -a * 3.0, pessimistic)
    x = np.clip(ref - logp, -20, 20)
    # seq-mean-token-sum-norm: mean over sequences of (token sum / L).
    per_sequence = lambda values: np.sum(values[mask]) / (MAX_RESPONSE * batch.num_items)  # noqa: E731
    expected = {
        "actor/pg_loss": per_sequence(loss),
        "actor/pg_clipfrac": np.mean((clipped > unclipped)[mask]),
        "actor/pg_clipfrac_lower": np.mean(dual_taken[mask]),
        "actor/ppo_kl": np.mean((old - logp)[mask]),
        "actor/kl_loss": per_sequence(np.clip(np.exp(x) - x - 1, -10, 10)),
        "actor/kl_coef": 0.1,
        "actor/grad_norm": grad_norm,
        "actor/lr": 0.0,  # warmup starts from 0 (verl's schedule)
        "actor/skipped_updates": 0.0,
    }
    assert 0 < expected["actor/pg_clipfrac"] < 1  # the noise really exercises the clip
    state, metrics = step.update(state, batch, 0)
    metrics = jax.device_get(metrics)
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    # The learning rate follows the training step, not the number of updates (verl's scheduler).
    for train_step, lr in ((0, 0.0), (1, optim.lr / 2), (1, optim.lr / 2), (5, optim.lr)):
        state, metrics = step.update(state, batch, train_step)
        np.testing.assert_allclose(jax.device_get(metrics["actor/lr"]), lr, rtol=1e-6)
    assert int(state.step) == 5


def test_update_does_not_depend_on_micro_batch_cut():
    model = make_model()
    alg = algorithm(entropy_coeff=0.01, kl=KL_ON)
    first = TrainStep(model, alg, OPTIM)
    batch = packed_minibatch(first, first.init_state(model).params, random_items(3), with_ref=True, rows_multiple=4)
    results = []
    for micro_rows in (batch.num_rows, batch.num_rows // 2, batch.num_rows // 4):
        step = TrainStep(model, dataclasses.replace(alg, micro_batch_rows=micro_rows), OPTIM)
        state = step.init_state(model)
        for train_step in range(2):
            state, metrics = step.update(state, batch, train_step)
        results.append((flat_params(state.params), jax.device_get(metrics)))
    (base_params, base_metrics), *others = results
    for params, metrics in others:
        for name in base_params:
            np.testing.assert_allclose(params[name], base_params[name], atol=PARAM_ATOL, rtol=0, err_msg=name)
        for name in base_metrics:
            np.testing.assert_allclose(metrics[name], base_metrics[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.fixture(scope="module")
def single_device_run():
    """Parameters after two updates on one device, and the batch they were made from."""
    model = make_model()
    step = TrainStep(model, algorithm(), OPTIM)
    state = step.init_state(model)
    batch = packed_minibatch(step, state.params, random_items(4, count=24), rows_multiple=8)
    for train_step in range(2):
        state, _ = step.update(state, batch, train_step)
    return batch, flat_params(state.params)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_update_matches_single_device(mesh_shape, single_device_run):
    batch, expected = single_device_run
    model = make_model()
    step = TrainStep(model, algorithm(), OPTIM, mesh=make_mesh(*mesh_shape))
    assert step.rows_multiple == mesh_shape[0] * mesh_shape[1]
    state = step.init_state(model)
    for train_step in range(2):
        state, _ = step.update(state, batch, train_step)
    got = flat_params(state.params)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=PARAM_ATOL, rtol=0, err_msg=name)

    kernel = state.params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]
    moment = state.opt_state.inner_state[1][0].mu["model"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]
    assert len(kernel.sharding.device_set) == 8 and moment.sharding == kernel.sharding
    if mesh_shape == (8, 1, 1):  # pure data parallelism: every device holds all parameters
        assert kernel.sharding.is_fully_replicated
    else:
        assert not kernel.sharding.is_fully_replicated
        shard_rows, shard_cols = kernel.addressable_shards[0].data.shape
        assert shard_rows * shard_cols * mesh_shape[1] * mesh_shape[2] == kernel.size


@pytest.mark.parametrize("impl", ["splash", "triton"])
def test_sharded_update_with_remat_and_flash_kernel_matches_plain(impl):
    """Remat (a regression: it once failed inside the jitted loops) and the Pallas attention kernels (interpret
    mode on CPU) in the old-log-prob pass and the update on a (2, 2, 2) mesh, against plain XLA attention."""
    mesh = make_mesh(2, 2, 2)
    items = random_items(5, count=8)
    pack = lambda items, step: pack_samples(  # noqa: E731
        items, (128,), loss_agg_mode="seq-mean-token-sum-norm", max_response_len=MAX_RESPONSE,
        rows_multiple=step.rows_multiple)
    results = []
    for attention, remat in (("xla", "none"), ("xla", "full"), (impl, "save_dots")):
        model = Qwen3ForCausalLM(CONFIG, attention_impl=attention, remat=remat, rngs=nnx.Rngs(0))
        step = TrainStep(model, algorithm(), OPTIM, mesh=mesh)
        state = step.init_state(model)
        plain = pack(items, step)
        old = plain.response_values(step.logprobs(state.params, plain))
        batch = pack([item._replace(old_logp=o - 0.1) for item, o in zip(items, old)], step)
        state, metrics = step.update(state, batch, 1)
        results.append((old, flat_params(state.params), jax.device_get(metrics)["actor/grad_norm"]))
    (old_base, params_base, norm_base), *others = results
    for old, params, norm in others:
        for a, b in zip(old_base, old):
            np.testing.assert_allclose(b, a, atol=1e-5)
        for name in params_base:
            np.testing.assert_allclose(params[name], params_base[name], atol=PARAM_ATOL, rtol=0, err_msg=name)
        np.testing.assert_allclose(norm, norm_base, rtol=1e-4)


def test_fsdp_mesh_compiles_without_replicating_activations(capfd):
    """On a (2, 2, 2) mesh XLA once split activations by hidden like the FSDP weights, then had to replicate
    them to go back ("involuntary full rematerialization" on stderr, plus collective-permutes)."""
    step = TrainStep(make_model(), algorithm(), OPTIM, mesh=make_mesh(2, 2, 2))
    state = step.init_state(make_model())
    items = random_items(6, count=8)
    batch = pack_samples([item._replace(old_logp=np.zeros(len(item.response_ids), np.float32)) for item in items],
                         (128,), loss_agg_mode="seq-mean-token-sum-norm", max_response_len=MAX_RESPONSE,
                         rows_multiple=step.rows_multiple)
    capfd.readouterr()
    hlo = step.lower_update(state, batch).compile().as_text()
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    assert "collective-permute" not in hlo and "all-to-all" not in hlo


def test_non_finite_gradient_skips_the_update():
    model = make_model()
    step = TrainStep(model, algorithm(), OPTIM)
    state = step.init_state(model)
    batch = packed_minibatch(step, state.params, random_items(5))
    broken = batch.advantages.copy()
    broken[np.nonzero(batch.loss_mask)[0][0], np.nonzero(batch.loss_mask)[1][0]] = np.nan
    before = flat_params(state.params), flat_params(state.opt_state)
    state, metrics = step.update(state, dataclasses.replace(batch, advantages=broken), 0)
    assert not np.isfinite(metrics["actor/grad_norm"]) and float(metrics["actor/skipped_updates"]) == 1
    assert int(state.step) == 0 and int(state.skipped_updates) == 1
    for old, new in zip(before, (flat_params(state.params), flat_params(state.opt_state))):
        for name in old:
            np.testing.assert_array_equal(new[name], old[name], err_msg=name)
    state, metrics = step.update(state, batch, 0)
    assert np.isfinite(metrics["actor/grad_norm"]) and int(state.step) == 1 and int(state.skipped_updates) == 1
    assert any(not np.array_equal(flat_params(state.params)[n], before[0][n]) for n in before[0])


def test_compile_count_depends_only_on_shape_buckets():
    model = make_model()
    step = TrainStep(model, algorithm(), OPTIM, mesh=make_mesh(2, 2, 1, devices=jax.devices()[:4]))
    state = step.init_state(model)
    shapes = []
    # Response lengths and counts vary; packed batches come in micro-batch counts from a small set.
    for seed, count in enumerate((9, 11, 13, 16, 10)):
        items = random_items(10 + seed, count=count, response_lengths=(9, 12))
        batch = packed_minibatch(step, state.params, items, seed=seed)
        micro = batch.num_rows // step.rows_multiple
        assert micro_batch_count(micro) == micro and len(set(batch.row_lengths)) == 1
        shapes.append((micro, batch.row_length))
        state, _ = step.update(state, batch, seed)
    assert shapes == [(3, 16), (3, 16), (2, 32), (2, 32), (3, 16)]
    assert step.compilations == {"zero_totals": 1, "update": 2, "apply": 1, "logprobs": 2}


def test_micro_batches_of_several_row_lengths_update_as_one_length_does():
    """The same items packed with one row length and with a shorter last micro-batch: the same log-probs, loss,
    gradient norm and parameters after the update."""
    model = make_model()
    step = TrainStep(model, algorithm(micro_batch_rows=2), OPTIM)
    lengths = (30, 30, 30, 30, 6, 6)  # 2 micro-batches of 2 x 32 and one of 2 x 8 (the 8s alone in rows of 32)
    rng = np.random.default_rng(4)
    items = [PackItem(rng.integers(1, 60, 3).tolist(), rng.integers(1, 60, n - 3).tolist(), float(rng.normal()))
             for n in lengths]
    results = []
    for buckets in ((32,), (8, 32)):
        state = step.init_state(model)
        pack = lambda items: pack_samples(items, buckets, loss_agg_mode="seq-mean-token-sum-norm",  # noqa: E731
                                          max_response_len=MAX_RESPONSE, rows_multiple=2)
        old = pack(items).response_values(step.logprobs(state.params, pack(items)))
        batch = pack([item._replace(old_logp=o) for item, o in zip(items, old)])
        state, metrics = step.update(state, batch, 0)
        results.append((batch.row_lengths.tolist(), old, jax.device_get(metrics), flat_params(state.params)))
    (one_lengths, old_one, metrics_one, params_one), (mixed_lengths, old_mixed, metrics_mixed, params_mixed) = results
    assert one_lengths == [32] * 6 and mixed_lengths == [32, 32, 32, 32, 8, 8]
    for a, b in zip(old_one, old_mixed):
        np.testing.assert_allclose(b, a, atol=1e-5)
    for name in ("actor/pg_loss", "actor/grad_norm", "actor/pg_clipfrac"):
        np.testing.assert_allclose(metrics_mixed[name], metrics_one[name], rtol=1e-4, err_msg=name)
    for name in params_one:
        np.testing.assert_allclose(params_mixed[name], params_one[name], atol=PARAM_ATOL, rtol=0, err_msg=name)


def test_rejects_batches_it_cannot_use():
    model = make_model()
    step = TrainStep(model, algorithm(micro_batch_rows=2, kl=KL_ON), OPTIM)
    state = step.init_state(model)
    items = random_items(6)
    with pytest.raises(KiminaError, match="rows_multiple"):
        step.logprobs(state.params, pack_samples(items, BUCKETS, loss_agg_mode="token-mean", rows_multiple=3))
    with pytest.raises(KiminaError, match="old_logp"):
        step.update(state, pack_samples(items, BUCKETS, loss_agg_mode="token-mean", rows_multiple=2), 0)
    with pytest.raises(KiminaError, match="ref_logp"):
        step.update(state, packed_minibatch(step, state.params, items), 0)


# ---------------------------------------------------------------------------------------------- learning
TARGET_TOKEN = 7


def sample_responses(forward, params, prompts, length, key):
    """Temperature-1 sampling by a plain loop of full forwards (`forward(params, tokens) -> logits`) over a
    fixed-size buffer."""
    tokens = np.concatenate([prompts, np.zeros((len(prompts), length), np.int32)], axis=1)
    start = prompts.shape[1]
    for position in range(start, start + length):
        key, sub = jax.random.split(key)
        logits = forward(params, jnp.asarray(tokens))[:, position - 1]
        tokens[:, position] = np.asarray(jax.random.categorical(sub, logits))
    return tokens[:, start:]


def test_grpo_raises_a_verifiable_reward():
    """Reward 1 when the response contains TARGET_TOKEN; GRPO must make that clearly more frequent."""
    config = Qwen3Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = make_model(seed=3, config=config)
    alg = AlgorithmConfig(loss_agg_mode="token-mean", micro_batch_rows=4, logits_chunk_tokens=64)
    step = TrainStep(model, alg, OptimConfig(lr=1e-2, weight_decay=0.0))
    state = step.init_state(model)
    prompts_per_step, group, length = 16, 4, 6
    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    forward = jax.jit(lambda params, tokens: nnx.merge(step.graphdef, params)(tokens)[0])
    rewards = []
    for train_step in range(12):
        key, sub = jax.random.split(key)
        prompts = np.repeat(rng.integers(0, 16, (prompts_per_step, 2), dtype=np.int32), group, axis=0)
        responses = sample_responses(forward, state.params, prompts, length, sub)
        scores = (responses == TARGET_TOKEN).any(axis=1).astype(np.float32)
        rewards.append(scores.mean())
        advantages = np.asarray(grpo_advantages(scores, np.arange(len(scores)) // group))
        items = [PackItem(p.tolist(), r.tolist(), float(a)) for p, r, a in zip(prompts, responses, advantages)]
        pack = lambda items: pack_samples(items, (32,), loss_agg_mode="token-mean",  # noqa: E731
                                          rows_multiple=step.rows_multiple)
        old = pack(items).response_values(step.logprobs(state.params, pack(items)))
        state, _ = step.update(state, pack([item._replace(old_logp=o) for item, o in zip(items, old)]), train_step)
    assert step.compilations == {"zero_totals": 1, "update": 1, "apply": 1, "logprobs": 1}
    start, end = np.mean(rewards[:2]), np.mean(rewards[-2:])
    assert end > max(0.8, start + 0.3), rewards


def test_old_logprob_pass_gives_the_old_policys_entropy():
    """verl's actor/entropy comes from the old log-prob pass: the same chunked pass returns the entropy of each
    position's full distribution (checked against the unchunked logits), and the log-probs are unchanged."""
    model = make_model()
    step = TrainStep(model, algorithm(logits_chunk_tokens=8), OPTIM)
    params = step.init_state(model).params
    batch = pack_samples(random_items(4), BUCKETS, loss_agg_mode="seq-mean-token-sum-norm",
                         max_response_len=MAX_RESPONSE, rows_multiple=step.rows_multiple)
    logp, entropy = step.logprobs(params, batch, with_entropy=True)
    direct_logp, direct_entropy = (np.asarray(x) for x in direct_terms(params, step.graphdef, batch, 1.0))
    mask = batch.loss_mask.astype(bool)
    np.testing.assert_allclose(entropy[mask], direct_entropy[mask], rtol=1e-5)
    np.testing.assert_allclose(logp[mask], direct_logp[mask], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(step.logprobs(params, batch), logp)
    assert (entropy[mask] > 0).all() and (entropy[mask] <= np.log(CONFIG.vocab_size) + 1e-5).all()


def test_ppo_epochs_repeat_the_mini_batches_with_fixed_old_logprobs():
    """algorithm.ppo_epochs=2 (verl): every mini-batch twice, in order, old log-probs as packed before the first
    update; metrics are the means over the four updates."""
    model = make_model()
    step = TrainStep(model, algorithm(ppo_epochs=2), OPTIM)
    state = step.init_state(model)
    batches = [packed_minibatch(step, state.params, random_items(seed), seed=seed) for seed in (5, 6)]
    manual = step.init_state(model)
    pg_losses = []
    for batch in batches + batches:
        manual, metrics = step.update(manual, batch, 0)
        pg_losses.append(float(metrics["actor/pg_loss"]))
    state, metrics = step.update_epochs(state, batches, 0)
    assert int(state.step) == 4
    np.testing.assert_allclose(metrics["actor/pg_loss"], np.mean(pg_losses), rtol=1e-6)
    assert len(set(np.round(pg_losses, 7))) > 1  # later updates see moved weights against the same old log-probs
    for name, value in flat_params(manual.params).items():
        np.testing.assert_allclose(flat_params(state.params)[name], value, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("offload", [False, True])
def test_reference_policy_is_a_frozen_copy_of_the_initial_weights(offload):
    """KL's reference: the initial weights, unaffected by the updates that donate the policy's buffers; with
    ref_offload it waits in host memory and gives the same log-probs."""
    model = make_model()
    alg = algorithm(kl=dataclasses.replace(KL_ON, ref_offload=offload))
    step = TrainStep(model, alg, OPTIM)
    state = step.init_state(model)
    reference = ReferencePolicy.from_config(alg.kl, state.params, step)
    batch = packed_minibatch(step, state.params, random_items(7), with_ref=True)
    initial = step.logprobs(state.params, batch)
    for train_step in range(3):
        state, _ = step.update(state, batch, train_step)
    assert not np.allclose(step.logprobs(state.params, batch), initial)  # the policy moved
    np.testing.assert_array_equal(reference.logprobs(batch), initial)
    kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(reference._params)}
    assert kinds == ({"pinned_host"} if offload else {"device"})


def test_reference_policy_from_an_hf_folder(tiny_hf_folder, tmp_path):
    """algorithm.kl.ref_path: any HF folder of the policy's architecture; another architecture is one clear error."""
    from kimina_jax.models import load_hf_checkpoint
    from tests.tiny_models import make_hf_model, save_hf_model

    policy = load_hf_checkpoint(tiny_hf_folder)
    other = save_hf_model(make_hf_model(tie=False, seed=3), tmp_path / "other")
    alg = algorithm(kl=dataclasses.replace(KL_ON, ref_path=str(other)))
    step = TrainStep(policy, alg, OPTIM)
    state = step.init_state(policy)
    reference = ReferencePolicy.from_config(alg.kl, state.params, step, load_model=load_hf_checkpoint)
    items = [PackItem([1, 2, 3], [4, 5, 6, 7], 1.0), PackItem([8, 9], [10, 11, 12], -1.0)]
    batch = pack_samples(items, BUCKETS, loss_agg_mode="token-mean", rows_multiple=step.rows_multiple)
    expected = step.logprobs(nnx.split(load_hf_checkpoint(other))[1], batch)
    np.testing.assert_allclose(reference.logprobs(batch), expected, rtol=1e-6)
    assert not np.allclose(expected, step.logprobs(state.params, batch))

    wrong = save_hf_model(make_hf_model(tie=False, num_hidden_layers=1), tmp_path / "wrong")
    alg = algorithm(kl=dataclasses.replace(KL_ON, ref_path=str(wrong)))
    with pytest.raises(KiminaError, match="algorithm.kl.ref_path"):
        ReferencePolicy.from_config(alg.kl, state.params, step, load_model=load_hf_checkpoint)


def test_loss_scale_gives_the_originals_loss_and_grad_norm():
    """`algorithm.loss_scale=2` reproduces Kimina-Prover-RL's gradient scale (issue 31): verl's
    seq-mean-token-sum-norm written out as the recipe runs it, scaled down (32 sequences, 8 data-parallel shards
    of 4, micro-batches of 2, so gradient accumulation 2): each micro-batch's loss is (sum of its sequences' token
    sums) / L / accumulation, a shard's gradient the sum over its micro-batches, the mini-batch's the mean over the
    shards; verl's `actor/pg_loss` is the mean of the micro-batches' losses before the accumulation division."""
    shards, micro_size = 8, 2
    accumulation = 32 // shards // micro_size
    model = make_model()
    step = TrainStep(model, algorithm(loss_scale=2.0), OPTIM)
    state = step.init_state(model)
    items = random_items(4, count=32)
    batch = packed_minibatch(step, state.params, items)
    old = batch.response_values(batch.old_logp)

    def verl_loss(params):
        logp = _direct_terms(params, step.graphdef, batch, 1.0)[0]
        token_sums = []
        for item, row, start, old_logp in zip(items, batch.item_row, batch.item_start, old):
            first = start + len(item.prompt_ids) - 1
            new_logp = logp[row, first : first + len(item.response_ids)]
            ratio = jnp.exp(jnp.clip(new_logp - old_logp, -20, 20))
            a = item.advantage
            pg = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 0.8, 1.3))
            pg = jnp.minimum(pg, -a * 3.0) if a < 0 else pg
            token_sums.append(jnp.sum(pg))
        micro_losses = [sum(token_sums[i : i + micro_size]) / MAX_RESPONSE for i in range(0, 32, micro_size)]
        per_shard = [sum(micro_losses[s * accumulation : (s + 1) * accumulation]) / accumulation
                     for s in range(shards)]
        return sum(per_shard) / shards, sum(micro_losses) / len(micro_losses)

    (_, verl_pg_loss), grads = jax.jit(jax.value_and_grad(verl_loss, has_aux=True))(state.params)
    verl_grad_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    _, metrics = step.update(state, batch, 0)
    metrics = jax.device_get(metrics)
    np.testing.assert_allclose(metrics["actor/grad_norm"], verl_grad_norm, rtol=1e-4)
    np.testing.assert_allclose(metrics["actor/pg_loss"], verl_pg_loss, rtol=1e-4, atol=1e-7)
