"""Orbax checkpoints of a run: `<run_dir>/checkpoints/<step>/{params,opt_state,rng,loop,config}`.

Beside them, `<run_dir>/model_files/` holds what a step needs to become a Hugging Face folder: the model's
`config.json` and the tokenizer files (written once per run with `write_model_files`).

A step folder exists whole or not at all: orbax writes into a temporary folder and renames it when complete,
so a process killed mid-write leaves the previous checkpoints usable (a `Checkpointer` opened on the run
again removes the leftover temporary folder in the background). Parameters and optimizer state are any pytrees (Flax NNX
`nnx.State`, optax states); restoring against an abstract target (`jax.ShapeDtypeStruct`s with shardings)
places each shard on its device, across hosts too. Every process of a multi-host run must call `save` and
`restore` alike; the JSON items are written by process 0.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from kimina_jax.config import TINY
from kimina_jax.errors import KiminaError

ITEMS = ("params", "opt_state", "rng", "loop", "config")
MODEL_FILES = "model_files"
RUN_RECORDS = ("config.yaml", MODEL_FILES, "checkpoints", "tensorboard", "rollouts")  # what one run writes
# The settings a checkpoint's parameters, optimizer state and data position were made for (dotted prefixes).
RESUME_KEYS = ("model.path", "model.param_dtype", "model.tiny", "data.tokenizer")


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
        self.directory = Path(run_dir).absolute() / "checkpoints"
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


def saved_steps(run_dir: str | os.PathLike) -> list[int]:
    """The steps of the run folder's checkpoints, oldest first (a step folder exists only once written whole)."""
    folder = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit() and p.is_dir())


def step_folder(path: str | os.PathLike, flag: str) -> Path | None:
    """The checkpoint step folder `path` names: itself, or a run folder's newest step; None when it is neither."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        steps = saved_steps(path)
        if not steps:
            raise KiminaError(f"{flag} {path}: the run folder has no checkpoint yet")
        path = path / "checkpoints" / str(steps[-1])
    return path if (path / "params").is_dir() else None


def writable_folder(path: str | os.PathLike, flag: str) -> Path:
    """`path`, created if need be (an output folder: the run's, evaluation's, export's); KiminaError naming `flag`
    and the path when it is a file or cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KiminaError(f"{flag} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KiminaError(f"{flag} {path}: cannot create it ({err.strerror})") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise KiminaError(f"{flag} {path}: not writable")
    return path


def claim_run_dir(run_dir: str | os.PathLike, config: dict, hf_config: dict, resume: str, is_main: bool) -> None:
    """Before a run writes its records into `run_dir`: with `resume` 'never', an earlier run's records are moved to
    `<run_dir>/previous/<UTC time>/` (by process 0); with 'auto', KiminaError naming every setting the newest
    checkpoint depends on (RESUME_KEYS, the model's `config.json`) that `config` / `hf_config` change."""
    run_dir = Path(run_dir)
    steps = saved_steps(run_dir)
    if not steps:
        return
    if resume == "never":
        if is_main:
            aside = run_dir / "previous" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside.mkdir(parents=True)
            for name in RUN_RECORDS:
                if (run_dir / name).exists():
                    (run_dir / name).rename(aside / name)
        return
    saved = load_config_dict(run_dir / "checkpoints" / str(steps[-1]))
    keys = RESUME_KEYS if config["model"]["path"] == TINY else tuple(k for k in RESUME_KEYS if k != "model.tiny")
    was, now = _flat(saved), _flat(config)
    differ = [f"{k}: {was.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(was) | set(now))
              if k.startswith(keys) and was.get(k) != now.get(k)]
    files = run_dir / MODEL_FILES / "config.json"
    if files.is_file():
        was, now = json.loads(files.read_text(encoding="utf-8")), json.loads(json.dumps(hf_config))
        differ += [f"{MODEL_FILES}/config.json {k}: {was.get(k)!r} there, {now.get(k)!r} now"
                   for k in sorted(set(was) & set(now)) if was[k] != now[k]]  # keys of other versions aside
    if differ:
        raise KiminaError(
            f"{run_dir} holds a run (checkpoints up to step {steps[-1]}) made with other settings than this config's: "
            f"{'; '.join(differ)}. Resume with the run's settings, use another --run-dir, or pass trainer.resume=never "
            "to start a new run there (the earlier run's records move to <run_dir>/previous/)"
        )


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def write_model_files(run_dir: str | os.PathLike, hf_config: dict, tokenizer) -> Path:
    """Write the model's HF `config.json` and the tokenizer files to `<run_dir>/model_files` (call on process 0)."""
    folder = Path(run_dir) / MODEL_FILES
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    tokenizer.save_pretrained(str(folder))
    return folder


def load_model_for_export(step_dir: str | os.PathLike):
    """(Qwen3ForCausalLM with the step's parameters, folder holding the tokenizer files) for `kimina_jax.export`.

    The parameters must have been saved as `nnx.state(model, nnx.Param)`; they are restored in the saved
    config's `model.param_dtype`.
    """
    from flax import nnx

    from kimina_jax.models import Qwen3Config, abstract_model
    from kimina_jax.models.hf import to_jax_dtype

    step_dir = Path(step_dir)
    files = step_dir.absolute().parent.parent / MODEL_FILES
    if not (files / "config.json").is_file():
        raise KiminaError(f"'{step_dir}': its run folder has no {MODEL_FILES}/config.json (written as training starts)")
    dtype = to_jax_dtype(load_config_dict(step_dir).get("model", {}).get("param_dtype", "float32"))
    model = abstract_model(Qwen3Config.from_pretrained(files), dtype=dtype, param_dtype=dtype)
    target = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as checkpointer:
        saved = _shapes(checkpointer.metadata(step_dir.absolute() / "params").item_metadata)
    differ = [f"{name}: {saved.get(name)} saved, {shape} in config.json"
              for name, shape in _shapes(nnx.to_pure_dict(target)).items() if saved.get(name) != shape]
    if differ:
        raise KiminaError(f"'{step_dir}': its parameters do not fit {files / 'config.json'} (rewritten by a later "
                          f"run in that folder?): {'; '.join(differ[:5])}")
    nnx.update(model, load_params(step_dir, target))
    return model, files


def _shapes(tree: Any) -> dict[str, tuple]:
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
