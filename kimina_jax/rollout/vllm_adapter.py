"""What both vLLM engines share (`vllm_engine.py`: vLLM in this process; `vllm_server.py`: remote servers).

`VllmAdapter` is their common part: the checks around `generate` and `update_weights`, the request's sampling
fields, the conversion of vLLM's samples into `Completion`s. The subclasses only send requests and weights.

Seeds: prompt i of a call seeded s samples with vLLM's per-request seed s + i (`prompt_seed`), so a seeded call is
reproducible and equal prompts in one call still get independent samples. Callers that split a batch into calls
space the calls' seeds further apart than a call has prompts (`pipeline.chunk_seed`), so no two prompts share one.
A continued request (`continue_samples`) samples with a seed of its key instead (`request_seed`), wherever it sits
in the call.

Dtypes: vLLM names its weight dtype as torch does (`torch.bfloat16`); `dtype_name` turns it into the model's
name for it (`bfloat16`), the dtype a pushed HF folder is written in.
"""
from __future__ import annotations

import abc
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from kimina_jax.errors import KiminaError
from kimina_jax.models import Qwen3Config, Qwen3ForCausalLM, abstract_model
from kimina_jax.models.hf import to_jax_dtype
from kimina_jax.rollout.base import (
    RolloutEngine,
    SampleRequest,
    SampleResult,
    SamplingParams,
    as_model,
    check_architecture,
    check_prompts,
    make_completion,
    resolve_eos_token_ids,
)
from kimina_jax.types import Completion

# `update_config` overrides that switch a vLLM worker started with dummy weights (whose loader cannot reload) to
# reading safetensors, before the first reload from an HF folder.
SAFETENSORS_LOADER = {"load_config": {"load_format": "safetensors"}}

# One prompt's sample as vLLM reports it: (sample index, token ids, log-prob of each token, finish reason).
VllmSample = tuple[int, Sequence[int], Sequence[float], str]


