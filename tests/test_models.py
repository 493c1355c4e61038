"""The Flax Qwen3 against transformers' Qwen3ForCausalLM on the same weights, and HF folder I/O."""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from kimina_jax.errors import KiminaError
from kimina_jax.models import (
    PagedKVCache, Qwen3Config, abstract_model, load_hf_checkpoint, param_names, save_hf_checkpoint,
)
from kimina_jax.models.paged import init_pools
from kimina_jax.models.safetensors_io import SafetensorsFile, write_safetensors

RNG = np.random.default_rng(0)


def _hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attention_mask))
    return out.logits.numpy()


def _padded_batch(vocab: int):
    ids = RNG.integers(0, vocab, size=(3, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def test_logits_match_transformers_with_padding(hf_folder):
    folder, hf_model = hf_folder
    model = load_hf_checkpoint(folder)
    ids, mask, positions = _padded_batch(model.config.vocab_size)
    ours, cache = model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))
    assert cache is None
    ref = _hf_logits(hf_model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(np.asarray(ours)[real] - ref[real]).max() <= 1e-4


def test_config_shape_is_the_hard_case(hf_folder):
    config = Qwen3Config.from_pretrained(hf_folder[0])
    assert config.head_dim * config.num_attention_heads != config.hidden_size
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.num_hidden_layers >= 3


def test_packed_row_equals_separate_sequences(tiny_hf_folder):
    model = load_hf_checkpoint(tiny_hf_folder)
    a, b = RNG.integers(0, 128, size=7), RNG.integers(0, 128, size=5)
    row = np.concatenate([a, b, [0, 0]])[None]
    segments = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    positions = np.array([list(range(7)) + list(range(5)) + [0, 0]])
    packed, _ = model(jnp.asarray(row), jnp.asarray(positions), jnp.asarray(segments))
    alone_a, _ = model(jnp.asarray(a[None]))
    alone_b, _ = model(jnp.asarray(b[None]))
    np.testing.assert_allclose(np.asarray(packed)[0, :7], np.asarray(alone_a)[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(packed)[0, 7:12], np.asarray(alone_b)[0], atol=1e-5)


@pytest.mark.parametrize("block_size", [2, 16])
def test_paged_kv_cache_decoding_matches_full_forward(tiny_hf_folder, block_size):
    """A prefill of 4 tokens, then one token per step through a paged cache whose rows' blocks are scattered
    over the pool: the logits of the full forward."""
    model = load_hf_checkpoint(tiny_hf_folder)
    cfg = model.config
    ids = RNG.integers(0, 128, size=(2, 9))
    full, _ = model(jnp.asarray(ids))
    width = -(-16 // block_size)
    tables = jnp.asarray(RNG.permutation(2 * width).reshape(2, width), jnp.int32)
    pools = init_pools(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 2 * width, block_size,
                       jnp.float32, "xla")
    prefix = 4
    cache = PagedKVCache(pools, tables, jnp.zeros(2, jnp.int32), pairs=2 * width, prefill=True)
    step_logits, cache = model(jnp.asarray(ids[:, :prefix]), jnp.broadcast_to(jnp.arange(prefix), (2, prefix)),
                               jnp.ones((2, prefix), jnp.int32), cache=cache)
    np.testing.assert_allclose(np.asarray(step_logits), np.asarray(full)[:, :prefix], atol=1e-5)
    cache = cache.replace(prefill=False)
    decode = nnx.jit(lambda m, tok, pos, c: m(tok, pos, jnp.ones_like(tok), cache=c))
    for t in range(prefix, 9):
        logits, cache = decode(model, jnp.asarray(ids[:, t : t + 1]), jnp.full((2, 1), t), cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], np.asarray(full)[:, t], atol=1e-5)
    assert np.asarray(cache.lengths).tolist() == [9, 9]


def test_bf16_compute_stays_close(tiny_hf_folder):
    ids = jnp.asarray(RNG.integers(0, 128, size=(2, 8)))
    fp32, _ = load_hf_checkpoint(tiny_hf_folder)(ids)
    model = load_hf_checkpoint(tiny_hf_folder, dtype="bfloat16", param_dtype="float32")
    assert model.model.embed_tokens.embedding[...].dtype == jnp.float32
    bf16, _ = model(ids)
    assert bf16.dtype == jnp.float32  # logits are always float32
    assert np.abs(np.asarray(bf16) - np.asarray(fp32)).max() < 0.1


def test_remat_policies_give_the_same_gradients_and_keep_what_they_say(tiny_hf_folder):
    ids = jnp.asarray(RNG.integers(0, 128, size=(1, 8)))
    config = Qwen3Config.from_pretrained(tiny_hf_folder)
    losses = {}
    for policy in ("none", "full", "save_dots"):
        graphdef, state = nnx.split(load_hf_checkpoint(tiny_hf_folder, remat=policy))
        losses[policy] = lambda s, graphdef=graphdef: nnx.merge(graphdef, s)(ids)[0].mean()
    grads = {policy: jax.tree.leaves(jax.grad(loss)(state)) for policy, loss in losses.items()}
    for policy in ("full", "save_dots"):
        for g1, g2 in zip(grads["none"], grads[policy]):
            np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-6)
    # What the backward pass keeps from the forward: the leaves of the VJP closure (parameters included).
    kept = {policy: sum(x.size for x in jax.tree.leaves(jax.vjp(loss, state)[1])) for policy, loss in losses.items()}
    assert kept["full"] < kept["save_dots"] < kept["none"]
    # save_dots keeps, per layer, the weight-matmul outputs that the backward pass reads: q, k, v, gate, up.
    per_token = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    per_token += 2 * config.intermediate_size
    assert kept["save_dots"] - kept["full"] >= ids.size * per_token * config.num_hidden_layers


def test_parameter_table_is_the_model_and_transformers_names(hf_folder):
    """The one table lists every parameter of our model once (with a logical axis per dimension) and every tensor
    of transformers' Qwen3 under its name, Linear weights transposed."""
    folder, hf_model = hf_folder
    config = Qwen3Config.from_pretrained(folder)
    ours = dict(nnx.to_flat_state(nnx.state(abstract_model(config), nnx.Param)))
    table = param_names(config)
    assert sorted(map(str, (spec.path for spec in table))) == sorted(map(str, ours))
    torch_shapes = {name: tuple(param.shape) for name, param in hf_model.named_parameters()}
    assert sorted(spec.hf_name for spec in table) == sorted(torch_shapes)
    for spec in table:
        shape = ours[spec.path].get_value().shape
        assert len(spec.axes) == len(shape), spec
        assert torch_shapes[spec.hf_name] == (shape[::-1] if spec.transpose else shape), spec
    with_head = param_names(config, tied_lm_head=True)
    if config.tie_word_embeddings:  # vLLM's reload is also handed the head: the embedding again
        assert (with_head[-1].hf_name, with_head[-1].path, with_head[-1].transpose) == (
            "lm_head.weight", table[0].path, False)
    assert with_head[: len(table)] == table


def test_export_round_trip_loads_in_transformers(hf_folder, tmp_path):
    folder, hf_model = hf_folder
    model = load_hf_checkpoint(folder)
    out = save_hf_checkpoint(model, tmp_path / "out")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "generation_config.json"}
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(out).eval()
    ids, mask, _ = _padded_batch(128)
    real = mask.astype(bool)
    diff = np.abs(_hf_logits(reloaded, ids, mask)[real] - _hf_logits(hf_model, ids, mask)[real]).max()
    assert diff <= 1e-5


