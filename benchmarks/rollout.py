"""Rollout speed: generated tokens/s of the JAX sampler and of vLLM, and weight-sync seconds vs model size.

    python benchmarks/rollout.py                                   # CPU: tiny and small shapes, fp32
    python benchmarks/rollout.py --shape qwen3-0.6b qwen3-1.7b --dtype bfloat16 --prompts 64 --n 8 --max-tokens 1024

Weights are random: the JAX model is initialised in memory, vLLM starts from a folder holding only config.json
(`load_format="dummy"`) and then receives the JAX weights through `update_weights`, the push the trainer makes
after every step (timed: median of --syncs pushes after a warm-up one). Generation runs once to compile/warm
up, then is timed; tokens/s counts the tokens actually generated (EOS is disabled). vLLM is skipped when not
installed. The JAX rows give the sampler's rows in flight (mean over decode steps / max). Targets (issue 4), one
H100, Qwen3-1.7B shape: weight sync under 1 s; the JAX sampler within 3x of vLLM's tokens/s. `--engines stream`
times the trainer's half of a vLLM push alone (where vLLM cannot be installed).
`--mean-tokens L` makes response lengths vary as in RL (each token stops a row with probability about 1/L, the
random model being near uniform), which is where batching matters: vLLM batches continuously, and so does the
JAX sampler within `--max-batch-rows` rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# vLLM and JAX share the accelerator: JAX must not take most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from kimina_jax.models import Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from kimina_jax.rollout import JaxSampler, SamplingParams  # noqa: E402

# Architecture numbers: SPEC 2 for the Qwen3 shapes; `tiny` is the test model, `small` a CPU-sized step up.
SHAPES = {
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}


@dataclasses.dataclass
class Row:
    shape: str
    params_m: float
    engine: str
    rows: int
    tokens: int
    gen_s: float | None  # None: the row times a weight sync alone
    sync_s: float | None
    in_flight: str = "-"  # the JAX sampler's rows in flight during the timed call: mean / max

    @property
    def tokens_per_s(self) -> float | None:
        return None if self.gen_s is None else self.tokens / self.gen_s


def make_model(shape: str, dtype: str) -> Qwen3ForCausalLM:
    config = Qwen3Config(**SHAPES[shape], rope_theta=1e6, max_position_embeddings=40960, eos_token_id=None)
    return Qwen3ForCausalLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))


def timed_generate(engine, prompts, params: SamplingParams) -> tuple[int, float]:
    engine.generate(prompts, params)  # compile / warm up
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for row in out for c in row), seconds


def bench_jax(shape, model, prompts, params, syncs: int, max_batch_rows: int | None,
              kv_cache_bytes: int | None) -> Row:
    sampler = JaxSampler(model, eos_token_ids=(), max_batch_rows=max_batch_rows or len(prompts) * params.n,
                         kv_cache_bytes=kv_cache_bytes)
    tokens, seconds = timed_generate(sampler, prompts, params)
    timed_call = sampler.last_call
    in_flight = f"{timed_call.row_steps / max(1, timed_call.decode_steps):.1f} / {timed_call.max_rows}"
    times = []
    for _ in range(syncs):
        start = time.perf_counter()
        sampler.update_weights(model)
        times.append(time.perf_counter() - start)
    return Row(shape, model.config.num_params / 1e6, "jax", len(prompts) * params.n, tokens, seconds,
               statistics.median(times), in_flight)


def bench_stream(shape, model, syncs: int, dtype: str) -> Row:
    """The trainer's half of a vLLM push without vLLM: every parameter in HF names and layout, handed to torch on
    the accelerator (DLPack) or the host, as `update_weights` streams them into vLLM's reload."""
    import torch

    from kimina_jax.rollout.weights import hf_torch_tensors

    device = "cuda" if jax.default_backend() == "gpu" else "cpu"

    def one_push() -> float:
        start = time.perf_counter()
        for _, tensor in hf_torch_tensors(model, device=device, dtype=getattr(torch, dtype)):
            del tensor
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    one_push()  # compiles the per-tensor casts and transposes
    times = [one_push() for _ in range(syncs)]
    return Row(shape, model.config.num_params / 1e6, "stream", 0, 0, None, statistics.median(times))


