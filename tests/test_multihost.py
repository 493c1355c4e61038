"""Multi-host training on one machine: two processes joined by JAX's multi-controller runtime (gloo collectives, 4
CPU devices each) train the tiny recipe exactly like one process with 8 devices, and their checkpoint restores in
a one-process run. Verifier: the local stand-in (LEAN_SERVER_API_URL unset), which process 0 alone may use.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kimina_jax.run_folder import load_model_for_export
from kimina_jax.parallel import parse_distributed_flags
from tests.lean_harness.server import free_port

REPO = Path(__file__).resolve().parents[1]
# The tiny random model never earns a reward, so advantages are 0; the entropy bonus still gives every update a
# gradient that depends on the sampled tokens and the data-parallel reduction. Validation (spread over the processes
# too) on 6 problems only, to save time.
OVERRIDES = ("algorithm.entropy_coeff=0.01", "trainer.save_freq=2", "data.val.limit=6")
STANDIN_WARNING = "Using the LOCAL STAND-IN verifier"


def _train(run_dir: Path, devices: int, *args: str, lean_url: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": str(REPO)}
    for name in ("LEAN_SERVER_API_URL", "LEAN_SERVER_API_KEY", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                 "JAX_PROCESS_ID"):
        env.pop(name, None)
    if lean_url:
        env["LEAN_SERVER_API_URL"] = lean_url
    return subprocess.Popen([sys.executable, "-m", "kimina_jax.train", "--run-dir", str(run_dir), *OVERRIDES, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(*procs: subprocess.Popen, timeout: float = 600) -> list[str]:
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    return outputs


def _params(step_dir: Path) -> list[np.ndarray]:
    model, _ = load_model_for_export(step_dir)  # the export path: any device count restores it
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return [e.value for e in events.Scalars(tag)]


def _rollouts(run_dir: Path, step: int) -> str:
    return (run_dir / "rollouts" / f"step_{step}.jsonl").read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with 8 devices for 3 steps; two processes with 4 devices each for 2 steps."""
    base = tmp_path_factory.mktemp("multihost")
    one, two = base / "one", base / "two"
    _finish(_train(one, 8, "trainer.total_steps=3"))
    port = free_port()
    launch = ("--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2")
    outputs = _finish(*(_train(two, 4, "trainer.total_steps=2", *launch, "--process-id", str(i)) for i in (0, 1)))
    return one, two, outputs


def test_a_failed_start_check_stops_every_process(tmp_path):
    # Only process 0 talks to the Lean server: the others must learn of its failure, not wait at a barrier.
    down = f"http://127.0.0.1:{free_port()}"
    launch = ("--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2")
    procs = [_train(tmp_path, 4, *launch, "--process-id", str(i), lean_url=down) for i in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=180)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [2, 2], outputs
    for out in outputs:
        assert f"error: the Lean server {down} is unreachable" in out


def test_launch_flags_become_jax_variables():
    argv = ["--config", "tiny", "--coordinator-address", "10.0.0.1:1234", "--num-processes", "4", "--process-id=3",
            "rollout.n=2"]
    assert parse_distributed_flags(argv) == (
        {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
        ["--config", "tiny", "rollout.n=2"],
    )
    assert parse_distributed_flags(["rollout.n=2"]) == ({}, ["rollout.n=2"])


@pytest.mark.slow
def test_two_processes_train_like_one_process(runs):
    one, two, (out_0, out_1) = runs
    for step in (1, 2):  # each process generated its share; process 0 verified and dumped the whole batch
        assert _rollouts(two, step) == _rollouts(one, step)
        assert len(_rollouts(two, step).splitlines()) == 16  # 4 prompts x 4 samples, none twice
    grad_norms = _scalars(two, "actor/grad_norm")
    assert min(grad_norms) > 0
    np.testing.assert_allclose(grad_norms, _scalars(one, "actor/grad_norm")[:2], rtol=1e-4)
    for ours, theirs in zip(_params(two / "checkpoints/2"), _params(one / "checkpoints/2")):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)  # the data-parallel sums' order differs
    # Only process 0 reached the verifier and wrote TensorBoard.
    assert STANDIN_WARNING in out_0 and STANDIN_WARNING not in out_1
    assert len(list((two / "tensorboard").iterdir())) == 1


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    one, two, _ = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    (out,) = _finish(_train(resumed, 8, "trainer.total_steps=3"))
    assert "at step 2" in out
    # Restored weights, optimizer state, data position and RNG: step 3 samples and trains as the uninterrupted run.
    assert _rollouts(resumed, 3) == _rollouts(one, 3)
    for ours, theirs in zip(_params(resumed / "checkpoints/3"), _params(one / "checkpoints/3")):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_processes_with_partial_rollouts_resume_exactly(tmp_path):
    """Partial rollouts across processes: each process trains its share of the groups it generated, process 0
    verifies them all; a checkpoint holds every process's groups in flight, so a two-process resume rolls out
    step 3 as the uninterrupted run, and a resume on another number of processes is refused with a clear error."""
    partial = ("rollout.partial.enabled=true", "rollout.partial.over_provision=1.5")

    def two_processes(run_dir: Path, steps: int) -> list[str]:
        launch = ("--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2")
        return _finish(*(_train(run_dir, 4, f"trainer.total_steps={steps}", *partial, *launch, "--process-id", str(i))
                         for i in (0, 1)))

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    two_processes(straight, 3)
    for step in (1, 2, 3):
        lines = _rollouts(straight, step).splitlines()
        assert len(lines) == 16 and len(set(lines)) == 16  # 4 groups x 4 samples, both processes' shares
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    (resumed / "rollouts" / "step_3.jsonl").unlink()
    out_0, _ = two_processes(resumed, 3)
    assert "at step 2" in out_0
    assert _rollouts(resumed, 3) == _rollouts(straight, 3)
    shutil.rmtree(resumed / "checkpoints" / "3")
    one = _train(resumed, 8, "trainer.total_steps=3", *partial)
    out = one.communicate(timeout=600)[0]
    assert one.returncode == 2 and "the checkpoint holds the groups of 2 processes, this run has 1" in out
