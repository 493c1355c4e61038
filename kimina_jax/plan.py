"""`python -m kimina_jax.plan --config <recipe> [--topology NAME] [--run] [key=value ...]`: will the recipe fit?

The recipe's model is built abstractly (no weights), its mesh laid over the topology's devices (a Cloud TPU slice
compiled for here by libtpu, without the hardware) or over the devices present, and every program a step runs is
compiled at the recipe's worst shapes: the gradient pass for the largest packed micro-batch (`micro_batch_rows`
rows of the longest row length), the optimizer step, the old log-prob pass, the reference pass (KL on), and the
JAX engine's prefill and decode loop with its decode batch at its largest (every slot's row at prompt bucket +
max_tokens tokens, the KV block pool `rollout.jax.kv_cache_bytes` at most). On TPU the engine planned is the JAX
one (this project's vLLM engines run on GPUs); with vLLM on a GPU, JAX's programs must fit in the share vLLM
leaves it.

Per program the compiler's per-device bytes (arguments, temporaries, outputs, aliased) and its peak: those plus
the resident state it does not take as an argument (parameters, optimizer, reference, the engine's weight copy,
and during generation its KV cache). FLOPs are the compiler's cost analysis per device and call (a loop body
counted once: one micro-batch, one decode iteration) times the calls of a worst-case step (every response
max_tokens long), and the ideal step time is that at the device's peak. Exit 0 when the largest peak fits the
device's memory, 1 when not (with one line saying what to change), 2 for bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimina_jax.config import TINY, TrainConfig, load_config, validate_for_devices
from kimina_jax.errors import KiminaError
from kimina_jax.grpo import TrainStep, row_length_buckets
from kimina_jax.models import Qwen3Config, Qwen3ForCausalLM, abstract_model
from kimina_jax.models.attention import FLASH_BLOCK, resolve_attention_impl
from kimina_jax.models.hf import to_jax_dtype
from kimina_jax.models.paged import paged_impl
from kimina_jax.models.qwen3.architectures import known_architecture
from kimina_jax.models.tiny import tiny_config
from kimina_jax.parallel import make_mesh
from kimina_jax.parallel.topology import GiB, Accelerator, present_accelerator, tpu_accelerator
from kimina_jax.rollout.jax_sampler import lower_sampling

log = logging.getLogger("kimina_jax.plan")
TRAINING = ("params", "optimizer", "reference")


@dataclasses.dataclass
class Program:
    """One compiled program: per-device bytes, its FLOPs per call and calls per worst-case step."""

    name: str
    shape: str
    compile_s: float
    arguments: int
    temporaries: int
    outputs: int
    aliased: int
    flops: float
    calls: int
    others: tuple[str, ...]  # resident state alive beside it that is not among its arguments
    compiled: jax.stages.Compiled | None = dataclasses.field(repr=False)  # None: the compiler ran out of memory
    args_info: tuple = dataclasses.field(repr=False)  # the lowered arguments' shapes and dtypes (for --run)
    out_of_memory: str | None = None  # the compiler's words when the program cannot fit the device

    def peak(self, resident: dict[str, int]) -> int:
        own = self.arguments + self.temporaries + self.outputs - self.aliased
        return own + sum(resident.get(name, 0) for name in self.others)


@dataclasses.dataclass
class Plan:
    accelerator: Accelerator
    mesh: dict[str, int]
    budget: int | None  # bytes per device the programs may use
    resident: dict[str, int]  # bytes per device
    programs: list[Program]
    notes: list[str]
    advice: str | None = None
    step_fn: TrainStep | None = dataclasses.field(default=None, repr=False)  # for --run

    @property
    def peak(self) -> int:
        resident = sum(self.resident[name] for name in TRAINING if name in self.resident)
        return max([resident, *(p.peak(self.resident) for p in self.programs)])

    @property
    def fits(self) -> bool:
        refused = any(p.out_of_memory for p in self.programs)
        return not refused and (self.budget is None or self.peak <= self.budget)

    @property
    def step_flops(self) -> float:
        return sum(p.flops * p.calls for p in self.programs)


def recipe_architecture(cfg: TrainConfig) -> Qwen3Config:
    """The recipe model's architecture without its weights: `tiny`'s sizes, a local folder's config.json, or a
    known Hub name (`models.qwen3.architectures`)."""
    path = cfg.model.path
    if path == TINY:
        vocab = cfg.model.tiny.vocab_size
        if vocab is None:
            from kimina_jax.data import load_tokenizer

            vocab = len(load_tokenizer(cfg.data.tokenizer or TINY))
        return tiny_config(cfg.model.tiny, vocab)
    if Path(path).is_dir():
        return Qwen3Config.from_pretrained(path)
    known = known_architecture(path)
    if known is None:
        raise KiminaError(f"model.path {path!r}: not a local Hugging Face folder nor a known Hub model; pass a "
                          "folder holding its config.json (no weights needed)")
    return known


def plan_recipe(cfg: TrainConfig, accelerator: Accelerator) -> Plan:
    """Compile the recipe's programs for `accelerator` and account for their memory (module docstring)."""
    devices = list(accelerator.devices)
    mesh = make_mesh(*validate_for_devices(cfg, len(devices), accelerator.processes), devices=devices)
    m, a, d = cfg.model, cfg.algorithm, cfg.data
    model = abstract_model(recipe_architecture(cfg), dtype=to_jax_dtype(m.dtype),
                           param_dtype=to_jax_dtype(m.param_dtype), attention_impl=m.attention_impl, remat=m.remat)
    step_fn = TrainStep(model, a, cfg.optim, temperature=cfg.rollout.temperature, mesh=mesh)
    state = step_fn.abstract_state()
    resident = {"params": _device_bytes(state.params), "optimizer": _device_bytes(state.opt_state)}
    if a.kl.enabled and not a.kl.ref_offload:
        resident["reference"] = resident["params"]
    with jax.set_mesh(mesh):
        attention = resolve_attention_impl(m.attention_impl, to_jax_dtype(m.dtype))
        paged = paged_impl(m.attention_impl, model.config.head_dim)
    notes = [f"attention {attention}" + ("" if attention == "xla" else f" (rows of multiples of {FLASH_BLOCK} "
                                         "tokens; xla for others)")]
    budget = accelerator.hbm_bytes
    plans_engine = cfg.rollout.engine == "jax" or accelerator.platform == "tpu"
    if cfg.rollout.engine != "jax" and plans_engine:
        notes.append(f"rollout.engine {cfg.rollout.engine}: planned with the JAX engine (rollout.engine=jax), "
                     "the engine this project runs on TPUs")
    elif cfg.rollout.engine == "vllm" and budget is not None:
        v = cfg.rollout.vllm
        share = v.jax_memory_fraction if v.jax_memory_fraction is not None else 1 - v.gpu_memory_utilization
        budget = int(budget * share)
        notes.append(f"rollout.engine vllm: vLLM keeps {v.gpu_memory_utilization:g} of each device's memory (not "
                     f"planned here); JAX's programs are planned within the {share:g} left")
    plan = Plan(accelerator, dict(mesh.shape), budget, resident, [], notes, step_fn=step_fn)
    if not plan.fits:  # the state alone is too large: no need to spend minutes compiling
        plan.advice = _advice(plan, cfg)
        return plan

    samples = d.train_batch_size * cfg.rollout.n
    sequence = d.max_prompt_length + cfg.rollout.max_tokens
    length = row_length_buckets(a.pack_length, min_length=min(256, a.pack_length))[-1]
    per_row = max(1, length // sequence)  # worst case: every sequence at its longest
    mini_batches = d.train_batch_size // a.ppo_mini_batch_size
    micro_per_mini = math.ceil(a.ppo_mini_batch_size * cfg.rollout.n / per_row / step_fn.rows_multiple)
    shape = f"{step_fn.rows_multiple} x {length}"
    lowered = step_fn.lower_programs(state, 1, length, reference=state.params if a.kl.enabled else None)
    calls = {"update": a.ppo_epochs * mini_batches * micro_per_mini, "apply": a.ppo_epochs * mini_batches,
             "old_logprobs": mini_batches * micro_per_mini, "ref_logprobs": mini_batches * micro_per_mini}
    beside = {"update": ("optimizer", "reference", "engine weights"), "apply": ("reference", "engine weights"),
              "old_logprobs": ("optimizer", "reference", "engine weights"),
              "ref_logprobs": ("params", "optimizer", "engine weights")}
    for name, program in lowered.items():
        plan.programs.append(_compiled(name, program, "-" if name == "apply" else shape, calls[name], beside[name]))

    if plans_engine:
        local = list(accelerator.local_devices) if accelerator.processes > 1 else devices
        engine_mesh = mesh if local == devices else make_mesh(1, -1, 1, devices=local)
        rows = math.ceil(samples / accelerator.processes / max(1, cfg.rollout.overlap_chunks))
        j = cfg.rollout.jax
        sampling = lower_sampling(model, engine_mesh, rows=rows, prompt_length=d.max_prompt_length,
                                  max_tokens=cfg.rollout.max_tokens, n=cfg.rollout.n, max_batch_rows=j.max_batch_rows,
                                  kv_cache_bytes=j.kv_cache_bytes, block_size=j.kv_block_size)
        # A copy beside the trainer's parameters: on several devices, across processes, or off-policy (the update
        # reuses the parameters' buffers while the engine still samples with them).
        if sampling.weights_are_copy or accelerator.processes > 1 or a.off_policy:
            plan.resident["engine weights"] = _device_bytes(sampling.weights)
        plan.resident["KV cache"] = _device_bytes(sampling.cache)
        plan.notes.append(f"decode attention: paged, {PAGED_KERNELS[paged]}, KV blocks of {j.kv_block_size} tokens")
        batches = math.ceil(rows / sampling.batch_rows) * max(1, cfg.rollout.overlap_chunks)
        weights_in_args = () if "engine weights" in plan.resident else ("params",)
        others = tuple(n for n in ("params", "optimizer", "reference") if n not in weights_in_args)
        slots = sampling.slots
        prompts = f"{max(1, sampling.batch_rows // cfg.rollout.n)} prompts"
        plan.programs.append(_compiled("prefill", sampling.programs["prefill"], prompts, batches, others))
        plan.programs.append(_compiled("decode", sampling.programs["decode"], f"{sampling.batch_rows} rows x {slots} "
                                       "slots", batches * cfg.rollout.max_tokens, others))
    if not plan.fits:
        plan.advice = _advice(plan, cfg)
    return plan


PAGED_KERNELS = {"xla": "plain XLA", "tpu": "JAX's ragged_paged_attention kernel",
                 "gpu": "JAX's Pallas paged_attention kernel"}


def _compiled(name: str, lowered, shape: str, calls: int, others: tuple[str, ...]) -> Program:
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        # The TPU compiler refuses a program whose temporaries exceed the device's memory ("... temporaries
        # (15.88G) exceeds available HBM (15.75G)"): that is the answer, not a failure of the plan.
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise KiminaError(f"compiling {name} ({shape}) failed: {str(error).splitlines()[0]}") from None
        seconds = time.perf_counter() - start
        needed = re.search(r"temporaries \(([\d.]+)G\)", str(error))
        temporaries = int(float(needed[1]) * GiB) if needed else 0
        log.info("%s (%s) does not fit: the compiler ran out of memory after %.1f s", name, shape, seconds)
        return Program(name, shape, seconds, 0, temporaries, 0, 0, 0.0, calls, others, None, (),
                       out_of_memory=str(error).splitlines()[0].split("RESOURCE_EXHAUSTED: ")[-1])
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    log.info("compiled %s (%s) in %.1f s", name, shape, seconds)
    return Program(name, shape, seconds, memory.argument_size_in_bytes, memory.temp_size_in_bytes,
                   memory.output_size_in_bytes, memory.alias_size_in_bytes, float(cost.get("flops", 0.0)), calls,
                   others, compiled, lowered.args_info[0])


def _device_bytes(tree) -> int:
    """Bytes one device holds of a tree of shape-dtype structs with shardings (the most loaded device)."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        itemsize = np.dtype(leaf.dtype).itemsize if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else 8
        shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize
        for device in leaf.sharding.device_set:
            per_device[device] = per_device.get(device, 0) + shard
    return max(per_device.values(), default=0)


def _advice(plan: Plan, cfg: TrainConfig) -> str:
    """One line: what to change so the largest user of memory fits."""
    budget = plan.budget / GiB
    state = sum(plan.resident[n] for n in TRAINING if n in plan.resident) / GiB
    if state > budget or not plan.programs:
        return (f"the parameters and optimizer state alone need {state:.2f} GiB per device of {budget:.2f}: use a "
                f"bigger slice (more devices for mesh.fsdp, now {plan.mesh['fsdp']})"
                + (" or model.param_dtype=bfloat16" if cfg.model.param_dtype == "float32" else ""))
    refused = [p for p in plan.programs if p.out_of_memory]
    if refused:
        worst = refused[0]
        return _change(worst.name, cfg, f"{worst.name}: the compiler ran out of memory ({worst.out_of_memory})")
    worst = max(plan.programs, key=lambda p: p.peak(plan.resident))
    need = worst.peak(plan.resident) / GiB
    return _change(worst.name, cfg, f"{worst.name} needs {need:.2f} GiB per device of {budget:.2f}")


def _change(program: str, cfg: TrainConfig, problem: str) -> str:
    """`problem`, then the keys that shrink `program`."""
    if program in ("prefill", "decode"):
        j = cfg.rollout.jax
        return (f"{problem}: lower rollout.jax.kv_cache_bytes (now {j.kv_cache_bytes}) or rollout.jax.max_batch_rows "
                f"(now {j.max_batch_rows}), or use a bigger slice")
    a = cfg.algorithm
    remat = "" if cfg.model.remat == "full" else "set model.remat=full, "
    return (f"{problem}: {remat}lower algorithm.pack_length (now {a.pack_length}) or algorithm.micro_batch_rows "
            f"(now {a.micro_batch_rows}), or use a bigger slice")


def run_step(plan: Plan, cfg: TrainConfig) -> list[tuple[str, int, int | None]]:
    """Execute each compiled program once on the devices present, from random weights, the resident state
    allocated as a run holds it: (what, predicted bytes, measured bytes or None) on the most loaded device. The
    resident state is measured from the arrays as placed; a program's peak from the allocator's peak so far (GPU,
    TPU; CPU devices keep no such statistics). The decode loop runs one iteration (its rows start one slot short of
    their blocks)."""
    m = cfg.model
    model = Qwen3ForCausalLM(recipe_architecture(cfg), dtype=to_jax_dtype(m.dtype), param_dtype=to_jax_dtype(m.param_dtype),
                             attention_impl=m.attention_impl, remat=m.remat, rngs=nnx.Rngs(cfg.experiment.seed))
    state = plan.step_fn.init_state(model, seed=cfg.experiment.seed)
    del model
    gc.collect()  # the model's own (unsharded) arrays: not part of what a run holds
    held: dict[str, object] = {"params": state.params}
    if "reference" in plan.resident:
        held["reference"] = jax.tree.map(jnp.copy, state.params)
    programs = {p.name: p for p in plan.programs}
    if "engine weights" in plan.resident:
        info, shardings = programs["prefill"].args_info[0], programs["prefill"].compiled.input_shardings[0][0]
        held["engine weights"] = jax.tree.map(lambda p, i, s: jax.device_put(p.astype(i.dtype), s, may_alias=False),
                                              state.params,
                                              info, shardings)
    resident = sum(plan.resident[name] for name in (*TRAINING, "engine weights") if name in plan.resident)
    rows = [("resident state", resident, _held_bytes([state.params, state.opt_state, *held.values()]))]
    pools = None  # the KV block pools, alive from the first prefill through decoding
    for program in plan.programs:
        args = [_zeros(info, sharding) for info, sharding in zip(program.args_info, program.compiled.input_shardings[0])]
        if program.name == "apply":
            args[0] = state
        elif program.name in ("prefill", "decode"):
            args[0] = held.get("engine weights", state.params)
            if pools is not None:
                args[1] = pools
            if program.name == "decode":
                args[2], args[-1] = _one_step(args[2]), jnp.int32(len(args[2].done))
        else:
            args[0] = held["reference" if program.name == "ref_logprobs" else "params"]
        out = jax.block_until_ready(program.compiled(*args))
        if program.name in ("prefill", "decode"):
            pools = out[0]
        if program.name == "apply":
            state = out[0]
            held["params"] = state.params
        rows.append((program.name, program.peak(plan.resident), _allocator_peak()))
    return rows


def _zeros(info_tree, sharding_tree):
    """Zero arrays (fresh keys for key arrays) of the lowered arguments' shapes, placed by the compiled shardings."""
    def zeros(info, sharding):
        if jax.dtypes.issubdtype(info.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.split(jax.random.key(0), math.prod(info.shape)).reshape(info.shape),
                                  sharding)
        return jax.device_put(np.zeros(info.shape, info.dtype), sharding)

    return jax.tree.map(zeros, info_tree, sharding_tree)


def _one_step(rows):
    """The decode batch with every row one cache slot short of its blocks: the loop stops after one step."""
    return rows._replace(capacity=jax.jit(lambda lengths: lengths + 1)(rows.lengths))


def _held_bytes(trees) -> int:
    """Bytes of these arrays on the most loaded device, as placed (each array once)."""
    per_device: dict = {}
    arrays = {id(leaf): leaf for leaf in jax.tree.leaves(trees)}
    for array in arrays.values():
        for shard in array.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


def _allocator_peak() -> int | None:
    peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in jax.local_devices()]
    return None if None in peaks else max(peaks)


