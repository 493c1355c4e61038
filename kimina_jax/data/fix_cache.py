"""The error-fix turn (SPEC 7): turn-2 prompts built from failed samples, and the FIFO cache they are drawn from.

A turn-2 prompt is the original messages + the assistant's full turn-1 response + a user message holding only
the Lean feedback. Which samples become one is counted with the original recipe's metric names
(`multiturn/turn_{t}/...`), checked in its order: a proof that passed Lean is `valid`; no proof was sent to Lean
(or the failure left no feedback text) is `filtered`; then `feedback_too_long`, `exceed_max_turn` (only one fix
turn; with the fix turn off, every turn-1 failure), `max_prompt_token_len_exceeded`, and `added_in_database`
for those kept. Samples whose verification could not be done are neither failures nor successes: they are counted
as `unverified` and never turned into prompts.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from kimina_jax.data.prompts import PromptRenderer
from kimina_jax.types import Prompt, Sample

MAX_TURNS = 2  # the original turn + one fix turn
FIX_COUNTERS = (
    "valid",
    "filtered",
    "feedback_too_long",
    "max_prompt_token_len_exceeded",
    "exceed_max_turn",
    "added_in_database",
    "unverified",
)


def fix_messages(prompt: Prompt, response: str, feedback: str) -> tuple[dict, ...]:
    return (*prompt.messages, {"role": "assistant", "content": response}, {"role": "user", "content": feedback})


def build_fix_prompts(
    samples: Sequence[Sample], renderer: PromptRenderer, max_feedback_chars: int, error_fix: bool = True
) -> tuple[list[Prompt], dict[str, int]]:
    """Turn-2 prompts from a step's samples, and the `multiturn/turn_{t}/...` counts.

    Without the fix turn (`error_fix=False`) the original's last turn is turn 1: failures count as
    `exceed_max_turn` and no prompt is made.
    """
    max_turns = MAX_TURNS if error_fix else 1
    counts = {f"multiturn/turn_{t}/{name}": 0 for t in range(1, max_turns + 1) for name in FIX_COUNTERS}
    prompts = []
    for sample in samples:
        outcome, prompt = _fix_one(sample, renderer, max_feedback_chars, max_turns)
        counts[f"multiturn/turn_{sample.prompt.turn}/{outcome}"] += 1
        if prompt is not None:
            prompts.append(prompt)
    return prompts, counts


def _fix_one(
    sample: Sample, renderer: PromptRenderer, max_feedback_chars: int, max_turns: int
) -> tuple[str, Prompt | None]:
    if not sample.is_verified:
        return "unverified", None
    if sample.verdict is not None and sample.verdict.is_valid:
        return "valid", None
    if sample.verdict is None or not sample.feedback:
        return "filtered", None
    if len(sample.feedback) > max_feedback_chars:
        return "feedback_too_long", None
    if sample.prompt.turn >= max_turns:
        return "exceed_max_turn", None
    messages = fix_messages(sample.prompt, sample.completion.text, sample.feedback)
    token_ids = renderer.encode(messages)
    if len(token_ids) > renderer.max_prompt_length:
        return "max_prompt_token_len_exceeded", None
    prompt = Prompt(
        statement_id=sample.prompt.statement_id,
        messages=messages,
        formal_statement=sample.prompt.formal_statement,
        token_ids=token_ids,
        turn=sample.prompt.turn + 1,
        data_source=sample.prompt.data_source,
    )
    return "added_in_database", prompt


class FixCache:
    """The newest `size` turn-2 prompts; each batch row is drawn from it with probability `rate` when non-empty.

    Draws depend only on (seed, number of draws so far, cache contents), so every process of a multi-host run
    makes the same draws, and a restored cache continues exactly where the saved one was.
    """

    def __init__(self, size: int, rate: float, seed: int):
        self.size = size
        self.rate = rate
        self.seed = seed
        self._prompts: list[Prompt] = []
        self._draws = 0

    def __len__(self) -> int:
        return len(self._prompts)

    def add(self, prompts: Iterable[Prompt]) -> None:
        self._prompts.extend(prompts)
        del self._prompts[: max(0, len(self._prompts) - self.size)]

    def draw(self, n_slots: int) -> list[Prompt | None]:
        """For each of `n_slots` batch rows: a cached prompt (chosen uniformly), or None (use the dataset's row)."""
        rng = np.random.default_rng((self.seed, self._draws))
        self._draws += 1
        if not self._prompts:
            return [None] * n_slots
        take = rng.random(n_slots) < self.rate
        picks = rng.integers(len(self._prompts), size=n_slots)
        return [self._prompts[i] if t else None for t, i in zip(take, picks)]

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self._draws, "prompts": [_prompt_to_dict(p) for p in self._prompts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._draws = int(state["draws"])
        self._prompts = [_prompt_from_dict(d) for d in state["prompts"]][-self.size :]


def _prompt_to_dict(prompt: Prompt) -> dict[str, Any]:
    return {
        "statement_id": prompt.statement_id,
        "messages": [dict(m) for m in prompt.messages],
        "formal_statement": prompt.formal_statement,
        "token_ids": list(prompt.token_ids),
        "turn": prompt.turn,
        "data_source": prompt.data_source,
    }


def _prompt_from_dict(d: dict[str, Any]) -> Prompt:
    return Prompt(
        statement_id=d["statement_id"],
        messages=tuple(dict(m) for m in d["messages"]),
        formal_statement=d["formal_statement"],
        token_ids=tuple(int(t) for t in d["token_ids"]),
        turn=int(d["turn"]),
        data_source=d["data_source"],
    )
