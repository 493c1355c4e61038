"""Partial rollouts (kimina_jax/partial.py) on the real JAX sampler, with long-tailed lengths from the stand-in
for EOS (tests/length_standin.py): groups train only when finished, carried samples are continued and never
restarted, the staleness bound holds, each token keeps the behaviour log-prob of the weights that sampled it, and
a run resumed from a checkpoint holding unfinished samples rolls out byte for byte as the run that went on."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from kimina_jax import train
from kimina_jax.config import OptimConfig, load_config
from kimina_jax.errors import KiminaError
from kimina_jax.grpo import TrainStep
from kimina_jax.models import load_hf_checkpoint
from kimina_jax.partial import PartialRollouts, completions, staleness
from kimina_jax.rollout import JaxSampler, SamplingParams
from kimina_jax.types import Prompt
from tests.length_standin import DrawnLengths, lognormal_length
from tests.rollout_fixtures import perturbed, trainer_logprobs

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def tiny_model(tiny_hf_folder):
    return load_hf_checkpoint(tiny_hf_folder)


def prompts():
    """An endless supply of batches of 3 distinct prompts."""
    b = 0
    while True:
        yield [Prompt(f"s{b}_{r}", (), "", tuple(range(3 + b % 5 + r, 12 + r))) for r in range(3)]
        b += 1


def run_steps(engine, partial, steps, on_step=None):
    batches = prompts()
    for step in range(1, steps + 1):
        carried_before = {(g.uid, j): s.tokens.copy() for g in partial.groups for j, s in enumerate(g.samples)}
        partial.top_up(lambda: next(batches))
        told = []
        out = partial.generate(engine, SamplingParams(max_tokens=MAX_TOKENS, seed=step), step, on_group=told.append)
        yield step, out, told, carried_before
        if on_step is not None:
            on_step(step)


def test_groups_train_only_when_finished_and_carried_samples_go_on(tiny_model):
    length = lognormal_length(6, MAX_TOKENS)
    engine = DrawnLengths(JaxSampler(tiny_model, eos_token_ids=()), length)
    partial = PartialRollouts(n=2, share=3, batch_size=3, first=0, over_provision=2.0, max_staleness=10)
    carried = continued = 0
    for step, out, told, before in run_steps(engine, partial, 5):
        assert len(out.groups) == 3 and [g.uid for g in told] == [g.uid for g in out.groups]
        for group in out.groups:  # finished, each sample at its drawn length
            assert [len(s.tokens) for s in group.samples] == [length((group.uid, j)) for j in range(2)]
            assert all(s.finish_reason == "stop" and len(s.logprobs) == len(s.steps) == len(s.tokens)
                       for s in group.samples)
        for group in partial.groups + out.groups:  # a sample carried in goes on from its tokens: never restarted
            for j, sample in enumerate(group.samples):
                head = before.get((group.uid, j), np.zeros(0, np.int32))
                np.testing.assert_array_equal(sample.tokens[: len(head)], head)
        carried += out.carried
        continued += out.continued
    assert carried > 0 and continued > 0


def test_no_token_trains_more_than_max_staleness_steps_after_it_was_sampled(tiny_model):
    engine = DrawnLengths(JaxSampler(tiny_model, eos_token_ids=()), lognormal_length(10, MAX_TOKENS))
    partial = PartialRollouts(n=2, share=3, batch_size=3, first=0, over_provision=3.0, max_staleness=1)
    dropped, lags = 0, []
    for step, out, _, _ in run_steps(engine, partial, 6):
        dropped += out.dropped_stale
        lags.append(staleness([c for g in out.groups for c in completions(g)], step)["rollout/staleness/max"])
    assert dropped > 0 and max(lags) == 1


def test_each_token_keeps_the_log_prob_of_the_weights_that_sampled_it(tiny_model):
    """A sample continued after a weight update: its tokens of step 1 keep step 1's log-probs, those of step 2
    are the new weights'; the completion trained on carries them per token (the TIS correction reads them)."""
    newer = perturbed(tiny_model, 0.05, seed=3)
    sampler = JaxSampler(tiny_model, eos_token_ids=())
    engine = DrawnLengths(sampler, lognormal_length(6, MAX_TOKENS))
    partial = PartialRollouts(n=2, share=3, batch_size=3, first=0, over_provision=2.0, max_staleness=10)
    spans = None
    for step, out, _, _ in run_steps(engine, partial, 4, on_step=lambda s: sampler.update_weights(
            newer if s % 2 else tiny_model)):
        for group in out.groups:
            for j, (sample, completion) in enumerate(zip(group.samples, completions(group))):
                np.testing.assert_array_equal(completion.logprobs, sample.logprobs)
                if len(set(sample.steps.tolist())) < 2:
                    continue
                spans = sample.steps
                expected = np.zeros(len(sample.tokens))
                for s in set(sample.steps.tolist()):
                    model = tiny_model if s % 2 else newer  # step s sampled with the weights set after step s - 1
                    expected[sample.steps == s] = trainer_logprobs(model, group.prompt.token_ids,
                                                                   sample.tokens)[sample.steps == s]
                np.testing.assert_allclose(sample.logprobs, expected, atol=2e-4, rtol=0)
    assert spans is not None  # some trained sample spanned two steps of different weights


