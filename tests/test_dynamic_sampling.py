"""DAPO's dynamic sampling (`algorithm.filter_groups`) and the pass-rate memory behind `data.skip_solved`: the group
filter alone, the config keys and the DAPO recipe variant, then the training loop with a scripted engine whose
groups are all solved, all failed or mixed by statement (judged by the stand-in verifier), and two processes
against one (the same outcomes as a user's reward function, with the real sampler)."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from kimina_jax import train
from kimina_jax.config import RECIPE_DIR, load_config
from kimina_jax.data import PromptRenderer, load_prompt_dataset, train_iterator
from kimina_jax.data.pass_rates import PassRateMemory
from kimina_jax.errors import KiminaError
from kimina_jax.grpo.dynamic_sampling import GroupFilter
from kimina_jax.rollout import RolloutEngine, make_completion
from kimina_jax.types import Completion, Prompt, Sample, Verdict
from tests.lean_harness.server import free_port
from tests.test_multihost import _finish, _rollouts, _scalars, _train

N = 4


# ------------------------------------------------------------------------------------------ the group filter
def group(name: str, accs: list[float], scores: list[float] | None = None, unverified: tuple[int, ...] = ()):
    """One prompt's n samples; `unverified`: the samples Lean never judged."""
    prompt = Prompt(name, (), "", (1,))
    return [
        Sample(
            prompt, Completion(0, i, (2,), "", np.zeros(1, np.float32), "stop"),
            Verdict("unverified" if i in unverified else "valid" if acc else "lean_error"),
            score=acc if scores is None else scores[i], acc=acc, format_error="No error.",
        )
        for i, acc in enumerate(accs)
    ]


def names(samples: list[Sample]) -> list[str]:
    return [s.prompt.statement_id for s in samples[::N]]


def test_filter_keeps_informative_groups_until_full_and_drops_the_surplus():
    first = (
        group("solved", [1, 1, 1, 1]) + group("failed", [0, 0, 0, 0]) + group("mixed", [0, 1, 0, 0])
        + group("failed-but-unverified-pass", [1, 0, 0, 0], unverified=(0,))  # judged on its 3 verified samples
        + group("one-verified", [1, 0, 0, 0], unverified=(1, 2, 3))  # fewer than 2 verified: not informative
        + group("none-verified", [0, 0, 0, 0], unverified=(0, 1, 2, 3))
    )
    groups = GroupFilter("acc", N, groups_wanted=3)
    groups.add(first)
    assert (groups.kept, groups.full, names(groups.samples())) == (1, False, ["mixed"])
    groups.add(group("m2", [1, 0, 1, 0]) + group("solved2", [1, 1, 1, 1]) + group("m3", [0, 0, 0, 1])
               + group("surplus", [1, 1, 0, 0]))
    assert groups.full and names(groups.samples()) == ["mixed", "m2", "m3"]  # the first ones, as verl
    assert groups.samples()[:N] == first[2 * N : 3 * N]
    assert groups.metrics() == {
        "filter_groups/all_pass": 3.0,  # solved, one-verified, solved2
        "filter_groups/all_fail": 2.0,  # failed, failed-but-unverified-pass
        "filter_groups/kept": 3.0,
        "filter_groups/gen_batches": 2.0,
    }


def test_filter_metric_score_or_acc():
    # Every proof checks, but one response fails the format: no signal in acc, a signal in the score.
    format_fail = group("format", [1, 1, 1, 1], scores=[1, 0, 1, 1])
    by_acc, by_score = GroupFilter("acc", N, 1), GroupFilter("score", N, 1)
    by_acc.add(format_fail)
    by_score.add(format_fail)
    assert (by_acc.kept, by_acc.all_pass) == (0, 1)
    assert (by_score.kept, by_score.samples()) == (1, format_fail)


