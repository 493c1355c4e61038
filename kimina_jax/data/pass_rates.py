"""Each training statement's recent pass rates, from its turn-1 groups in training steps; saved in checkpoints."""
from __future__ import annotations

import math
from typing import Any, Sequence

from kimina_jax.types import Sample


class PassRateMemory:
    """The last `visits` visits of every statement trained on, oldest first.

    A visit is one group of the statement's turn-1 samples in a training step, kept as (passed, verified,
    samples): its pass rate is passed / verified (samples Lean never judged are left out). A statement is `solved`
    when each of its last `visits` visits passed in every one of its samples. Every process records the same
    global batches, so every process holds the same memory.
    """

    def __init__(self, visits: int = 2):
        self.visits = visits
        self._history: dict[str, list[tuple[int, int, int]]] = {}

    def __len__(self) -> int:
        """Statements visited at least once."""
        return len(self._history)

    def record(self, statement_id: str, passed: int, verified: int, samples: int) -> None:
        history = self._history.setdefault(statement_id, [])
        history.append((passed, verified, samples))
        del history[: -self.visits]

    def record_groups(self, samples: Sequence[Sample], n: int) -> None:
        """A visit for each turn-1 group of `n` consecutive samples (a step's global batch, in group order)."""
        for start in range(0, len(samples), n):
            group = samples[start : start + n]
            if group[0].prompt.turn == 1:
                verified = [s for s in group if s.is_verified]
                self.record(group[0].prompt.statement_id, sum(s.acc >= 1.0 for s in verified), len(verified),
                            len(group))

    def pass_rates(self, statement_id: str) -> list[float]:
        """The statement's recent pass rates, oldest first (nan for a visit with no verified sample)."""
        visits = self._history.get(statement_id, ())
        return [passed / verified if verified else math.nan for passed, verified, _ in visits]

    def solved(self, statement_id: str) -> bool:
        history = self._history.get(statement_id, ())
        return len(history) == self.visits and all(passed == samples for passed, _, samples in history)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {sid: [list(visit) for visit in visits] for sid, visits in self._history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the visits; a run that keeps fewer `visits` than the saved one keeps the latest."""
        self._history = {
            sid: [tuple(visit) for visit in visits][-self.visits :] for sid, visits in state["history"].items()
        }
