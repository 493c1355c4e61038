"""Rows in flight per device with the rollout engine's KV cache, before (one fixed reservation per row) and after
(the paged cache of `kimina_jax.rollout.kv_blocks`), from the allocator's accounting: no model runs, no timing.

- before: the old engine reserved `--prompt-len` + `--max-response` slots for every row and decoded the largest
  power of two of rows (at most `--max-batch-rows`) whose slots fit `--kv-cache-bytes`.
- after: `--rows` rows (`--samples` per prompt, prompts of `--prompt-len` tokens) go through a real `BlockPool`
  of the blocks the budget buys (`pool_blocks`). A prompt's blocks are allocated once, its samples share the
  full ones and each copies the last partial one; the prompt's own references are released once all its samples
  are admitted. Admission is first come first served, while fewer than `--max-batch-rows` rows run and the pool
  has the blocks the next row needs now plus `--headroom` blocks (default 16, as `paged_scheduler`) per running row
  (at most a quarter of the pool), the new one included.
  Every decode step each running row gains a token, taking a block when it crosses a block boundary; when the
  pool is empty the youngest running row is preempted (its blocks released, requeued at the front, re-prefilled
  later with prompt + tokens so far into blocks of its own). Finished rows release their blocks.
  Decode runs in chunks of `--block-size` steps (a row crosses at most one boundary in a chunk; the events inside
  a chunk are handled in step order), admission between chunks. Not simulated: `paged_scheduler` also gives rows
  64 tokens' blocks ahead where the pool allows it, and prefills a prompt again for samples admitted later.
Response lengths: gamma with shape 2 and the given mean (seeded numpy), at least 1, capped at `--max-response`;
the cap lowers the mean, printed as `mean len`. `after rows mean` is over the decode steps while rows still wait (the
capacity), `all steps` over every step (with the tail, where the queue is empty and the batch drains);
`re-prefill %`: the tokens preempted rows are prefilled with again (prompt + tokens so far), per response token.

    python benchmarks/kv_capacity.py                         # the 0.6B and 1.7B recipes' models, 16 GiB
    python benchmarks/kv_capacity.py --block-size 64 --kv-cache-bytes 8589934592 --rows 512
"""
from __future__ import annotations

import argparse
import collections
import dataclasses

import numpy as np

from kimina_jax.models.qwen3.architectures import KNOWN_MODELS, known_architecture
from kimina_jax.rollout.kv_blocks import BlockPool, block_bytes, pool_blocks
from padding import print_markdown_table


@dataclasses.dataclass
class Row:
    prompt: int
    target: int  # response tokens it ends with
    generated: int = 0
    resumed: bool = False  # preempted: re-prefilled into blocks of its own
    shared: list[int] = dataclasses.field(default_factory=list)
    own: list[int] = dataclasses.field(default_factory=list)


