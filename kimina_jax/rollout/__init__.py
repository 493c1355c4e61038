"""Rollout engines: the built-in JAX sampler, vLLM fed the trainer's weights (SPEC 4), remote vLLM servers."""
from kimina_jax.rollout.base import (
    LogprobDiff,
    OnFinished,
    RolloutEngine,
    SampleRequest,
    SampleResult,
    SamplingParams,
    WrappedEngine,
    as_model,
    check_prompts,
    check_requests,
    find_eos_token_ids,
    logprob_diff,
    make_completion,
)
from kimina_jax.rollout.jax_sampler import JaxSampler
from kimina_jax.rollout.vllm_engine import VllmEngine
from kimina_jax.rollout.vllm_server import VllmServerEngine

__all__ = [
    "JaxSampler",
    "LogprobDiff",
    "OnFinished",
    "RolloutEngine",
    "SampleRequest",
    "SampleResult",
    "SamplingParams",
    "VllmEngine",
    "VllmServerEngine",
    "WrappedEngine",
    "as_model",
    "check_prompts",
    "check_requests",
    "find_eos_token_ids",
    "logprob_diff",
    "make_completion",
]