def test_config_checks_and_defaults():
    cfg = load_config("tiny", env={})
    assert not cfg.algorithm.filter_groups.enabled and cfg.algorithm.filter_groups.max_gen_batches == 0
    assert (cfg.data.skip_solved.enabled, cfg.data.skip_solved.visits) == (False, 2)
    with pytest.raises(KiminaError, match="max_gen_batches' must be >= 0"):
        load_config("tiny", ["algorithm.filter_groups.max_gen_batches=-1"], env={})
    with pytest.raises(KiminaError, match="filter_groups.enabled needs rollout.n >= 2"):
        load_config("tiny", ["algorithm.filter_groups.enabled=true", "rollout.n=1"], env={})
    with pytest.raises(KiminaError, match="'data.skip_solved.visits' must be > 0"):
        load_config("tiny", ["data.skip_solved.visits=0"], env={})
    with pytest.raises(KiminaError, match="metric"):
        load_config("tiny", ["algorithm.filter_groups.metric=seq_reward"], env={})


def test_dapo_recipe_is_the_1_7B_recipe_with_filter_groups_on():
    env = {"LEAN_SERVER_API_URL": "http://localhost"}
    base = yaml.safe_load((RECIPE_DIR / "kimina_prover_1.7B.yaml").read_text())
    dapo = yaml.safe_load((RECIPE_DIR / "kimina_prover_1.7B_dapo.yaml").read_text())
    assert dapo["algorithm"].pop("filter_groups") == {"enabled": True, "metric": "score", "max_gen_batches": 10}
    assert dapo["experiment"].pop("name") == "kimina-prover-1.7B-dapo"
    base["experiment"].pop("name")
    assert dapo == base
    assert load_config("kimina_prover_1.7B_dapo", env=env).algorithm.filter_groups.enabled
    assert not load_config("kimina_prover_1.7B", env=env).algorithm.filter_groups.enabled


# ------------------------------------------------------------------------------------------ the training loop
def category(statement_id: str) -> str:
    """Every sample of a statement proves it, none does, or only the first one does: about a third each."""
    return ("mixed", "pass", "fail")[zlib.crc32(statement_id.encode()) % 3]


def category_reward(item) -> float:
    """`category` as a user's reward function (`reward.function`), for runs with the real sampler."""
    kind = category(item.statement_id)
    return float(kind == "pass" or (kind == "mixed" and item.extra_info["sample_index"] == 0))


class ScriptedProofs(RolloutEngine):
    """Answers a training prompt with its statement proved (`by trivial`: valid for the stand-in verifier) or left
    as `by sorry` (a failure), by `category`; anything else (validation) with a failure."""

    def __init__(self, tokenizer, prompts: list[Prompt]):
        self.tokenizer = tokenizer
        self.statements = {p.token_ids: (category(p.statement_id), p.formal_statement) for p in prompts}
        self.everything_fails = False

    def generate(self, prompt_token_ids, params):
        groups = []
        for j, ids in enumerate(prompt_token_ids):
            kind, statement = self.statements.get(tuple(ids), ("fail", "theorem x : False := by sorry"))
            if self.everything_fails:
                kind = "fail"
            group = []
            for i in range(params.n):
                proved = kind == "pass" or (kind == "mixed" and i == 0)
                code = statement.replace("by sorry", "by trivial") if proved else statement
                answer = self.tokenizer.encode(f"```lean4\n{code}\n```", add_special_tokens=False)
                group.append(make_completion(j, i, answer, np.zeros(len(answer)), "stop", self.tokenizer))
            groups.append(group)
        return groups

    def update_weights(self, model_or_params) -> None:
        pass


OVERRIDES = [
    "verifier.kind=standin", "data.error_fix.enabled=false", "data.max_response_length=192", "data.train.limit=16",
    "data.val.limit=1", "algorithm.filter_groups.enabled=true", "algorithm.filter_groups.metric=acc",
    "data.skip_solved.enabled=true", "data.skip_solved.visits=1", "trainer.total_steps=3", "trainer.save_freq=1",
    "logging.tensorboard=false", "logging.progress_bars=false",
]


