"""Overlapped rollouts and one-step off-policy training.

- The truncated importance-sampling (TIS) correction against formulas written here; with the engine's log-probs
  equal to the old policy's, the off-policy update is the on-policy one.
- `StepRollouts`: each engine call's groups go to the verifier before the next call starts; background generation
  gives the same samples; the samples do not depend on how the batch is shared between processes.
- The tiny recipe trains off-policy end to end and resumes from a checkpoint taken while the next step's rollouts
  were being generated, with the same data order.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kimina_jax import train
from kimina_jax.config import load_config
from kimina_jax.errors import KiminaError
from kimina_jax.grpo import PackItem, TrainStep, pack_samples, rollout_correction
from kimina_jax.pipeline import MainProcessRewarder, StepRollouts
from kimina_jax.reward import Rewarder, StandinVerifier, Verifier
from kimina_jax.rollout import JaxSampler, SamplingParams
from kimina_jax.types import Prompt
from tests.test_eval_training_validation import EmptyProofs
from tests.test_grpo_step import BUCKETS, CONFIG, MAX_RESPONSE, OPTIM, algorithm, flat_params, make_model, random_items

REPO = Path(__file__).resolve().parents[1]
TIS_CAP = 2.0  # algorithm.rollout_correction.rollout_is_threshold's default


# ------------------------------------------------------------------ the TIS term (the rollout correction's auto)
def _batch(step, params, items, engine_shift, seed=0):
    """Items packed with old log-probs = the current policy's plus noise, and engine log-probs = old - shift,
    corrected as train.py does (token-level truncated weights: off-policy's auto level). Returns the batch and the
    engine's log-probs aligned like it."""
    rng = np.random.default_rng(seed)
    pack = lambda items: pack_samples(items, BUCKETS, loss_agg_mode="seq-mean-token-sum-norm",  # noqa: E731
                                      max_response_len=MAX_RESPONSE, rows_multiple=step.rows_multiple)
    plain = pack(items)
    current = plain.response_values(step.logprobs(params, plain))
    old = [(v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for v in current]
    engine = [(o - engine_shift(rng, o.shape)).astype(np.float32) for o in old]
    batch = pack([PackItem(i.prompt_ids, i.response_ids, i.advantage, o) for i, o in zip(items, old)])
    correction = rollout_correction(old, engine, step.algorithm.rollout_correction, step.off_policy)
    batch = batch.corrected(correction.weights, correction.keep, loss_agg_mode="seq-mean-token-sum-norm",
                            max_response_len=MAX_RESPONSE)
    return batch, batch.token_values(engine)


def test_off_policy_update_equals_on_policy_when_engine_logprobs_match():
    model, items = make_model(), random_items(1)
    on = TrainStep(model, algorithm(), OPTIM)
    off = TrainStep(model, algorithm(off_policy=True), OPTIM)
    assert off.uses_is_weights and not on.uses_is_weights
    batch, _ = _batch(off, on.init_state(model).params, items, lambda rng, shape: np.zeros(shape))
    on_state, on_metrics = on.update(on.init_state(model), batch, 0)
    off_state, off_metrics = off.update(off.init_state(model), batch, 0)
    on_metrics, off_metrics = jax.device_get((on_metrics, off_metrics))
    assert on_metrics.keys() == off_metrics.keys()
    for name in on_metrics:
        np.testing.assert_allclose(off_metrics[name], on_metrics[name], rtol=1e-6, atol=1e-9, err_msg=name)
    assert on_metrics["actor/grad_norm"] > 0
    on_params, off_params = flat_params(on_state.params), flat_params(off_state.params)
    for name in on_params:
        np.testing.assert_allclose(off_params[name], on_params[name], rtol=0, atol=1e-7, err_msg=name)


def test_off_policy_loss_weights_each_token_by_the_truncated_ratio():
    model, items = make_model(), random_items(2)
    step = TrainStep(model, algorithm(off_policy=True), OPTIM)
    state = step.init_state(model)
    batch, engine = _batch(step, state.params, items, lambda rng, shape: rng.normal(0, 1.0, shape))
    logp = step.logprobs(state.params, batch).astype(np.float64)  # the policy the update starts from
    mask = batch.loss_mask.astype(bool)
    a, old = batch.advantages.astype(np.float64), batch.old_logp
    ratio = np.exp(np.clip(logp - old, -20, 20))
    pessimistic = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.3))
    ppo = np.where(a < 0, np.minimum(pessimistic, -a * 3.0), pessimistic)
    weight = np.minimum(np.exp(old - engine), TIS_CAP)
    assert 0 < np.mean(weight[mask] == TIS_CAP) < 1  # some tokens are capped, some are not
    expected = np.sum((weight * ppo)[mask]) / (MAX_RESPONSE * batch.num_items)  # seq-mean-token-sum-norm
    _, metrics = step.update(state, batch, 0)
    metrics = jax.device_get(metrics)
    np.testing.assert_allclose(metrics["actor/pg_loss"], expected, rtol=1e-4, atol=1e-7)


