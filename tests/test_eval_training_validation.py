"""Training's validation gives fix attempts by the recipe's `data.error_fix` (SPEC 7), as training's own fix turn
does: feedback longer than `data.error_fix.max_feedback_chars` gets no fix (it was a fixed 3000 before)."""
from __future__ import annotations

import numpy as np

from kimina_jax import train
from kimina_jax.config import load_config
from kimina_jax.rollout import RolloutEngine, make_completion

STATEMENT_START, STATEMENT_END = "# Formal Statement:\n```lean4\n", "\n```"


class EmptyProofs(RolloutEngine):
    """Answers every prompt with its statement and no proof: the stand-in verifier's "unsolved goals" error, whose
    feedback makes a fix prompt. Counts the fix prompts it is asked for."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.fix_prompts = 0

    def generate(self, prompt_token_ids, params):
        groups = []
        for j, ids in enumerate(prompt_token_ids):
            text = self.tokenizer.decode(list(ids))
            start = text.index(STATEMENT_START) + len(STATEMENT_START)
            statement = text[start : text.index(STATEMENT_END, start)]
            self.fix_prompts += text.count(statement) > 1  # a fix prompt holds the turn-1 answer too
            answer = self.tokenizer.encode(f"```lean4\n{statement}\n```", add_special_tokens=False)
            groups.append([
                make_completion(j, i, answer, np.zeros(len(answer)), "stop", self.tokenizer) for i in range(params.n)
            ])
        return groups

    def update_weights(self, model_or_params) -> None:
        pass

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_training_validation_uses_the_recipe_feedback_limit(tmp_path, monkeypatch):
    engines = []

    def make_engine(rollout_cfg, model, tokenizer, model_dir=None):
        engines.append(EmptyProofs(tokenizer))
        return engines[-1]

    monkeypatch.setattr(train, "make_engine", make_engine)
    overrides = ["verifier.kind=standin", "data.error_fix.max_feedback_chars=10", "logging.tensorboard=false",
                 "logging.progress_bars=false", "data.val.limit=3"]
    trainer = train.Trainer(load_config("tiny", overrides, run_dir=tmp_path, env={}))
    try:
        (engine,) = engines
        metrics = trainer._validate(log_now=False)
        assert metrics["val-aux/minif2f_test/unverified/turn_1"] == 0
        assert metrics["val-aux/minif2f_test/fix_attempts"] == 0 and engine.fix_prompts == 0  # feedback > 10 chars

        trainer.cfg.data.error_fix.max_feedback_chars = 3000  # the feedback fits: every failed sample gets its fix
        metrics = trainer._validate(log_now=False)
        samples = 3 * trainer.cfg.rollout.val.n
        assert metrics["val-aux/minif2f_test/fix_attempts"] == samples and engine.fix_prompts == samples
    finally:
        trainer.close()
