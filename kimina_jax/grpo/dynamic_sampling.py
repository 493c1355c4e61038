"""DAPO's dynamic sampling (verl's `algorithm.filter_groups`): a step trains only on groups with a reward signal."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from kimina_jax.grpo.advantages import informative_groups
from kimina_jax.types import Sample


class GroupFilter:
    """The informative groups of one step's generation batches, in the order they were generated.

    `add` takes one generation batch's scored samples (prompt-major, `n` per prompt) and keeps the groups whose
    `metric` ("score" or "acc") is not equal over all their verified samples; unverified samples are not judged,
    and a group with fewer than 2 verified samples is dropped (verl keeps a group of one; its advantage is 0 here).
    The step is `full` once `groups_wanted` groups are kept; `samples()` gives the first `groups_wanted` of them,
    dropping the surplus as verl does. Counts cover every group generated: `all_pass` / `all_fail` are the dropped
    groups whose common value is > 0 / <= 0 (for the Lean reward: all solved / none solved).
    """

    def __init__(self, metric: str, n: int, groups_wanted: int):
        self.metric, self.n, self.groups_wanted = metric, n, groups_wanted
        self.gen_batches = self.all_pass = self.all_fail = 0
        self._kept: list[Sequence[Sample]] = []

    @property
    def kept(self) -> int:
        """Groups the step trains on so far."""
        return min(len(self._kept), self.groups_wanted)

    @property
    def full(self) -> bool:
        return len(self._kept) >= self.groups_wanted

    def add(self, samples: Sequence[Sample]) -> None:
        self.gen_batches += 1
        groups = len(samples) // self.n
        judged = np.array([s.is_verified for s in samples], bool)
        group_ids = (np.arange(len(samples)) // self.n)[judged]
        values = np.array([getattr(s, self.metric) for s in samples], np.float64)[judged]
        informative = np.zeros(groups, bool)
        informative[group_ids[informative_groups(values, group_ids)]] = True
        best = np.full(groups, -np.inf)  # a dropped group's common value; -inf: no verified sample
        np.maximum.at(best, group_ids, values)
        dropped = ~informative & np.isfinite(best)
        self.all_pass += int(np.sum(dropped & (best > 0)))
        self.all_fail += int(np.sum(dropped & (best <= 0)))
        self._kept += [samples[g * self.n : (g + 1) * self.n] for g in np.flatnonzero(informative)]

    def samples(self) -> list[Sample]:
        return [sample for group in self._kept[: self.groups_wanted] for sample in group]

    def metrics(self) -> dict[str, float]:
        return {
            "filter_groups/all_pass": float(self.all_pass),
            "filter_groups/all_fail": float(self.all_fail),
            "filter_groups/kept": float(self.kept),
            "filter_groups/gen_batches": float(self.gen_batches),
        }
