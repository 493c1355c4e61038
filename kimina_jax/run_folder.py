"""The run folder: what a run writes and where, claiming a folder for a run (resume or set the earlier run aside),
finding its checkpoints' step folders, and the model files that turn a step into a Hugging Face model.

Layout: `config.yaml` (the resolved config), `model_files/` (the model's `config.json` and the tokenizer files,
written once per run), `checkpoints/<step>/` (checkpoint.py), `tensorboard/`, `rollouts/`, and `previous/<UTC
time>/` for the records of earlier runs set aside by `trainer.resume=never`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kimina_jax.checkpoint import CHECKPOINTS, load_config_dict, load_params, param_shapes, saved_param_shapes
from kimina_jax.config import TINY
from kimina_jax.errors import KiminaError

MODEL_FILES = "model_files"
RUN_RECORDS = ("config.yaml", MODEL_FILES, CHECKPOINTS, "tensorboard", "rollouts")  # what one run writes
# The settings a checkpoint's parameters, optimizer state and data position were made for (dotted prefixes).
RESUME_KEYS = ("model.path", "model.param_dtype", "model.tiny", "data.tokenizer")


def saved_steps(run_dir: str | os.PathLike) -> list[int]:
    """The steps of the run folder's checkpoints, oldest first (a step folder exists only once written whole)."""
    folder = Path(run_dir) / CHECKPOINTS
    return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit() and p.is_dir())


def step_folder(path: str | os.PathLike, flag: str) -> Path | None:
    """The checkpoint step folder `path` names: itself, or a run folder's newest step; None when it is neither."""
    path = Path(path)
    if (path / CHECKPOINTS).is_dir():
        steps = saved_steps(path)
        if not steps:
            raise KiminaError(f"{flag} {path}: the run folder has no checkpoint yet")
        path = path / CHECKPOINTS / str(steps[-1])
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
    saved = load_config_dict(run_dir / CHECKPOINTS / str(steps[-1]))
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
    saved = saved_param_shapes(step_dir)
    differ = [f"{name}: {saved.get(name)} saved, {shape} in config.json"
              for name, shape in param_shapes(nnx.to_pure_dict(target)).items() if saved.get(name) != shape]
    if differ:
        raise KiminaError(f"'{step_dir}': its parameters do not fit {files / 'config.json'} (rewritten by a later "
                          f"run in that folder?): {'; '.join(differ[:5])}")
    nnx.update(model, load_params(step_dir, target))
    return model, files