def make_trainer(run_dir, monkeypatch, *overrides: str):
    """A tiny-recipe Trainer with the scripted engine; it records each step's metrics and what it packs."""
    cfg = load_config("tiny", [*OVERRIDES, *overrides], run_dir=run_dir, env={})

    def make_engine(rollout_cfg, model, tokenizer, model_dir=None):
        renderer = PromptRenderer(tokenizer, cfg.data.max_prompt_length)
        prompts = load_prompt_dataset(cfg.data.train, renderer, cfg.data.filter_overlong_prompts).all_prompts()
        return ScriptedProofs(tokenizer, prompts)

    monkeypatch.setattr(train, "make_engine", make_engine)
    trainer = train.Trainer(cfg)
    trainer.packed, trainer.logged = [], {}
    pack, log_step = trainer._pack, trainer.writer.log_step

    def spy_pack(samples, verified, advantages):
        trainer.packed.append(list(samples))
        return pack(samples, verified, advantages)

    def spy_log(step, metrics, samples):
        trainer.logged[step] = dict(metrics)
        log_step(step, metrics, samples)

    trainer._pack, trainer.writer.log_step = spy_pack, spy_log
    return trainer


def expected_steps(trainer, steps: int) -> tuple[list[dict], PassRateMemory]:
    """Each step's draws worked out from the categories alone, with a fresh iterator: batches are drawn until 4
    groups are mixed; then every drawn group is remembered (pass: 4 of 4 samples passed, mixed: 1 of 4, fail: 0),
    and the statements solved in their last visit are left out of the next epochs. Also the pass rates after."""
    cfg = trainer.cfg
    data = train_iterator(cfg.data, trainer.renderer)
    outcome = {"pass": (N, N, N), "fail": (0, N, N), "mixed": (1, N, N)}
    wanted = cfg.data.train_batch_size
    out = []
    for _ in range(steps):
        drawn, mixed, skipped = [], [], []
        while len(mixed) < wanted:
            batch = [p.statement_id for p in data.next_batch()]
            skipped.append(data.skipped_solved)
            drawn += batch
            mixed += [s for s in batch if category(s) == "mixed"]
        for statement in drawn:
            data.pass_rates.record(statement, *outcome[category(statement)])
        kinds = [category(s) for s in drawn]
        out.append({
            "drawn": drawn, "trained": mixed[:wanted], "epoch": data.drawn_epoch, "skipped": skipped[-1],
            "filter_groups/gen_batches": len(drawn) // wanted, "filter_groups/kept": wanted,
            "filter_groups/all_pass": kinds.count("pass"), "filter_groups/all_fail": kinds.count("fail"),
        })
    return out, data.pass_rates


