"""The run folder: claiming it for a run (resume or set the earlier run aside), output folders, and a step with its
run's model files exported as a Hugging Face model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kimina_jax.checkpoint import Checkpointer
from kimina_jax.errors import KiminaError
from kimina_jax.run_folder import claim_run_dir, saved_steps, writable_folder, write_model_files
from tests.test_checkpoint import train_state, trees_equal


def test_export_of_a_training_checkpoint_loads_in_transformers(tmp_path):
    import torch
    import transformers

    from kimina_jax.data import build_tiny_tokenizer
    from kimina_jax.export import main as export_main
    from kimina_jax.models import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, eos_token_id=tokenizer.eos_token_id)
    model = Qwen3ForCausalLM(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    write_model_files(tmp_path, config.to_dict(), tokenizer)
    ck = Checkpointer(tmp_path)
    ck.save(3, params=params, opt_state=optax.adamw(1e-3).init(params), rng_key=jax.random.key(0), loop_state={},
            config={"model": {"param_dtype": "float32"}})
    ck.wait()

    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(tmp_path / "checkpoints" / "3"), "--out", str(out)]) == 0
    ids = tokenizer.encode("theorem t : 1 + 1 = 2 := by norm_num", add_special_tokens=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(model(jnp.asarray([ids]))[0][0])
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    assert transformers.AutoTokenizer.from_pretrained(out).encode("<think> by", add_special_tokens=False) == \
        tokenizer.encode("<think> by", add_special_tokens=False)


def test_export_takes_a_run_folders_newest_step_and_refuses_model_files_it_does_not_fit(tmp_path, capsys):
    from kimina_jax.data import build_tiny_tokenizer
    from kimina_jax.export import main as export_main
    from kimina_jax.models import Qwen3Config, Qwen3ForCausalLM, load_hf_checkpoint

    tokenizer = build_tiny_tokenizer()

    def config(hidden: int) -> Qwen3Config:
        return Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32)

    write_model_files(tmp_path, config(64).to_dict(), tokenizer)
    ck = Checkpointer(tmp_path, async_save=False)
    for step in (2, 4):
        params = nnx.state(Qwen3ForCausalLM(config(64), rngs=nnx.Rngs(step)), nnx.Param)
        ck.save(step, params=params, opt_state=optax.adamw(1e-3).init(params), rng_key=jax.random.key(0),
                loop_state={}, config={"model": {"param_dtype": "float32"}})
    ck.close()
    assert export_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")]) == 0
    assert trees_equal(nnx.state(load_hf_checkpoint(tmp_path / "hf"), nnx.Param), params)  # step 4's

    write_model_files(tmp_path, config(128).to_dict(), tokenizer)  # a later run of another size in the folder
    assert export_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err
    assert f"error: '{tmp_path / 'checkpoints' / '4'}': its parameters do not fit" in err and "(64,) saved" in err


def test_a_rerun_with_other_settings_is_refused_unless_a_new_run_is_asked_for(tmp_path):
    config = {"model": {"path": "tiny", "param_dtype": "float32", "tiny": {"hidden_size": 64}},
              "data": {"tokenizer": "tiny"}, "optim": {"lr": 1e-6}}
    params, opt_state, _ = train_state(0)
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(3, params=params, opt_state=opt_state, rng_key=jax.random.key(0), loop_state={}, config=config)
    ck.close()
    (tmp_path / "model_files").mkdir()
    (tmp_path / "model_files" / "config.json").write_text('{"hidden_size": 64}')

    claim_run_dir(tmp_path, {**config, "optim": {"lr": 1.0}}, {"hidden_size": 64}, "auto", True)  # may change
    bigger = {**config, "model": {**config["model"], "tiny": {"hidden_size": 128}}}
    with pytest.raises(KiminaError, match=r"model.tiny.hidden_size: 64 there, 128 now; "
                                          r"model_files/config.json hidden_size: 64 there, 128 now\..*resume=never"):
        claim_run_dir(tmp_path, bigger, {"hidden_size": 128}, "auto", True)
    qwen = {**bigger, "model": {**bigger["model"], "path": "Qwen/Qwen3-1.7B"}}
    with pytest.raises(KiminaError, match=r"made with other settings than this config's: model.path: 'tiny' there, "
                                          r"'Qwen/Qwen3-1.7B' now\. Resume"):  # model.tiny is not compared then
        claim_run_dir(tmp_path, qwen, {"hidden_size": 64}, "auto", True)
    claim_run_dir(tmp_path, bigger, {"hidden_size": 128}, "never", True)
    assert saved_steps(tmp_path) == [] and not (tmp_path / "model_files").exists()
    [previous] = (tmp_path / "previous").iterdir()
    assert saved_steps(previous) == [3] and (previous / "model_files" / "config.json").is_file()


def test_a_run_folder_that_is_a_file_or_unwritable(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(KiminaError, match=f"--run-dir {tmp_path / 'f'}: is a file, not a folder"):
        writable_folder(tmp_path / "f", "--run-dir")
    with pytest.raises(KiminaError, match="--run-dir .*: cannot create it"):
        writable_folder(tmp_path / "f" / "sub", "--run-dir")
    assert writable_folder(tmp_path / "new" / "run", "--run-dir").is_dir()
