"""Mesh construction, logical-axis rules (Qwen3 parameters via its table, batches, activations) and multi-process
start, on 8 CPU devices (see conftest.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from kimina_jax.errors import KiminaError
from kimina_jax.models import Qwen3Config, abstract_model
from kimina_jax.models.mesh_hints import constrain
from kimina_jax.parallel import (
    SAMPLING_RULES,
    batch_sharding,
    environment_process_count,
    logical_sharding,
    make_mesh,
    maybe_initialize_distributed,
    mesh_axes,
    num_shards,
    param_partition_specs,
    path_to_str,
    shard_params,
)

REPO = Path(__file__).resolve().parents[1]
# Tiny Qwen3 shapes: 4 query heads and 2 KV heads of 16, vocab 100 (not divisible by 8).
V, H, NQ, NKV, D, I, LAYERS = 100, 64, 4, 2, 16, 96, 2


def qwen3_params(seed=0, tied=False):
    """Nested dicts shaped like the model's nnx.state (kernels [in, out])."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))

    def normal(*shape):
        return jax.random.normal(next(keys), shape, jnp.float32) * 0.1

    layer = lambda: {  # noqa: E731
        "input_layernorm": {"weight": 1 + normal(H)},
        "post_attention_layernorm": {"weight": 1 + normal(H)},
        "self_attn": {
            "q_proj": {"kernel": normal(H, NQ * D)},
            "k_proj": {"kernel": normal(H, NKV * D)},
            "v_proj": {"kernel": normal(H, NKV * D)},
            "o_proj": {"kernel": normal(NQ * D, H)},
            "q_norm": {"weight": 1 + normal(D)},
            "k_norm": {"weight": 1 + normal(D)},
        },
        "mlp": {"gate_proj": {"kernel": normal(H, I)}, "up_proj": {"kernel": normal(H, I)},
                "down_proj": {"kernel": normal(I, H)}},
    }
    params = {"model": {"embed_tokens": {"embedding": normal(V, H)},
                        "layers": {i: layer() for i in range(LAYERS)}, "norm": {"weight": 1 + normal(H)}}}
    if not tied:
        params["lm_head"] = {"kernel": normal(H, V)}
    return params


def toy_forward(params, tokens):
    """Uses every parameter (not the real model: sharded and unsharded results must just agree)."""
    x = params["model"]["embed_tokens"]["embedding"][tokens]
    for layer in params["model"]["layers"].values():
        attn, mlp = layer["self_attn"], layer["mlp"]
        h = x * layer["input_layernorm"]["weight"]
        q = (h @ attn["q_proj"]["kernel"]).reshape(*h.shape[:-1], NQ, D) * attn["q_norm"]["weight"]
        k = (h @ attn["k_proj"]["kernel"]).reshape(*h.shape[:-1], NKV, D) * attn["k_norm"]["weight"]
        v = (h @ attn["v_proj"]["kernel"]).reshape(*h.shape[:-1], NKV, D)
        mixed = jnp.tanh(q * jnp.repeat(k + v, NQ // NKV, axis=-2)).reshape(*h.shape[:-1], NQ * D)
        x = x + mixed @ attn["o_proj"]["kernel"]
        h = x * layer["post_attention_layernorm"]["weight"]
        x = x + (jax.nn.silu(h @ mlp["gate_proj"]["kernel"]) * (h @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
    return (x * params["model"]["norm"]["weight"]) @ params["lm_head"]["kernel"]


def ways(mesh, axes):
    """Into how many pieces mesh axes (a name, a tuple of names or None) cut a dimension."""
    names = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[name] for name in names]))


# ---- mesh ----

@pytest.mark.parametrize(
    "sizes, shape",
    [({}, (8, 1, 1)), ({"data": 1, "fsdp": -1}, (1, 8, 1)), ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
     ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)), ({"data": -1, "tensor": 4}, (2, 1, 4))],
)
def test_make_mesh_shapes(sizes, shape):
    mesh = make_mesh(**sizes)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_some_devices_and_errors():
    assert tuple(make_mesh(2, 2, 1, devices=jax.devices()[:4]).shape.values()) == (2, 2, 1)
    with pytest.raises(KiminaError, match="data=3 x fsdp=1 x tensor=1 needs 3 devices, but 8 are available"):
        make_mesh(3)
    with pytest.raises(KiminaError, match="at most one axis may be -1"):
        make_mesh(-1, -1)
    with pytest.raises(KiminaError, match="8 devices do not divide by 3"):
        make_mesh(-1, 3)
    with pytest.raises(KiminaError, match="'tensor' must be a positive integer"):
        make_mesh(8, 1, 0)


# ---- parameter sharding ----

