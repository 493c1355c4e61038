"""Reward functions (reward/base.py `RewardFunction`): a user's function by `reward.function` (per-response and
batch, sync and async, module or file), its dict returns, its failures, the bad-key error, and the built-in format x
Lean reward under its registered name. The user functions the tests name live in this module."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time

import numpy as np
import pytest

from kimina_jax.config import ErrorFixConfig, RewardConfig, TinyModelConfig, VerifierConfig, load_config
from kimina_jax.data import PromptRenderer, build_tiny_tokenizer
from kimina_jax.errors import KiminaError
from kimina_jax.eval import validate
from kimina_jax.eval.metrics import Outcome
from kimina_jax.models.tiny import build_tiny_model
from kimina_jax.pipeline import MainProcessRewarder
from kimina_jax.reward import REWARDS, RewardInput, Rewarder, StandinVerifier, extra_means, reward_from_config
from kimina_jax.rollout import JaxSampler, SamplingParams
from kimina_jax.types import Completion, Prompt, Sample

HERE = "tests.test_reward_function"
STATEMENT = "theorem t (x : Nat) : x + 0 = x := by\n"
SEEN: list[RewardInput] = []
NOT_CALLABLE = 3


def length_score(item: RewardInput) -> float:
    SEEN.append(item)
    return len(item.response) / 10


async def async_length_score(item: RewardInput) -> float:
    await asyncio.sleep(0.01)
    return len(item.response) / 10


def batch_length_score(items: list[RewardInput]) -> list[float]:
    return [len(item.response) / 10 for item in items]


async def async_batch_length_score(items: list[RewardInput]) -> list[float]:
    await asyncio.sleep(0.01)
    return [len(item.response) / 10 for item in items]


def with_extras(item: RewardInput) -> dict:
    stopped = item.extra_info["finish_reason"] == "stop"
    return {"score": 1.0, "acc": 0.5, "length": len(item.response_ids), "stopped": stopped}


def score_only_dict(item: RewardInput) -> dict:
    return {"score": 0.25}


def flaky(item: RewardInput):
    """Sample 0 is fine; 1 raises, 2 returns a string, 3 NaN, 4 a dict without score."""
    index = item.extra_info["sample_index"]
    if index == 1:
        raise RuntimeError("judge unreachable")
    return [1.0, None, "yes", math.nan, {"acc": 1.0}][index]


def batch_failing_on_p1(items: list[RewardInput]) -> list[float]:
    if items[0].statement_id == "p1":
        raise RuntimeError("judge unreachable")
    return [1.0] * len(items)


def batch_too_short(items: list[RewardInput]) -> list[float]:
    return [1.0]


GATE = threading.Event()


def gated(item: RewardInput) -> float:
    assert GATE.wait(10)
    return 1.0


def _prompt(statement_id: str = "p0", turn: int = 1) -> Prompt:
    return Prompt(statement_id, ({"role": "user", "content": f"prove {statement_id}"},), STATEMENT, (5, 6, 7),
                  turn=turn, data_source="minif2f")


def _completion(text: str, index: int, finish_reason: str = "stop") -> Completion:
    ids = tuple(range(2, 2 + len(text)))
    return Completion(0, index, ids, text, np.zeros(len(ids), np.float32), finish_reason)


def _scored(spec: str, groups: dict[str, list[str]], batch: bool = False) -> list[Sample]:
    with reward_from_config(RewardConfig(function=spec, batch=batch), VerifierConfig(kind="standin")) as reward:
        prompts = [_prompt(sid) for sid in groups]
        completions = [[_completion(text, i) for i, text in enumerate(texts)] for texts in groups.values()]
        return reward.score_groups(prompts, completions)


@pytest.mark.parametrize("name, batch", [
    ("length_score", False), ("async_length_score", False),
    ("batch_length_score", True), ("async_batch_length_score", True),
])
def test_per_response_and_batch_forms_sync_and_async(name, batch):
    samples = _scored(f"{HERE}:{name}", {"p0": ["a", "abc"], "p1": ["abcdefghij"]}, batch)
    assert [s.score for s in samples] == [0.1, 0.3, 1.0]
    assert [s.acc for s in samples] == [0.1, 0.3, 1.0]  # no `acc` returned: the score
    assert [(s.prompt.statement_id, s.completion.sample_index) for s in samples] == [("p0", 0), ("p0", 1), ("p1", 0)]
    assert all(s.verdict is None and s.format_error == "" and s.extras == {} and not s.feedback for s in samples)


def test_the_function_receives_the_prompt_and_response():
    SEEN.clear()
    prompt = _prompt("p7", turn=2)
    with reward_from_config(RewardConfig(function=f"{HERE}:length_score"), VerifierConfig()) as reward:
        reward.collect(reward.submit(prompt, [_completion("xy", 3, "length")]))
    (item,) = SEEN
    assert item == RewardInput(
        data_source="minif2f", statement_id="p7", messages=prompt.messages, response="xy", response_ids=(2, 3),
        extra_info={"turn": 2, "formal_statement": STATEMENT, "sample_index": 3, "finish_reason": "length"},
    )


def test_a_file_path_names_a_function(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        "from __future__ import annotations\nimport dataclasses\n\n"
        "@dataclasses.dataclass\nclass Weights:\n    per_char: float = 0.5\n\n"
        "def compute_score(item):\n    return Weights().per_char * len(item.response)\n"
    )
    samples = _scored(f"{path}:compute_score", {"p0": ["ab"]})
    assert [s.score for s in samples] == [1.0]


def test_dict_returns_give_extras_and_acc():
    (sample,) = _scored(f"{HERE}:with_extras", {"p0": ["abc"]})
    assert (sample.score, sample.acc) == (1.0, 0.5)
    assert sample.extras == {"acc": 0.5, "length": 3.0, "stopped": 1.0}
    (plain,) = _scored(f"{HERE}:score_only_dict", {"p0": ["abc"]})
    assert (plain.score, plain.acc, plain.extras) == (0.25, 0.25, {})


def test_extra_values_are_logged_as_step_means():
    samples = _scored(f"{HERE}:with_extras", {"p0": ["a", "abc"]})
    failed = _scored(f"{HERE}:flaky", {"p0": ["a", "b"]})[1]  # carries no extras
    assert extra_means([*samples, failed]) == {
        "reward_extra/acc/mean": 0.5, "reward_extra/length/mean": 2.0, "reward_extra/stopped/mean": 1.0,
    }


def test_a_failing_call_names_function_and_sample_and_spares_the_others(caplog):
    spec = f"{HERE}:flaky"
    with caplog.at_level(logging.ERROR, logger="kimina_jax.reward.user"):
        samples = _scored(spec, {"p0": ["a", "b", "c", "d", "e"]})
    assert samples[0].score == 1.0 and samples[0].verdict is None
    reasons = {1: "judge unreachable", 2: "must be a number", 3: "is nan", 4: "needs a 'score' entry"}
    for index, reason in reasons.items():
        sample = samples[index]
        assert sample.verdict.status == "unverified" and not Outcome.of(sample).verified  # out of loss and accuracy
        assert (sample.score, sample.acc) == (0.0, 0.0)
        assert f"reward.function {spec} failed on statement 'p0', sample {index}" in sample.verdict.error
        assert reason in sample.verdict.error
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 4 and all(spec in m and "'p0'" in m for m in logged)


def test_a_failing_batch_fails_its_own_samples_only():
    samples = _scored(f"{HERE}:batch_failing_on_p1", {"p0": ["a", "b"], "p1": ["c", "d"]}, batch=True)
    assert [s.verdict is None for s in samples] == [True, True, False, False]
    assert all("judge unreachable" in s.verdict.error for s in samples[2:])
    short = _scored(f"{HERE}:batch_too_short", {"p0": ["a", "b"]}, batch=True)
    assert all("must return a list of 2 values" in s.verdict.error for s in short)


def test_submit_returns_while_the_function_runs():
    """Scoring overlaps generation: `submit` starts the calls and returns; `collect` waits for them."""
    GATE.clear()
    with reward_from_config(RewardConfig(function=f"{HERE}:gated"), VerifierConfig()) as reward:
        start = time.perf_counter()
        pending = reward.submit(_prompt(), [_completion("a", 0), _completion("b", 1)])
        assert time.perf_counter() - start < 1 and not any(p.result.done() for p in pending)
        GATE.set()
        assert [s.score for s in reward.collect(pending)] == [1.0, 1.0]


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_kj:fn", r"reward.function 'no_such_module_kj:fn': cannot import 'no_such_module_kj'"),
    (f"{HERE}:missing", r"reward.function .*has no attribute 'missing'"),
    (f"{HERE}:NOT_CALLABLE", r"reward.function .*'NOT_CALLABLE' is a int, not a function"),
    ("/no/such/dir/reward.py:fn", r"reward.function: no file '/no/such/dir/reward.py'"),
    ("leann", r"reward.function 'leann' is no registered reward \(lean\)"),
    (":fn", r"reward.function ':fn': expected 'package.module:name'"),
])
def test_a_bad_reward_function_is_one_error_naming_the_key(spec, message):
    with pytest.raises(KiminaError, match=message):
        reward_from_config(RewardConfig(function=spec), VerifierConfig(kind="standin"))


def test_config_takes_the_keys_and_rejects_batch_without_a_user_function():
    cfg = load_config("tiny", [f"reward.function={HERE}:batch_length_score", "reward.batch=true"], env={})
    assert (cfg.reward.function, cfg.reward.batch) == (f"{HERE}:batch_length_score", True)
    with pytest.raises(KiminaError, match="'reward.batch' is for a user's function"):
        load_config("tiny", ["reward.batch=true"], env={})


def test_the_builtin_lean_reward_is_registered_under_its_name():
    """`lean` (and the default, null) is the format x Lean reward: the same samples as the Rewarder gives."""
    proved = f"```lean4\n{STATEMENT}  simp\n```"
    unproved = f"```lean4\n{STATEMENT}\n```"
    groups = [[_completion(proved, 0), _completion(unproved, 1), _completion("no proof", 2)]]
    expected = Rewarder(StandinVerifier()).score_groups([_prompt()], groups)
    assert [s.verdict and s.verdict.status for s in expected] == ["valid", "lean_error", None]
    assert [s.acc for s in expected] == [1.0, 0.0, 0.0] and expected[1].feedback
    assert set(REWARDS) == {"lean"}
    for name in ("lean", None):
        with reward_from_config(RewardConfig(function=name), VerifierConfig(kind="standin")) as reward:
            assert isinstance(reward, Rewarder) and isinstance(reward.verifier, StandinVerifier)
            samples = reward.score_groups([_prompt()], groups)
        assert [_fields(s) for s in samples] == [_fields(s) for s in expected]


def _fields(sample: Sample) -> tuple:
    return (sample.score, sample.acc, sample.format_error, sample.proof_code, sample.feedback,
            sample.verdict and (sample.verdict.status, sample.verdict.messages), sample.extras)


def test_a_user_reward_starts_no_verifier_and_needs_no_server():
    with reward_from_config(RewardConfig(function=f"{HERE}:length_score"), VerifierConfig(kind="lean")) as reward:
        assert reward.verifier is None and reward.stats() == {}
        rewarder = MainProcessRewarder(reward)
        assert rewarder.stats() == {} and rewarder.scores_here


def test_validation_with_a_user_reward_and_the_fix_turn_on():
    """A user's reward evaluates too; its samples carry no feedback, so the fix turn makes no prompts."""
    tokenizer = build_tiny_tokenizer()
    renderer = PromptRenderer(tokenizer, 64)
    prompts = [dataclasses.replace(_prompt(f"p{i}"), token_ids=renderer.encode(_prompt().messages)) for i in range(2)]
    model = build_tiny_model(TinyModelConfig(), len(tokenizer), eos_token_id=tokenizer.eos_token_id, seed=0)
    with reward_from_config(RewardConfig(function=f"{HERE}:with_extras"), VerifierConfig()) as reward:
        metrics, samples = validate(
            JaxSampler(model, tokenizer=tokenizer), reward, prompts, SamplingParams(n=2, max_tokens=4, seed=1),
            renderer, error_fix=ErrorFixConfig(enabled=True), data_source="demo",
        )
    assert len(samples) == 4 and all(s.prompt.turn == 1 and s.extras["acc"] == 0.5 for s in samples)
    assert metrics["val-aux/demo/fix_attempts"] == 0 and metrics["val-aux/demo/unverified/turn_1"] == 0
