"""Config: recipes load with SPEC 10 numbers; typos, bad types and impossible combinations give one clear error."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import annotated_types
import pytest
import yaml

from kimina_jax.config import (
    POLICY_LOSS_NAMES,
    POLICY_LOSS_OPTIONS,
    policy_loss_options,
    RECIPE_DIR,
    EvalRunConfig,
    TrainConfig,
    config_to_dict,
    load_config,
    load_eval_config,
    parse_cli,
    save_resolved,
    validate_for_devices,
)
from kimina_jax.config.ranges import range_of
from kimina_jax.errors import KiminaError

REPO = Path(__file__).resolve().parents[1]
LEAN_ENV = {"LEAN_SERVER_API_URL": "http://localhost"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("recipe", "model", "batch", "mini", "prompt_len", "response_len", "error_fix", "val_first", "limit"),
    [
        ("kimina_prover_1.7B", "AI-MO/Kimina-Prover-Distill-1.7B", 256, 32, 8192, 24576, True, True, None),
        ("kimina_prover_0.6B", "AI-MO/Kimina-Prover-Distill-0.6B", 256, 32, 8192, 24576, True, True, None),
        ("dry_run", "AI-MO/Kimina-Prover-Distill-1.7B", 8, 8, 1684, 6508, False, False, 8),
    ],
)
def test_recipes_have_spec_numbers(recipe, model, batch, mini, prompt_len, response_len, error_fix, val_first, limit):
    cfg = load_config(recipe, env=LEAN_ENV)
    assert cfg.model.path == model
    assert (cfg.data.train_batch_size, cfg.algorithm.ppo_mini_batch_size, cfg.rollout.n) == (batch, mini, 8)
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (prompt_len, response_len)
    assert cfg.rollout.max_tokens == cfg.algorithm.loss_norm_length == response_len
    assert cfg.data.error_fix.enabled is error_fix
    assert (cfg.data.error_fix.rate, cfg.data.error_fix.cache_size) == (0.5, 5000)
    assert cfg.trainer.val_before_train is val_first
    assert (cfg.trainer.save_freq, cfg.trainer.test_freq, cfg.trainer.total_epochs) == (5, 5, 15)
    assert cfg.data.train.limit == cfg.data.val.limit == limit
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (2e-6, 0.01, 1.0)
    assert (cfg.algorithm.clip_low, cfg.algorithm.clip_high, cfg.algorithm.clip_c) == (0.2, 0.3, 3.0)
    assert cfg.algorithm.loss_agg_mode == "seq-mean-token-sum-norm" and not cfg.algorithm.norm_adv_by_std
    assert (cfg.rollout.val.n, cfg.rollout.val.temperature, cfg.rollout.val.top_p) == (8, 1.0, 0.95)
    assert (cfg.rollout.vllm.gpu_memory_utilization, cfg.rollout.vllm.tensor_parallel_size) == (0.6, 1)
    assert (cfg.verifier.kind, cfg.verifier.url, cfg.verifier.timeout_s) == ("lean", "http://localhost", 60.0)
    assert (cfg.verifier.batch_size, cfg.verifier.max_in_flight, cfg.verifier.retries) == (8, 40, 3)


def test_real_recipe_needs_lean_server_url():
    with pytest.raises(KiminaError, match="LEAN_SERVER_API_URL"):
        load_config("kimina_prover_1.7B", env={})


def test_tiny_verifier_follows_environment():
    assert load_config(env={}).verifier.kind == "standin"
    cfg = load_config("tiny", env={"LEAN_SERVER_API_URL": "http://lean:8000"})
    assert (cfg.verifier.kind, cfg.verifier.url) == ("lean", "http://lean:8000")


def test_tiny_is_the_shipped_default_and_repo_configs_are_the_same_files():
    cfg = load_config(None, env={})
    assert (cfg.model.path, cfg.data.tokenizer, cfg.rollout.engine) == ("tiny", "tiny", "jax")
    assert cfg.data.train.files == ["bundled:train.jsonl"]
    shipped = sorted(p.name for p in RECIPE_DIR.glob("*.yaml"))
    assert shipped == ["dry_run.yaml", "kimina_prover_0.6B.yaml", "kimina_prover_1.7B.yaml",
                       "kimina_prover_1.7B_dapo.yaml", "learn_demo.yaml", "tiny.yaml"]
    assert sorted(p.name for p in (REPO / "configs").glob("*.yaml")) == shipped
    assert load_config(REPO / "configs" / "tiny.yaml", env={}) == cfg


def test_overrides_and_run_dir():
    cfg = load_config(
        "tiny",
        ["rollout.n=2", "data.train.files=[a.jsonl, b.parquet]", "optim.lr=3e-5", "data.val.where={split: test}"],
        run_dir="/tmp/somewhere",
        env={},
    )
    assert cfg.rollout.n == 2
    assert cfg.data.train.files == ["a.jsonl", "b.parquet"]
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.data.val.where == {"split": "test"}
    assert cfg.run_dir == Path("/tmp/somewhere")
    assert load_config("tiny", env={}).run_dir == Path("runs/tiny")


def test_parse_cli():
    cfg = parse_cli(["--config", "tiny", "--run-dir", "r", "rollout.n=3"])
    assert (cfg.rollout.n, cfg.trainer.run_dir) == (3, "r")


def test_typo_in_key_names_key_and_allowed_keys(tmp_path):
    with pytest.raises(KiminaError) as err:
        load_config("tiny", ["rollout.temprature=0.5"], env={})
    message = str(err.value)
    assert "'rollout.temprature'" in message and "did you mean 'temperature'" in message
    assert "engine, n, temperature, top_p" in message

    with pytest.raises(KiminaError, match=r"unknown key 'trainr'.*allowed keys here: model, data, rollout, verifier, reward, experiment"):
        load_config(write(tmp_path, "trainr: {save_freq: 1}\n"), env=LEAN_ENV)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["algorithm.ppo_mini_batch_size=3"], r"ppo_mini_batch_size \(3\) must divide data.train_batch_size \(4\)"),
        (["data.error_fix.rate=1.5"], r"'data.error_fix.rate' must be in \[0, 1\]"),
        (["rollout.n=0"], r"'rollout.n' must be > 0"),
        (["rollout.jax.kv_cache_bytes=0"], r"'rollout.jax.kv_cache_bytes' must be > 0"),
        (["rollout.vllm.max_model_len=100"], r"max_model_len \(100\) is below max prompt \+ response length \(576\)"),
        (["mesh.data=-1", "mesh.fsdp=-1"], r"at most one mesh axis may be -1"),
        (["rollout.engine=vllm-server"], r"rollout.servers.urls is empty"),
        (["rollout.max_tokens=99"], r"'rollout.max_tokens' is derived from data.max_response_length \(64\)"),
        (["model.tiny.head_dim=16"], r"'model.tiny.head_dim' must be >= 32"),
        (["model.tiny.num_key_value_heads=3"], r"heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
        (["model.path=/models/qwen3", "verifier.url=http://lean"], r"data.tokenizer 'tiny' only fits model.path"),
        (["model.path=/models/qwen3", "data.tokenizer=null", "verifier.kind=standin"], r"'standin' is only for"),
    ],
)
def test_impossible_combinations(overrides, expected):
    with pytest.raises(KiminaError, match=expected):
        load_config("tiny", overrides, env={})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("rollout.n=four", r"'rollout.n' must be an int, got 'four'"),
        ("data.filter_overlong_prompts=3", r"'data.filter_overlong_prompts' must be a bool, got 3"),
        ("rollout.engine=vlm", r"'rollout.engine' must be one of 'jax', 'vllm', 'vllm-server', got 'vlm'"),
        ("data.train.files=x.jsonl", r"'data.train.files' must be a list \(items: a string\), got 'x.jsonl'"),
        ("rollout.vllm=3", r"'rollout.vllm' must be a mapping"),
        ("optim.lr=fast", r"'optim.lr' must be a number, got 'fast'"),
        ("trainer.total_steps=1.5", r"'trainer.total_steps' must be an int or null, got 1.5"),
        ("optim.grad_clip=-1", r"'optim.grad_clip' must be > 0 \(the global-norm bound\), got -1.0$"),
        ("optim.grad_clip=0", r"'optim.grad_clip' must be > 0 .*got 0.0$"),
        ("optim.lr=.inf", r"'optim.lr' must be a finite number, got inf$"),
        ("optim.lr=.nan", r"'optim.lr' must be a finite number, got nan$"),
        ("optim.eps=0", r"'optim.eps' must be > 0, got 0.0$"),
        ("optim.b1=1.5", r"'optim.b1' must be in \[0, 1\), got 1.5$"),
        ("optim.b2=1", r"'optim.b2' must be in \[0, 1\), got 1.0$"),
        ("optim.weight_decay=-5", r"'optim.weight_decay' must be >= 0, got -5.0$"),
        ("optim.warmup_steps=-1", r"'optim.warmup_steps' must be >= 0, got -1$"),
        ("optim.min_lr_ratio=1.5", r"'optim.min_lr_ratio' must be in \[0, 1\], got 1.5$"),
        ("algorithm.clip_low=-0.5", r"'algorithm.clip_low' must be in \[0, 1\), got -0.5$"),
        ("algorithm.clip_high=-0.1", r"'algorithm.clip_high' must be >= 0, got -0.1$"),
        ("algorithm.clip_c=1", r"'algorithm.clip_c' must be > 1 \(verl's clip_ratio_c, .*\), got 1.0$"),
        ("algorithm.kl.coef=-1", r"'algorithm.kl.coef' must be >= 0, got -1.0$"),
        ("algorithm.entropy_coeff=-0.1", r"'algorithm.entropy_coeff' must be >= 0, got -0.1$"),
        ("rollout.top_k=-2", r"'rollout.top_k' must be >= -1 \(-1 or 0: off\), got -2$"),
        ("rollout.val.top_p=0", r"'rollout.val.top_p' must be in \(0, 1\], got 0.0$"),
        ("rollout.temperature=.inf", r"'rollout.temperature' must be a finite number, got inf$"),
        ("trainer.total_epochs=-3", r"'trainer.total_epochs' must be > 0, got -3$"),
        ("trainer.peak_tflops_per_device=0", r"'trainer.peak_tflops_per_device' must be > 0 .*got 0.0$"),
        ("verifier.retries=-1", r"'verifier.retries' must be >= 0, got -1$"),
        ("verifier.timeout_s=.inf", r"'verifier.timeout_s' must be a finite number, got inf$"),
        ("model.tiny.hidden_size=-64", r"'model.tiny.hidden_size' must be > 0, got -64$"),
        ("model.tiny.num_hidden_layers=0", r"'model.tiny.num_hidden_layers' must be > 0, got 0$"),
        ("model.tiny.vocab_size=0", r"'model.tiny.vocab_size' must be > 0 \(null: the tokenizer's size\), got 0$"),
        ("model.tiny.rope_theta=-1", r"'model.tiny.rope_theta' must be > 0, got -1.0$"),
        ("model.tiny.rms_norm_eps=0", r"'model.tiny.rms_norm_eps' must be > 0, got 0.0$"),
        ("mesh.tensor=0", r"'mesh.tensor' must be -1 or > 0 \(-1: all remaining devices\), got 0$"),
        ("data.train.limit=0", r"'data.train.limit' must be > 0 \(null: all rows\), got 0$"),
        ("reward.format.min_coverage=2", r"'reward.format.min_coverage' must be in \[0, 1\], got 2.0$"),
        ("experiment.seed=-1", r"'experiment.seed' must be >= 0, got -1$"),
    ],
)
def test_bad_value_names_the_key_and_what_is_allowed(override, expected):
    with pytest.raises(KiminaError, match=expected):
        load_config("tiny", [override], env={})


def test_top_k_zero_is_off_as_in_vllm():
    assert load_config("tiny", ["rollout.top_k=0", "rollout.val.top_k=-1"], env={}).rollout.top_k == 0


def _numeric_keys(cls, prefix=""):
    """(dotted key, section class, field name, annotation with its metadata) of every numeric key, recursively."""
    for name, tp in typing.get_type_hints(cls, include_extras=True).items():
        plain = typing.get_type_hints(cls)[name]
        args = {plain, *typing.get_args(plain), *(a for arg in typing.get_args(plain) for a in typing.get_args(arg))}
        if dataclasses.is_dataclass(plain):
            yield from _numeric_keys(plain, f"{prefix}{name}.")
        elif typing.get_origin(plain) is dict:
            continue  # algorithm.policy_loss_options: each loss's ranges are in POLICY_LOSS_OPTIONS (next test)
        elif {int, float} & args:
            yield f"{prefix}{name}", cls, name, tp


def _declared_constraints(tp):
    """The annotated-types constraints written on an annotation, inside `X | None` and `list[X]` too."""
    if typing.get_origin(tp) is typing.Annotated:
        return [m for m in tp.__metadata__ if isinstance(m, annotated_types.BaseMetadata)
                or isinstance(m, annotated_types.GroupedMetadata)]
    return [m for arg in typing.get_args(tp) for m in _declared_constraints(arg)]


NUMERIC_KEYS = [*_numeric_keys(TrainConfig), *_numeric_keys(EvalRunConfig, "eval.")]


def test_every_numeric_key_declares_its_range_where_it_is_declared():
    undeclared = [key for key, _, _, tp in NUMERIC_KEYS if not _declared_constraints(tp)]
    assert len(NUMERIC_KEYS) > 90 and undeclared == []


def _settable(cls, name):
    return "derived_from" not in {f.name: f for f in dataclasses.fields(cls)}[name].metadata


@pytest.mark.parametrize("key", [key for key, cls, name, _ in NUMERIC_KEYS if _settable(cls, name)])
def test_every_declared_range_is_enforced_naming_the_key(key):
    _, cls, name, _ = next(entry for entry in NUMERIC_KEYS if entry[0] == key)
    allowed = range_of(cls, name)
    integral = "int" in str(typing.get_type_hints(cls)[name])
    bad = next(v for v in (-2, 0, 0.5, 1, 1.5, 16, -1e9, 1e9) if not allowed.allows(v) and (v == int(v) or not integral))
    if key.startswith("eval."):
        value = f"[{bad}]" if key == "eval.k" else bad
        with pytest.raises(KiminaError, match=f"'{re.escape(key)}' must be "):
            load_eval_config(None, ["eval.model=m", "eval.dataset.files=[d.jsonl]", f"{key}={value}"], env={})
        return
    overrides = [f"{key}={bad}"]
    if key == "algorithm.rollout_correction.rollout_rs_threshold":
        overrides.append("algorithm.rollout_correction.rollout_rs=token_k2")
    with pytest.raises(KiminaError, match=f"'{re.escape(key)}' must be "):
        load_config("tiny", overrides, env={})


def test_every_policy_loss_option_has_a_default_and_a_range():
    assert set(POLICY_LOSS_OPTIONS) <= set(POLICY_LOSS_NAMES)
    for name, options in POLICY_LOSS_OPTIONS.items():
        assert policy_loss_options(name, {}) == {option: default for option, (default, _) in options.items()}
        for option, (default, allowed) in options.items():
            with pytest.raises(KiminaError, match=f"'algorithm.policy_loss_options.{option}' must be"):
                load_config(overrides=[f"algorithm.policy_loss={name}", f"algorithm.policy_loss_options.{option}=nan"
                                       if allowed == "finite" else f"algorithm.policy_loss_options.{option}=-1"],
                            env=LEAN_ENV)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
def test_every_shipped_recipe_loads(recipe):
    load_config(recipe, env=LEAN_ENV)


def test_the_originals_recipes_train_at_its_gradient_scale():
    """The recipes of Kimina-Prover-RL's runs carry its micro-batch size per GPU (2) as `algorithm.loss_scale`;
    the demos keep the plain SPEC 3 loss (issue 31)."""
    scales = {recipe: load_config(recipe, env=LEAN_ENV).algorithm.loss_scale
              for recipe in sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))}
    assert scales == {"dry_run": 2.0, "kimina_prover_0.6B": 2.0, "kimina_prover_1.7B": 2.0,
                      "kimina_prover_1.7B_dapo": 2.0, "learn_demo": 1.0, "tiny": 1.0}


def _train_error(capsys, argv):
    from kimina_jax.train import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_inputs_end_in_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LEAN_SERVER_API_URL", raising=False)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"optim:\n  lr: 1\n\x89PNG\x00\xff\xfe")
    assert f"{binary}:3: the config is not UTF-8 text" in _train_error(capsys, ["--config", str(binary)])
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"optim: {lr: 1}\n\x00\x01")
    assert f"{nul}: not valid YAML: unacceptable character" in _train_error(capsys, ["--config", str(nul)])
    err = _train_error(capsys, ["rollout.n=[1,"])
    assert "override 'rollout.n=[1,': the value is not valid YAML: line 1, column 4: expected the node content" in err
    assert "'model.tiny.hidden_size' must be > 0" in _train_error(capsys, ["model.tiny.hidden_size=-64"])


def test_non_utf8_data_file_ends_in_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LEAN_SERVER_API_URL", raising=False)
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"uuid": "a", "problem": "p", "formal_statement": "theorem x : True := by"}\n{"uuid": "\xe9"}\n')
    err = _train_error(capsys, ["--run-dir", str(tmp_path / "run"), f"data.train.files=[{data}]"])
    assert f"{data}:2: the dataset file is not UTF-8 text (byte 0xe9 at offset " in err


def test_flags_and_overrides_in_any_order():
    cfg = parse_cli(["rollout.n=3", "--run-dir", "r", "data.train_batch_size=8", "--config", "tiny", "optim.lr=1e-5"])
    assert (cfg.rollout.n, cfg.data.train_batch_size, cfg.optim.lr, cfg.trainer.run_dir) == (3, 8, 1e-5, "r")
    from kimina_jax.evaluate import parse_args

    config, overrides = parse_args(["eval.n=4", "--config", "tiny", "eval.seed=2", "--model", "m"])
    assert (config, overrides) == ("tiny", ['eval.model="m"', "eval.n=4", "eval.seed=2"])


def test_model_config_json_sizes_must_be_positive_and_finite():
    from kimina_jax.models import Qwen3Config

    raw = {"model_type": "qwen3", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 0, "num_hidden_layers": 2,
           "num_attention_heads": 4, "rms_norm_eps": float("nan")}
    with pytest.raises(KiminaError, match=r"^config: intermediate_size = 0, rms_norm_eps = nan: must be positive"):
        Qwen3Config.from_dict(raw)


def test_standin_never_allowed_in_real_recipe():
    with pytest.raises(KiminaError, match="'standin' is only for the tiny recipe"):
        load_config("kimina_prover_1.7B", ["verifier.kind=standin"], env=LEAN_ENV)
    with pytest.raises(KiminaError, match="'standin' is only for the tiny recipe"):
        load_config("kimina_prover_1.7B", ["verifier.kind=auto"], env={})


def test_api_key_comes_only_from_environment_and_is_never_written(tmp_path):
    secret = "sk-very-secret-123"
    cfg = load_config("tiny", env={"LEAN_SERVER_API_URL": "http://lean", "LEAN_SERVER_API_KEY": secret})
    assert cfg.verifier.api_key == secret
    assert secret not in repr(cfg)
    path = save_resolved(cfg, tmp_path / "run")
    assert secret not in path.read_text()
    assert "api_key" not in str(config_to_dict(cfg))
    with pytest.raises(KiminaError, match="LEAN_SERVER_API_KEY"):
        load_config("tiny", [f"verifier.api_key={secret}"], env={})


def test_resolved_config_loads_back_identically(tmp_path):
    env = {"LEAN_SERVER_API_URL": "http://lean"}
    cfg = load_config("dry_run", ["rollout.n=4"], run_dir=tmp_path / "run", env=env)
    path = save_resolved(cfg, cfg.run_dir)
    assert path == tmp_path / "run" / "config.yaml"
    assert yaml.safe_load(path.read_text())["rollout"]["max_tokens"] == 6508
    assert load_config(path, env={}) == cfg


def test_validate_for_devices():
    cfg = load_config("tiny", env={})
    assert validate_for_devices(cfg, 8) == (1, 8, 1)
    cfg = load_config("tiny", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], env={})
    assert validate_for_devices(cfg, 8) == (2, 2, 2)
    with pytest.raises(KiminaError, match="mesh data=2 x fsdp=2 x tensor=2 needs 8 devices, but 4 are available"):
        validate_for_devices(cfg, 4)
    cfg = load_config("tiny", ["mesh.tensor=3"], env={})
    with pytest.raises(KiminaError, match=r"mesh data=1 x fsdp=-1 x tensor=3: 8 devices do not divide by 3"):
        validate_for_devices(cfg, 8)
    with pytest.raises(KiminaError, match=r"train_batch_size \(4\) must be divisible by the number of processes \(3\)"):
        validate_for_devices(load_config("tiny", env={}), 3, process_count=3)


def test_float_written_without_dot_is_a_number(tmp_path):
    # PyYAML reads `2e-6` as a string; the loader takes it as the number it plainly is.
    cfg = load_config(write(tmp_path, "optim:\n  lr: 2e-6\n"), env=LEAN_ENV)
    assert cfg.optim.lr == 2e-6 and isinstance(cfg.optim.lr, float)


def test_defaults_are_the_recipe():
    cfg = TrainConfig()
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.eps) == (0.9, 0.999, 1e-8)
    assert (cfg.data.error_fix.max_feedback_chars, cfg.verifier.timeout_s) == (3000, 60.0)


def test_installed_default_runs_without_repo_configs(tmp_path):
    """`load_config()` finds tiny.yaml inside the package, from any working directory."""
    code = "from kimina_jax.config import load_config; print(load_config(env={}).experiment.name)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "tiny"