def test_the_loss_is_corrected_with_the_rollout_log_probs_when_partial(tiny_model, tmp_path):
    algorithm = load_config("tiny", [], run_dir=tmp_path, env={}).algorithm
    assert TrainStep(tiny_model, algorithm, OptimConfig(), stale_rollouts=True).uses_is_weights
    assert not TrainStep(tiny_model, algorithm, OptimConfig()).uses_is_weights


@pytest.mark.parametrize("overrides, message", [
    (["rollout.partial.over_provision=0.9"], r"'rollout.partial.over_provision' must be >= 1, got 0.9"),
    (["rollout.partial.max_staleness=0"], r"'rollout.partial.max_staleness' must be >= 1, got 0"),
    (["rollout.partial.enabled=true", "rollout.engine=vllm-server", "rollout.servers.urls=[http://h:8000]"],
     "rollout.partial.enabled needs rollout.engine jax or vllm"),
])
def test_bad_partial_settings_get_one_clear_error(overrides, message):
    with pytest.raises(KiminaError, match=message):
        load_config("tiny", overrides, env={})


# ------------------------------------------------------------------------------------ the training job
def _config(run_dir, steps: int, *overrides: str):
    return load_config("tiny", [
        "rollout.partial.enabled=true", "rollout.partial.over_provision=1.5", f"trainer.total_steps={steps}",
        "trainer.save_freq=100", "verifier.kind=standin", "logging.tensorboard=false", "logging.console=false",
        "logging.progress_bars=false", "logging.dump_rollouts=true", "data.val.limit=4", *overrides,
    ], run_dir=run_dir, env={})


def _fit(run_dir, steps: int, *overrides: str) -> list[dict]:
    trainer = train.Trainer(_config(run_dir, steps, *overrides))
    metrics, step_fn = [], trainer.train_step

    def train_step():
        metrics.append(step_fn())
        return metrics[-1]

    trainer.train_step = train_step
    trainer.fit()
    return metrics


@pytest.fixture
def long_tailed(monkeypatch):
    """The trainer's engine with the stand-in for EOS: lengths lognormal around 8 tokens, at most 64."""
    make = train.make_engine
    monkeypatch.setattr(train, "make_engine", lambda *args, **kwargs: DrawnLengths(
        make(*args, **kwargs), lognormal_length(8, 64), tokenizer=args[2]))


@pytest.mark.slow
def test_a_resumed_run_continues_the_carried_samples_byte_for_byte(tmp_path, long_tailed):
    """A run resumed from its step-2 checkpoint with unfinished samples carried rolls out steps 3 and 4 byte for
    byte as the run that went on: the checkpoint holds the groups in flight (tokens, log-probs, steps) and the
    prompts waiting; error-fix prompts (on in the tiny recipe) go through the same data."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    went_on = _fit(straight, 4, "trainer.save_freq=2")
    assert sum(m["rollout/partial/continued"] for m in went_on) > 0
    assert went_on[1]["rollout/partial/carried"] > 0  # the step-2 checkpoint holds unfinished samples
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    for step in (3, 4):
        (resumed / f"rollouts/step_{step}.jsonl").unlink()
    again = _fit(resumed, 4)
    assert len(again) == 2
    for step in (3, 4):
        name = f"rollouts/step_{step}.jsonl"
        assert (resumed / name).read_bytes() == (straight / name).read_bytes()
    for key in ("rollout/partial/continued", "rollout/partial/carried", "rollout/staleness/mean"):
        assert [m[key] for m in again] == [m[key] for m in went_on[2:]]


@pytest.mark.slow
def test_off_policy_partial_rollouts_continue_the_groups_while_the_step_trains(tmp_path, long_tailed):
    """Off-policy, step t + 1's generation (with the weights step t started from) continues the groups in flight
    while step t trains: every token trained is at least a step old, and carried samples go on."""
    metrics = _fit(tmp_path / "run", 3, "algorithm.off_policy=true")
    assert all(m["rollout/staleness/mean"] >= 1 for m in metrics[1:]) and metrics[0]["rollout/staleness/max"] == 0
    assert sum(m["rollout/partial/continued"] for m in metrics) > 0
    assert all(m["rollout_corr/rollout_is_mean"] > 0 for m in metrics)


@pytest.mark.slow
def test_dynamic_sampling_continues_the_groups_for_each_extra_batch(tmp_path, long_tailed):
    """With dynamic sampling, each extra generation batch of a step continues the groups in flight until another
    share of them is finished (the random model's groups are never informative: every batch is generated)."""
    metrics = _fit(tmp_path / "run", 2, "algorithm.filter_groups.enabled=true",
                   "algorithm.filter_groups.max_gen_batches=3")
    assert [m["filter_groups/gen_batches"] for m in metrics] == [3, 3]
    assert sum(m["rollout/partial/continued"] for m in metrics) > 0
