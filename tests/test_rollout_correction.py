"""The rollout correction (verl's rollout_corr_helper) against formulas written here, per response in float64
loops; its packed form (`PackedBatch.corrected`) in the update; its config keys and their errors."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from kimina_jax.config import RolloutCorrectionConfig, load_config, rejection_criteria
from kimina_jax.errors import KiminaError
from kimina_jax.grpo import PackItem, TrainStep, importance_level, pack_samples, rollout_correction
from tests.test_grpo_step import BUCKETS, MAX_RESPONSE, OPTIM, algorithm, make_model, random_items


def _responses(seed=0):
    """Four responses' old and engine log-probs; one with a wild token (log-ratio 30: the +-20 clamp)."""
    rng = np.random.default_rng(seed)
    old = [rng.normal(-1.5, 0.6, n) for n in (5, 1, 7, 3)]
    engine = [o + rng.normal(0, 0.5, o.shape) for o in old]
    engine[2][3] = old[2][3] - 30.0
    return old, engine


def _config(**overrides):
    return RolloutCorrectionConfig(**overrides)


# ------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("threshold", [2.0, 5.0])
def test_weights_are_truncated_ratios(level, threshold):
    old, engine = _responses()
    got = rollout_correction(old, engine, _config(rollout_is=level, rollout_is_threshold=threshold), False)
    for o, e, w in zip(old, engine, got.weights):
        expected = []
        for t in range(len(o)):
            if level == "token":
                log_ratio = o[t] - e[t]
            elif level == "sequence":
                log_ratio = sum(o[i] - e[i] for i in range(len(o)))
            else:
                log_ratio = sum(o[i] - e[i] for i in range(len(o))) / len(o)
            expected.append(min(math.exp(min(max(log_ratio, -20.0), 20.0)), threshold))
        np.testing.assert_allclose(w, expected, rtol=1e-6)
    capped = np.concatenate(got.weights) == np.float32(threshold)
    assert capped.any() and not capped.all()  # the truncation is exercised
    assert got.keep is None


def test_batch_normalised_weights_have_mean_one():
    old, engine = _responses()
    for level in ("token", "sequence"):
        raw = rollout_correction(old, engine, _config(rollout_is=level), False)
        normal = rollout_correction(old, engine, _config(rollout_is=level, rollout_is_batch_normalize=True), False)
        units = np.concatenate(raw.weights) if level == "token" else np.array([w[0] for w in raw.weights])
        factor = normal.metrics["rollout_corr/rollout_is_batch_norm_factor"]
        assert factor == pytest.approx(units.mean(), rel=1e-6)
        for w, n in zip(raw.weights, normal.weights):
            np.testing.assert_allclose(n, w / factor, rtol=1e-6)


def test_weight_metrics_are_verls():
    old, engine = _responses()
    threshold = 2.0
    metrics = rollout_correction(old, engine, _config(rollout_is="token"), False).metrics
    raw = np.exp(np.clip(np.concatenate([o - e for o, e in zip(old, engine)]), -20, 20))
    bounded = np.clip(raw, 1 / threshold, threshold)
    assert metrics["rollout_corr/rollout_is_mean"] == pytest.approx(raw.mean())
    assert metrics["rollout_corr/rollout_is_max"] == pytest.approx(raw.max())
    assert metrics["rollout_corr/rollout_is_ratio_fraction_high"] == pytest.approx(np.mean(raw > threshold))
    assert metrics["rollout_corr/rollout_is_ratio_fraction_low"] == pytest.approx(np.mean(raw < 1 / threshold))
    assert metrics["rollout_corr/rollout_is_std"] == pytest.approx(np.sqrt(np.mean(bounded ** 2) - bounded.mean() ** 2))
    normalised = bounded / bounded.mean()
    assert metrics["rollout_corr/rollout_is_eff_sample_size"] == pytest.approx(1 / np.mean(normalised ** 2))
    ratios = np.concatenate([o - e for o, e in zip(old, engine)])
    assert metrics["rollout_corr/kl"] == pytest.approx(np.mean(-ratios))
    assert metrics["rollout_corr/k3_kl"] == pytest.approx(np.mean(np.exp(ratios) - ratios - 1))
    assert metrics["rollout_corr/training_ppl"] == pytest.approx(np.mean([np.exp(-o.mean()) for o in old]))
    assert metrics["rollout_corr/log_ppl_diff"] == pytest.approx(np.mean([e.mean() - o.mean()
                                                                          for o, e in zip(old, engine)]))
    assert metrics["rollout_corr/chi2_seq"] == pytest.approx(
        np.mean([np.exp(2 * np.clip((o - e).sum(), -20, 20)) for o, e in zip(old, engine)]) - 1)