def bench_vllm(shape, model, prompts, params, syncs: int, dtype: str, gpu_memory_utilization: float) -> Row:
    from kimina_jax.rollout import VllmEngine

    on_cpu = jax.default_backend() == "cpu"
    max_model_len = len(prompts[0]) + params.max_tokens
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(model.config.to_dict(dtype=dtype)))
        engine = VllmEngine(
            folder, load_format="dummy", dtype=dtype, eos_token_ids=(), max_model_len=max_model_len,
            enforce_eager=on_cpu, kv_cache_memory_bytes=(1 << 30) if on_cpu else None,
            gpu_memory_utilization=gpu_memory_utilization,
        )
    with engine:
        engine.update_weights(model)  # warm-up push
        times = []
        for _ in range(syncs):
            engine.update_weights(model)
            times.append(engine.last_sync_s)
        tokens, seconds = timed_generate(engine, prompts, params)
    return Row(shape, model.config.num_params / 1e6, "vllm", len(prompts) * params.n, tokens, seconds,
               statistics.median(times))


def print_table(rows: list[Row]) -> None:
    header = (f"{'shape':<12}{'params':>9}  {'engine':<6}{'rows':>6}{'tokens':>9}{'gen s':>9}{'tokens/s':>11}"
              f"{'sync s':>10}  in flight")
    print(header)
    print("-" * len(header))
    for r in rows:
        sync = f"{r.sync_s:.4f}" if r.sync_s is not None else "-"
        gen = ("-", "-") if r.gen_s is None else (f"{r.gen_s:.3f}", f"{r.tokens_per_s:.1f}")
        print(f"{r.shape:<12}{r.params_m:>8.1f}M  {r.engine:<6}{r.rows:>6}{r.tokens:>9}{gen[0]:>9}{gen[1]:>11}"
              f"{sync:>10}  {r.in_flight}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["tiny", "small"])
    parser.add_argument("--engines", nargs="+", choices=["jax", "vllm", "stream"], default=["jax", "vllm"],
                        help="stream: only the trainer's half of the vLLM weight push (needs torch, not vLLM)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--mean-tokens", type=int, default=0,
                        help="stop ids that end a row after about this many tokens (0: every row runs to --max-tokens)")
    parser.add_argument("--max-batch-rows", type=int, default=None, help="JAX sampler (default: every row at once)")
    parser.add_argument("--kv-cache-bytes", type=int, default=None,
                        help="JAX sampler: its KV block pool per device (default: what the call could need)")
    parser.add_argument("--syncs", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = parser.parse_args(argv)
    engines = [e for e in args.engines if e != "vllm" or importlib.util.find_spec("vllm") is not None]
    if engines != args.engines:
        print("vLLM is not installed: its rows are skipped", file=sys.stderr)
    rows = []
    for shape in args.shape:
        model = make_model(shape, args.dtype)
        stops = tuple(range(model.config.vocab_size // args.mean_tokens)) if args.mean_tokens else ()
        params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0, stop_token_ids=stops)
        rng = np.random.default_rng(0)
        prompts = rng.integers(0, model.config.vocab_size, (args.prompts, args.prompt_len)).tolist()
        if "jax" in engines:
            rows.append(bench_jax(shape, model, prompts, params, args.syncs, args.max_batch_rows, args.kv_cache_bytes))
        if "vllm" in engines:
            rows.append(bench_vllm(shape, model, prompts, params, args.syncs, args.dtype, args.gpu_memory_utilization))
        if "stream" in engines:
            rows.append(bench_stream(shape, model, args.syncs, args.dtype))
    print(f"device: {jax.devices()[0].device_kind}, dtype {args.dtype}, {args.prompts} prompts x n={args.n}, "
          f"prompt {args.prompt_len} tokens, up to {args.max_tokens} new tokens"
          + (f" (about {args.mean_tokens} on average)" if args.mean_tokens else ""))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
