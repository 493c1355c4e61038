"""GRPO math against formulas written here independently, in numpy float64."""
from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimina_jax.config import AlgorithmConfig, load_config
from kimina_jax.errors import KiminaError
from kimina_jax.grpo import (
    ADVANTAGE_ESTIMATORS,
    AGG_MODES,
    aggregate_loss,
    batch_agg_metric,
    compute_advantages,
    compute_policy_loss,
    entropy_from_logits,
    grpo_advantages,
    grpo_loss,
    informative_groups,
    kl_penalty,
    sequence_token_weights,
)

CLIP_LOW, CLIP_HIGH, CLIP_C = 0.2, 0.3, 3.0
MAX_LEN = 16


# ---- references (float64, loops, straight from SPEC 3) ----

def ref_advantages(scores, groups, norm_by_std, eps=1e-6):
    out = np.zeros(len(scores))
    for group in set(groups.tolist()):
        members = np.flatnonzero(groups == group)
        if len(members) == 1:
            continue  # issue 3: a lone response gets advantage 0
        values = scores[members].astype(np.float64)
        centered = values - values.mean()
        out[members] = centered / (values.std(ddof=1) + eps) if norm_by_std else centered
    return out


def ref_rloo(scores, groups, eps=1e-6):
    out = np.zeros(len(scores))
    for i, group in enumerate(groups):
        others = [float(scores[j]) for j in range(len(scores)) if groups[j] == group and j != i]
        if others:  # a lone response gets 0 (verl leaves its reward)
            out[i] = scores[i] - sum(others) / len(others)
    return out


def ref_passk(scores, groups, norm_by_std, eps=1e-6):
    """verl's pass@k: the group's top response (ties: the first index) gets r_max - r_second_max."""
    out = np.zeros(len(scores))
    for group in set(groups.tolist()):
        members = np.flatnonzero(groups == group)
        if len(members) == 1:
            continue  # verl raises; ours gives 0
        values = scores[members].astype(np.float64)
        top = int(np.argmax(values))
        runner_up = max(v for k, v in enumerate(values) if k != top)
        advantage = values[top] - runner_up
        out[members[top]] = advantage / (values.std(ddof=1) + eps) if norm_by_std else advantage
    return out


REFERENCES = {
    "grpo": ref_advantages,
    "rloo": lambda scores, groups, norm_by_std: ref_rloo(scores, groups),
    "grpo_passk": ref_passk,
}


def ref_token_loss(logp, old, adv):
    ratio = np.exp(np.clip(logp - old, -20, 20))
    loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH))
    return np.where(adv < 0, np.minimum(loss, -adv * CLIP_C), loss)


def ref_aggregate(loss, mask, mode, max_len=MAX_LEN):
    """Rows with no masked token are not sequences; nothing masked at all -> 0."""
    per_seq = []
    for row_loss, row_mask in zip(loss, mask):
        n = row_mask.sum()
        if n == 0:
            continue
        total = float((row_loss * row_mask).sum())
        per_seq.append({"seq-mean-token-sum": total, "seq-mean-token-mean": total / n,
                        "seq-mean-token-sum-norm": total / max_len, "token-mean": None}[mode])
    if mode == "token-mean":
        return float((loss * mask).sum() / mask.sum()) if mask.sum() else 0.0
    return float(np.mean(per_seq)) if per_seq else 0.0


def ref_kl(logp, ref, kind):
    d = logp - ref
    if kind in ("k1", "kl"):
        return d
    if kind == "abs":
        return np.abs(d)
    if kind in ("k2", "mse"):
        return 0.5 * d * d
    x = np.clip(ref - logp, -20, 20)
    return np.clip(np.exp(x) - x - 1, -10, 10)


def ref_entropy(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    return -(p * np.log(p)).sum(-1)


def random_rollout(seed, rows=6, length=MAX_LEN, extreme=True):
    """Per-token inputs with ragged masks, one fully masked row, and (optionally) clamp-hitting ratios."""
    rng = np.random.default_rng(seed)
    logp = rng.normal(-2.0, 1.0, (rows, length))
    old = logp + rng.normal(0.0, 0.4, (rows, length))
    if extreme:
        old[0, :4] = logp[0, :4] + np.array([30.0, -30.0, 25.0, -25.0])  # |log-ratio| > 20: clamp
    adv = np.repeat(rng.normal(0.0, 1.0, (rows, 1)), length, axis=1)
    adv[1] = -2.5  # negative advantage with big ratios below: dual clip taken
    old[1, :3] = logp[1, :3] - np.array([3.0, 5.0, 0.5])
    adv[2] = 0.0
    lengths = rng.integers(1, length + 1, rows)
    lengths[3] = 0  # a fully masked row
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float64)
    return logp, old, adv, mask


