"""The GRPO arithmetic of SPEC 3 as pure functions on arrays (all usable inside `jax.jit`).

Conventions shared by every function here:
- `mask` marks the tokens that count (response tokens); anything outside it never reaches a result,
  even when it holds garbage.
- A "sequence" is one response. Aggregation over sequences only counts sequences with at least one masked
  token: an all-masked row (padding, an empty response) neither adds to a sum nor to a denominator, and a
  batch with no masked token at all aggregates to 0, never NaN.
- Micro-batch invariance: the aggregate of a mini-batch is a weighted token sum whose weights only need two
  mini-batch-level normalisers, `num_tokens` (masked tokens) and `num_seqs` (sequences). Passing those to
  `aggregate_loss` / `policy_loss` for each micro-batch makes the micro-batch results add up exactly to the
  mini-batch's. `sequence_token_weights` gives the per-token weight itself (packing stores it per token).
"""
from __future__ import annotations

import functools

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kimina_jax.errors import KiminaError

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
# verl clamps log-ratios before exp so that one wild token cannot overflow the loss.
LOG_RATIO_LIMIT = 20.0
LOW_VAR_KL_LIMIT = 10.0


def grpo_advantages(scores: Any, group_ids: Any, norm_by_std: bool = False, eps: float = 1e-6) -> jax.Array:
    """A_i = r_i - mean(group of i), optionally / (unbiased std(group) + eps); a group of one gets 0.

    `group_ids` may be any integers (not necessarily contiguous); see `_groups` for how group sums are taken.
    SPEC 3 gives a lone response mean 0 (advantage = its reward, as verl does); issue 3 overrides that
    with 0, since one response carries no group-relative signal.
    """
    scores, same, count = _groups(scores, group_ids)
    mean = _group_sum(same, scores) / count
    advantages = scores - mean
    if norm_by_std:
        advantages = advantages / (_group_std(scores, same, count, mean) + eps)
    return jnp.where(count > 1, advantages, 0.0)


def rloo_advantages(scores: Any, group_ids: Any, norm_by_std: bool = False, eps: float = 1e-6) -> jax.Array:
    """RLOO (verl's `rloo`): A_i = r_i - mean of the other responses of its group; a group of one gets 0.

    verl computes it as n/(n-1) * (r_i - mean(group)), the same number, and leaves a lone response's reward as its
    advantage; a group of one gets 0 here, as in `grpo_advantages`. verl's RLOO has no std normalisation, so
    `norm_by_std=True` is refused rather than ignored; `eps` is unused (kept for the registry's common signature).
    """
    if norm_by_std:
        raise KiminaError("the rloo advantage has no std normalisation (as in verl); set norm_by_std false")
    scores, same, count = _groups(scores, group_ids)
    others = _group_sum(same, scores) - scores
    return jnp.where(count > 1, scores - others / jnp.maximum(count - 1.0, 1.0), 0.0)


def grpo_passk_advantages(scores: Any, group_ids: Any, norm_by_std: bool = False, eps: float = 1e-6) -> jax.Array:
    """Pass@k (verl's `grpo_passk`): only the best response of a group gets an advantage, r_max - r_second_max,
    optionally / (unbiased std(group) + eps); every other response gets 0, and so does a group of one (verl
    refuses groups of one).

    Computed as A_i = max(0, r_i - max of the others in its group), which is that number for every input: ties at
    the top give 0 whichever tied response verl's `topk` picks (r_max - r_second_max = 0), so no tie-break is needed.
    """
    scores, same, count = _groups(scores, group_ids)
    others = (same > 0) & ~jnp.eye(scores.shape[0], dtype=bool)
    best_other = jnp.max(jnp.where(others, scores[None, :], -jnp.inf), axis=1)
    advantages = jnp.maximum(scores - best_other, 0.0)
    if norm_by_std:
        advantages = advantages / (_group_std(scores, same, count, _group_sum(same, scores) / count) + eps)
    # A lone response's best_other is -inf: its advantage is set here, not computed.
    return jnp.where(count > 1, advantages, 0.0)


AdvantageEstimator = Callable[..., jax.Array]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
    "grpo_passk": grpo_passk_advantages,
}


