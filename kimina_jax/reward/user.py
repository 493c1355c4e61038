"""A user's reward function (`reward.function: "package.module:name"` or `"path/to/file.py:name"`, as verl's
custom_reward_function) behind the `RewardFunction` interface.

The function takes a `RewardInput` and returns a float, or a dict with `score` and other float values (the
sample's `extras`; an `acc` entry is its accuracy, else the score is). With `reward.batch` it takes the list of
one prompt's group and returns a list. Either form may be `async def`. Calls run on a background event loop (sync
functions on its small thread pool) as soon as a group is submitted, so scoring overlaps generation as Lean
verification does. A failed call (exception, wrong return, NaN) is logged with the function and the sample and
leaves that sample unverified: out of the loss and of accuracy, never a wrong answer.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kimina_jax.errors import KiminaError
from kimina_jax.reward.base import PendingSample, RewardFunction, RewardInput, wait_all
from kimina_jax.types import Completion, Prompt, Sample, Verdict

log = logging.getLogger(__name__)

WORKERS = 4  # threads for sync functions: enough to overlap I/O-bound calls, few enough to leave the sampler be


def load_user_function(spec: str) -> Callable:
    """The callable `spec` names ("package.module:name" or "path/to/file.py:name"); a KiminaError naming
    `reward.function` when it cannot be loaded."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise KiminaError(
            f"reward.function {spec!r}: expected 'package.module:name' or 'path/to/file.py:name', "
            "or a registered name"
        )
    is_file = target.endswith(".py") or "/" in target
    try:
        module = _load_file(Path(target)) if is_file else importlib.import_module(target)
    except KiminaError:
        raise
    except Exception as err:  # the user's module failed to import: say which key brought it in
        raise KiminaError(f"reward.function {spec!r}: cannot import {target!r}: {err!r}") from err
    if not hasattr(module, name):
        raise KiminaError(f"reward.function {spec!r}: {target!r} has no attribute {name!r}")
    fn = getattr(module, name)
    if not callable(fn):
        raise KiminaError(f"reward.function {spec!r}: {name!r} is a {type(fn).__name__}, not a function")
    return fn


def _load_file(path: Path):
    if not path.is_file():
        raise KiminaError(f"reward.function: no file {str(path)!r}")
    module_name = f"kimina_jax_user_reward_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up there
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass(frozen=True)
class PendingReward(PendingSample):
    """A response whose reward call is running: `result` is its call's; `position` its place in a batch's list
    (None: a per-response call)."""

    result: concurrent.futures.Future
    position: int | None


class UserReward(RewardFunction):
    """Runs a user's reward function `fn` (see the module docstring); `name` identifies it in errors."""

    def __init__(self, fn: Callable, name: str, batch: bool = False):
        self.fn, self.name, self.batch = fn, name, batch
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))
        self._pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="reward")
        self._traceback_logged = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reward-loop", daemon=True)
        self._thread.start()

    def submit(self, prompt: Prompt, completions: Sequence[Completion]) -> list[PendingReward]:
        """Starts the calls for one prompt's group: one per response, or one for the group with `batch`."""
        items = [reward_input(prompt, c) for c in completions]
        if self.batch:
            result = self._start(items)
            return [PendingReward(prompt, c, result, i) for i, c in enumerate(completions)]
        return [PendingReward(prompt, c, self._start(item), None) for c, item in zip(completions, items)]

    def collect(self, pending: Sequence[PendingReward], progress: str | None = None) -> list[Sample]:
        wait_all((p.result for p in pending), progress, unit="call")
        return [self._scored(p) for p in pending]

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._pool.shutdown()

    def _start(self, arg: RewardInput | list[RewardInput]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self._call(arg), self._loop)

    async def _call(self, arg: RewardInput | list[RewardInput]) -> Any:
        if self._is_async:
            value = await self.fn(arg)
        else:
            value = await self._loop.run_in_executor(self._pool, self.fn, arg)
        if isinstance(arg, list) and (not isinstance(value, (list, tuple)) or len(value) != len(arg)):
            raise TypeError(f"a batch function must return a list of {len(arg)} values, got {_describe(value)}")
        return value

    def _scored(self, pending: PendingReward) -> Sample:
        try:
            value = pending.result.result()
            score, acc, extras = reward_values(value if pending.position is None else value[pending.position])
        except Exception as err:  # the user's code: fail this sample, keep the step's others
            return self._failed(pending, err)
        return Sample(pending.prompt, pending.completion, None, score, acc, "", extras=extras)

    def _failed(self, pending: PendingReward, err: Exception) -> Sample:
        message = (f"reward.function {self.name} failed on statement {pending.prompt.statement_id!r}, "
                   f"sample {pending.completion.sample_index}: {err!r}")
        # One traceback to debug the function with; a step can fail hundreds of samples the same way.
        log.error("%s", message, exc_info=None if self._traceback_logged else err)
        self._traceback_logged = True
        return Sample(pending.prompt, pending.completion, Verdict("unverified", error=message), 0.0, 0.0, "")


def reward_input(prompt: Prompt, completion: Completion) -> RewardInput:
    """What the user's function receives for `completion` of `prompt`."""
    return RewardInput(
        data_source=prompt.data_source,
        statement_id=prompt.statement_id,
        messages=prompt.messages,
        response=completion.text,
        response_ids=completion.token_ids,
        extra_info={
            "turn": prompt.turn,
            "formal_statement": prompt.formal_statement,
            "sample_index": completion.sample_index,
            "finish_reason": completion.finish_reason,
        },
    )


def reward_values(value: Any) -> tuple[float, float, dict[str, float]]:
    """(score, acc, extras) from what a user's function returned for one response; TypeError/ValueError if it
    is not a finite number or a dict with a `score` and finite numbers."""
    if not isinstance(value, dict):
        score = _finite("the score", value)
        return score, score, {}
    if "score" not in value:
        raise TypeError(f"a dict return needs a 'score' entry, got keys {sorted(map(str, value))}")
    score = _finite("'score'", value["score"])
    extras = {str(k): _finite(f"{k!r}", v) for k, v in value.items() if k != "score"}
    return score, extras.get("acc", score), extras


def _finite(what: str, value: Any) -> float:
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {_describe(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}")
    return float(value)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:200]