# ---- advantages ----

@pytest.mark.parametrize("norm_by_std", [False, True])
def test_advantages_match_reference(norm_by_std):
    rng = np.random.default_rng(0)
    groups = rng.permutation(np.repeat([7, 3, 11, 40, 2, 5], [8, 8, 1, 4, 8, 1]))  # shuffled, non-contiguous
    scores = rng.integers(0, 2, len(groups)).astype(np.float64)
    scores[groups == 2] = 1.0  # a group with all-equal rewards
    scores[groups == 40] = rng.normal(size=4)
    got = np.asarray(grpo_advantages(scores, groups, norm_by_std=norm_by_std))
    want = ref_advantages(scores, groups, norm_by_std)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[groups == 2] == 0) and np.all(got[groups == 11] == 0) and np.all(got[groups == 5] == 0)


def test_advantages_jit_and_single_response():
    jitted = jax.jit(grpo_advantages, static_argnames="norm_by_std")
    np.testing.assert_array_equal(np.asarray(jitted(jnp.array([1.0]), jnp.array([0]), norm_by_std=True)), [0.0])
    got = np.asarray(jitted(jnp.array([1.0, 0.0, 0.0, 0.0]), jnp.array([1, 1, 1, 1]), norm_by_std=True))
    np.testing.assert_allclose(got, ref_advantages(np.array([1.0, 0, 0, 0]), np.array([1, 1, 1, 1]), True), rtol=1e-5)


def mixed_groups(seed):
    """Shuffled non-contiguous ids; groups of one, all-equal groups, ties at the top, a unique best, real scores."""
    rng = np.random.default_rng(seed)
    groups = rng.permutation(np.repeat([7, 3, 11, 40, 2, 5, 9, 12], [8, 8, 1, 4, 8, 1, 4, 4]))
    scores = rng.integers(0, 2, len(groups)).astype(np.float64)
    scores[groups == 2] = 1.0  # all pass
    scores[groups == 40] = rng.normal(size=4)  # a unique best and a distinct runner-up
    scores[groups == 9] = [0.0, 1.0, 0.0, 1.0]  # a tie at the top
    scores[groups == 12] = [0.0, 0.0, 1.0, 0.0]  # one success
    return scores, groups


# rloo with norm_by_std is refused: test_estimator_errors.
@pytest.mark.parametrize("name, norm_by_std", [("grpo", False), ("grpo", True), ("rloo", False),
                                               ("grpo_passk", False), ("grpo_passk", True)])
def test_estimators_match_reference(name, norm_by_std):
    scores, groups = mixed_groups(1)
    got = np.asarray(compute_advantages(name, scores, groups, norm_by_std))
    np.testing.assert_allclose(got, REFERENCES[name](scores, groups, norm_by_std), rtol=1e-5, atol=1e-6)
    for lone in (11, 5):
        assert got[groups == lone] == 0.0
    assert np.all(got[groups == 2] == 0.0)


