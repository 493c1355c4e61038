"""Hugging Face folders <-> the Flax Qwen3: load, save and the vLLM weight stream, all by its parameter table."""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimina_jax.errors import KiminaError
from kimina_jax.models.attention import AttentionImpl
from kimina_jax.models.config import Qwen3Config
from kimina_jax.models.qwen3 import Qwen3ForCausalLM, RematPolicy, param_names
from kimina_jax.models.safetensors_io import SafetensorsFile, write_safetensors

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_jax_dtype(dtype) -> jnp.dtype:
    """Accepts 'float32' / 'bfloat16' / 'float16' or a dtype."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise KiminaError(f"dtype {dtype!r} not supported; choose one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


def abstract_model(
    config: Qwen3Config, *, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl: AttentionImpl = "auto",
    remat: RematPolicy = "none",
) -> Qwen3ForCausalLM:
    """The model with shape-only parameters (nothing allocated)."""
    return nnx.eval_shape(
        lambda: Qwen3ForCausalLM(
            config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat,
            rngs=nnx.Rngs(0),
        )
    )


def resolve_model_folder(name_or_path: str | Path) -> Path:
    """A local HF folder as is; otherwise a Hub model name, downloaded (or found in the Hub cache)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja"]
        return Path(snapshot_download(str(name_or_path), allow_patterns=patterns))
    except (OSError, HFValidationError) as err:  # offline, unknown repo, or not a repo name at all
        raise KiminaError(f"model {name_or_path!r}: not a local folder and not downloadable from the Hub ({err})") from err


def _tensor_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise KiminaError(f"{index}: malformed safetensors index ({err})") from err
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        return {name: single for name in SafetensorsFile(single).names}
    raise KiminaError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_hf_checkpoint(
    path: str | Path,
    dtype="float32",
    mesh: jax.sharding.Mesh | None = None,
    *,
    param_dtype=None,
    attention_impl: AttentionImpl = "auto",
    remat: RematPolicy = "none",
) -> Qwen3ForCausalLM:
    """Loads an HF Qwen3 folder, tensor by tensor, placing each parameter with its sharding on `mesh`.

    `dtype` is the compute dtype; parameters are stored in `param_dtype` (default: the same).
    """
    folder = Path(path)
    config = Qwen3Config.from_pretrained(folder)
    dtype = to_jax_dtype(dtype)
    param_dtype = to_jax_dtype(param_dtype or dtype)
    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat)
    graphdef, state = nnx.split(model)
    shardings = _param_shardings(state, mesh)
    flat = dict(nnx.to_flat_state(state))
    files = _tensor_files(folder)
    opened: dict[Path, SafetensorsFile] = {}
    expected = param_names(config)
    for spec in expected:
        file = files.get(spec.hf_name)
        if file is None:
            raise KiminaError(f"{folder}: tensor {spec.hf_name!r} is missing from the checkpoint")
        reader = opened.get(file) or opened.setdefault(file, SafetensorsFile(file))
        if spec.hf_name not in reader.names:
            raise KiminaError(f"{file}: tensor {spec.hf_name!r} is listed in the index but not in the file")
        array = reader.read(spec.hf_name)
        if spec.transpose:
            array = array.T
        target = flat[spec.path]
        if array.shape != target.get_value().shape:
            raise KiminaError(
                f"{file}: tensor {spec.hf_name!r} has shape {tuple(reader.shape(spec.hf_name))}, "
                f"expected {target.get_value().shape[::-1] if spec.transpose else target.get_value().shape} for this config"
            )
        # One host copy at a time: cast this tensor, place it, let it go before reading the next.
        host = np.asarray(array, dtype=param_dtype)
        target.set_value(jax.device_put(host, shardings[spec.path]) if shardings else jnp.asarray(host))
    unused = set(files) - {s.hf_name for s in param_names(config, tied_lm_head=True)}  # a tied folder may hold the head
    if unused:
        log.warning("%s: ignoring %d tensor(s) this architecture does not use, e.g. %s", folder, len(unused),
                    sorted(unused)[:3])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _param_shardings(state: nnx.State, mesh) -> dict | None:
    if mesh is None:
        return None
    from kimina_jax.parallel import param_shardings

    flat = nnx.to_flat_state(param_shardings(state, mesh))
    return {path: v.get_value() if isinstance(v, nnx.Variable) else v for path, v in flat}


def _flat_params(model: Qwen3ForCausalLM) -> dict:
    return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def iter_hf_tensors(
    model: Qwen3ForCausalLM, dtype=None, *, tied_lm_head: bool = False
) -> Iterator[tuple[str, jax.Array]]:
    """Yields (HF name, array in HF layout) one tensor at a time, converted on the arrays' own devices."""
    flat = _flat_params(model)
    for spec in param_names(model.config, tied_lm_head=tied_lm_head):
        value = flat[spec.path].get_value()
        if spec.transpose:
            value = value.T
        yield spec.hf_name, value if dtype is None else value.astype(to_jax_dtype(dtype))


def save_hf_checkpoint(
    model: Qwen3ForCausalLM,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    dtype=None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    generation_config: dict | None = None,
    progress=None,
    tied_lm_head: bool = False,
) -> Path:
    """Writes an HF folder (safetensors, config.json, generation_config.json, tokenizer files).

    Tensors are gathered to the host one at a time; `progress(n_bytes)` is called after each. `tied_lm_head`:
    as for `param_names`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    flat = _flat_params(model)
    names = param_names(config, tied_lm_head=tied_lm_head)
    first_dtype = flat[names[0].path].get_value().dtype
    np_dtype = np.dtype(to_jax_dtype(dtype) if dtype is not None else first_dtype)
    specs = []
    for spec in names:
        shape = flat[spec.path].get_value().shape
        specs.append((spec.hf_name, shape[::-1] if spec.transpose else shape, np_dtype))
    by_name = {s.hf_name: s for s in names}

    def produce(name: str) -> np.ndarray:
        spec = by_name[name]
        value = np.asarray(jax.device_get(flat[spec.path].get_value()))
        array = (value.T if spec.transpose else value).astype(np_dtype)
        if progress is not None:
            progress(array.nbytes)
        return array

    shards = _split_shards(specs, max_shard_bytes)
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], produce)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / file, shard, produce)
            weight_map.update({name: file for name, _, _ in shard})
        total = sum(int(np.prod(s)) * d.itemsize for _, s, d in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config.to_dict(dtype=np_dtype.name), indent=2))
    gen = generation_config or _default_generation_config(config)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


def _split_shards(specs, max_bytes: int) -> list[list]:
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = int(np.prod(spec[1])) * spec[2].itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    return shards + [current]


def _default_generation_config(config: Qwen3Config) -> dict:
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    return {k: v for k, v in gen.items() if v is not None}


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copies the tokenizer files found in `src`; a folder with none of them is an error."""
    src, dst = Path(src), Path(dst)
    found = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not found:
        raise KiminaError(f"{src}: no tokenizer files found (looked for {', '.join(TOKENIZER_FILES)})")
    for name in found:
        if (src / name).resolve() != (dst / name).resolve():
            shutil.copyfile(src / name, dst / name)
    return found
