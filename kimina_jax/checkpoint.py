"""Orbax checkpoints of a run's training state: `<run_dir>/checkpoints/<step>/{params,opt_state,rng,loop,config}`
(the rest of the run folder is run_folder.py's).

A step folder exists whole or not at all: orbax writes into a temporary folder and renames it when complete,
so a process killed mid-write leaves the previous checkpoints usable (a `Checkpointer` opened on the run
again removes the leftover temporary folder in the background). Parameters and optimizer state are any pytrees (Flax NNX
`nnx.State`, optax states); restoring against an abstract target (`jax.ShapeDtypeStruct`s with shardings)
places each shard on its device, across hosts too. Every process of a multi-host run must call `save` and
`restore` alike; the JSON items are written by process 0.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from kimina_jax.errors import KiminaError

ITEMS = ("params", "opt_state", "rng", "loop", "config")
CHECKPOINTS = "checkpoints"  # the folder of a run folder that holds the step folders


@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any
    rng_key: jax.Array
    loop_state: dict  # what the loop saved: data iterator position, fix cache, ...
    config: dict  # the run's resolved config (secrets excluded)


class Checkpointer:
    """Saves and restores a run's training state; keeps the newest `keep` checkpoints."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = Path(run_dir).absolute() / CHECKPOINTS
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save that was killed
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self, step: int, *, params: Any, opt_state: Any, rng_key: jax.Array, loop_state: dict, config: dict
    ) -> None:
        """Start writing step `step` (in the background when async); `wait()` before the process exits."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            rng=ocp.args.StandardSave({"key_data": _key_data(rng_key)}),
            loop=ocp.args.JsonSave(loop_state),
            config=ocp.args.JsonSave(config),
        )
        self._manager.save(step, args=args, force=True)

    def restore(
        self, step: int | None = None, *, params: Any, opt_state: Any, rng_key: jax.Array | None = None
    ) -> Restored:
        """Restore `step` (default: the latest) into the structure and shardings of the given targets.

        Targets may be concrete arrays or abstract ones (`jax.ShapeDtypeStruct` with `.sharding`).
        `rng_key` (optional) decides whether a typed key (`jax.random.key`) or raw uint32 key data comes back.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise KiminaError(f"no checkpoint for step {step} in {self.directory} (have: {self.steps()})")
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params)),
                opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
                # With a target, placed like `rng_key` (a checkpoint from other devices or processes restores too).
                rng=ocp.args.StandardRestore(None if rng_key is None else _abstract({"key_data": _key_data(rng_key)})),
                loop=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        key = jnp.asarray(out.rng["key_data"])
        if rng_key is not None and jax.dtypes.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key, impl=jax.random.key_impl(rng_key))
        return Restored(step, out.params, out.opt_state, key, dict(out.loop), dict(out.config))

    def wait(self) -> None:
        """Block until a background save has been written and committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def load_params(step_dir: str | os.PathLike, target: Any = None) -> Any:
    """Only the parameters of one checkpoint folder (`<run>/checkpoints/<step>`), e.g. for export.

    Without a target the arrays come back in the saved tree structure (nested dicts). Arrays the target gives no
    sharding (all of them without a target) land on the default device, whichever devices or processes wrote them.
    """
    path = Path(step_dir).absolute() / "params"
    if not path.is_dir():
        raise KiminaError(f"'{step_dir}' is not a checkpoint step folder (no params/ inside)")
    with ocp.StandardCheckpointer() as checkpointer:
        target = checkpointer.metadata(path).item_metadata if target is None else target
        return checkpointer.restore(path, jax.tree.map(_on_default_device_if_unplaced, target))


def saved_param_shapes(step_dir: str | os.PathLike) -> dict[str, tuple]:
    """Parameter name -> shape of one checkpoint's saved parameters, read from its metadata (no array loaded)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return param_shapes(checkpointer.metadata(Path(step_dir).absolute() / "params").item_metadata)


def param_shapes(tree: Any) -> dict[str, tuple]:
    """Parameter name -> shape of a nested dict of arrays (or array metadata, where each sits under a `value` key)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(str(k.key) for k in path if k.key != "value"): tuple(x.shape) for path, x in leaves}


def load_config_dict(step_dir: str | os.PathLike) -> dict:
    """The resolved config saved with a checkpoint (secrets were never saved)."""
    path = Path(step_dir).absolute() / "config"
    if not path.is_dir():
        raise KiminaError(f"'{step_dir}' is not a checkpoint step folder (no config/ inside)")
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        return dict(checkpointer.restore(path))


def _abstract(tree: Any) -> Any:
    """Concrete arrays -> ShapeDtypeStructs with their shardings (so restore allocates nothing twice)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _on_default_device_if_unplaced(leaf: Any) -> jax.ShapeDtypeStruct:
    """An abstract array; without a jax sharding orbax would place it as saved, on devices that may not exist here."""
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _key_data(key: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key
