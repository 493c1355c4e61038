"""Evaluation's config: its own `eval` section beside the sections it shares with training (same classes, same
resolution and checks), and the loader that fills in the evaluated run's lengths."""
from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Any, Mapping, Sequence

from kimina_jax.config.loading import (
    apply_overrides,
    config_from_dict,
    convert,
    lookup,
    read_yaml,
    resolve_recipe_path,
    set_dotted,
)
from kimina_jax.config.ranges import Ge, check_ranges
from kimina_jax.config.sections import DatasetConfig, SharedSections
from kimina_jax.errors import KiminaError


@dataclasses.dataclass
class EvalRunConfig:
    """The `eval` section: what only evaluation has. The rest comes from the sections training reads too: sampling
    from `rollout.val`, the engine from `rollout`, lengths and the fix-turn feedback limit from `data`."""

    model: str | None = None  # required: an HF folder, a training run folder (its newest checkpoint) or a step folder
    dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)  # files: one MiniF2F file or Hub name
    split: str | None = "test"  # keep rows whose `split` column has this value (all rows when there is no such column)
    n: Annotated[int, Ge(1)] = 32  # samples per problem
    k: list[Annotated[int, Ge(1)]] = dataclasses.field(default_factory=lambda: [1, 8, 32])  # pass@k / best@k sizes
    error_fix: bool = False  # one fix attempt per failed sample with feedback (SPEC 7)
    out: str = "results"  # output folder; a rerun with the same one resumes
    seed: Annotated[int, Ge(0)] = 0
    batch_problems: Annotated[int, Ge(1)] = 64  # problems per generate call


@dataclasses.dataclass
class EvalConfig(SharedSections):
    """`python -m kimina_jax.evaluate`: the sections it shares with `TrainConfig` (same classes, same resolution and
    checks) and its own `eval` section."""

    eval: EvalRunConfig = dataclasses.field(default_factory=EvalRunConfig)


# What evaluation takes from the saved config of the training run it evaluates, when its own config does not say.
RUN_LENGTHS = ("data.max_prompt_length", "data.max_response_length")


def load_eval_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    run_config: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> EvalConfig:
    """Evaluation's config from a YAML file (a training recipe serves; None: the defaults) and `dotted.key=value`
    overrides. The shared sections are built, resolved and checked as training's (training-only sections are
    checked too, then left out); `run_config` (the evaluated run's saved config) fills in RUN_LENGTHS."""
    recipe = None if path is None else resolve_recipe_path(path)
    source = "<command line>" if recipe is None else str(recipe)
    data = apply_overrides({} if recipe is None else read_yaml(recipe), overrides)
    run = convert(data.pop("eval", None) or {}, EvalRunConfig, "eval", source)
    _check_eval(run, source)
    for key in RUN_LENGTHS:
        saved = lookup(run_config or {}, key)
        if lookup(data, key) is None and saved is not None:
            set_dotted(data, key, saved, f"{key} of the evaluated run")
    shared = config_from_dict(data, env=env, source=source)
    return EvalConfig(
        model=shared.model, data=shared.data, rollout=shared.rollout, verifier=shared.verifier, reward=shared.reward,
        eval=run,
    )


def _check_eval(run: EvalRunConfig, source: str) -> None:
    def fail(message: str) -> None:
        raise KiminaError(f"{source}: {message}")

    if not run.model:
        fail("'eval.model' (--model) is required: an HF folder, a training run folder or a checkpoint step folder")
    if len(run.dataset.files) != 1:
        fail(f"'eval.dataset.files' (--dataset) must name one MiniF2F file or Hub dataset, got {run.dataset.files}")
    if not run.k or min(run.k) < 1:
        fail(f"'eval.k' must be a non-empty list of positive integers, got {run.k}")
    check_ranges(run, "eval", fail)
    if run.n < max(run.k):
        fail(
            f"eval.n: --n {run.n} is smaller than the largest --k ({max(run.k)}): pass@{max(run.k)} needs at least "
            f"{max(run.k)} samples per problem; raise eval.n or drop that k"
        )
