"""Reading a config: YAML files, dotted command-line overrides, type conversion against the sections'
annotations, derived values filled in, then the checks; and writing the resolved config back as YAML."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from kimina_jax.config.checks import check_config
from kimina_jax.config.sections import ENV_KEY, ENV_URL, TrainConfig, uses_lean
from kimina_jax.errors import KiminaError
from kimina_jax.urls import redact_url

RECIPE_DIR = Path(__file__).parents[1] / "configs"
DEFAULT_RECIPE = "tiny"


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list (items: {_describe(typing.get_args(tp)[0])})"
    if origin is dict:
        return f"a mapping (values: {_describe(typing.get_args(tp)[1])})"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {type(None): "null", bool: "a bool", int: "an int", float: "a number", str: "a string"}.get(tp, str(tp))


def convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (sections built recursively)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise KiminaError(f"{source}: '{key}' must be a mapping (section), got {value!r}")
        return _build(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return convert(value, arg, key, source)
            except KiminaError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, Mapping):
            _, item_tp = typing.get_args(tp)
            return {str(k): convert(v, item_tp, f"{key}.{k}", source) for k, v in value.items()}
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) reads `2e-6` as a string; accept what is plainly a number.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise KiminaError(f"{source}: '{key}' must be {_describe(tp)}, got {value!r}")


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise KiminaError(_unknown_key_message(key, name, list(fields), source))
        if fields[name].metadata.get("secret"):
            raise KiminaError(f"{source}: '{key}' cannot be set in a config; set ${ENV_KEY} in the environment")
        if "derived_from" in fields[name].metadata:
            continue  # compared with the value it derives from, in _resolve
        kwargs[name] = convert(value, hints[name], key, source)
    return cls(**kwargs)


def _unknown_key_message(key: str, name: str, allowed: list[str], source: str) -> str:
    close = difflib.get_close_matches(str(name), allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{source}: unknown key '{key}'{hint}; allowed keys here: {', '.join(allowed)}"


def lookup(data: Mapping[str, Any], dotted: str) -> Any:
    """`data["a"]["b"]` for "a.b"; None when a key is missing."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML scalars/flow) to a raw config mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise KiminaError(f"override '{item}' must look like dotted.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise KiminaError(f"override '{item}': the value is not valid YAML: {_yaml_error(exc)}") from None
        set_dotted(data, key, value, f"override '{item}'")
    return data


def _yaml_error(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: where, then what."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + (getattr(exc, "problem", None) or " ".join(str(exc).split()))


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file's content; an unreadable or binary file is one error naming it (and the line)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KiminaError(f"cannot read {what} {path}: {exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise KiminaError(
            f"{path}:{line}: the {what} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})"
        ) from None


def set_dotted(data: dict[str, Any], key: str, value: Any, what: str) -> None:
    """Set `dotted.key` of a raw config mapping, making the sections on the way."""
    node = data
    *parents, last = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise KiminaError(f"{what}: '{part}' is not a section")
        node = child
    node[last] = value


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(read_text(path, "config"))
    except yaml.YAMLError as exc:
        raise KiminaError(f"{path}: not valid YAML: {_yaml_error(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KiminaError(f"{path}: the top level must be a mapping of sections")
    return data


def resolve_recipe_path(name_or_path: str | os.PathLike | None) -> Path:
    """A YAML path, or the name of a recipe shipped in the package (`tiny`, `kimina_prover_1.7B`, ...)."""
    if name_or_path is None:
        name_or_path = DEFAULT_RECIPE
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPE_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if shipped.exists():
        return shipped
    available = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
    raise KiminaError(f"config '{name_or_path}' is neither a file nor a shipped recipe ({available})")


def config_from_dict(
    data: Mapping[str, Any], *, env: Mapping[str, str] | None = None, source: str = "<config>"
) -> TrainConfig:
    """Build, resolve derived values and check a config from a raw mapping (as read from YAML)."""
    env = os.environ if env is None else env
    cfg = _build(TrainConfig, data, "", source)
    _resolve(cfg, data, env, source)
    check_config(cfg, source)
    return cfg


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    run_dir: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    needs_verifier: bool = True,
) -> TrainConfig:
    """Read a recipe (a path or a shipped recipe name; default `tiny`), apply overrides and `--run-dir`.
    `needs_verifier=False`: a Lean recipe without a server configured is accepted (planning runs no step)."""
    recipe = resolve_recipe_path(path)
    data = apply_overrides(read_yaml(recipe), overrides)
    if run_dir is not None:
        data.setdefault("trainer", {})["run_dir"] = str(run_dir)
    env = os.environ if env is None else env
    cfg = config_from_dict(data, env=env, source=str(recipe))
    if needs_verifier and uses_lean(cfg) and not cfg.verifier.url:
        raise KiminaError(
            f"{recipe}: verifier.kind is 'lean' but no server is configured: set ${ENV_URL} "
            "(e.g. http://localhost after launch/lean_server.sh)"
        )
    return cfg


def parse_cli(argv: Sequence[str] | None = None, description: str = "") -> TrainConfig:
    """The command line shared by the entry points: `--config`, `--run-dir` and `dotted.key=value` overrides.

    With no `--config`, the `tiny` recipe shipped inside the package is used.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config", default=None, help=f"recipe YAML or shipped recipe name (default: {DEFAULT_RECIPE})"
    )
    parser.add_argument("--run-dir", default=None, help="run folder (default: runs/<experiment.name>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rollout.n=4 data.train_batch_size=8")
    args = parser.parse_intermixed_args(argv)  # flags and overrides in any order
    return load_config(args.config, args.overrides, run_dir=args.run_dir)


def _resolve(cfg: TrainConfig, data: Mapping[str, Any], env: Mapping[str, str], source: str) -> None:
    derived = {
        "rollout.max_tokens": cfg.data.max_response_length,
        "algorithm.loss_norm_length": cfg.data.max_response_length,
    }
    for key, value in derived.items():
        given = lookup(data, key)
        if given is not None and given != value:
            raise KiminaError(
                f"{source}: '{key}' is derived from data.max_response_length ({value}); got {given!r}. "
                "Set data.max_response_length instead."
            )
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)

    full_length = cfg.data.max_prompt_length + cfg.data.max_response_length
    if cfg.data.tokenizer is None:
        cfg.data.tokenizer = cfg.model.path
    if cfg.rollout.vllm.max_model_len is None:
        cfg.rollout.vllm.max_model_len = full_length
    if cfg.algorithm.pack_length is None:
        cfg.algorithm.pack_length = full_length
    if cfg.verifier.url is None:
        cfg.verifier.url = env.get(ENV_URL) or None
    cfg.verifier.api_key = env.get(ENV_KEY) or None
    if cfg.verifier.kind == "auto":
        cfg.verifier.kind = "lean" if cfg.verifier.url else "standin"


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data, secrets left out (credentials inside URLs too: they come from the environment)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("secret"):
            continue
        value = getattr(cfg, f.name)
        out[f.name] = config_to_dict(value) if dataclasses.is_dataclass(value) else _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return redact_url(value)


def save_resolved(cfg: TrainConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config to `<run_dir>/config.yaml` (no secrets, URLs without their credentials); it loads
    back with `load_config`."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    path.write_text("# Resolved config of this run (secrets excluded).\n" + text, encoding="utf-8")
    return path
