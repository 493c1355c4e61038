"""GRPO core: the math of SPEC 3 (advantages, verl's policy losses and KL kinds, rollout correction), packing into
fixed-shape rows, chunked log-probs, the jitted update."""
from kimina_jax.grpo.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    grpo_advantages,
    grpo_passk_advantages,
    informative_groups,
    rloo_advantages,
)
from kimina_jax.grpo.logprobs import chunked_logprobs, token_logprobs
from kimina_jax.grpo.math import (
    AGG_MODES,
    KL_KINDS,
    POLICY_LOSSES,
    aggregate_loss,
    batch_agg_metric,
    compute_policy_loss,
    effective_agg_mode,
    entropy_from_logits,
    grpo_loss,
    kl_penalty,
    masked_mean,
    ppo_token_loss,
    sequence_token_weights,
    weighted_token_sum,
)
from kimina_jax.grpo.optimizer import learning_rate_schedule, make_optimizer, with_learning_rate
from kimina_jax.grpo.packing import PackedBatch, PackItem, pack_samples, row_length_buckets
from kimina_jax.grpo.reference import ReferencePolicy
from kimina_jax.grpo.rollout_correction import Correction, importance_level, rollout_correction
from kimina_jax.grpo.step import TrainState, TrainStep, accumulate_gradients, micro_batch_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "Correction",
    "KL_KINDS",
    "POLICY_LOSSES",
    "PackItem",
    "PackedBatch",
    "ReferencePolicy",
    "TrainState",
    "TrainStep",
    "accumulate_gradients",
    "aggregate_loss",
    "batch_agg_metric",
    "chunked_logprobs",
    "compute_advantages",
    "compute_policy_loss",
    "effective_agg_mode",
    "entropy_from_logits",
    "grpo_advantages",
    "grpo_loss",
    "grpo_passk_advantages",
    "importance_level",
    "informative_groups",
    "kl_penalty",
    "learning_rate_schedule",
    "make_optimizer",
    "masked_mean",
    "micro_batch_loss",
    "pack_samples",
    "ppo_token_loss",
    "rloo_advantages",
    "rollout_correction",
    "row_length_buckets",
    "sequence_token_weights",
    "token_logprobs",
    "weighted_token_sum",
    "with_learning_rate",
]
