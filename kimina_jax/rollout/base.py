"""The rollout engine interface, its sampling parameters, and what every engine shares.

Per-token log-probs are those of the FULL distribution log_softmax(logits / temperature) at each sampled token
(the trainer's definition, SPEC 3), not of a top-p / top-k renormalised one; with temperature 0 (greedy) they
are log_softmax(logits). One exception, vLLM's: with a top-p / top-k filter it reports the renormalised
distribution's (vllm_engine.py); training rollouts sample unfiltered.
"""
from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from kimina_jax.errors import KiminaError
from kimina_jax.models import Qwen3Config, Qwen3ForCausalLM
from kimina_jax.types import Completion

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. `top_k` <= 0 and `top_p` == 1 switch those filters off; temperature 0 is greedy.

    `stop_token_ids` are added to the engine's EOS ids. With a `seed` a call is reproducible, and each prompt
    draws from its own stream, so equal prompts in one call still get independent samples.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = {
            "n": self.n >= 1,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "max_tokens": self.max_tokens >= 1,
        }
        for field, ok in checks.items():
            if not ok:
                raise KiminaError(f"SamplingParams.{field}: invalid value {getattr(self, field)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p removes any token."""
        return self.top_k > 0 or self.top_p < 1

    def stop_ids(self, eos_token_ids: Sequence[int]) -> list[int]:
        """The ids that end a sample: `stop_token_ids` and the engine's `eos_token_ids`, sorted."""
        return sorted(set(self.stop_token_ids) | set(eos_token_ids))


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """One sample to generate, or to continue from its response so far (partial rollouts).

    `key` (group id, sample index) picks the sample's random stream in a seeded call, wherever the request sits in
    the call; `response` / `logprobs` are its tokens so far and their behaviour log-probs (those of the weights that
    sampled each), handed back unchanged at the head of the result; `max_tokens` caps the whole response, tokens so
    far included (None: the call's `SamplingParams.max_tokens`).
    """

    prompt_token_ids: tuple[int, ...]
    key: tuple[int, int]
    response: tuple[int, ...] = ()
    logprobs: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    max_tokens: int | None = None

    def cap(self, params: SamplingParams) -> int:
        return params.max_tokens if self.max_tokens is None else self.max_tokens


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """A request's whole response so far; `finish_reason` "stop" / "length", or None while unfinished."""

    token_ids: tuple[int, ...]
    logprobs: np.ndarray  # float32 [len(token_ids)]
    finish_reason: str | None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# Called as request i finishes, with its result; True: the call may stop (the others come back unfinished).
OnFinished = Callable[[int, SampleResult], bool]


class RolloutEngine(abc.ABC):
    """Samples completions from the current policy weights. Also a context manager (`close` on exit)."""

    @abc.abstractmethod
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """For each prompt, its `params.n` completions in sample order."""

    @abc.abstractmethod
    def update_weights(self, model_or_params: Any) -> None:
        """Use these weights from now on: a `Qwen3ForCausalLM` or its `nnx.state(model, nnx.Param)`."""

    def continue_samples(
        self, requests: Sequence[SampleRequest], params: SamplingParams, on_finished: OnFinished | None = None
    ) -> list[SampleResult]:
        """Each request's response generated (one sample a request: `params.n` is not used) until it stops, or
        until `on_finished` returns True: then the call returns at once, the requests still running or waiting
        unfinished with what they have. The engines that can stop a call part way implement it."""
        raise KiminaError(f"{type(self).__name__} cannot continue samples (partial rollouts need rollout.engine "
                          "jax or vllm)")

    def take_metrics(self) -> dict[str, float]:
        """The engine's own statistics over the calls since the last time (metric name -> value); none here."""
        return {}

    def sleep(self) -> None:
        """Release accelerator memory until `wake` (no-op where there is nothing to release)."""

    def wake(self) -> None:
        """Take the memory back after `sleep`."""

    def close(self) -> None:
        """Free the engine; it cannot be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class WrappedEngine(RolloutEngine):
    """An engine that samples through another (`engine`), whose weights, metrics, memory and closing these are;
    subclasses say how they sample."""

    def __init__(self, engine: RolloutEngine):
        self.engine = engine

    def update_weights(self, model_or_params: Any) -> None:
        self.engine.update_weights(model_or_params)

    def take_metrics(self) -> dict[str, float]:
        return self.engine.take_metrics()

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def close(self) -> None:
        self.engine.close()


def as_model(model_or_params: Any, graphdef: nnx.GraphDef) -> Qwen3ForCausalLM:
    """The model itself, or `nnx.state(model, nnx.Param)` put back into `graphdef` (the engine's model structure)."""
    if isinstance(model_or_params, Qwen3ForCausalLM):
        return model_or_params
    if isinstance(model_or_params, nnx.State):
        try:
            return nnx.merge(graphdef, model_or_params)
        except (ValueError, KeyError, TypeError) as err:
            raise KiminaError(f"update_weights: the parameters do not fit this engine's model ({err})") from err
    raise KiminaError(
        f"update_weights: expected a Qwen3ForCausalLM or its nnx.State, got {type(model_or_params).__name__}"
    )


_ARCHITECTURE = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "tie_word_embeddings",
)


def check_architecture(engine_config: Qwen3Config, model_config: Qwen3Config) -> None:
    """Raises unless pushed weights of `model_config`'s shapes fit an engine built for `engine_config`."""
    theirs = {k: getattr(engine_config, k) for k in _ARCHITECTURE}
    ours = {k: getattr(model_config, k) for k in _ARCHITECTURE}
    if theirs != ours:
        diff = {k: (ours[k], theirs[k]) for k in _ARCHITECTURE if ours[k] != theirs[k]}
        raise KiminaError(
            f"update_weights: the model's architecture differs from the engine's (ours, the engine's): {diff}"
        )


def check_prompts(
    prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams, max_len: int, vocab_size: int
) -> list[tuple[int, ...]]:
    """Validated prompts as tuples; every prompt must leave room for `params.max_tokens` within `max_len`."""
    if len(prompt_token_ids) == 0:
        raise KiminaError("generate: the prompt list is empty")
    prompts = []
    for i, ids in enumerate(prompt_token_ids):
        ids = tuple(int(t) for t in ids)
        if not ids:
            raise KiminaError(f"generate: prompt {i} has no tokens")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise KiminaError(f"generate: prompt {i} has token id {bad}, outside the vocabulary [0, {vocab_size})")
        if len(ids) + params.max_tokens > max_len:
            raise KiminaError(
                f"generate: prompt {i} has {len(ids)} tokens; with max_tokens={params.max_tokens} that exceeds the "
                f"engine's maximum length {max_len} (allowed prompt length: {max_len - params.max_tokens})"
            )
        prompts.append(ids)
    return prompts


def check_requests(
    requests: Sequence[SampleRequest], params: SamplingParams, max_len: int, vocab_size: int
) -> list[SampleRequest]:
    """Validated requests: a response shorter than the cap with one log-prob per token, then prompt + response
    checked as `check_prompts` checks a prompt (against the tokens the cap leaves)."""
    if len(requests) == 0:
        raise KiminaError("continue_samples: the request list is empty")
    checked = []
    for i, request in enumerate(requests):
        cap = request.cap(params)
        response = tuple(int(t) for t in request.response)
        logprobs = np.asarray(request.logprobs, np.float32)
        if not 1 <= cap <= params.max_tokens or len(response) >= cap or logprobs.shape != (len(response),):
            raise KiminaError(f"continue_samples: request {i} has {len(response)} tokens, {logprobs.shape} log-probs "
                              f"and a cap of {cap} (at most max_tokens={params.max_tokens}): it must have one log-prob "
                              "per token and fewer tokens than its cap")
        # Prompt + response so far against the tokens the cap leaves: the same length and vocabulary checks.
        (sequence,) = check_prompts([tuple(request.prompt_token_ids) + response],
                                    dataclasses.replace(params, max_tokens=cap - len(response)), max_len, vocab_size)
        prompt = sequence[: len(sequence) - len(response)]
        checked.append(dataclasses.replace(request, prompt_token_ids=prompt, response=response, logprobs=logprobs))
    return checked


def find_eos_token_ids(config: Qwen3Config, tokenizer=None, folder: str | Path | None = None) -> tuple[int, ...]:
    """The ids that end a response: config.json's and generation_config.json's `eos_token_id`, and the tokenizer's."""
    found: list[int] = []
    sources: list[Any] = [config.eos_token_id, getattr(tokenizer, "eos_token_id", None)]
    gen_config = Path(folder) / "generation_config.json" if folder is not None else None
    if gen_config is not None and gen_config.is_file():
        try:
            sources.append(json.loads(gen_config.read_text()).get("eos_token_id"))
        except json.JSONDecodeError as err:
            raise KiminaError(f"{gen_config}: not valid JSON ({err})") from err
    for value in sources:
        for token in [value] if isinstance(value, int) else (value or []):
            if token not in found:
                found.append(int(token))
    return tuple(found)


def resolve_eos_token_ids(
    eos_token_ids: Sequence[int] | None, config: Qwen3Config, tokenizer=None, folder: str | Path | None = None
) -> tuple[int, ...]:
    """An engine's EOS ids: those it was given, else `find_eos_token_ids`."""
    if eos_token_ids is not None:
        return tuple(int(t) for t in eos_token_ids)
    return find_eos_token_ids(config, tokenizer, folder)


def make_completion(
    prompt_index: int,
    sample_index: int,
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    finish_reason: str,
    tokenizer=None,
) -> Completion:
    """A `Completion`; its text is the tokenizer's decoding without special tokens ("" without a tokenizer)."""
    ids = tuple(int(t) for t in token_ids)
    text = tokenizer.decode(list(ids), skip_special_tokens=True) if tokenizer is not None else ""
    return Completion(
        prompt_index=prompt_index,
        sample_index=sample_index,
        token_ids=ids,
        text=text,
        logprobs=np.asarray(logprobs, dtype=np.float32),
        finish_reason=finish_reason,
    )


@dataclasses.dataclass(frozen=True)
class LogprobDiff:
    mean: float
    max: float


def logprob_diff(completions: Sequence[Completion], trainer_logprobs: Sequence[Sequence[float]]) -> LogprobDiff:
    """Mean and max |engine log-prob - trainer log-prob| over all sampled tokens (a weight-sync health metric).

    `trainer_logprobs[i]` are the trainer's log-probs of `completions[i].token_ids`.
    """
    if len(completions) != len(trainer_logprobs):
        raise KiminaError(f"logprob_diff: {len(completions)} completions but {len(trainer_logprobs)} trainer rows")
    diffs = []
    for i, (completion, trainer) in enumerate(zip(completions, trainer_logprobs)):
        trainer = np.asarray(trainer, dtype=np.float64)
        if trainer.shape != (len(completion.token_ids),):
            raise KiminaError(
                f"logprob_diff: completion {i} has {len(completion.token_ids)} tokens "
                f"but {trainer.shape} trainer log-probs"
            )
        diffs.append(np.abs(completion.logprobs.astype(np.float64) - trainer))
    flat = np.concatenate(diffs) if diffs else np.zeros(0)
    if flat.size == 0:
        return LogprobDiff(mean=0.0, max=0.0)
    return LogprobDiff(mean=float(flat.mean()), max=float(flat.max()))