def test_param_specs_on_a_2x2x2_mesh():
    specs = param_partition_specs(qwen3_params(), make_mesh(2, 2, 2))
    layer = specs["model"]["layers"][1]
    assert specs["model"]["embed_tokens"]["embedding"] == P("tensor", "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
    assert specs["model"]["norm"]["weight"] == P(None)
    assert layer["input_layernorm"]["weight"] == P(None)
    assert layer["self_attn"]["q_proj"]["kernel"] == P("fsdp", "tensor")
    assert layer["self_attn"]["k_proj"]["kernel"] == P("fsdp", "tensor")  # 2 KV heads over 2: whole heads
    assert layer["self_attn"]["o_proj"]["kernel"] == P("tensor", "fsdp")
    assert layer["self_attn"]["q_norm"]["weight"] == P(None)
    assert layer["mlp"]["up_proj"]["kernel"] == P("fsdp", "tensor")
    assert layer["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")


def test_undividable_dimensions_fall_back_to_replication():
    specs = param_partition_specs(qwen3_params(), make_mesh(1, 1, 8))
    attn = specs["model"]["layers"][0]["self_attn"]
    # 4 query heads / 2 KV heads cannot be split 8 ways without cutting heads; vocab 100 is not divisible by 8.
    assert attn["q_proj"]["kernel"] == P("fsdp", None)
    assert attn["k_proj"]["kernel"] == P("fsdp", None)
    assert specs["model"]["embed_tokens"]["embedding"] == P(None, "fsdp")
    assert specs["model"]["layers"][0]["mlp"]["gate_proj"]["kernel"] == P("fsdp", "tensor")
    # 2 KV heads x 16 = 32 columns would divide by 4, but not into whole heads.
    kv = param_partition_specs(qwen3_params(), make_mesh(1, 2, 4))["model"]["layers"][0]["self_attn"]
    assert kv["k_proj"]["kernel"] == P("fsdp", None) and kv["q_proj"]["kernel"] == P("fsdp", "tensor")


# The shardings the regex rules gave before the parameter table existed, where every dimension divides: ZeRO-3
# over fsdp, Megatron over tensor (layer parameters by their path inside a layer).
SPECS_WHEN_ALL_DIVIDE = {
    "model.embed_tokens.embedding": P("tensor", "fsdp"), "model.norm.weight": P(None),
    "lm_head.kernel": P("fsdp", "tensor"),
    "input_layernorm.weight": P(None), "post_attention_layernorm.weight": P(None),
    "self_attn.q_proj.kernel": P("fsdp", "tensor"), "self_attn.k_proj.kernel": P("fsdp", "tensor"),
    "self_attn.v_proj.kernel": P("fsdp", "tensor"), "self_attn.o_proj.kernel": P("tensor", "fsdp"),
    "self_attn.q_norm.weight": P(None), "self_attn.k_norm.weight": P(None),
    "mlp.gate_proj.kernel": P("fsdp", "tensor"), "mlp.up_proj.kernel": P("fsdp", "tensor"),
    "mlp.down_proj.kernel": P("tensor", "fsdp"),
}
TINY_SIZES = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_attention_heads=NQ, num_key_value_heads=NKV,
                  head_dim=D)
QWEN3_1P7B_SIZES = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=128)
# Tiny on tensor=8: vocab 100 and 4 query / 2 KV heads do not split 8 ways. On tensor=4: 2 KV heads do not.
TINY_ON_TENSOR_8 = {"model.embed_tokens.embedding": P(None, "fsdp"), "lm_head.kernel": P("fsdp", None),
                    "self_attn.q_proj.kernel": P("fsdp", None), "self_attn.k_proj.kernel": P("fsdp", None),
                    "self_attn.v_proj.kernel": P("fsdp", None), "self_attn.o_proj.kernel": P(None, "fsdp")}
TINY_ON_TENSOR_4 = {"self_attn.k_proj.kernel": P("fsdp", None), "self_attn.v_proj.kernel": P("fsdp", None)}


@pytest.mark.parametrize("sizes, mesh_shape, differences", [
    *((TINY_SIZES, shape, {}) for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]),
    (TINY_SIZES, (1, 1, 8), TINY_ON_TENSOR_8),
    (TINY_SIZES, (1, 2, 4), TINY_ON_TENSOR_4),
    *((QWEN3_1P7B_SIZES, shape, {}) for shape in [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4), (1, 4, 2)]),
], ids=lambda value: str(value) if isinstance(value, tuple) else None)
def test_table_and_rules_give_the_shardings_of_the_regex_rules(sizes, mesh_shape, differences):
    config = Qwen3Config(**sizes, num_hidden_layers=2, tie_word_embeddings=False)
    state = nnx.state(abstract_model(config), nnx.Param)
    specs = param_partition_specs(state, make_mesh(*mesh_shape))
    got = {path_to_str(path): spec for path, spec in jax.tree_util.tree_flatten_with_path(specs)[0]}
    expected = {**SPECS_WHEN_ALL_DIVIDE, **differences}
    assert len(got) == 3 + 11 * 2
    for name, spec in got.items():
        key = name.split(".", 3)[3] if name.startswith("model.layers.") else name
        assert spec == expected[key], name


