"""GRPO core: the math of SPEC 3, packing into fixed-shape rows, chunked log-probs, the jitted update."""
from kimina_jax.grpo.logprobs import chunked_logprobs, token_logprobs
from kimina_jax.grpo.math import (
    AGG_MODES,
    KL_KINDS,
    aggregate_loss,
    batch_agg_metric,
    entropy_from_logits,
    grpo_advantages,
    grpo_loss,
    kl_penalty,
    masked_mean,
    policy_loss,
    ppo_token_loss,
    sequence_token_weights,
    truncated_is_weight,
    weighted_token_sum,
)
from kimina_jax.grpo.optimizer import learning_rate_schedule, make_optimizer, with_learning_rate
from kimina_jax.grpo.packing import PackedBatch, PackItem, pack_samples, row_length_buckets
from kimina_jax.grpo.reference import ReferencePolicy
from kimina_jax.grpo.step import TrainState, TrainStep, accumulate_gradients, micro_batch_loss

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "PackItem",
    "PackedBatch",
    "ReferencePolicy",
    "TrainState",
    "TrainStep",
    "accumulate_gradients",
    "aggregate_loss",
    "batch_agg_metric",
    "chunked_logprobs",
    "entropy_from_logits",
    "grpo_advantages",
    "grpo_loss",
    "kl_penalty",
    "learning_rate_schedule",
    "make_optimizer",
    "masked_mean",
    "micro_batch_loss",
    "pack_samples",
    "policy_loss",
    "ppo_token_loss",
    "row_length_buckets",
    "sequence_token_weights",
    "token_logprobs",
    "truncated_is_weight",
    "weighted_token_sum",
    "with_learning_rate",
]
