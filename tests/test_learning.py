"""The loop learns: `configs/learn_demo.yaml` (tiny random Qwen3, synthetic reward) raises its score from the
base rate (about 0.2) to nearly 1 in 20 steps, through the real loop (sampler, advantages, packing, old log-probs,
updates, weight sync), synchronously, one step off-policy, with vLLM as the engine, with partial rollouts on
(vLLM's continued samples: tests/test_rollout_vllm_partial.py), and with verl's gspo and cispo losses. A sign
error in the advantages, the loss or the weight sync makes the score fall or stay flat instead."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.vllm_support import VLLM_ENV, requires_vllm

pytestmark = pytest.mark.slow

VLLM_ON_CPU = ["rollout.engine=vllm", "rollout.vllm.dtype=float32", "rollout.vllm.enforce_eager=true",
               f"rollout.vllm.kv_cache_bytes={64 << 20}", "rollout.vllm.enable_sleep_mode=false"]


def learn(tmp_path, *overrides: str) -> tuple[list[float], float]:
    """The per-step `critic/score/mean` of a learn_demo run, and its wall time."""
    env = {**os.environ, **VLLM_ENV, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    env.pop("LEAN_SERVER_API_URL", None)  # the synthetic reward needs no Lean server
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kimina_jax.train", "--config", "configs/learn_demo.yaml", "--run-dir",
         str(tmp_path / "run"), "logging.progress_bars=false", *overrides],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return [e.value for e in events.Scalars("critic/score/mean")], time.perf_counter() - start


@pytest.mark.parametrize("overrides", [
    pytest.param([], id="synchronous"),
    pytest.param(["algorithm.off_policy=true"], id="off-policy"),
    pytest.param(VLLM_ON_CPU, id="vllm", marks=requires_vllm),
    pytest.param(["rollout.partial.enabled=true"], id="partial"),
    pytest.param(["algorithm.policy_loss=gspo"], id="gspo"),
    pytest.param(["algorithm.policy_loss=cispo"], id="cispo"),
])
def test_the_loop_learns(tmp_path, overrides):
    scores, wall_s = learn(tmp_path, *overrides)
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    print(f"score: first 3 steps {first:.2f}, last 3 steps {last:.2f}, {wall_s:.0f} s")
    assert len(scores) == 20
    assert first <= 0.4 and last >= 0.8, scores