def test_estimators_by_hand():
    ids = np.array([0, 0, 0, 0])
    rloo = np.asarray(compute_advantages("rloo", [1.0, 0.0, 0.0, 1.0], ids))
    np.testing.assert_allclose(rloo, [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6)
    passk = np.asarray(compute_advantages("grpo_passk", [0.0, 0.5, 1.0, 0.2], ids))
    np.testing.assert_allclose(passk, [0.0, 0.0, 0.5, 0.0], rtol=1e-6)
    tie = np.asarray(compute_advantages("grpo_passk", [1.0, 0.0, 1.0, 0.0], ids, norm_by_std=True))
    np.testing.assert_array_equal(tie, [0.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_estimators_jit(name):
    jitted = jax.jit(compute_advantages, static_argnames=("name", "norm_by_std"))
    norm_by_std = name != "rloo"
    np.testing.assert_array_equal(np.asarray(jitted(name, jnp.array([1.0]), jnp.array([0]), norm_by_std)), [0.0])
    scores, groups = mixed_groups(2)
    got = np.asarray(jitted(name, jnp.asarray(scores), jnp.asarray(groups), norm_by_std))
    np.testing.assert_allclose(got, REFERENCES[name](scores, groups, norm_by_std), rtol=1e-5, atol=1e-6)


def test_estimator_errors():
    with pytest.raises(KiminaError, match="unknown advantage estimator 'gae'"):
        compute_advantages("gae", [1.0, 0.0], [0, 0])
    with pytest.raises(KiminaError, match="no std normalisation"):
        compute_advantages("rloo", [1.0, 0.0], [0, 0], norm_by_std=True)


def test_estimator_config_key():
    assert set(typing.get_args(typing.get_type_hints(AlgorithmConfig)["adv_estimator"])) == set(ADVANTAGE_ESTIMATORS)
    assert load_config(overrides=["algorithm.adv_estimator=grpo_passk"], env={}).algorithm.adv_estimator == "grpo_passk"
    with pytest.raises(KiminaError, match="adv_estimator"):
        load_config(overrides=["algorithm.adv_estimator=gae"], env={})
    with pytest.raises(KiminaError, match="norm_adv_by_std false"):
        load_config(overrides=["algorithm.adv_estimator=rloo", "algorithm.norm_adv_by_std=true"], env={})


def test_informative_groups():
    scores, groups = mixed_groups(3)
    scores[groups == 7] = 0.0  # all fail
    want = np.array([len({float(v) for v in scores[groups == g]}) > 1 for g in groups])
    got = informative_groups(scores, groups)
    assert got.dtype == bool and got.tolist() == want.tolist()
    assert not got[np.isin(groups, [7, 2, 11, 5])].any() and got[np.isin(groups, [40, 9, 12])].all()
    assert informative_groups([0.5, 0.25, 0.5], [-3, -3, 10**12]).tolist() == [True, True, False]
    assert informative_groups([], []).shape == (0,)


# ---- policy loss and aggregation ----

@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_matches_reference(mode):
    logp, old, adv, mask = random_rollout(1)
    loss, metrics = jax.jit(lambda *arrays: compute_policy_loss(
        "vanilla", *arrays, agg_mode=mode, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, clip_c=CLIP_C, max_len=MAX_LEN
    ))(logp, old, adv, mask)
    token_loss = ref_token_loss(logp, old, adv)
    np.testing.assert_allclose(float(loss), ref_aggregate(token_loss, mask, mode), rtol=1e-5, atol=1e-6)

    ratio = np.exp(np.clip(logp - old, -20, 20))
    clipped = -adv * np.clip(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH) > -adv * ratio
    lower = (adv < 0) & (np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH)) > -adv * CLIP_C)
    n = mask.sum()
    np.testing.assert_allclose(float(metrics["pg_clipfrac"]), (clipped * mask).sum() / n, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["pg_clipfrac_lower"]), (lower * mask).sum() / n, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ppo_kl"]), (np.clip(old - logp, -20, 20) * mask).sum() / n,
                               rtol=1e-5, atol=1e-6)
    assert (lower * mask).sum() > 0 and (clipped * mask).sum() > 0  # both clips were exercised


@pytest.mark.parametrize("mode", AGG_MODES)
def test_training_loss_is_the_reference_formula(mode):
    """`grpo_loss`, what the update trains on, given each sequence's token weights: the same policy loss as the
    reference formula, plus the entropy and KL terms aggregated alike."""
    logp, old, adv, mask = random_rollout(1)
    rng = np.random.default_rng(5)
    ref, entropy = logp + rng.normal(0, 0.3, logp.shape), rng.random(logp.shape) * 3
    weights = np.asarray(sequence_token_weights(mask.sum(-1), mode, MAX_LEN))[:, None]
    loss, sums = grpo_loss(logp, old, adv, mask, weights, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, clip_c=CLIP_C,
                           entropy=entropy, entropy_coeff=0.01, ref_logp=ref, kl_coef=0.1, kl_kind="k3")
    pg = ref_aggregate(ref_token_loss(logp, old, adv), mask, mode)
    kl = ref_aggregate(ref_kl(logp, ref, "k3"), mask, mode)
    np.testing.assert_allclose(float(sums["pg_loss"]), pg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(sums["kl_loss"]), kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss), pg - 0.01 * ref_aggregate(entropy, mask, mode) + 0.1 * kl,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(sums["loss_tokens"]), mask.sum())


