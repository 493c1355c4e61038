"""Training batches: a seeded shuffle per epoch, error-fix prompts mixed in, solved statements optionally left
out, a position saved in checkpoints.

Multi-host: every process holds the same row table (so all agree, without talking, on the order and on which
rows the length filter dropped) but builds `Prompt`s only for its own contiguous share of each global batch;
the shares of all processes make up the global batch exactly once. Fix-cache draws are made for the global
batch on every process alike, and every process records the same global results in its pass-rate memory, so
the shares and the statements left out stay consistent.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from kimina_jax.config import DataConfig
from kimina_jax.data.fix_cache import FixCache
from kimina_jax.data.pass_rates import PassRateMemory
from kimina_jax.data.prompts import PromptDataset, PromptRenderer, load_prompt_dataset
from kimina_jax.errors import KiminaError
from kimina_jax.types import Prompt

log = logging.getLogger(__name__)


class PromptIterator:
    """Draws the next global batch of `batch_size` prompts and returns this process's share.

    An epoch is `len(dataset) // batch_size` batches (the remainder is left out, as verl's loader does); each
    epoch's order is a permutation seeded by (seed, epoch). As in the original recipe, a batch row drawn from the
    fix cache replaces the dataset row at that position (the dataset row is skipped for this epoch).

    With `skip_solved`, the statements `pass_rates` holds as solved when an epoch's first batch is drawn are left
    out of that epoch (its order is the full permutation without them, so it has fewer batches); when fewer than a
    batch would remain, none is left out. `drawn_epoch` and `skipped_solved` describe the latest batch drawn: its
    epoch, and how many rows were left out of that epoch.

    Batches drawn `ahead` (off-policy: for the step after the one training; with partial rollouts one or more) are
    not yet part of the run's past: until `use_ahead()`, `state_dict()` gives the position before the first of
    them, so a run resumed from a checkpoint taken meanwhile draws them again. Extra draws (dynamic sampling) are
    ordinary draws.
    """

    def __init__(
        self,
        dataset: Sequence[Prompt],
        batch_size: int,
        seed: int,
        *,
        shuffle: bool = True,
        fix_cache: FixCache | None = None,
        process_index: int = 0,
        process_count: int = 1,
        pass_rates: PassRateMemory | None = None,
        skip_solved: bool = False,
    ):
        if batch_size % process_count:
            raise KiminaError(f"train batch size {batch_size} is not divisible by the {process_count} processes")
        if len(dataset) < batch_size:
            raise KiminaError(
                f"the training set has {len(dataset)} prompts after filtering, fewer than one batch ({batch_size})"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.fix_cache = fix_cache
        self.pass_rates = PassRateMemory() if pass_rates is None else pass_rates
        self.skip_solved = skip_solved
        self._statement_ids = _statement_ids(dataset) if skip_solved else []
        share = batch_size // process_count
        self._share = slice(process_index * share, (process_index + 1) * share)
        self.epoch = 0
        self.batch = 0  # index of the next batch within the epoch
        self._skipped: list[int] | None = None  # rows left out of `epoch`; None: not decided before its first draw
        self._order_epoch = -1
        self._order = np.arange(0)
        self._before_ahead: dict[str, Any] | None = None
        self._ahead_draws = 0
        self.drawn_epoch = 0
        self.skipped_solved = 0

    @property
    def steps_per_epoch(self) -> int:
        """Batches in an epoch of every row (one that leaves solved statements out has fewer)."""
        return len(self.dataset) // self.batch_size

    def next_batch(self, ahead: bool = False) -> list[Prompt]:
        """This process's prompts of the next global batch (turn-2 prompts from the fix cache mixed in)."""
        if ahead:
            self._before_ahead = self._before_ahead or self._position()
            self._ahead_draws += 1
        order = self._epoch_order()
        start = self.batch * self.batch_size
        rows = order[start : start + self.batch_size]
        cached = self.fix_cache.draw(self.batch_size) if self.fix_cache is not None else [None] * self.batch_size
        self.drawn_epoch, self.skipped_solved = self.epoch, len(self._skipped)
        self.batch += 1
        if self.batch == len(order) // self.batch_size:
            self.epoch, self.batch, self._skipped = self.epoch + 1, 0, None
        return [
            fix if fix is not None else self.dataset[int(row)]
            for row, fix in zip(rows[self._share], cached[self._share])
        ]

    def _position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "skipped_rows": self._skipped}

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.dataset)
            rng = np.random.default_rng((self.seed, self.epoch))
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            if self._skipped is None:
                self._skipped = self._solved_rows()
            self._order = order[~np.isin(order, self._skipped)]
            self._order_epoch = self.epoch
        return self._order

    def _solved_rows(self) -> list[int]:
        """The rows to leave out of the epoch starting now (see the class docstring)."""
        if not self.skip_solved:
            return []
        solved = [row for row, statement in enumerate(self._statement_ids) if self.pass_rates.solved(statement)]
        if len(self.dataset) - len(solved) < self.batch_size:
            log.warning(
                "epoch %d: %d of %d statements are solved, fewer than a batch (%d) would remain: none is left out",
                self.epoch, len(solved), len(self.dataset), self.batch_size,
            )
            return []
        return solved

    def use_ahead(self) -> None:
        """The batches drawn ahead now belong to the step training on them."""
        self._before_ahead, self._ahead_draws = None, 0

    def state_dict(self) -> dict[str, Any]:
        """The position (before batches drawn ahead) with the rows left out of its epoch, the fix cache (with those
        batches' draws undone) and the pass-rate memory."""
        position = self._before_ahead or self._position()
        fix_cache = None
        if self.fix_cache is not None:
            fix_cache = self.fix_cache.state_dict()
            fix_cache["draws"] -= self._ahead_draws  # drawing a batch draws once from the cache
        return {
            **position, "dataset_size": len(self.dataset), "batch_size": self.batch_size, "fix_cache": fix_cache,
            "pass_rates": self.pass_rates.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (int(state["dataset_size"]), int(state["batch_size"]))
        if saved != (len(self.dataset), self.batch_size):
            raise KiminaError(
                f"cannot resume the data order: the checkpoint was taken with {saved[0]} prompts in batches of "
                f"{saved[1]}, this run has {len(self.dataset)} prompts in batches of {self.batch_size}"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._skipped = state.get("skipped_rows")
        self._order_epoch = -1  # the restored epoch's order leaves out the restored rows
        if self.fix_cache is not None and state.get("fix_cache") is not None:
            self.fix_cache.load_state_dict(state["fix_cache"])
        if state.get("pass_rates") is not None:
            self.pass_rates.load_state_dict(state["pass_rates"])
        self._before_ahead, self._ahead_draws = None, 0


def _statement_ids(dataset: Sequence[Prompt]) -> list[str]:
    """Each row's statement id; a PromptDataset gives them without rendering its prompts."""
    if isinstance(dataset, PromptDataset):
        return [row.statement_id for row in dataset.rows]
    return [prompt.statement_id for prompt in dataset]


def train_iterator(
    cfg: DataConfig, renderer: PromptRenderer, process_index: int = 0, process_count: int = 1
) -> PromptIterator:
    """The training split, its length filter, the fix cache (when enabled) and the iterator, from `data:`."""
    dataset = load_prompt_dataset(cfg.train, renderer, cfg.filter_overlong_prompts, "data.train")
    fix = cfg.error_fix
    cache = FixCache(fix.cache_size, fix.rate, cfg.seed) if fix.enabled else None
    return PromptIterator(
        dataset,
        cfg.train_batch_size,
        cfg.seed,
        shuffle=cfg.shuffle,
        fix_cache=cache,
        process_index=process_index,
        process_count=process_count,
        pass_rates=PassRateMemory(cfg.skip_solved.visits),
        skip_solved=cfg.skip_solved.enabled,
    )
