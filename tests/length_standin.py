"""A STAND-IN for the model's end of response, for tests and benchmarks of partial rollouts: the random tiny
models never sample EOS, so every response would run to max_tokens. `DrawnLengths` wraps a real engine and caps
each sample at a length drawn from its key (a pure function of it: the same sample gets the same length however
often it is continued), reporting the cap as "stop". Everything else (decoding, log-probs, stopping part way)
is the real engine's."""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from kimina_jax.rollout import (
    RolloutEngine, SampleRequest, SampleResult, SamplingParams, WrappedEngine, make_completion,
)


def lognormal_length(median: int, maximum: int) -> Callable[[tuple[int, int]], int]:
    """Lengths lognormal around `median` (sigma 1: the seed run's long tail), cut at `maximum`, from a key's hash."""
    def length(key: tuple[int, int]) -> int:
        seed = int.from_bytes(hashlib.sha256(repr(tuple(key)).encode()).digest()[:8], "little")
        return int(min(maximum, max(1, round(median * np.exp(np.random.default_rng(seed).standard_normal())))))
    return length


class DrawnLengths(WrappedEngine):
    """`engine` with each sample stopped at `length(key)` tokens (module docstring). `generate` goes through
    `continue_samples` with keys (the call's seed and prompt, sample) and no early stop: a synchronous call."""

    def __init__(self, engine: RolloutEngine, length: Callable[[tuple[int, int]], int], tokenizer=None):
        super().__init__(engine)
        self.length, self.tokenizer = length, tokenizer

    def continue_samples(self, requests: Sequence[SampleRequest], params: SamplingParams, on_finished=None):
        capped = [dataclasses.replace(r, max_tokens=max(len(r.response) + 1, min(r.cap(params), self.length(r.key))))
                  for r in requests]
        told = None if on_finished is None else lambda i, result: on_finished(i, _as_stop(result))
        return [_as_stop(r) for r in self.engine.continue_samples(capped, params, told)]

    def generate(self, prompt_token_ids, params: SamplingParams):
        call = (params.seed or 0) % 2**18  # keys are int32 in the JAX engine
        requests = [SampleRequest(tuple(ids), (call * 4096 + i, j)) for i, ids in enumerate(prompt_token_ids)
                    for j in range(params.n)]
        results = iter(self.continue_samples(requests, params))
        groups = [[next(results) for _ in range(params.n)] for _ in prompt_token_ids]
        return [[make_completion(i, j, r.token_ids, r.logprobs, "stop", self.tokenizer) for j, r in enumerate(group)]
                for i, group in enumerate(groups)]


def _as_stop(result: SampleResult) -> SampleResult:
    return dataclasses.replace(result, finish_reason="stop") if result.finished else result