def test_policy_loss_clamps_extreme_ratios_and_stays_finite():
    logp = jnp.array([[0.0, 0.0, 0.0, 0.0]])
    old = jnp.array([[-100.0, 100.0, -100.0, 0.0]])  # log-ratios +100, -100, +100, 0
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0]])
    loss, metrics = compute_policy_loss("vanilla", logp, old, adv, jnp.ones((1, 4)), agg_mode="seq-mean-token-sum",
                                        clip_low=CLIP_LOW, clip_high=CLIP_HIGH, clip_c=CLIP_C)
    # A>0, ratio e^20: pessimistic max picks the clipped -1.3; A>0, ratio e^-20: -e^-20 (unclipped is larger);
    # A<0, ratio e^20: min(e^20, 3) = 3 (dual clip); A<0, ratio 1: 1.
    np.testing.assert_allclose(float(loss), -1.3 - np.exp(-20.0) + 3.0 + 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ppo_kl"]), (-20 + 20 - 20 + 0) / 4, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["pg_clipfrac_lower"]), 0.25)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_fully_masked(mode):
    loss = jnp.full((3, 5), jnp.nan)  # garbage outside the mask must not leak
    assert float(aggregate_loss(loss, jnp.zeros((3, 5)), mode, MAX_LEN)) == 0.0
    grads = jax.grad(lambda x: aggregate_loss(x, jnp.zeros((3, 5)), mode, MAX_LEN))(jnp.ones((3, 5)))
    assert np.all(np.asarray(grads) == 0)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("pieces", [1, 2, 4])
def test_aggregate_is_invariant_to_micro_batch_cuts(mode, pieces):
    rng = np.random.default_rng(2)
    loss = rng.normal(size=(8, MAX_LEN))
    lengths = rng.integers(0, MAX_LEN + 1, 8)
    lengths[[1, 6]] = 0
    mask = (np.arange(MAX_LEN)[None, :] < lengths[:, None]).astype(np.float64)
    whole = float(aggregate_loss(loss, mask, mode, MAX_LEN))
    num_tokens, num_seqs = mask.sum(), (mask.sum(-1) > 0).sum()
    parts = sum(
        float(aggregate_loss(l, m, mode, MAX_LEN, num_tokens=num_tokens, num_seqs=num_seqs))
        for l, m in zip(np.split(loss, pieces), np.split(mask, pieces))
    )
    np.testing.assert_allclose(parts, whole, rtol=1e-5)
    np.testing.assert_allclose(whole, ref_aggregate(loss, mask, mode), rtol=1e-5)


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 10 / 4),  # (1 + 2 + 3 + 4) / 4 tokens
    ("seq-mean-token-sum", (6 + 4) / 2),
    ("seq-mean-token-mean", (2 + 4) / 2),
    ("seq-mean-token-sum-norm", (6 + 4) / 8),  # verl: the batch's total / L, not divided by the 2 sequences
])
def test_batch_agg_metric_is_verls_agg_loss(mode, expected):
    """verl's agg_loss over a step batch (its actor/entropy): responses [1, 2, 3] and [4], L = 8; an empty
    response counts nowhere."""
    assert batch_agg_metric([np.array([1.0, 2.0, 3.0]), np.array([4.0]), np.array([])], mode, 8) == pytest.approx(expected)
    assert batch_agg_metric([], mode, 8) == 0.0


def test_aggregate_rejects_bad_modes():
    with pytest.raises(KiminaError, match="seq-mean-token-mean"):
        aggregate_loss(jnp.ones((1, 2)), jnp.ones((1, 2)), "token-sum")
    with pytest.raises(KiminaError, match="max_len"):
        aggregate_loss(jnp.ones((1, 2)), jnp.ones((1, 2)), "seq-mean-token-sum-norm")


# ---- KL and entropy ----

@pytest.mark.parametrize("kind", ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"])
def test_kl_penalty_matches_reference(kind):
    rng = np.random.default_rng(3)
    logp = rng.normal(-2.0, 1.0, 64)
    ref = logp + rng.normal(0.0, 1.0, 64)
    ref[:4] = logp[:4] + np.array([5.0, 30.0, -30.0, -5.0])  # low_var_kl clamps (x and result) hit
    np.testing.assert_allclose(np.asarray(kl_penalty(logp, ref, kind)), ref_kl(logp, ref, kind), rtol=1e-5, atol=1e-6)


def test_low_var_kl_clamps():
    got = np.asarray(kl_penalty(jnp.zeros(3), jnp.array([30.0, -30.0, 0.0]), "k3"))
    np.testing.assert_allclose(got, [10.0, 10.0, 0.0])
    with pytest.raises(KiminaError, match="low_var_kl"):
        kl_penalty(jnp.zeros(1), jnp.zeros(1), "k4")


def test_entropy_matches_reference():
    rng = np.random.default_rng(4)
    logits = rng.normal(0.0, 3.0, (2, 5, 50))
    logits[0, 0] *= 40.0  # a near one-hot distribution
    np.testing.assert_allclose(np.asarray(entropy_from_logits(logits)), ref_entropy(logits), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy_from_logits(jnp.zeros((3, 50)))), np.log(50.0), rtol=1e-6)
