"""Checkpoints: Flax NNX / optax state round trips, sharded restore, keep-last-K, and atomicity under SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kimina_jax.checkpoint import Checkpointer, load_config_dict, load_params
from kimina_jax.errors import KiminaError

REPO = Path(__file__).resolve().parents[1]


class TwoLayer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.down = nnx.Linear(16, 8, rngs=rngs)


def train_state(seed: int):
    params = nnx.state(TwoLayer(nnx.Rngs(seed)), nnx.Param)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments and count
    return params, opt_state, tx


def abstract_targets(tx):
    params = nnx.state(nnx.eval_shape(lambda: TwoLayer(nnx.Rngs(0))), nnx.Param)
    return params, jax.eval_shape(tx.init, params)


def trees_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def save_step(ck: Checkpointer, step: int, seed: int) -> tuple:
    params, opt_state, _ = train_state(seed)
    loop = {"data": {"epoch": 0, "batch": step}, "fix_cache": {"draws": step, "prompts": []}}
    ck.save(step, params=params, opt_state=opt_state, rng_key=jax.random.key(seed), loop_state=loop,
            config={"experiment": {"name": "t"}})
    return params, opt_state, loop


def test_round_trip_into_abstract_targets(tmp_path):
    ck = Checkpointer(tmp_path, keep=3)
    params, opt_state, loop = save_step(ck, 5, seed=1)
    ck.wait()
    _, _, tx = train_state(0)
    target_params, target_opt = abstract_targets(tx)
    restored = Checkpointer(tmp_path).restore(params=target_params, opt_state=target_opt, rng_key=jax.random.key(0))
    assert restored.step == 5
    assert isinstance(restored.params, nnx.State)
    assert trees_equal(restored.params, params) and trees_equal(restored.opt_state, opt_state)
    assert type(restored.opt_state[0]).__name__ == type(opt_state[0]).__name__  # optax state classes come back
    assert restored.loop_state == loop and restored.config == {"experiment": {"name": "t"}}
    assert np.array_equal(jax.random.key_data(restored.rng_key), jax.random.key_data(jax.random.key(1)))
    # a restored optimizer state keeps training
    grads = jax.tree.map(jnp.ones_like, restored.params)
    tx.update(grads, restored.opt_state, restored.params)


def test_raw_key_and_params_only(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    params, opt_state, _ = train_state(2)
    ck.save(1, params=params, opt_state=opt_state, rng_key=jax.random.PRNGKey(9), loop_state={}, config={"a": 1})
    ck.wait()
    restored = ck.restore(1, params=params, opt_state=opt_state)
    assert np.array_equal(restored.rng_key, jax.random.PRNGKey(9))
    step_dir = tmp_path / "checkpoints" / "1"
    plain = load_params(step_dir)  # no target: nested dicts of arrays
    assert np.array_equal(plain["up"]["kernel"]["value"], params["up"]["kernel"][...])
    assert trees_equal(load_params(step_dir, params), params)
    assert load_config_dict(step_dir) == {"a": 1}
    with pytest.raises(KiminaError, match="not a checkpoint step folder"):
        load_params(tmp_path)


def test_keeps_last_k_and_reports_steps(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    assert ck.latest_step() is None
    for step in (1, 2, 3):
        save_step(ck, step, seed=step)
    ck.wait()
    assert ck.steps() == [2, 3] and ck.latest_step() == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
    with pytest.raises(KiminaError, match=r"no checkpoint for step 1 .*have: \[2, 3\]"):
        ck.restore(1, params={}, opt_state={})


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (CPU) devices")
def test_restore_places_shards_of_the_target(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    saved_sharding = NamedSharding(mesh, P("fsdp", None))
    params = {"w": jax.device_put(jnp.arange(64.0 * 8).reshape(64, 8), saved_sharding)}
    ck = Checkpointer(tmp_path)
    ck.save(1, params=params, opt_state={"mu": params["w"] * 2}, rng_key=jax.random.key(0), loop_state={}, config={})
    ck.wait()
    other = NamedSharding(mesh, P("data", "fsdp"))  # restore into a different layout
    target = {"w": jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=other)}
    restored = ck.restore(params=target, opt_state={"mu": target["w"]})
    assert restored.params["w"].sharding == other and restored.opt_state["mu"].sharding == other
    assert np.array_equal(restored.params["w"], np.arange(64.0 * 8).reshape(64, 8))
    shard = restored.params["w"].addressable_shards[0]
    assert shard.data.shape == (32, 2)


# ---------------------------------------------------------------------------------------------- SIGKILL
# The child saves step 1 completely, then starts step 2 and is killed with SIGKILL from outside. To kill at a
# known moment, the child may pause orbax's own commit rename (the point at which a step becomes visible):
# "item": at the first rename inside the step (some items written, others not); "step": all data written, the
# step folder not yet renamed into place; "async": no pause, killed right after save() returned while the
# background thread writes.
CHILD = r"""
import sys, time
from pathlib import Path
import jax, jax.numpy as jnp
from kimina_jax.checkpoint import Checkpointer
from orbax.checkpoint._src.path import async_path

run_dir, pause_at = sys.argv[1], sys.argv[2]
ck = Checkpointer(run_dir, keep=5)
ck.save(1, params={"w": jnp.arange(16.0)}, opt_state={"mu": jnp.ones(16)}, rng_key=jax.random.key(1),
        loop_state={"step": 1}, config={"name": "killed"})
ck.wait()

real_rename = async_path.rename
async def paused_rename(src, dst):
    if pause_at == "item" or (pause_at == "step" and Path(dst).name == "2"):
        print("paused", flush=True)
        time.sleep(600)
    return await real_rename(src, dst)
async_path.rename = paused_rename

big = {f"w{i}": jnp.full((4 << 20,), float(i)) for i in range(16)}
ck.save(2, params=big, opt_state={"mu": jnp.zeros(16)}, rng_key=jax.random.key(2), loop_state={"step": 2}, config={})
print("writing", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("pause_at", ["item", "step", "async"])
def test_sigkill_while_saving_leaves_previous_checkpoint_usable(tmp_path, pause_at):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), pause_at], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        wanted = "writing" if pause_at == "async" else "paused"
        for line in child.stdout:
            if line.strip() == wanted:
                break
        else:
            pytest.fail(f"child exited ({child.wait()}) before '{wanted}'")
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    leftovers = [p.name for p in (tmp_path / "checkpoints").rglob("*orbax-checkpoint-tmp*")]
    if pause_at != "async":
        assert leftovers, "the kill should have caught step 2 half-written"
    ck = Checkpointer(tmp_path)
    steps = ck.steps()
    if pause_at != "async":
        assert steps == [1]
    assert 1 in steps
    restored = ck.restore(1, params={"w": jnp.zeros(16)}, opt_state={"mu": jnp.zeros(16)})
    assert np.array_equal(restored.params["w"], np.arange(16.0))
    assert (restored.loop_state, restored.config) == ({"step": 1}, {"name": "killed"})
    if 2 in steps:  # the write finished before the kill: then it is whole
        big = ck.restore(2, params={f"w{i}": jnp.zeros(4 << 20) for i in range(16)}, opt_state={"mu": jnp.zeros(16)})
        assert float(big.params["w15"][-1]) == 15.0
    # Training goes on from there; the half-written leftovers are gone (orbax removes them in the background).
    ck.save(3, params=restored.params, opt_state=restored.opt_state, rng_key=restored.rng_key, loop_state={}, config={})
    ck.wait()
    assert 3 in ck.steps()
    assert not list((tmp_path / "checkpoints").rglob("*orbax-checkpoint-tmp*"))