def test_auto_is_token_level_off_policy_and_off_on_policy():
    assert importance_level(_config(), off_policy=True) == "token"
    assert importance_level(_config(), off_policy=False) is None
    assert importance_level(_config(rollout_is="none"), off_policy=True) is None
    assert importance_level(_config(rollout_is="sequence"), off_policy=False) == "sequence"
    old, engine = _responses()
    on_policy = rollout_correction(old, engine, _config(), False)
    assert on_policy.weights is None and on_policy.keep is None


# ------------------------------------------------------------------------------------------ rejection
def _divergences(o, e):
    r = [min(max(o[t] - e[t], -20.0), 20.0) for t in range(len(o))]
    return {"k1": [-x for x in r], "k2": [0.5 * x * x for x in r], "k3": [math.exp(x) - 1 - x for x in r]}


@pytest.mark.parametrize("criterion, threshold", [
    ("token_k1", "0.6_1.5"), ("token_k1", "1.5"), ("token_k2", "0.08"), ("token_k3", "0.1"),
    ("seq_sum_k1", "0.3_4"), ("seq_sum_k3", "0.4"), ("seq_mean_k2", "0.1"), ("seq_mean_k1", "2"),
    ("seq_max_k2", "0.2"), ("seq_max_k3", "0.3"),
])
def test_rejection_keeps_what_passes(criterion, threshold):
    old, engine = _responses(1)
    got = rollout_correction(old, engine, _config(rollout_is="none", rollout_rs=criterion,
                                                  rollout_rs_threshold=threshold), False)
    level, kind = criterion.rsplit("_", 1)
    bounds = [float(b) for b in threshold.split("_")]
    lower, upper = (bounds if len(bounds) == 2 else [1 / bounds[0], bounds[0]]) if kind == "k1" else (None, bounds[0])
    rejected_tokens = 0
    for o, e, keep in zip(old, engine, got.keep):
        values = _divergences(o, e)[kind]
        if level != "token":
            value = {"seq_sum": sum, "seq_mean": lambda v: sum(v) / len(v), "seq_max": max}[level](values)
            values = [value] * len(o)
        if kind == "k1":
            expected = [math.log(lower) <= v <= math.log(upper) for v in values]
        else:
            expected = [v <= upper for v in values]
        assert keep.tolist() == expected
        rejected_tokens += len(o) - sum(expected)
    assert 0 < rejected_tokens < sum(len(o) for o in old)  # the bound is exercised
    assert got.metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(
        rejected_tokens / sum(len(o) for o in old))
    assert got.weights is None


def test_several_criteria_must_all_pass():
    old, engine = _responses(1)
    both = rollout_correction(old, engine, _config(rollout_rs="token_k2, seq_max_k3", rollout_rs_threshold="0.08,0.3",
                                                   rollout_is="none"), False)
    one = [rollout_correction(old, engine, _config(rollout_rs=c, rollout_rs_threshold=t, rollout_is="none"), False)
           for c, t in (("token_k2", "0.08"), ("seq_max_k3", "0.3"))]
    for keep, a, b in zip(both.keep, one[0].keep, one[1].keep):
        assert keep.tolist() == (a & b).tolist()
    assert "rollout_corr/rollout_rs_token_k2_masked_fraction" in both.metrics
    assert both.metrics["rollout_corr/rollout_rs_seq_masked_fraction"] == pytest.approx(
        np.mean([not k.all() for k in both.keep]))


