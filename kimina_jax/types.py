"""Plain frozen dataclasses that cross stage boundaries (numpy / Python inside, never JAX arrays)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import numpy as np

VerdictStatus = Literal["valid", "sorry", "lean_error", "repl_error", "timeout", "server_error", "unverified"]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: the chat messages, the statement they are about, and the rendered token ids."""

    statement_id: str
    messages: tuple[dict, ...]
    formal_statement: str
    token_ids: tuple[int, ...]
    turn: int = 1
    data_source: str = ""


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled response to one prompt, with the engine's own per-token log-probs."""

    prompt_index: int
    sample_index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: np.ndarray  # float32 [len(token_ids)]
    finish_reason: str  # "stop" (EOS / stop token) or "length"
    # Partial rollouts: the training step whose starting weights sampled each token (None: the step's own).
    token_steps: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the Lean server said about one snippet.

    `unverified` (no answer after retries) and `server_error` (the server kept answering with an error about its
    own machinery) are not judgements of the proof: such samples are left out of the loss and of accuracy.
    """

    status: VerdictStatus
    messages: tuple[dict, ...] = ()  # Lean's messages as the server sent them
    time_s: float = 0.0
    error: str | None = None  # server-level error text (SPEC 11 `error`) or the client's reason
    # Message line k is line `line_offset + k` of `code.splitlines()`: the server checks the code without its
    # import header (SPEC 11), so Lean counts lines from there.
    line_offset: int = 0

    @property
    def is_valid(self) -> bool:
        return self.status == "valid"

    @property
    def is_verified(self) -> bool:
        return self.status not in ("unverified", "server_error")


@dataclasses.dataclass(frozen=True)
class Sample:
    """A scored response: prompt + completion + verdict + reward, and the error-fix feedback if any.

    A user's reward function gives no verdict (None), format error ("") or feedback; a failed call gives an
    `unverified` verdict with its error text.
    """

    prompt: Prompt
    completion: Completion
    verdict: Verdict | None  # None when no proof was extracted (nothing was sent to Lean)
    score: float
    acc: float
    format_error: str
    proof_code: str | None = None
    feedback: str = ""
    extras: Mapping[str, float] = dataclasses.field(default_factory=dict)  # a user reward's values besides score

    @property
    def is_verified(self) -> bool:
        """Whether its reward judges the response: no proof sent, or a verdict that judges the proof. Samples that
        are not are left out of the loss and of accuracy, never scored as wrong."""
        return self.verdict is None or self.verdict.is_verified