def compute_advantages(
    name: str, scores: Any, group_ids: Any, norm_by_std: bool = False, eps: float = 1e-6
) -> jax.Array:
    """Per-response advantages by the estimator `name` of `ADVANTAGE_ESTIMATORS` (`algorithm.adv_estimator`).

    Dr. GRPO needs no estimator of its own: it is `grpo` without std normalisation, aggregated with
    `seq-mean-token-sum-norm`, i.e. `algorithm.norm_adv_by_std=false` and
    `algorithm.loss_agg_mode=seq-mean-token-sum-norm`: the defaults, and the Kimina recipe's own setting.
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise KiminaError(f"unknown advantage estimator {name!r}; expected one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name](scores, group_ids, norm_by_std, eps)


def informative_groups(values: Any, group_ids: Any) -> np.ndarray:
    """Per sample: whether its group's `values` (e.g. scores) are not all equal, i.e. whether the group carries a
    group-relative signal (DAPO's filter keeps these groups). A group of one is not informative. Runs on host."""
    values = np.asarray(values, np.float64).ravel()
    groups, inverse = np.unique(np.asarray(group_ids), return_inverse=True)
    inverse = inverse.ravel()
    low = np.full(len(groups), np.inf)
    high = np.full(len(groups), -np.inf)
    np.minimum.at(low, inverse, values)
    np.maximum.at(high, inverse, values)
    return (low < high)[inverse]


def _groups(scores: Any, group_ids: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 scores, the [N, N] float32 same-group matrix and each response's group size. Group sums are
    elementwise float32 sums over this matrix (no matmul, so no reduced-precision passes on TPU)."""
    scores = jnp.asarray(scores, jnp.float32)
    group_ids = jnp.asarray(group_ids)
    same = (group_ids[:, None] == group_ids[None, :]).astype(jnp.float32)
    return scores, same, same.sum(axis=1)


def _group_sum(same: jax.Array, values: jax.Array) -> jax.Array:
    """Sum of `values` over each response's group."""
    return (same * values[None, :]).sum(axis=1)


def _group_std(scores: jax.Array, same: jax.Array, count: jax.Array, mean: jax.Array) -> jax.Array:
    """Unbiased std of each response's group (0 for a group of one)."""
    squares = (same * (scores[None, :] - mean[:, None]) ** 2).sum(axis=1)
    return jnp.sqrt(squares / jnp.maximum(count - 1.0, 1.0))


def sequence_token_weights(
    token_counts: Any, mode: str, max_len: int | None = None, num_tokens: Any = None, num_seqs: Any = None
) -> jax.Array:
    """Weight of each masked token of each sequence, so that the aggregate loss is sum(weight * token loss).

    `token_counts`: masked tokens per sequence (any shape). `num_tokens` / `num_seqs` default to the totals
    over `token_counts`; pass the mini-batch's totals when `token_counts` covers only a micro-batch.
    token-mean: 1/num_tokens; seq-mean-token-sum: 1/num_seqs; seq-mean-token-mean: 1/(n_s * num_seqs);
    seq-mean-token-sum-norm: 1/(max_len * num_seqs). Sequences with no token get weight 0.
    """
    counts = jnp.asarray(token_counts, jnp.float32)
    total_tokens = counts.sum() if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
    total_seqs = (counts > 0).sum().astype(jnp.float32) if num_seqs is None else jnp.asarray(num_seqs, jnp.float32)
    ones = jnp.ones_like(counts)
    if mode == "token-mean":
        denominator = total_tokens * ones
    elif mode == "seq-mean-token-sum":
        denominator = total_seqs * ones
    elif mode == "seq-mean-token-mean":
        denominator = counts * total_seqs
    elif mode == "seq-mean-token-sum-norm":
        if max_len is None or max_len <= 0:
            raise KiminaError(f"loss aggregation mode {mode!r} needs max_len (the max response length), got {max_len!r}")
        denominator = float(max_len) * total_seqs * ones
    else:
        raise KiminaError(f"unknown loss aggregation mode {mode!r}; expected one of {', '.join(AGG_MODES)}")
    usable = (counts > 0) & (denominator > 0)
    return jnp.where(usable, 1.0 / jnp.where(usable, denominator, 1.0), 0.0)


def aggregate_loss(
    loss: Any, mask: Any, mode: str, max_len: int | None = None, num_tokens: Any = None, num_seqs: Any = None
) -> jax.Array:
    """Reduce a per-token loss [..., T] (each row one sequence) to a scalar with one of `AGG_MODES`.

    See the module docstring for all-masked rows and for the `num_tokens` / `num_seqs` normalisers.
    """
    mask = jnp.asarray(mask, jnp.float32)
    weights = sequence_token_weights(mask.sum(axis=-1), mode, max_len, num_tokens, num_seqs)
    return weighted_token_sum(loss, mask, weights[..., None])


def weighted_token_sum(values: Any, mask: Any, weights: Any) -> jax.Array:
    """sum(weights * values) over the masked tokens: every aggregation mode is this with its token weights
    (`sequence_token_weights`; packed rows carry them per token as `PackedBatch.loss_weights`)."""
    mask = jnp.asarray(mask, jnp.float32)
    return jnp.sum(jnp.where(mask > 0, values, 0.0) * mask * weights)


def batch_agg_metric(per_sequence: Sequence[Any], mode: str, max_len: int | None = None) -> float:
    """A per-token quantity of a whole step batch aggregated as verl's `agg_loss` does for its metrics (e.g.
    verl's `actor/entropy`): `per_sequence` holds each response's token values.

    token-mean: mean over all tokens; seq-mean-token-sum: mean of the sequences' sums; seq-mean-token-mean: mean
    of their means; seq-mean-token-sum-norm: the batch's total / max_len. That last one is verl's formula (it
    divides by the length only, not by the number of sequences, so the recipe's entropy reads in the hundreds);
    the loss's own normaliser (`sequence_token_weights`) also divides by the sequences (SPEC 3). Empty: 0.
    """
    sequences = [np.asarray(values, np.float64) for values in per_sequence if len(values)]
    if not sequences:
        return 0.0
    if mode == "token-mean":
        return float(np.concatenate(sequences).mean())
    if mode == "seq-mean-token-sum":
        return float(np.mean([values.sum() for values in sequences]))
    if mode == "seq-mean-token-mean":
        return float(np.mean([values.mean() for values in sequences]))
    if mode == "seq-mean-token-sum-norm":
        if max_len is None or max_len <= 0:
            raise KiminaError(f"loss aggregation mode {mode!r} needs max_len (the max response length), got {max_len!r}")
        return float(sum(values.sum() for values in sequences) / max_len)
    raise KiminaError(f"unknown loss aggregation mode {mode!r}; expected one of {', '.join(AGG_MODES)}")


def masked_mean(values: Any, mask: Any) -> jax.Array:
    """Mean of `values` over the masked entries; 0 when nothing is masked."""
    mask = jnp.asarray(mask, jnp.float32)
    total = jnp.sum(jnp.where(mask > 0, values, 0.0) * mask)
    count = mask.sum()
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def ppo_token_loss(
    logp: Any, old_logp: Any, advantages: Any, clip_low: float, clip_high: float, clip_c: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token dual-clip PPO loss and per-token 0/1 indicators behind the metrics (verl's definitions).

    Returns (loss, {pg_clipfrac: the clipped branch was taken, pg_clipfrac_lower: the dual clip -A*clip_c
    was taken (A < 0), ppo_kl: old_logp - logp with the log-ratio clamp}). A masked mean of each indicator
    is the metric; the train step sums them over micro-batches instead.
    """
    log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pessimistic = jnp.maximum(unclipped, clipped)
    dual = -advantages * clip_c
    negative = advantages < 0
    loss = jnp.where(negative, jnp.minimum(pessimistic, dual), pessimistic)
    indicators = {
        "pg_clipfrac": (clipped > unclipped).astype(jnp.float32),
        "pg_clipfrac_lower": (negative & (pessimistic > dual)).astype(jnp.float32),
        "ppo_kl": -log_ratio,
    }
    return loss, indicators


def policy_loss(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
    clip_low: float,
    clip_high: float,
    clip_c: float,
    agg_mode: str,
    max_len: int | None = None,
    num_tokens: Any = None,
    num_seqs: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The PPO-clip policy loss of SPEC 3 over [..., T] rows, and its metrics as masked means.

    Returns (loss, {pg_clipfrac, pg_clipfrac_lower, ppo_kl}); the metrics cover this call's tokens only.
    """
    token_loss, indicators = ppo_token_loss(logp, old_logp, advantages, clip_low, clip_high, clip_c)
    loss = aggregate_loss(token_loss, mask, agg_mode, max_len, num_tokens, num_seqs)
    return loss, {name: masked_mean(value, mask) for name, value in indicators.items()}


def grpo_loss(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
    weights: Any,
    *,
    clip_low: float,
    clip_high: float,
    clip_c: float,
    entropy: Any = None,
    entropy_coeff: float = 0.0,
    ref_logp: Any = None,
    kl_coef: float = 0.0,
    kl_kind: str = "low_var_kl",
    rollout_logp: Any = None,
    tis_cap: float = 0.0,
    loss_scale: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of SPEC 3 over tokens with aggregation `weights` (see `weighted_token_sum`), built from this
    module's terms: pg_loss - entropy_coeff * entropy term + kl_coef * KL term, each aggregated alike (verl's
    `agg_loss` with one mode) and times `loss_scale`. With `rollout_logp` (off-policy), each token's policy loss
    is first multiplied by its truncated importance-sampling weight.

    Returns (loss, sums): `pg_loss`, `loss_tokens`, the masked token sums of the `ppo_token_loss` indicators
    (a mini-batch adds micro-batches' sums, then divides by its loss tokens), `kl_loss` with a reference and
    `tis_weight` (a token sum) with rollout log-probs.
    """
    mask = jnp.asarray(mask, jnp.float32)
    weights = loss_scale * jnp.asarray(weights, jnp.float32)  # so pg_loss and kl_loss read at the scale trained
    token_sum = functools.partial(weighted_token_sum, mask=mask, weights=1.0)  # the metrics' plain token sums
    token_loss, indicators = ppo_token_loss(logp, old_logp, advantages, clip_low, clip_high, clip_c)
    sums = {"loss_tokens": jnp.sum(mask)}
    if rollout_logp is not None:
        weight = truncated_is_weight(old_logp, rollout_logp, tis_cap)
        token_loss = token_loss * weight
        sums["tis_weight"] = token_sum(weight)
    sums["pg_loss"] = weighted_token_sum(token_loss, mask, weights)
    sums.update({name: token_sum(value) for name, value in indicators.items()})
    loss = sums["pg_loss"]
    if entropy_coeff:
        loss = loss - entropy_coeff * weighted_token_sum(entropy, mask, weights)
    if ref_logp is not None:
        sums["kl_loss"] = weighted_token_sum(kl_penalty(logp, ref_logp, kl_kind), mask, weights)
        loss = loss + kl_coef * sums["kl_loss"]
    return loss, sums


def truncated_is_weight(old_logp: Any, rollout_logp: Any, cap: float) -> jax.Array:
    """Truncated importance-sampling weight of each token, min(exp(old_logp - rollout_logp), cap): corrects a
    policy loss whose samples came from the rollout engine's weights rather than the old policy's (verl's TIS,
    with the log-ratio clamp of this module). A constant for the gradient: both inputs are fixed numbers."""
    log_ratio = jnp.clip(jnp.asarray(old_logp) - jnp.asarray(rollout_logp), -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return jnp.minimum(jnp.exp(log_ratio), cap)


def kl_penalty(logp: Any, ref_logp: Any, kind: str) -> jax.Array:
    """Per-token KL estimate between the policy and the reference: k1/kl, abs, k2/mse, k3/low_var_kl."""
    if kind in ("k1", "kl"):
        return logp - ref_logp
    if kind == "abs":
        return jnp.abs(logp - ref_logp)
    if kind in ("k2", "mse"):
        return 0.5 * jnp.square(logp - ref_logp)
    if kind in ("k3", "low_var_kl"):
        log_ratio = jnp.clip(ref_logp - logp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -LOW_VAR_KL_LIMIT, LOW_VAR_KL_LIMIT)
    raise KiminaError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_KINDS)}")


def entropy_from_logits(logits: Any, log_z: Any = None) -> jax.Array:
    """Entropy of the full next-token distribution, [..., V] -> [...], computed in float32; `log_z` (the
    logsumexp of the logits) when the caller has it already."""
    logits = jnp.asarray(logits, jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1) if log_z is None else log_z
    probs = jnp.exp(logits - log_z[..., None])
    return log_z - jnp.sum(probs * logits, axis=-1)
