"""The GRPO arithmetic of SPEC 3 as pure functions on arrays (all usable inside `jax.jit`).

Conventions shared by every function here:
- `mask` marks the tokens that count (response tokens); anything outside it never reaches a result,
  even when it holds garbage.
- A "sequence" is one response. Aggregation over sequences only counts sequences with at least one masked
  token: an all-masked row (padding, an empty response) neither adds to a sum nor to a denominator, and a
  batch with no masked token at all aggregates to 0, never NaN.
- Micro-batch invariance: the aggregate of a mini-batch is a weighted token sum whose weights only need two
  mini-batch-level normalisers, `num_tokens` (masked tokens) and `num_seqs` (sequences). Passing those to
  `aggregate_loss` for each micro-batch makes the micro-batch results add up exactly to the
  mini-batch's. `sequence_token_weights` gives the per-token weight itself (packing stores it per token).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kimina_jax.config import policy_loss_options
from kimina_jax.errors import KiminaError

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_KL_BASE_KINDS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
# With a trailing `+`: straight-through, the estimate's value with k2's gradient (verl).
KL_KINDS = (*_KL_BASE_KINDS, *(f"{kind}+" for kind in _KL_BASE_KINDS))
# verl clamps log-ratios before exp so that one wild token cannot overflow the loss.
LOG_RATIO_LIMIT = 20.0
LOW_VAR_KL_LIMIT = 10.0


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


def sequence_means(mask: Any, segment_ids: Any = None) -> Callable[[Any], jax.Array]:
    """A function giving each token its sequence's masked mean of per-token values: a sequence is a row of [..., T]
    arrays, or, with `segment_ids` (packed rows, 0 = padding), one segment of a row. Unmasked tokens get 0."""
    mask = jnp.asarray(mask, jnp.float32)
    if segment_ids is None:
        def mean(values):
            total = jnp.sum(jnp.where(mask > 0, values, 0.0) * mask, axis=-1, keepdims=True)
            return jnp.where(mask > 0, total / jnp.maximum(mask.sum(axis=-1, keepdims=True), 1.0), 0.0)
        return mean
    segment_ids = jnp.asarray(segment_ids)
    width = segment_ids.shape[-1]
    # One id per (row, segment): a segment holds at least one token, so a row has fewer than `width` segments.
    ids = (jnp.arange(segment_ids.size // width).reshape(segment_ids.shape[:-1])[..., None] * width
           + segment_ids).ravel()
    counts = jax.ops.segment_sum(mask.ravel(), ids, num_segments=segment_ids.size)

    def segment_mean(values):
        totals = jax.ops.segment_sum((jnp.where(mask > 0, values, 0.0) * mask).ravel(), ids,
                                     num_segments=segment_ids.size)
        means = (totals / jnp.maximum(counts, 1.0))[ids].reshape(mask.shape)
        return jnp.where(mask > 0, means, 0.0)
    return segment_mean


class PolicyInputs(NamedTuple):
    """What a registered policy loss computes from: [..., T] arrays, zero outside `mask`, and the reductions."""

    logp: jax.Array
    old_logp: jax.Array
    advantages: jax.Array
    mask: jax.Array
    clip_low: float
    clip_high: float
    clip_c: float
    sequence_mean: Callable[[jax.Array], jax.Array]  # `sequence_means`
    key: jax.Array  # randomness (clip_cov's pick)

    def log_ratio(self, clamp: bool = True) -> jax.Array:
        """logp - old_logp, clamped to +-LOG_RATIO_LIMIT where verl clamps it."""
        log_ratio = self.logp - self.old_logp
        return jnp.clip(log_ratio, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT) if clamp else log_ratio

    def clipped(self, ratio: jax.Array) -> jax.Array:
        return jnp.clip(ratio, 1.0 - self.clip_low, 1.0 + self.clip_high)


PolicyTokenLoss = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """One entry of `POLICY_LOSSES`: the per-token loss and per-token metric indicators (`PolicyInputs`,
    **options) -> (loss, {pg_clipfrac, pg_clipfrac_lower, ppo_kl}: those it has; options as
    `config.policy_loss_options` gives them), the aggregation it forces (verl's) and how rollout IS weights enter."""

    token_loss: PolicyTokenLoss
    agg_mode: str | None = None  # None: the configured one
    sequence_is_weights: bool = False  # the weights enter as each sequence's geometric mean (verl's geo_mean)
    random: bool = False  # draws from `PolicyInputs.key` (clip_cov's pick)


POLICY_METRICS = ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl")


def ppo_token_loss(
    logp: Any, old_logp: Any, advantages: Any, clip_low: float, clip_high: float, clip_c: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token dual-clip PPO loss (`vanilla`) and per-token indicators behind its metrics (verl's definitions):
    pg_clipfrac: the clipped branch was taken, pg_clipfrac_lower: the dual clip -A*clip_c was (A < 0), ppo_kl:
    old_logp - logp with the log-ratio clamp. A masked mean of each indicator is the metric."""
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


def _vanilla(x: PolicyInputs):
    return ppo_token_loss(x.logp, x.old_logp, x.advantages, x.clip_low, x.clip_high, x.clip_c)


def _gspo(x: PolicyInputs):
    """GSPO: the sequence's ratio exp(mean log-ratio), carried to each token with that token's own gradient."""
    sequence = jax.lax.stop_gradient(x.sequence_mean(x.log_ratio(clamp=False)))
    ratio = jnp.exp(jnp.minimum(x.logp - jax.lax.stop_gradient(x.logp) + sequence, 10.0))
    unclipped, clipped = -x.advantages * ratio, -x.advantages * x.clipped(ratio)
    return jnp.maximum(unclipped, clipped), {"pg_clipfrac": (clipped > unclipped).astype(jnp.float32),
                                             "ppo_kl": -x.log_ratio(clamp=False)}


def _cispo(x: PolicyInputs):
    """CISPO: the clipped ratio as a constant weight on the log-prob's gradient (no token's gradient is cut)."""
    ratio = jnp.exp(x.log_ratio())
    weight = jax.lax.stop_gradient(x.clipped(ratio))
    return -weight * x.advantages * x.logp, {"pg_clipfrac": (ratio != weight).astype(jnp.float32),
                                             "ppo_kl": -x.log_ratio()}


def _sapo(x: PolicyInputs, tau_pos: float, tau_neg: float):
    """SAPO: a soft sigmoid gate on the ratio instead of a hard clip, steeper for negative advantages."""
    tau = jnp.where(x.advantages > 0, tau_pos, tau_neg)
    gate = jax.nn.sigmoid(tau * (jnp.exp(x.log_ratio()) - 1.0)) * (4.0 / tau)
    return -gate * x.advantages, {"ppo_kl": -x.log_ratio()}


def _gpg(x: PolicyInputs):
    """GPG: the plain policy gradient, -A log-prob (no ratio, no clip)."""
    return -x.logp * x.advantages, {"ppo_kl": -x.log_ratio(clamp=False)}


def _geo_mean(x: PolicyInputs):
    """GMPO: the geometric mean of the sequence's token ratios, each log-ratio clipped on its advantage's side."""
    log_ratio = x.log_ratio(clamp=False)
    sign = jnp.sign(x.advantages)
    bounded = jnp.clip(log_ratio, -x.clip_low, x.clip_high)
    pessimistic = sign * jnp.minimum(sign * log_ratio, sign * bounded)
    loss = -x.sequence_mean(x.advantages) * jnp.exp(x.sequence_mean(pessimistic))
    clipped = log_ratio != bounded
    return loss, {"pg_clipfrac": (clipped & (x.advantages > 0)).astype(jnp.float32),
                  "pg_clipfrac_lower": (clipped & (x.advantages < 0)).astype(jnp.float32), "ppo_kl": -log_ratio}


def _covariance(x: PolicyInputs) -> jax.Array:
    """Each masked token's (A - mean A) (logp - mean logp) over the call's tokens, a constant (entropy mechanism)."""
    logp = jax.lax.stop_gradient(x.logp)
    return (x.advantages - masked_mean(x.advantages, x.mask)) * (logp - masked_mean(logp, x.mask))


def _first_ranked(scores: jax.Array, eligible: jax.Array, count: jax.Array) -> jax.Array:
    """The `count` eligible entries of highest score (as many as there are, when fewer)."""
    flat = jnp.where(eligible, scores, -jnp.inf).ravel()
    order = jnp.argsort(-flat, stable=True)
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return eligible & (rank.reshape(scores.shape) < count)


def _clip_cov(x: PolicyInputs, clip_cov_ratio: float, clip_cov_lb: float, clip_cov_ub: float):
    """Clip-Cov: PPO-clip, plus the gradient cut from a random few tokens whose covariance is in (lb, ub)."""
    ratio = jnp.exp(x.log_ratio(clamp=False))
    unclipped, clipped = -x.advantages * ratio, -x.advantages * x.clipped(ratio)
    covariance = _covariance(x)
    candidates = (x.mask > 0) & ~(clipped > unclipped) & (covariance > clip_cov_lb) & (covariance < clip_cov_ub)
    count = jnp.maximum(jnp.floor(clip_cov_ratio * x.mask.sum()).astype(jnp.int32), 1)
    cut = _first_ranked(jax.random.uniform(x.key, x.mask.shape), candidates, count)
    return jnp.maximum(unclipped, clipped) * (1.0 - cut), {"pg_clipfrac": cut.astype(jnp.float32),
                                                           "ppo_kl": -x.log_ratio(clamp=False)}


def _kl_cov(x: PolicyInputs, kl_cov_ratio: float, ppo_kl_coef: float):
    """KL-Cov: the unclipped ratio loss, plus |log-ratio| x ppo_kl_coef on the tokens of largest covariance."""
    log_ratio = x.log_ratio(clamp=False)
    loss = -x.advantages * jnp.exp(log_ratio)
    count = jnp.maximum(jnp.floor(x.mask.sum() * kl_cov_ratio).astype(jnp.int32), 1)
    penalised = _first_ranked(_covariance(x), x.mask > 0, count)
    return loss + jnp.where(penalised, ppo_kl_coef * jnp.abs(log_ratio), 0.0), {"ppo_kl": jnp.abs(log_ratio)}


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "vanilla": PolicyLoss(_vanilla),
    "gspo": PolicyLoss(_gspo, agg_mode="seq-mean-token-mean"),
    "cispo": PolicyLoss(_cispo),
    "geo_mean": PolicyLoss(_geo_mean, agg_mode="seq-mean-token-mean", sequence_is_weights=True),
    "sapo": PolicyLoss(_sapo, agg_mode="seq-mean-token-mean"),
    "gpg": PolicyLoss(_gpg),
    "clip_cov": PolicyLoss(_clip_cov, random=True),
    "kl_cov": PolicyLoss(_kl_cov),
}


def policy_token_losses(
    name: str, inputs: PolicyInputs, options: Mapping[str, float], is_weights: Any = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss `name`'s per-token loss with `options` (over verl's defaults: `config.policy_loss_options`), times the
    rollout correction's `is_weights` when given, and the per-token indicators of all of `POLICY_METRICS` (0 where
    the loss has none, as verl reports none)."""
    values = policy_loss_options(name, options)  # an unknown loss or option fails here, by name
    spec = POLICY_LOSSES[name]
    loss, indicators = spec.token_loss(inputs, **values)
    if is_weights is not None:
        weights = jnp.asarray(is_weights, jnp.float32)
        if spec.sequence_is_weights:
            weights = jnp.exp(inputs.sequence_mean(jnp.log(weights + 1e-10)))
        loss = loss * weights
    zeros = jnp.zeros_like(loss)
    return loss, {metric: indicators.get(metric, zeros) for metric in POLICY_METRICS}


def _inputs(logp, old_logp, advantages, mask, clip_low, clip_high, clip_c, segment_ids=None, key=None):
    """`PolicyInputs` with everything outside `mask` zeroed: garbage there must not reach a value or a gradient."""
    mask = jnp.asarray(mask, jnp.float32)
    inside = lambda values: jnp.where(mask > 0, jnp.asarray(values, jnp.float32), 0.0)  # noqa: E731
    return PolicyInputs(inside(logp), inside(old_logp), inside(advantages), mask, clip_low, clip_high, clip_c,
                        sequence_means(mask, segment_ids), jax.random.key(0) if key is None else key)


def compute_policy_loss(
    name: str, logp: Any, old_logp: Any, advantages: Any, mask: Any, *, agg_mode: str, clip_low: float,
    clip_high: float, clip_c: float = 3.0, max_len: int | None = None, **options: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """verl's policy loss `name` (`POLICY_LOSSES`) over [B, T] rows, one sequence a row, aggregated with `agg_mode`
    (or the loss's own: gspo, sapo and geo_mean take seq-mean-token-mean, as verl). `options`: the loss's own
    (verl's names; `policy_loss_options`), `rollout_is_weights` ([B, T], the rollout correction's) and, for
    clip_cov's random pick, `rng` (a key). Returns (loss, {pg_clipfrac, ppo_kl, pg_clipfrac_lower}: masked means).
    """
    is_weights = options.pop("rollout_is_weights", None)
    # `rng` is an option of the losses that draw (clip_cov); for any other it is refused like an unknown option.
    key = options.pop("rng") if name in POLICY_LOSSES and POLICY_LOSSES[name].random and "rng" in options else None
    inputs = _inputs(logp, old_logp, advantages, mask, clip_low, clip_high, clip_c, key=key)
    token_loss, indicators = policy_token_losses(name, inputs, options, is_weights)
    loss = aggregate_loss(token_loss, inputs.mask, effective_agg_mode(name, agg_mode), max_len)
    return loss, {metric: masked_mean(value, inputs.mask) for metric, value in indicators.items()}


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
    policy_loss: str = "vanilla",
    options: Mapping[str, float] | None = None,
    segment_ids: Any = None,
    key: jax.Array | None = None,
    is_weights: Any = None,
    entropy: Any = None,
    entropy_coeff: float = 0.0,
    ref_logp: Any = None,
    kl_coef: float = 0.0,
    kl_kind: str = "low_var_kl",
    loss_scale: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of SPEC 3 over tokens with aggregation `weights` (see `weighted_token_sum`; for a loss that forces
    its aggregation, pack with `effective_agg_mode`): policy loss `policy_loss` (`POLICY_LOSSES`, with `options`
    from `policy_loss_options`, per-token `is_weights` from the rollout correction) - entropy_coeff * entropy term
    + kl_coef * KL term, each aggregated alike (verl's `agg_loss` with one mode), times `loss_scale`. Sequences
    are rows, or with `segment_ids` the segments of packed rows; `key`: the loss's randomness (clip_cov).

    Returns (loss, sums): `pg_loss`, `loss_tokens`, the masked token sums of the `POLICY_METRICS` indicators
    (a mini-batch adds micro-batches' sums, then divides by its loss tokens) and `kl_loss` with a reference.
    """
    inputs = _inputs(logp, old_logp, advantages, mask, clip_low, clip_high, clip_c, segment_ids, key)
    mask = inputs.mask
    weights = loss_scale * jnp.asarray(weights, jnp.float32)  # so pg_loss and kl_loss read at the scale trained
    token_loss, indicators = policy_token_losses(policy_loss, inputs, options or {}, is_weights)
    sums = {"loss_tokens": jnp.sum(mask), "pg_loss": weighted_token_sum(token_loss, mask, weights)}
    sums.update({name: weighted_token_sum(value, mask, 1.0) for name, value in indicators.items()})
    loss = sums["pg_loss"]
    if entropy_coeff:
        loss = loss - entropy_coeff * weighted_token_sum(entropy, mask, weights)
    if ref_logp is not None:
        sums["kl_loss"] = weighted_token_sum(kl_penalty(logp, ref_logp, kl_kind), mask, weights)
        loss = loss + kl_coef * sums["kl_loss"]
    return loss, sums


def effective_agg_mode(policy_loss: str, agg_mode: str) -> str:
    """The aggregation loss `policy_loss` trains with: its own where it forces one (gspo, sapo, geo_mean)."""
    return POLICY_LOSSES[policy_loss].agg_mode or agg_mode


def kl_penalty(logp: Any, ref_logp: Any, kind: str) -> jax.Array:
    """Per-token KL estimate between the policy and the reference: k1/kl, abs, k2/mse, k3/low_var_kl; a trailing
    `+` (verl's straight-through kinds) keeps the estimate's value with k2's gradient, logp - ref_logp."""
    if kind.endswith("+") and kind in KL_KINDS:
        k2 = 0.5 * jnp.square(logp - ref_logp)
        value = jax.lax.stop_gradient(kl_penalty(logp, ref_logp, kind[:-1]))
        return k2 - jax.lax.stop_gradient(k2) + value
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