def test_off_policy_batch_without_engine_logprobs_is_refused():
    model = make_model()
    step = TrainStep(model, algorithm(off_policy=True), OPTIM)
    items = [PackItem(i.prompt_ids, i.response_ids, i.advantage, np.zeros(len(i.response_ids), np.float32))
             for i in random_items(3)]
    batch = pack_samples(items, BUCKETS, loss_agg_mode="seq-mean-token-sum-norm", max_response_len=MAX_RESPONSE,
                         rows_multiple=step.rows_multiple)
    with pytest.raises(KiminaError, match="no is_weights"):
        step.update(step.init_state(model), batch, 0)


@pytest.mark.parametrize("override, message", [
    ("rollout.overlap_chunks=0", "'rollout.overlap_chunks' must be > 0"),
    ("algorithm.rollout_correction.rollout_is_threshold=0",
     "'algorithm.rollout_correction.rollout_is_threshold' must be > 0"),
])
def test_config_checks_the_new_keys(override, message):
    with pytest.raises(KiminaError, match=message):
        load_config("tiny", [override], env={})


# ------------------------------------------------------------------------------------------ StepRollouts
class RecordingEngine:
    """The real JAX sampler, noting when each generate call starts."""

    def __init__(self, engine, events):
        self.engine, self.events = engine, events

    def generate(self, prompt_token_ids, params):
        self.events.append(("generate", len(prompt_token_ids)))
        return self.engine.generate(prompt_token_ids, params)


class RecordingRewarder(Rewarder):
    """The real rewarder (stand-in verifier), noting each group it is given."""

    def __init__(self, events):
        super().__init__(StandinVerifier())
        self.events = events

    def submit(self, prompt, completions):
        self.events.append(("submit", prompt.statement_id))
        return super().submit(prompt, completions)


@pytest.fixture(scope="module")
def sampler():
    return JaxSampler(make_model(seed=3), eos_token_ids=(1,), max_len=64)


def _prompts(count=4):
    rng = np.random.default_rng(5)
    return [Prompt(f"p{i}", ({"role": "user", "content": f"problem {i}"},), "theorem t : True := by sorry",
                   tuple(int(t) for t in rng.integers(2, CONFIG.vocab_size, 3 + i))) for i in range(count)]


PARAMS = SamplingParams(n=2, max_tokens=8, seed=11)


def _rollouts(sampler, prompts, first_index, chunks, background=False):
    events = []
    rollouts = StepRollouts(RecordingEngine(sampler, events), MainProcessRewarder(RecordingRewarder(events)),
                            prompts, first_index, PARAMS, chunks)
    if background:
        rollouts.start_in_background()
        rollouts.wait_generated()
    samples, timings = rollouts.finish()
    return samples, timings, events


def _tokens(samples):
    return [s.completion.token_ids for s in samples]


def test_each_call_is_verified_while_the_next_generates(sampler):
    prompts = _prompts()
    samples, timings, events = _rollouts(sampler, prompts, 0, chunks=2)
    assert events == [("generate", 2), ("submit", "p0"), ("submit", "p1"),
                      ("generate", 2), ("submit", "p2"), ("submit", "p3")]
    assert [s.prompt.statement_id for s in samples] == ["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3"]
    assert [s.completion.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]  # global batch positions
    assert {"timing_s/gen", "timing_s/verify", "timing_s/verify_wait", "timing_s/rollout"} <= timings.keys()
    _, _, sync_events = _rollouts(sampler, prompts, 0, chunks=1)
    assert sync_events == [("generate", 4)] + [("submit", f"p{i}") for i in range(4)]


def test_background_generation_gives_the_same_samples(sampler):
    prompts = _prompts()
    inline, _, _ = _rollouts(sampler, prompts, 0, chunks=2)
    background, _, events = _rollouts(sampler, prompts, 0, chunks=2, background=True)
    assert _tokens(background) == _tokens(inline)
    assert [s.score for s in background] == [s.score for s in inline]
    assert events[:3] == [("generate", 2), ("submit", "p0"), ("submit", "p1")]


def test_samples_do_not_depend_on_the_process_shares(sampler):
    """Two processes holding two prompts each sample what one process holding all four does (chunk seeds
    follow the global batch position)."""
    prompts = _prompts()
    whole, _, _ = _rollouts(sampler, prompts, 0, chunks=2)
    first, _, _ = _rollouts(sampler, prompts[:2], 0, chunks=1)
    second, _, _ = _rollouts(sampler, prompts[2:], 2, chunks=1)
    assert _tokens(first + second) == _tokens(whole)
    assert [s.completion.prompt_index for s in second] == [2, 2, 3, 3]


