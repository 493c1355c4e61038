"""The recipe's exact messages, chat-template rendering, and the overlong-prompt filter (SPEC 5)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from kimina_jax.config import DatasetConfig
from kimina_jax.data.datasets import StatementRow, read_rows
from kimina_jax.errors import KiminaError
from kimina_jax.types import Prompt

log = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are an expert in mathematics and proving theorems in Lean 4."
USER_TEMPLATE = (
    "Think about and solve the following problems step by step in Lean 4.\n\n"
    "# Problem:\n{informal_problem}\n\n"
    "# Formal Statement:\n```lean4\n{formal_statement}\n```\n"
)

Messages = tuple[dict, ...]


def make_messages(informal_problem: str | None, formal_statement: str) -> Messages:
    """System + user message; a missing problem renders as the literal text `None`, as in the original."""
    user = USER_TEMPLATE.format(informal_problem=informal_problem, formal_statement=formal_statement)
    return ({"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user})


class PromptRenderer:
    """Renders messages with the tokenizer's chat template (with the generation prompt) into token ids."""

    def __init__(self, tokenizer, max_prompt_length: int):
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length

    def render(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def encode(self, messages: Messages) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(self.render(messages), add_special_tokens=False))

    def lengths(self, all_messages: Sequence[Messages]) -> list[int]:
        texts = [self.render(m) for m in all_messages]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def prompt(self, row: StatementRow) -> Prompt:
        messages = make_messages(row.problem, row.formal_statement)
        return Prompt(
            statement_id=row.statement_id,
            messages=messages,
            formal_statement=row.formal_statement,
            token_ids=self.encode(messages),
            turn=1,
            data_source=row.data_source,
        )


@dataclasses.dataclass
class PromptDataset:
    """The rows kept after the length filter; `Prompt`s (token ids included) are built on demand.

    Token ids are not held for every row: a full prompt set would hold millions of Python ints per process.
    """

    rows: list[StatementRow]
    renderer: PromptRenderer
    dropped: int = 0  # rows longer than the max prompt length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Prompt:
        return self.renderer.prompt(self.rows[index])

    def all_prompts(self) -> list[Prompt]:
        return [self[i] for i in range(len(self))]


def load_prompt_dataset(
    cfg: DatasetConfig, renderer: PromptRenderer, filter_overlong: bool, key: str = "data"
) -> PromptDataset:
    """Read a split and drop (and count) prompts over the max length, or fail naming the first one."""
    rows = read_rows(cfg, key)
    if not rows:
        raise KiminaError(f"'{key}' ({', '.join(cfg.files)}) has no rows after 'where' {cfg.where}")
    lengths = renderer.lengths([make_messages(r.problem, r.formal_statement) for r in rows])
    kept = [row for row, n in zip(rows, lengths) if n <= renderer.max_prompt_length]
    if len(kept) < len(rows) and not filter_overlong:
        row, n = next((r, n) for r, n in zip(rows, lengths) if n > renderer.max_prompt_length)
        raise KiminaError(
            f"{row.origin}: prompt is {n} tokens, over data.max_prompt_length ({renderer.max_prompt_length}); "
            "raise the limit or set data.filter_overlong_prompts: true"
        )
    dropped = len(rows) - len(kept)
    if dropped:
        limit = renderer.max_prompt_length
        log.warning("%s: dropped %d of %d prompts longer than %d tokens", key, dropped, len(rows), limit)
    if not kept:
        raise KiminaError(f"'{key}': every prompt is longer than data.max_prompt_length ({renderer.max_prompt_length})")
    return PromptDataset(kept, renderer, dropped)
