"""Reading a run folder: the scalars of its TensorBoard event files and its resolved `config.yaml`."""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml


@dataclasses.dataclass(frozen=True)
class Series:
    """One scalar of one run: increasing steps, one value each."""

    steps: np.ndarray
    values: np.ndarray


@dataclasses.dataclass(frozen=True)
class Run:
    """A training run folder; `name` labels it in legends and tables."""

    path: Path
    name: str
    scalars: dict[str, Series]
    config: dict[str, Any]

    def tags(self, pattern: str) -> list[str]:
        """The scalar names that match `pattern` whole, sorted."""
        regex = re.compile(pattern)
        return sorted(tag for tag in self.scalars if regex.fullmatch(tag))

    def last(self, tag: str) -> tuple[int, float] | None:
        """(step, value) of the last step logged for `tag`."""
        series = self.scalars.get(tag)
        return None if series is None else (int(series.steps[-1]), float(series.values[-1]))

    @property
    def steps_reached(self) -> int | None:
        return max((int(s.steps[-1]) for s in self.scalars.values()), default=None)


def has_events(run_dir: Path) -> bool:
    return any((run_dir / "tensorboard").glob("*tfevents*"))


def read_scalars(logdir: Path) -> dict[str, Series]:
    """Every scalar in `logdir`'s event files. A resumed run logs some steps again: the last value written wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}  # files and events in write order
        steps = sorted(by_step)
        out[tag] = Series(np.array(steps, dtype=np.int64), np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def read_config(run_dir: Path) -> dict[str, Any]:
    """`config.yaml` as a dict; {} when the run has none. Raises ValueError when it is not a YAML mapping."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e.__class__.__name__})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return config


def load_run(run_dir: Path, note: Callable[[str], None] = print) -> Run | None:
    """The run in `run_dir`, None when it has no event files. An unreadable config is noted and left empty."""
    if not has_events(run_dir):
        return None
    try:
        config = read_config(run_dir)
    except ValueError as e:
        note(f"{run_dir}: config summary left empty: {e}")
        config = {}
    return Run(run_dir, run_dir.resolve().name, read_scalars(run_dir / "tensorboard"), config)


def label_runs(runs: Sequence[Run]) -> list[Run]:
    """Runs whose folder names collide are named by their paths instead."""
    names = [run.name for run in runs]
    return [run if names.count(run.name) == 1 else dataclasses.replace(run, name=str(run.path)) for run in runs]


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average with weight `weight` on the past, debiased (divided
    by 1 - weight^n) so that the first points are not pulled towards 0; non-finite values pass through."""
    if weight <= 0:
        return np.asarray(values, dtype=np.float64)
    out = np.empty(len(values))
    last, count = 0.0, 0
    for i, value in enumerate(values):
        if not math.isfinite(value):
            out[i] = value
            continue
        last = last * weight + (1 - weight) * value
        count += 1
        out[i] = last / (1 - weight**count)
    return out