def dumped(run_dir, step: int) -> list[str]:
    """The statements of a step's dumped groups."""
    lines = (run_dir / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()
    return [json.loads(line)["problem"] for line in lines][::N]


@pytest.mark.slow
@pytest.mark.parametrize("off_policy", [False, True])
def test_only_mixed_groups_reach_the_update_and_a_resumed_run_draws_the_same(tmp_path, monkeypatch, off_policy):
    """Off-policy, a step's first batch is drawn ahead while the step before trains (checkpoint 2 is taken then), and
    its extra batches are drawn in the step: the same prompts in the same order."""
    policy = f"algorithm.off_policy={str(off_policy).lower()}"
    run_dir = tmp_path / "run"
    trainer = make_trainer(run_dir, monkeypatch, policy)
    expected, pass_rates = expected_steps(trainer, 3)
    trainer.fit()

    assert len(trainer.packed) == 3
    for step, (packed, want) in enumerate(zip(trainer.packed, expected), 1):
        # The full number of groups, all mixed: the all-solved and all-failed groups never reach the update.
        assert names(packed) == want["trained"]
        assert all(sum(s.acc for s in packed[g : g + N]) == 1 for g in range(0, len(packed), N))
        assert dumped(run_dir, step) == want["drawn"]  # every generated group is dumped
        metrics = trainer.logged[step]
        for key in ("filter_groups/gen_batches", "filter_groups/kept", "filter_groups/all_pass",
                    "filter_groups/all_fail"):
            assert metrics[key] == want[key], (step, key)
        assert (metrics["training/epoch"], metrics["data/skipped_solved"]) == (want["epoch"], want["skipped"])
    assert min(s["filter_groups/gen_batches"] for s in expected) > 1  # every step made extra draws
    assert expected[-1]["skipped"] > 0  # and the run reached an epoch with solved statements left out
    assert trainer.data.pass_rates.state_dict() == pass_rates.state_dict()

    # Resume from step 2's checkpoint: step 3 draws the same prompts, and the pass rates come back.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "3")
    (resumed_dir / "rollouts" / "step_3.jsonl").unlink()
    resumed = make_trainer(resumed_dir, monkeypatch, policy)
    resumed.fit()
    assert resumed.step == 3 and len(resumed.packed) == 1
    assert dumped(resumed_dir, 3) == dumped(run_dir, 3)
    assert names(resumed.packed[0]) == expected[2]["trained"]
    assert resumed.data.state_dict() == trainer.data.state_dict()  # position, skipped rows, pass rates


@pytest.mark.slow
def test_max_gen_batches_stops_and_the_step_trains_on_what_there_is(tmp_path, monkeypatch, caplog):
    trainer = make_trainer(tmp_path, monkeypatch, "algorithm.filter_groups.max_gen_batches=2")
    try:
        data = train_iterator(trainer.cfg.data, trainer.renderer)
        want = [p.statement_id for _ in range(2) for p in data.next_batch()]  # the first two batches
        trainer.step = 1
        with caplog.at_level(logging.WARNING, logger="kimina_jax.train"):
            metrics = trainer.train_step()
        mixed = [s for s in want if category(s) == "mixed"]
        assert 0 < len(mixed) < 4 and names(trainer.packed[0]) == mixed
        assert (metrics["filter_groups/gen_batches"], metrics["filter_groups/kept"]) == (2, len(mixed))
        assert "after max_gen_batches (2) generation batches; training on those" in caplog.text

        # No informative group at all: no update (the optimizer does not move), the step still reports.
        trainer.engine.everything_fails = True
        trainer.step = 2
        updates = int(trainer.state.step)
        metrics = trainer.train_step()
        assert int(trainer.state.step) == updates and len(trainer.packed) == 1
        assert (metrics["filter_groups/kept"], metrics["filter_groups/all_fail"]) == (0, 8)
        assert metrics["perf/total_num_tokens"] == 0
    finally:
        trainer.close()


def test_the_loop_remembers_turn_1_groups_as_passed_over_verified():
    memory = PassRateMemory(visits=2)
    fixes = [dataclasses.replace(s, prompt=dataclasses.replace(s.prompt, turn=2)) for s in group("a", [1, 1, 1, 1])]
    samples = group("a", [1, 0, 1, 0], unverified=(3,)) + group("b", [1, 1, 1, 1]) + fixes
    memory.record_groups(samples, N)
    assert memory.pass_rates("a") == [pytest.approx(2 / 3)] and not memory.solved("a")  # the fix turn is not a visit
    assert memory.pass_rates("b") == [1.0] and len(memory) == 2


@pytest.mark.slow
def test_two_processes_draw_filter_and_skip_like_one_process(tmp_path):
    """Each process generates its share of every extra batch; the groups kept and the statements left out are
    decided from the whole batch, alike on every process: the same draws as one process."""
    overrides = (
        f"reward.function={Path(__file__)}:category_reward", "data.error_fix.enabled=false", "data.train.limit=16",
        "data.max_response_length=8", "algorithm.filter_groups.enabled=true", "data.skip_solved.enabled=true",
        "data.skip_solved.visits=1", "trainer.total_steps=3",
    )
    one, two = tmp_path / "one", tmp_path / "two"
    _finish(_train(one, 8, *overrides))
    launch = ("--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2")
    _finish(*(_train(two, 4, *overrides, *launch, "--process-id", str(i)) for i in (0, 1)))
    for step in (1, 2, 3):
        assert _rollouts(two, step) == _rollouts(one, step)
    assert _scalars(two, "filter_groups/gen_batches") == _scalars(one, "filter_groups/gen_batches")
    assert min(_scalars(two, "filter_groups/gen_batches")) > 1 and _scalars(two, "data/skipped_solved")[-1] > 0