class VllmAdapter(RolloutEngine):
    """A vLLM-backed engine for a model of `config`. Subclasses set `max_model_len` and implement `_sample` and
    `_push_weights`. EOS ids: those given, else the model's (`resolve_eos_token_ids`, reading `folder`'s
    generation_config.json). `last_sync_s` is the duration of the last weight push."""

    def __init__(
        self, config: Qwen3Config, *, tokenizer=None, eos_token_ids: Sequence[int] | None = None,
        folder: str | Path | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = resolve_eos_token_ids(eos_token_ids, config, tokenizer, folder)
        self.max_model_len = config.max_position_embeddings
        self.last_sync_s = 0.0
        self._asleep = False
        self._closed = False
        self._graphdef = nnx.split(abstract_model(config))[0]

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        self._check_usable()
        prompts = check_prompts(prompt_token_ids, params, self.max_model_len, self.config.vocab_size)
        return self._sample(prompts, params)

    def update_weights(self, model_or_params: Any) -> None:
        self._check_usable()
        model = as_model(model_or_params, self._graphdef)
        check_architecture(self.config, model.config)
        start = time.perf_counter()
        self._push_weights(model)
        self.last_sync_s = time.perf_counter() - start

    @abc.abstractmethod
    def _sample(self, prompts: list[tuple[int, ...]], params: SamplingParams) -> list[list[Completion]]:
        """`generate` for checked prompts."""

    @abc.abstractmethod
    def _push_weights(self, model: Qwen3ForCausalLM) -> None:
        """`update_weights` for a model of the engine's architecture."""

    def _request(self, params: SamplingParams, prompt_index: int) -> dict[str, Any]:
        """The sampling fields of prompt `prompt_index`'s request, named alike in `vllm.SamplingParams` and the
        body of `/v1/completions`; log-probs of the sampled tokens only."""
        return {
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": max(params.top_k, 0),  # vLLM's "no top-k" is 0 (or -1)
            "max_tokens": params.max_tokens,
            "stop_token_ids": params.stop_ids(self.eos_token_ids),
            "seed": prompt_seed(params.seed, prompt_index),
            "logprobs": 0,
        }

    def _continued_request(self, params: SamplingParams, request: SampleRequest) -> dict[str, Any]:
        """`_request`'s fields for a continued request: one sample, the tokens its cap leaves, its key's seed."""
        return {**self._request(params, 0), "n": 1, "max_tokens": request.cap(params) - len(request.response),
                "seed": request_seed(params.seed, request.key)}

    def _continued(
        self, index: int, request: SampleRequest, ids: Sequence[int], logprobs: Sequence[float], reason: str | None,
        where: str,
    ) -> SampleResult:
        """Request `index`'s result: its response so far, then vLLM's new tokens (`reason` None: not finished);
        KiminaError naming `where` unless vLLM ended it with "stop" or "length", with one log-prob per token."""
        if reason not in (None, "stop", "length"):
            raise KiminaError(f"{where}: request {index} ended with {reason!r}")
        if len(logprobs) != len(ids):
            raise KiminaError(f"{where}: request {index} has {len(ids)} new tokens but {len(logprobs)} log-probs")
        return SampleResult(
            token_ids=request.response + tuple(int(t) for t in ids),
            logprobs=np.concatenate([request.logprobs, np.asarray(logprobs, np.float32)]),
            finish_reason=reason,
        )

    def _completions(self, prompt_index: int, samples: Iterable[VllmSample], n: int, where: str) -> list[Completion]:
        """Prompt `prompt_index`'s n samples (in any order) as `Completion`s; KiminaError naming `where` unless
        they are samples 0..n-1, each finished and with one log-prob per token."""
        samples = sorted(samples, key=lambda sample: sample[0])
        indices = [index for index, *_ in samples]
        if indices != list(range(n)):
            raise KiminaError(f"{where}: samples {indices} in the reply, expected {n} (0..{n - 1})")
        completions = []
        for index, ids, logprobs, reason in samples:
            if reason not in ("stop", "length"):
                raise KiminaError(f"{where}: sample {index} ended with {reason!r}")
            if len(logprobs) != len(ids):
                raise KiminaError(f"{where}: sample {index} has {len(ids)} tokens but {len(logprobs)} log-probs")
            completions.append(make_completion(prompt_index, index, ids, logprobs, reason, self.tokenizer))
        return completions

    def _check_usable(self) -> None:
        name = type(self).__name__
        if self._closed:
            raise KiminaError(f"{name}: used after close()")
        if self._asleep:
            raise KiminaError(f"{name}: asleep; call wake() before generating or pushing weights")


def prompt_seed(seed: int | None, prompt_index: int) -> int | None:
    """vLLM's seed for prompt `prompt_index` of a call seeded `seed` (module docstring)."""
    return None if seed is None else seed + prompt_index


def request_seed(seed: int | None, key: tuple[int, int]) -> int | None:
    """vLLM's seed for the request of `key` (group id, sample index) in a call seeded `seed`: distinct for sample
    indices below 4096 in groups less than 2**19 apart (vLLM's seeds are kept below 2**31)."""
    if seed is None:
        return None
    group, sample = key
    return (seed + group * 4096 + sample) % 2**31


def dtype_name(vllm_dtype: Any, where: str) -> str:
    """The model's name ('float32', 'bfloat16', 'float16') of vLLM's weight dtype: a `torch.dtype`, or its name
    as a server reports it ('torch.bfloat16'); KiminaError naming `where` for a dtype the model does not have."""
    name = str(vllm_dtype).removeprefix("torch.")
    try:
        to_jax_dtype(name)  # the supported names are the model's own (models/hf.py)
    except KiminaError as err:
        raise KiminaError(f"{where}: vLLM runs dtype {vllm_dtype}; {err}") from None
    return name