class CountingEngine:
    """The trainer's engine, counting its generate calls (`started[i]` is set when call i starts)."""

    def __init__(self, engine):
        self.engine, self.started = engine, [threading.Event() for _ in range(16)]
        self.calls = 0

    def generate(self, prompt_token_ids, params):
        self.started[self.calls].set()
        self.calls += 1
        return self.engine.generate(prompt_token_ids, params)

    def __getattr__(self, name):
        return getattr(self.engine, name)


class VerdictsAfterTheNextCall(Verifier):
    """The stand-in verifier's verdicts, each held back until the engine starts its next generate call after the
    snippet was submitted, or WAIT_S passed (counted in `waited_out`): a Lean server slower than generation."""

    WAIT_S = 20.0

    def __init__(self, engine: CountingEngine):
        self.engine, self.standin, self.submitted, self.waited_out = engine, StandinVerifier(), 0, 0

    def submit(self, snippets):
        self.submitted += 1
        verdicts = self.standin.check_sync(snippets)
        futures = [concurrent.futures.Future() for _ in verdicts]
        next_call = self.engine.started[self.engine.calls]

        def release():
            if not next_call.wait(self.WAIT_S):
                self.waited_out += 1
            for future, verdict in zip(futures, verdicts):
                future.set_result(verdict)

        threading.Thread(target=release, daemon=True).start()
        return futures

    def health(self):
        return True


def test_off_policy_generates_the_next_step_while_lean_checks_this_ones(tmp_path, monkeypatch):
    """The next step's generation needs only this step's weights: it starts once this step's completions are
    generated, not after their verdicts are in (verl's one-step off-policy)."""
    cfg = load_config("tiny", ["algorithm.off_policy=true", "rollout.overlap_chunks=1", "trainer.total_steps=2",
                               "verifier.kind=standin", "logging.tensorboard=false", "logging.console=false",
                               "logging.progress_bars=false", "logging.dump_rollouts=false"], run_dir=tmp_path, env={})
    # Every answer is a Lean snippet, so every group reaches the verifier (the random model's text would not).
    monkeypatch.setattr(train, "make_engine", lambda rollout, model, tokenizer, model_dir=None:
                        CountingEngine(EmptyProofs(tokenizer)))
    trainer = train.Trainer(cfg)
    engine, verifier = trainer.engine, VerdictsAfterTheNextCall(trainer.engine)
    trainer.rewarder = MainProcessRewarder(Rewarder(verifier, cfg.reward.format))
    try:
        trainer.step = 1
        metrics = trainer.train_step()
        assert engine.calls == 2  # step 1's call, then step 2's (in the background, waited for before the sync)
        assert verifier.submitted == 2 * cfg.data.train_batch_size  # a request per group of steps 1 and 2
        assert verifier.waited_out == 0  # step 1's verdicts came once step 2's generation had started
        assert metrics["training/epoch"] == 0
    finally:
        trainer.close()


# ------------------------------------------------------------------------------------ the training job
def _train(run_dir: Path, *overrides: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
    env.pop("LEAN_SERVER_API_URL", None)  # the tiny recipe's local stand-in verifier
    done = subprocess.run(
        [sys.executable, "-m", "kimina_jax.train", "--run-dir", str(run_dir), "algorithm.off_policy=true",
         "algorithm.entropy_coeff=0.01", "trainer.total_steps=3", "trainer.save_freq=2", *overrides],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def _statements(run_dir: Path, step: int) -> list[str]:
    lines = (run_dir / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()
    return [json.loads(line)["problem"] for line in lines]


@pytest.mark.slow
def test_tiny_recipe_trains_off_policy_and_resumes(tmp_path):
    run_dir = tmp_path / "off_policy"
    _train(run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    scalar = lambda tag: [e.value for e in events.Scalars(tag)]  # noqa: E731
    assert len(scalar("timing_s/gen_wait")) == 2  # steps 1 and 2 generated the next step's rollouts
    assert all(w > 0 for w in scalar("rollout_corr/rollout_is_mean"))
    # Steps 2 and 3 trained on rollouts of the weights one step older: the engine's log-probs differ.
    lp_diff = scalar("rollout/logprob_diff_mean")
    assert lp_diff[0] < 1e-5 < min(lp_diff[1:])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]

    # Checkpoint 2 was written while step 3's rollouts were being generated: a resumed run draws them again.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    (resumed / "rollouts" / "step_3.jsonl").unlink()
    assert "at step 2" in _train(resumed)
    assert _statements(resumed, 3) == _statements(run_dir, 3)