def test_sharded_export_and_load(tiny_hf_folder, tmp_path):
    model = load_hf_checkpoint(tiny_hf_folder)
    out = save_hf_checkpoint(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = jnp.asarray(RNG.integers(0, 128, size=(1, 6)))
    np.testing.assert_array_equal(np.asarray(load_hf_checkpoint(out)(ids)[0]), np.asarray(model(ids)[0]))
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ref = reloaded(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()
    assert np.abs(ref - np.asarray(model(ids)[0])).max() <= 1e-4


def test_bf16_export(tiny_hf_folder, tmp_path):
    model = load_hf_checkpoint(tiny_hf_folder)
    out = save_hf_checkpoint(model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(out)
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    back = load_hf_checkpoint(out, dtype="float32")
    ids = jnp.asarray(RNG.integers(0, 128, size=(1, 6)))
    assert np.abs(np.asarray(back(ids)[0]) - np.asarray(model(ids)[0])).max() < 0.05


def test_load_places_parameters_on_a_mesh(tiny_hf_folder):
    from kimina_jax.parallel import make_mesh

    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    model = load_hf_checkpoint(tiny_hf_folder, mesh=mesh)
    kernel = model.model.layers[0].mlp.gate_proj.kernel[...]
    assert kernel.sharding.mesh.shape == mesh.shape
    assert not kernel.sharding.is_fully_replicated
    ids = jnp.asarray(RNG.integers(0, 128, size=(2, 6)))
    plain = load_hf_checkpoint(tiny_hf_folder)
    np.testing.assert_allclose(np.asarray(model(ids)[0]), np.asarray(plain(ids)[0]), atol=1e-5)


# --- bad input: every error names the file and tensor --------------------------------------------------


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def test_folder_without_config(tmp_path):
    with pytest.raises(KiminaError, match="no config.json"):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "qwen3_moe"}, "model_type 'qwen3_moe'"),
        ({"architectures": ["LlamaForCausalLM"]}, "LlamaForCausalLM"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope scaling"),
        ({"num_experts": 8}, "mixture-of-experts"),
        ({"use_sliding_window": True}, "sliding_window"),
    ],
)
def test_unsupported_configs(tiny_hf_folder, tmp_path, change, message):
    folder = _copy(tiny_hf_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(KiminaError, match=message) as err:
        load_hf_checkpoint(folder)
    assert "config.json" in str(err.value)


def _rewrite_weights(folder, edit):
    """Rewrites model.safetensors after `edit(dict name -> array)`."""
    path = folder / "model.safetensors"
    reader = SafetensorsFile(path)
    tensors = {name: np.array(reader.read(name)) for name in reader.names}
    del reader
    edit(tensors)
    write_safetensors(path, [(n, a.shape, a.dtype) for n, a in tensors.items()], tensors.__getitem__)


def test_missing_tensor_is_named(tiny_hf_folder, tmp_path):
    folder = _copy(tiny_hf_folder, tmp_path)
    _rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KiminaError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_hf_checkpoint(folder)


def test_wrong_shape_names_file_and_tensor(tiny_hf_folder, tmp_path):
    folder = _copy(tiny_hf_folder, tmp_path)

    def shrink(tensors):
        tensors["model.layers.2.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)

    _rewrite_weights(folder, shrink)
    with pytest.raises(KiminaError) as err:
        load_hf_checkpoint(folder)
    assert "model.safetensors" in str(err.value) and "model.layers.2.self_attn.k_proj.weight" in str(err.value)
    assert "(16, 64)" in str(err.value)


def test_model_names_resolve_to_folders_or_fail_clearly(tiny_hf_folder, monkeypatch):
    from kimina_jax.models.hf import resolve_model_folder

    assert resolve_model_folder(tiny_hf_folder) == tiny_hf_folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KiminaError, match="not a local folder and not downloadable"):
        resolve_model_folder("AI-MO/no-such-model-here")


def test_folder_without_weights(tiny_hf_folder, tmp_path):
    folder = _copy(tiny_hf_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(KiminaError, match="no model.safetensors"):
        load_hf_checkpoint(folder)