def format_run(rows: list[tuple[str, int, int | None]]) -> str:
    """--run's table: predicted beside measured."""
    lines = ["measured (--run, random weights)", "what  predicted GiB  measured GiB"]
    for what, predicted, measured in rows:
        shown = "n/a (no allocator statistics)" if measured is None else f"{measured / GiB:.3g}"
        lines.append(f"{what}  {predicted / GiB:.3g}  {shown}")
    return "\n".join(lines)


def format_plan(plan: Plan, recipe: str) -> str:
    """The table the command prints."""
    g = lambda b: f"{b / GiB:.3g}"  # noqa: E731
    lines = [f"plan: {recipe} on {plan.accelerator.name}, mesh {plan.mesh}; jax {jax.__version__}"]
    lines += [f"note: {note}" for note in plan.notes]
    header = ("program", "shape", "compile s", "args GiB", "temp GiB", "out GiB", "alias GiB", "peak GiB", "calls/step",
              "GFLOP/call")
    rows = [(p.name, p.shape, f"{p.compile_s:.1f}", g(p.arguments), g(p.temporaries), g(p.outputs), g(p.aliased),
             g(p.peak(plan.resident)), str(p.calls), f"{p.flops / 1e9:.1f}") if not p.out_of_memory else
            (p.name, p.shape, f"{p.compile_s:.1f}", "-", f">{g(p.temporaries)}", "-", "-", "out of memory", str(p.calls),
             "-") for p in plan.programs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows] if rows else []:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not rows:
        lines.append("programs: not compiled (the resident state alone does not fit)")
    lines.append("resident per device: " + ", ".join(f"{name} {g(size)} GiB" for name, size in plan.resident.items()))
    budget = "unknown memory" if plan.budget is None else f"{g(plan.budget)} GiB"
    lines.append(f"peak {g(plan.peak)} GiB per device of {budget}: {'fits' if plan.fits else 'DOES NOT FIT'}"
                 + (" (a program the compiler refused is counted by its temporaries alone)"
                    if any(p.out_of_memory for p in plan.programs) else ""))
    if plan.programs:
        flops = plan.step_flops
        ideal = (f"; ideal step {flops / plan.accelerator.peak_flops:.3g} s at {plan.accelerator.peak_flops / 1e12:.0f} "
                 "TFLOP/s per device" if plan.accelerator.peak_flops else "")
        refused = [p.name for p in plan.programs if p.out_of_memory]
        left_out = f" (without {', '.join(refused)}: not compiled)" if refused else ""
        lines.append(f"FLOPs per step per device (every response max_tokens long){left_out}: {flops:.3e}{ideal}")
    if plan.advice:
        lines.append(f"does not fit: {plan.advice}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile a recipe's programs for a TPU slice (or the devices "
                                     "present) and say whether it fits")
    parser.add_argument("--config", default=None, help="recipe YAML or shipped recipe name (default: tiny)")
    parser.add_argument("--topology", default=None, help="Cloud TPU type (v5p-8, v5litepod-8, v6e-8, ...) or JAX "
                        "topology (v5e:2x2); default: the devices present")
    parser.add_argument("--run", action="store_true", help="then execute each program once on random weights and "
                        "print measured beside predicted memory (the devices present only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.run and args.topology:
            raise KiminaError("--run executes on the devices present: leave out --topology")
        cfg = load_config(args.config, args.overrides, needs_verifier=False)
        accelerator = tpu_accelerator(args.topology) if args.topology else present_accelerator()
        plan = plan_recipe(cfg, accelerator)
    except KiminaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_plan(plan, args.config or TINY))
    if args.run and plan.fits:
        print(format_run(run_step(plan, cfg)))
    elif args.run:
        print("--run: not run, the plan does not fit")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