def before_rows(config, dtype: str, kv_cache_bytes: int, slots: int, max_batch_rows: int) -> int:
    fitting = min(kv_cache_bytes // (slots * block_bytes(config, dtype, 1)), max_batch_rows)
    return 1 << (fitting.bit_length() - 1) if fitting else 0


def simulate(pool: BlockPool, lengths: np.ndarray, samples: int, prompt_len: int, block_size: int,
             max_batch_rows: int, headroom: int) -> dict[str, float]:
    full, partial = divmod(prompt_len, block_size)
    partial = int(partial > 0)
    queue = collections.deque(Row(index // samples, int(length)) for index, length in enumerate(lengths))
    unadmitted = collections.Counter(row.prompt for row in queue)  # first admissions left per prompt
    prompt_blocks: dict[int, list[int]] = {}  # the prompt's own references
    running: list[Row] = []  # in admission order: the youngest last
    preemptions = reprefilled = max_rows = steps = row_steps = waiting_steps = waiting_row_steps = 0

    def need(row: Row) -> int:
        if row.resumed:
            return -(-(prompt_len + row.generated) // block_size)
        return (0 if row.prompt in prompt_blocks else full + partial) + partial

    def admit(row: Row) -> None:
        if row.resumed:
            row.own = pool.allocate(need(row))
        else:
            if row.prompt not in prompt_blocks:
                prompt_blocks[row.prompt] = pool.allocate(full + partial)
            row.shared = prompt_blocks[row.prompt][:full]
            pool.share(row.shared)
            row.own = pool.allocate(partial)  # the copy it writes into
            unadmitted[row.prompt] -= 1
            if not unadmitted[row.prompt]:
                pool.release(prompt_blocks.pop(row.prompt))
        running.append(row)

    def drop(row: Row) -> None:
        pool.release(row.shared + row.own)
        row.shared, row.own = [], []

    while queue or running:
        while (queue and len(running) < max_batch_rows
               and pool.free >= need(queue[0]) + min(headroom * (len(running) + 1), pool.size // 4)):
            admit(queue.popleft())
        if not running:
            raise SystemExit(f"a row needing {need(queue[0])} blocks does not fit a pool of {pool.size}")
        max_rows = max(max_rows, len(running))
        runs = [min(block_size, row.target - row.generated) for row in running]
        events = []  # (step in the chunk, 0: needs a block / 1: finishes, row index): allocations go first
        for index, (row, run) in enumerate(zip(running, runs)):
            crossing = -(prompt_len + row.generated) % block_size + 1
            if crossing <= run:
                events.append((crossing, 0, index))
            if row.generated + run == row.target:
                events.append((run, 1, index))
        gone: set[int] = set()
        for step, finishes, index in sorted(events):
            if index in gone:
                continue
            if finishes:
                drop(running[index])
                gone.add(index)
                continue
            while not pool.free:
                victim = max(i for i in range(len(running)) if i not in gone)
                row = running[victim]
                runs[victim] = step - 1
                row.generated += step - 1
                row.resumed = True
                drop(row)
                gone.add(victim)
                queue.appendleft(row)  # older victims of this chunk end up ahead of younger ones
                preemptions += 1
                reprefilled += prompt_len + row.generated
                if victim == index:
                    break
            if index not in gone:
                running[index].own += pool.allocate(1)
        chunk_steps, chunk_row_steps = max(runs), sum(runs)
        steps += chunk_steps
        row_steps += chunk_row_steps
        if queue:
            waiting_steps += chunk_steps
            waiting_row_steps += chunk_row_steps
        for index, (row, run) in enumerate(zip(running, runs)):
            if index not in gone:
                row.generated += run
        running = [row for index, row in enumerate(running) if index not in gone]
    assert pool.free == pool.size, f"{pool.size - pool.free} blocks still held"
    assert not prompt_blocks and not any(unadmitted.values())
    return {"mean": waiting_row_steps / max(waiting_steps, 1), "all": row_steps / steps, "max": max_rows,
            "preemptions": preemptions, "reprefill": reprefilled / lengths.sum(), "peak": pool.peak_used / pool.size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(KNOWN_MODELS), metavar="HUB_NAME",
                        default=["AI-MO/Kimina-Prover-Distill-0.6B", "AI-MO/Kimina-Prover-Distill-1.7B"])
    parser.add_argument("--mean-lengths", nargs="+", type=int, default=[4096, 8192, 12288])
    parser.add_argument("--max-response", type=int, default=24576)
    parser.add_argument("--prompt-len", type=int, default=512, help="the prompt bucket")
    parser.add_argument("--samples", type=int, default=8, help="responses per prompt (rollout.n)")
    parser.add_argument("--rows", type=int, default=2048, help="rows through the pool per table row")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (rollout.jax.kv_block_size)")
    parser.add_argument("--kv-cache-bytes", type=int, default=16 * 2**30, help="per device")
    parser.add_argument("--max-batch-rows", type=int, default=128, help="rollout.jax.max_batch_rows")
    parser.add_argument("--headroom", type=int, default=16,
                        help="free blocks per running row to admit a row, at most a quarter of the pool "
                             "(paged_scheduler: ADMIT_HEADROOM_TOKENS = 256 tokens)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table = []
    for model in args.models:
        config = known_architecture(model)
        blocks = pool_blocks(config, args.dtype, args.block_size, args.kv_cache_bytes)
        print(f"{model}: {block_bytes(config, args.dtype, 1)} bytes a token, {blocks} blocks of {args.block_size} "
              f"tokens in {args.kv_cache_bytes / 2**30:g} GiB")
        before = before_rows(config, args.dtype, args.kv_cache_bytes, args.prompt_len + args.max_response,
                             args.max_batch_rows)
        for mean_length in args.mean_lengths:
            # The same lengths for every model: a fresh generator per table row.
            rng = np.random.default_rng(args.seed)
            lengths = np.clip(np.ceil(rng.gamma(2.0, mean_length / 2, args.rows)), 1, args.max_response)
            pool = BlockPool(blocks)
            after = simulate(pool, lengths, args.samples, args.prompt_len, args.block_size, args.max_batch_rows,
                             args.headroom)
            table.append({
                "model": model.rsplit("/", 1)[-1], "mean target": str(mean_length),
                "mean len": f"{lengths.mean():.0f}", "before rows": str(before),
                "after rows mean": f"{after['mean']:.1f}", "all steps": f"{after['all']:.1f}",
                "max": str(after["max"]), "after/before": f"{after['mean'] / before:.1f}x" if before else "-",
                "preemptions": str(after["preemptions"]), "re-prefill %": f"{100 * after['reprefill']:.0f}",
                "peak pool %": f"{100 * after['peak']:.1f}",
            })
    print(f"{args.rows} rows ({args.samples} per prompt of {args.prompt_len} tokens), responses gamma(shape 2) "
          f"capped at {args.max_response}, at most {args.max_batch_rows} batch rows, headroom {args.headroom} "
          f"block(s) a row")
    print_markdown_table(table)


if __name__ == "__main__":
    main()
