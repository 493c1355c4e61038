"""Training batches: a seeded shuffle per epoch, error-fix prompts mixed in, a position saved in checkpoints.

Multi-host: every process holds the same row table (so all agree, without talking, on the order and on which
rows the length filter dropped) but builds `Prompt`s only for its own contiguous share of each global batch;
the shares of all processes make up the global batch exactly once. Fix-cache draws are made for the global
batch on every process alike, so the shares stay consistent.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from kimina_jax.config import DataConfig
from kimina_jax.data.fix_cache import FixCache
from kimina_jax.data.prompts import PromptRenderer, load_prompt_dataset
from kimina_jax.errors import KiminaError
from kimina_jax.types import Prompt


class PromptIterator:
    """Draws the next global batch of `batch_size` prompts and returns this process's share.

    An epoch is `len(dataset) // batch_size` batches (the remainder is left out, as verl's loader does); each
    epoch's order is a permutation seeded by (seed, epoch). As in the original recipe, a batch row drawn from the
    fix cache replaces the dataset row at that position (the dataset row is skipped for this epoch).

    A batch drawn `ahead` (off-policy: for the step after the one training) is not yet part of the run's past:
    until `use_ahead()`, `state_dict()` gives the position before it, so a run resumed from a checkpoint taken
    meanwhile draws it again.
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
        share = batch_size // process_count
        self._share = slice(process_index * share, (process_index + 1) * share)
        self.epoch = 0
        self.batch = 0  # index of the next batch within the epoch
        self._order_epoch = -1
        self._order = np.arange(0)
        self._before_ahead: dict[str, Any] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def next_batch(self, ahead: bool = False) -> list[Prompt]:
        """This process's prompts of the next global batch (turn-2 prompts from the fix cache mixed in)."""
        if ahead:
            self._before_ahead = {"epoch": self.epoch, "batch": self.batch}
        start = self.batch * self.batch_size
        rows = self._epoch_order()[start : start + self.batch_size]
        cached = self.fix_cache.draw(self.batch_size) if self.fix_cache is not None else [None] * self.batch_size
        self.batch += 1
        if self.batch == self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return [
            fix if fix is not None else self.dataset[int(row)]
            for row, fix in zip(rows[self._share], cached[self._share])
        ]

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.dataset)
            rng = np.random.default_rng((self.seed, self.epoch))
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def use_ahead(self) -> None:
        """The batch drawn ahead now belongs to the step training on it."""
        self._before_ahead = None

    def state_dict(self) -> dict[str, Any]:
        """The position (before a batch drawn ahead) and the fix cache (with that batch's draw undone)."""
        position = self._before_ahead or {"epoch": self.epoch, "batch": self.batch}
        fix_cache = None
        if self.fix_cache is not None:
            fix_cache = self.fix_cache.state_dict()
            fix_cache["draws"] -= self._before_ahead is not None  # drawing a batch draws once from the cache
        return {**position, "dataset_size": len(self.dataset), "batch_size": self.batch_size, "fix_cache": fix_cache}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (int(state["dataset_size"]), int(state["batch_size"]))
        if saved != (len(self.dataset), self.batch_size):
            raise KiminaError(
                f"cannot resume the data order: the checkpoint was taken with {saved[0]} prompts in batches of "
                f"{saved[1]}, this run has {len(self.dataset)} prompts in batches of {self.batch_size}"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        if self.fix_cache is not None and state.get("fix_cache") is not None:
            self.fix_cache.load_state_dict(state["fix_cache"])
        self._before_ahead = None


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
    )