def test_logical_axes_resolve_on_the_mesh_at_hand():
    mesh = make_mesh(2, 2, 2)
    assert mesh_axes("batch", mesh) == ("data", "fsdp") and num_shards(mesh, "batch") == 4
    assert mesh_axes("batch", mesh, size=6) is None and num_shards(mesh, "batch", 6) == 1
    assert mesh_axes("kv_heads", mesh, size=2) == "tensor" and num_shards(mesh, "kv_heads", 3) == 1
    assert mesh_axes("act_embed", mesh) is None and num_shards(mesh, "length") == 1
    data_only = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))  # axes a mesh lacks are left out
    assert mesh_axes("batch", data_only) == ("data",) and mesh_axes("vocab", data_only, size=128) is None
    with pytest.raises(KiminaError, match="unknown logical axis 'rows'"):
        num_shards(mesh, "rows")


def test_sampling_rules_keep_only_the_model_parallel_split():
    specs = param_partition_specs(qwen3_params(), make_mesh(2, 2, 2), SAMPLING_RULES)
    layer = specs["model"]["layers"][0]
    assert specs["model"]["embed_tokens"]["embedding"] == P("tensor", None)
    assert layer["self_attn"]["o_proj"]["kernel"] == P("tensor", None)
    assert layer["mlp"]["up_proj"]["kernel"] == P(None, "tensor")
    assert set(jax.tree_util.tree_leaves([tuple(spec) for spec in jax.tree_util.tree_leaves(specs)])) <= {"tensor"}


def test_heads_split_in_whole_heads_needs_the_head_size():
    """The head size comes from the parameters that carry `head_dim` alone (q_norm, k_norm): a tree without them
    cannot split projections by heads."""
    attn = qwen3_params()["model"]["layers"][0]["self_attn"]
    in_layer = lambda **params: {"model": {"layers": {0: {"self_attn": params}}}}  # noqa: E731
    with pytest.raises(KiminaError, match="the size of 'head_dim' must be known"):
        param_partition_specs(in_layer(q_proj=attn["q_proj"]), make_mesh(1, 2, 4))
    specs = param_partition_specs(in_layer(q_proj=attn["q_proj"], q_norm=attn["q_norm"]), make_mesh(1, 2, 4))
    assert specs["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"] == P("fsdp", "tensor")


@pytest.mark.parametrize("logical_axes, shape, mesh_shape, expected", [
    (("batch", "length", "act_embed"), (8, 4, H), (2, 2, 2), P(("data", "fsdp"), None, None)),
    (("batch", "length", "act_embed"), (2, 4, H), (2, 2, 2), P(None, None, None)),  # 2 rows on 4 row shards
    (("vocab", "act_embed"), (V, H), (1, 1, 8), P(None, None)),  # the embedding hint: vocab 100 on tensor=8
    (("vocab", "act_embed"), (96, H), (1, 2, 4), P("tensor", None)),
])
def test_activation_hints_pin_what_the_rules_say(logical_axes, shape, mesh_shape, expected):
    mesh = make_mesh(*mesh_shape)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda x: constrain(x * 2, logical_axes))(jnp.ones(shape))
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, expected), len(shape))


@pytest.mark.parametrize("sizes", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)])
def test_sharded_params_are_really_sharded_and_compute_the_same(sizes):
    mesh = make_mesh(*sizes)
    params = qwen3_params()
    sharded = shard_params(params, mesh)
    specs = param_partition_specs(params, mesh)
    for (path, leaf), spec, original in zip(
        jax.tree_util.tree_flatten_with_path(sharded)[0], jax.tree_util.tree_leaves(specs), jax.tree_util.tree_leaves(params)
    ):
        assert leaf.sharding == NamedSharding(mesh, spec), path
        expected = tuple(size // ways(mesh, axes) for size, axes in zip(leaf.shape, spec))
        assert leaf.addressable_shards[0].data.shape == expected, path
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(original))
    if sizes[2] > 1 or sizes[1] > 1:
        up = sharded["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
        assert up.addressable_shards[0].data.size < up.size  # really split

    tokens = jax.device_put(jnp.arange(8 * 16).reshape(8, 16) % V, batch_sharding(mesh))
    got = jax.jit(toy_forward)(sharded, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(toy_forward(params, tokens)), rtol=2e-5, atol=2e-5)


def test_rules_cover_the_real_model_state():
    for tied in (False, True):
        config = Qwen3Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS,
                             num_attention_heads=NQ, num_key_value_heads=NKV, head_dim=D, tie_word_embeddings=tied)
        state = nnx.state(abstract_model(config), nnx.Param)
        specs = param_partition_specs(state, make_mesh(2, 2, 2))
        assert len(jax.tree_util.tree_leaves(specs)) == len(jax.tree_util.tree_leaves(state)) == 3 + 11 * LAYERS - tied
        # Trees nesting the parameters (optimizer moments) follow the same rules.
        moments = param_partition_specs({"mu": state, "nu": state}, make_mesh(2, 2, 2))
        assert jax.tree_util.tree_leaves(moments["mu"]) == jax.tree_util.tree_leaves(specs)


