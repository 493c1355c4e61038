"""The packed update trains on the registered policy losses: sequences are the segments of packed rows (values and
gradients as one row per sequence), and the update's pg_loss is `compute_policy_loss` over the unpacked responses."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimina_jax.grpo import (
    POLICY_LOSSES,
    PackItem,
    TrainStep,
    compute_policy_loss,
    effective_agg_mode,
    grpo_loss,
    pack_samples,
    sequence_token_weights,
)
from tests.test_grpo_step import BUCKETS, MAX_RESPONSE, OPTIM, algorithm, make_model, random_items

CLIPS = dict(clip_low=0.2, clip_high=0.3, clip_c=3.0)
# clip_cov's pick is random; with a ratio of 1 every candidate is cut, so both layouts cut the same tokens.
OPTIONS = {"clip_cov": {"clip_cov_ratio": 1.0}, "kl_cov": {"kl_cov_ratio": 0.2}}


def _rows(lengths, seed):
    """Three responses as [3, T] rows and the same tokens packed into one row of two segments and one of one."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    mask = (np.arange(width)[None] < np.array(lengths)[:, None]).astype(np.float32)
    logp = rng.normal(-1.0, 0.5, mask.shape).astype(np.float32)
    old = (logp + rng.normal(0, 0.4, mask.shape)).astype(np.float32)
    adv = np.repeat(np.array([[1.0], [-0.7], [0.4]], np.float32), width, 1)
    weights = rng.uniform(0.5, 2.0, mask.shape).astype(np.float32)
    return logp, old, adv, mask, weights


def _pack(rows, lengths, gap=2):
    """Rows [3, T] into [2, L]: responses 0 and 1 in row 0 (segments 1, 2, a gap of padding between), 2 in row 1."""
    width = lengths[0] + gap + lengths[1] + gap
    out = np.zeros((2, width), np.float32)
    out[0, : lengths[0]] = rows[0, : lengths[0]]
    out[0, lengths[0] + gap : lengths[0] + gap + lengths[1]] = rows[1, : lengths[1]]
    out[1, : lengths[2]] = rows[2, : lengths[2]]
    return out


def _segments(lengths, gap=2):
    width = lengths[0] + gap + lengths[1] + gap
    ids = np.zeros((2, width), np.int32)
    ids[0, : lengths[0] + gap] = 1  # a segment's prompt part is outside the mask: ids cover it too
    ids[0, lengths[0] + gap : lengths[0] + gap + lengths[1]] = 2
    ids[1, : lengths[2]] = 1
    return ids


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_packed_segments_are_sequences(name, mode):
    lengths = (5, 3, 6)
    logp, old, adv, mask, weights = _rows(lengths, seed=1)
    options = OPTIONS.get(name, {})

    def rows_loss(lp):
        return compute_policy_loss(name, lp, old, adv, mask, agg_mode=mode, max_len=MAX_RESPONSE,
                                   rollout_is_weights=weights, **CLIPS, **options)

    packed = {key: _pack(value, lengths) for key, value in
              dict(logp=logp, old=old, adv=adv, mask=mask, weights=weights).items()}
    token_weights = np.asarray(sequence_token_weights(np.array(lengths), effective_agg_mode(name, mode)))
    loss_weights = _pack(np.repeat(token_weights[:, None], mask.shape[1], 1) * mask, lengths)

    def packed_loss(lp):
        return grpo_loss(lp, packed["old"], packed["adv"], packed["mask"], loss_weights, **CLIPS, policy_loss=name,
                         options=options, segment_ids=_segments(lengths), is_weights=packed["weights"])

    (want, metrics), grad = jax.value_and_grad(rows_loss, has_aux=True)(jnp.asarray(logp))
    (got, sums), packed_grad = jax.value_and_grad(packed_loss, has_aux=True)(jnp.asarray(packed["logp"]))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(packed_grad), _pack(np.asarray(grad), lengths), rtol=1e-4, atol=1e-7)
    for metric, value in metrics.items():
        np.testing.assert_allclose(float(sums[metric]) / float(sums["loss_tokens"]), float(value), rtol=1e-5,
                                   atol=1e-7, err_msg=metric)


@pytest.mark.parametrize("name", ["gspo", "geo_mean", "cispo"])
def test_the_update_trains_on_the_registered_loss(name):
    """TrainStep with algorithm.policy_loss: its pg_loss and clip fractions are `compute_policy_loss` of the
    responses, one row each, at the policy the update starts from (one micro-batch of all rows)."""
    model, items = make_model(), random_items(4)
    alg = algorithm(policy_loss=name, loss_agg_mode="token-mean", micro_batch_rows=8)
    step = TrainStep(model, alg, OPTIM)
    state = step.init_state(model)
    pack = lambda items: pack_samples(items, BUCKETS, loss_agg_mode=effective_agg_mode(name, alg.loss_agg_mode),  # noqa: E731
                                      max_response_len=MAX_RESPONSE, rows_multiple=step.rows_multiple)
    plain = pack(items)
    current = plain.response_values(step.logprobs(state.params, plain))
    rng = np.random.default_rng(0)
    old = [(v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for v in current]
    batch = pack([PackItem(i.prompt_ids, i.response_ids, i.advantage, o) for i, o in zip(items, old)])
    assert batch.num_rows == 8 and np.max(batch.segment_ids) > 1  # one micro-batch, several sequences a row

    width = max(len(v) for v in current)
    rows = lambda values: np.stack([np.pad(v, (0, width - len(v))) for v in values])  # noqa: E731
    mask = rows([np.ones(len(v), np.float32) for v in current])
    adv = rows([np.full(len(v), i.advantage, np.float32) for v, i in zip(current, items)])
    want, want_metrics = compute_policy_loss(name, rows(current), rows(old), adv, mask, agg_mode="token-mean",
                                             max_len=MAX_RESPONSE, **CLIPS)
    _, metrics = jax.device_get(step.update(state, batch, 0))
    np.testing.assert_allclose(metrics["actor/pg_loss"], float(want), rtol=2e-4, atol=1e-6)
    for metric, value in want_metrics.items():
        np.testing.assert_allclose(metrics[f"actor/{metric}"], float(value), rtol=2e-4, atol=1e-6, err_msg=metric)