def test_rejected_tokens_leave_the_loss_and_its_normaliser():
    """The update with rejection equals the update on a batch without the rejected tokens' losses, their loss
    weights recomputed over the kept tokens (seq-mean-token-mean: each sequence's mean of its kept tokens)."""
    model, items = make_model(), random_items(5)
    alg = algorithm(loss_agg_mode="seq-mean-token-mean",
                    rollout_correction=_config(rollout_is="token", rollout_rs="token_k2", rollout_rs_threshold=0.02))
    step = TrainStep(model, alg, OPTIM)
    assert step.uses_is_weights
    state = step.init_state(model)
    pack = lambda items: pack_samples(items, BUCKETS, loss_agg_mode="seq-mean-token-mean",  # noqa: E731
                                      max_response_len=MAX_RESPONSE, rows_multiple=step.rows_multiple)
    plain = pack(items)
    current = plain.response_values(step.logprobs(state.params, plain))
    rng = np.random.default_rng(0)
    old = [(v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for v in current]
    engine = [(o + rng.normal(0, 0.3, o.shape)).astype(np.float32) for o in old]
    batch = pack([PackItem(i.prompt_ids, i.response_ids, i.advantage, o) for i, o in zip(items, old)])
    correction = rollout_correction(old, engine, alg.rollout_correction, False)
    kept = np.concatenate(correction.keep)
    assert 0 < kept.sum() < kept.size
    corrected = batch.corrected(correction.weights, correction.keep, loss_agg_mode="seq-mean-token-mean",
                                max_response_len=MAX_RESPONSE)

    a, logp = [np.full(len(o), i.advantage) for o, i in zip(old, items)], current
    expected, sequences = 0.0, 0
    for lp, o, adv, w, keep in zip(logp, old, a, correction.weights, correction.keep):
        if not keep.any():
            continue
        ratio = np.exp(lp.astype(np.float64) - o)
        pessimistic = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.3))
        token = np.where(adv < 0, np.minimum(pessimistic, -adv * 3.0), pessimistic) * w
        expected += token[keep].mean()
        sequences += 1
    _, metrics = jax.device_get(step.update(state, corrected, 0))
    np.testing.assert_allclose(metrics["actor/pg_loss"], expected / sequences, rtol=1e-4, atol=1e-7)
    assert corrected.loss_mask.sum() == kept.sum()


# ------------------------------------------------------------------------------------------ config
def test_rejection_thresholds_read_as_verl():
    assert rejection_criteria("token_k1,seq_mean_k3,token_k1", "0.5_2,0.1") == [
        ("token_k1", 0.5, 2.0), ("seq_mean_k3", None, 0.1)]
    assert rejection_criteria("seq_sum_k1", 4.0) == [("seq_sum_k1", 0.25, 4.0)]
    assert rejection_criteria("token_k2,seq_max_k3", "0.3") == [("token_k2", None, 0.3), ("seq_max_k3", None, 0.3)]


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.rollout_correction.rollout_rs=token_k4", "algorithm.rollout_correction.rollout_rs_threshold=1"],
     "unknown criterion 'token_k4'"),
    (["algorithm.rollout_correction.rollout_rs=token_k2"], "needs 'algorithm.rollout_correction.rollout_rs_threshold'"),
    (["algorithm.rollout_correction.rollout_rs=token_k2,seq_max_k2",
      "algorithm.rollout_correction.rollout_rs_threshold=1,2,3"],
     "3 thresholds for 2 criteria"),
    (["algorithm.rollout_correction.rollout_rs=token_k2", "algorithm.rollout_correction.rollout_rs_threshold=0.1_2.0"],
     "'0.1_2.0' for token_k2: expected one upper bound"),
    (["algorithm.rollout_correction.rollout_rs=token_k2", "algorithm.rollout_correction.rollout_rs_threshold=-1"],
     "'algorithm.rollout_correction.rollout_rs_threshold' must be > 0"),
    (["algorithm.rollout_correction.rollout_is=tokens"], "'algorithm.rollout_correction.rollout_is' must be one of"),
    (["algorithm.policy_loss=ppo"], "'algorithm.policy_loss' must be one of 'vanilla'"),
    (["algorithm.policy_loss=gspo", "algorithm.policy_loss_options.tau_pos=2"],
     "'algorithm.policy_loss_options.tau_pos' is not an option of policy loss 'gspo'"),
])
def test_bad_settings_are_one_clear_error(overrides, message):
    with pytest.raises(KiminaError, match=message):
        load_config("tiny", overrides, env={})


def test_the_new_keys_load():
    cfg = load_config("tiny", ["algorithm.policy_loss=kl_cov", "algorithm.policy_loss_options.ppo_kl_coef=0.5",
                               "algorithm.kl.kind=k3+", "algorithm.rollout_correction.rollout_is=geometric",
                               "algorithm.rollout_correction.rollout_rs=seq_mean_k3",
                               "algorithm.rollout_correction.rollout_rs_threshold=0.05"], env={})
    assert cfg.algorithm.policy_loss_options == {"ppo_kl_coef": 0.5} and cfg.algorithm.kl.kind == "k3+"
    assert cfg.algorithm.rollout_correction.rollout_rs_threshold == 0.05