def test_unknown_parameters_are_errors_not_replicated():
    params = qwen3_params()
    params["model"]["layers"][0]["self_attn"]["q_proj"]["bias"] = jnp.zeros(NQ * D)
    with pytest.raises(KiminaError, match=r"no sharding rule for parameter 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        param_partition_specs(params, make_mesh())
    params = qwen3_params()
    params["model"]["norm"]["weight"] = jnp.zeros((H, 2))
    with pytest.raises(KiminaError, match=r"'model\.norm\.weight' has shape \(64, 2\)"):
        param_partition_specs(params, make_mesh())


def test_batch_and_activation_shardings():
    mesh = make_mesh(2, 2, 2)
    batch = jax.device_put(np.zeros((16, 32), np.int32), batch_sharding(mesh))
    assert {shard.data.shape for shard in batch.addressable_shards} == {(4, 32)}  # rows over data x fsdp
    hidden = logical_sharding(mesh, ("batch", "length", "act_embed"))
    assert hidden.spec == P(("data", "fsdp"), None, None)
    assert logical_sharding(mesh, ("batch", "length", "vocab"), shape=(8, 4, 99)).spec == P(("data", "fsdp"), None, None)
    with pytest.raises(KiminaError, match="unknown logical axis 'rows'"):
        logical_sharding(mesh, ("rows", "length"))


# ---- multi-process start ----

@pytest.mark.parametrize(
    "environ, count",
    [({}, 1),
     ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "0"}, 4),
     ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
       "SLURM_LOCALID": "0"}, 2),
     ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, 1),  # an allocation shell, not an srun step
     ({"OMPI_MCA_orte_hnp_uri": "1.2.3.4:5", "OMPI_COMM_WORLD_SIZE": "3"}, 3),
     ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, 4)],
)
def test_environment_process_count(environ, count):
    assert environment_process_count(environ) == count


def test_single_process_does_nothing():
    assert maybe_initialize_distributed(environ={}) is False
    assert maybe_initialize_distributed("off", {"JAX_NUM_PROCESSES": "2"}) is False
    assert not jax.distributed.is_initialized()
    with pytest.raises(KiminaError, match="'auto', 'on' or 'off'"):
        maybe_initialize_distributed("yes")
    with pytest.raises(KiminaError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        maybe_initialize_distributed(environ={"JAX_NUM_PROCESSES": "two"})


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from kimina_jax.parallel import batch_sharding, make_mesh, maybe_initialize_distributed, shard_params
    assert maybe_initialize_distributed() and maybe_initialize_distributed()  # the second call is a no-op
    mesh = make_mesh(data=-1, tensor=2)
    rows = jax.make_array_from_process_local_data(batch_sharding(mesh), np.full((1, 4), jax.process_index() + 1.0))
    kernel = np.arange(64.0).reshape(8, 8)
    params = shard_params({"lm_head": {"kernel": kernel}}, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    total = jax.jit(lambda r, p: jnp.sum(r) + jnp.sum(p["lm_head"]["kernel"]), out_shardings=replicated)(rows, params)
    print("RESULT", jax.process_count(), jax.device_count(), tuple(mesh.shape.values()),
          float(total.addressable_data(0)))
""")


def test_two_processes_join_one_mesh(tmp_path):
    """The real multi-controller runtime on CPU: 2 processes x 2 devices form one 4-device mesh."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "PYTHONPATH": str(REPO)}
    workers = [subprocess.Popen([sys.executable, str(script)], env={**env, "JAX_PROCESS_ID": str(i)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [worker.communicate(timeout=180)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output
        # mesh (data 2 across the processes, tensor 2 within); rows: 4 x 1 + 4 x 2 = 12; kernel: sum(0..63) = 2016
        assert "RESULT 2 4 (2, 1, 2) 2028.0" in output, output
