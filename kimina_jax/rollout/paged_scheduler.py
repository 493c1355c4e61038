"""One engine call's rows through the paged engine: continuous batching over a pool of KV blocks.

Rows (a prompt and a sample's random stream; a continued row also its response so far) wait in order. A row is
admitted into a free decode-batch slot when its data shard's pool has the blocks it needs now plus headroom for
the rows running there; a prompt is prefilled once for
its samples admitted together, which share its full blocks and each take a copy of its last partial block (copy
on write); room for the running rows to grow (`ADMIT_HEADROOM_TOKENS` each) is kept free. Before every
decode call each running row is given blocks for `AHEAD_TOKENS` more tokens when the pool allows it for all of
them, else for its next token alone; when even that runs out, the youngest rows of the
shard are preempted: their blocks freed, their tokens so far kept, and they wait (first in line) to be prefilled
again with prompt + tokens so far (recompute preemption). A decode call runs until rows finish (then waiting rows
are admitted) or a row needs a block. Once nothing waits, running rows are gathered into the smallest
power-of-two batch that holds them (moving block tables, not caches). A continued row starts as a preempted one
does (prefilled with prompt + response so far). `on_finished` is told of each row as it finishes; once it asks to
stop, the call ends with the other rows unfinished (their tokens so far copied out, their blocks freed).

On a mesh the batch slots, the prefill rows and the pool are split into data shards alike (slot s belongs to
shard s // (slots / shards)); each shard has its own `BlockPool` and block ids.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kimina_jax.errors import KiminaError
from kimina_jax.rollout.kv_blocks import BlockPool
from kimina_jax.rollout.paged_steps import NewRows

MIN_PROMPT_BUCKET = 16
AHEAD_TOKENS = 16  # blocks given ahead: a decode call runs at least this many steps unless rows finish
ADMIT_HEADROOM_TOKENS = 256  # free blocks kept per running row when admitting (`_plan`)
REFILL_FRACTION = 8  # with rows waiting, the loop stops to refill once 1/8 of the batch (at least one row) is free
MIN_PAIRS = 16


@dataclasses.dataclass
class GenerationStats:
    """What one or more `generate` calls did, from the allocator's and scheduler's own accounting."""

    decode_steps: int = 0
    row_steps: int = 0  # sum over decode steps of the rows running
    max_rows: int = 0
    peak_blocks: float = 0.0  # the largest fraction of a shard's pool in use
    preempted: int = 0
    prefilled: int = 0  # sequences prefilled (a prompt once for its samples admitted together; preempted rows again)
    blocks_held_after: int = 0  # blocks still held once a call returned (0: no leak)

    def add(self, other: "GenerationStats") -> None:
        self.decode_steps += other.decode_steps
        self.row_steps += other.row_steps
        self.max_rows = max(self.max_rows, other.max_rows)
        self.peak_blocks = max(self.peak_blocks, other.peak_blocks)
        self.preempted += other.preempted
        self.prefilled += other.prefilled
        self.blocks_held_after += other.blocks_held_after

    def metrics(self) -> dict[str, float]:
        return {
            "rollout/decode_steps": float(self.decode_steps),
            "rollout/rows_in_flight/mean": self.row_steps / max(1, self.decode_steps),
            "rollout/rows_in_flight/max": float(self.max_rows),
            "rollout/kv_blocks_used/max": self.peak_blocks,
            "rollout/preempted": float(self.preempted),
        }


def bucket(size: int, minimum: int = 1) -> int:
    """The next power of two >= size (and >= minimum)."""
    return max(minimum, 1 << (int(size) - 1).bit_length())


def pairs_bucket(pairs: int) -> int:
    """The XLA path's (row, block) pairs bound for `pairs`: eight sizes per octave (1, 1.125, ... 1.875 x a power
    of two), at least `MIN_PAIRS`: about 6% of the gathered blocks wasted on average, against 50% with powers of
    two (the XLA path's gather is most of a CPU decode step)."""
    if pairs <= MIN_PAIRS:
        return MIN_PAIRS
    octave = floor_pow2(pairs - 1)
    return next(octave * eighths // 8 for eighths in range(9, 17) if octave * eighths // 8 >= pairs)


def floor_pow2(size: int) -> int:
    return 1 << (int(size).bit_length() - 1)


class CallShape(NamedTuple):
    """A call's decode batch and block tables, and the blocks a data shard's pool needs at most."""

    slots: int  # decode batch slots: a power of two within max_batch_rows, at least one per data shard
    width: int  # block table entries per row: a power of two (the GPU kernel splits tables evenly)
    pool_need: int  # blocks per data shard with every slot's row at its longest (and one spare block each)


def call_shape(rows: int, longest: int, block_size: int, max_batch_rows: int, shards: int) -> CallShape:
    """The shape of a call of `rows` rows whose longest may cache `longest` tokens (prompt bucket + max_tokens)."""
    slots = bucket(max(shards, min(bucket(rows), floor_pow2(max_batch_rows))))
    width = bucket(-(-longest // block_size))
    return CallShape(slots, width, (slots // shards) * (width + 1))


class Generation:
    """The rows of one call, their slots and blocks (host side); `run` returns each row's (tokens, log-probs) and
    whether it finished.

    Row r is prompt `prompts[rows[r]]` sampled with stream `keys[r]`, generating at most `caps[r]` tokens (`None`:
    max_tokens), `responses` holding the rows continued (row -> tokens and log-probs so far); `on_finished(row,
    tokens, log-probs)` returns True to stop the call.
    """

    def __init__(self, engine, prompts, rows, call_key, stop_ids, params, *, shards: int, pool_size: int | None,
                 keys, caps=None, responses=None, on_finished=None):
        self.engine, self.steps, self.prompts, self.rows, self.params = engine, engine._steps, prompts, rows, params
        self.call_key, self.shards, self.keys, self.on_finished = call_key, shards, keys, on_finished
        self.caps = np.full(len(rows), params.max_tokens) if caps is None else np.asarray(caps)
        self.block_size = engine.block_size
        self.sampling = (jnp.asarray(stop_ids or [-1], jnp.int32), jnp.float32(params.temperature),
                         jnp.float32(params.top_p), jnp.int32(params.top_k))
        longest = bucket(max(len(prompts[i]) for i in rows), MIN_PROMPT_BUCKET) + params.max_tokens
        shape = call_shape(len(rows), longest, self.block_size, engine.max_batch_rows, shards)
        self.slots, self.width = shape.slots, shape.width
        size = shape.pool_need if pool_size is None else min(pool_size, shape.pool_need)
        if size * self.block_size < longest + self.block_size:
            raise KiminaError(f"rollout.jax.kv_cache_bytes holds {size} KV blocks of {self.block_size} tokens per "
                              f"device, fewer than one row of {longest} tokens needs: raise it or lower "
                              f"data.max_response_length")
        self.pools = [BlockPool(size) for _ in range(shards)]
        self.waiting = collections.deque(range(len(rows)))
        # Continued and preempted rows' tokens and log-probs so far.
        self.kept: dict[int, tuple[np.ndarray, np.ndarray]] = dict(responses or {})
        self.origin = np.full(self.slots, -1)  # row per slot; -1: free
        self.blocks: list[list[int]] = [[] for _ in range(self.slots)]
        self.age = np.zeros(self.slots, np.int64)  # admission order: the youngest are preempted first
        self.admitted = 0
        self.lengths = np.zeros(self.slots, np.int64)
        self.outputs: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(rows)
        self.finished = np.zeros(len(rows), bool)
        self.stats = GenerationStats()
        self.device_pools = engine.new_pools(size * shards)
        self.batch = self.steps.empty_rows(call_key, slots=self.slots, width=self.width,
                                           max_tokens=params.max_tokens, vocab=engine.config.vocab_size)

    def shard(self, slot: int) -> int:
        return slot // (len(self.origin) // self.shards)

    def run(self) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
        while self.waiting or (self.origin >= 0).any():
            if self.waiting:
                self._admit()
                if not (self.origin >= 0).any():  # the pool holds a row at its longest (checked): not reached
                    raise KiminaError("JaxSampler: no waiting row fits the empty KV block pool")
            elif len(self.origin) > self.shards:
                self._compact()
            self._give_blocks()
            if not (self.origin >= 0).any():  # all preempted: the pool holds a row at its longest, so one fits now
                continue
            batch = len(self.origin)
            running = int((self.origin >= 0).sum())
            stop_at = (batch - running) + max(1, batch // REFILL_FRACTION) if self.waiting else \
                max(batch - batch // 2, batch - running + 1)
            before = np.asarray(self.batch.count)
            self.device_pools, self.batch = self.steps.decode(
                self.engine._state, self.device_pools, self.batch, *self.sampling, jnp.int32(stop_at),
                greedy=self.params.greedy, filters=self.params.filters, pairs=self._pairs())
            count, self.lengths = (np.array(a) for a in jax.device_get((self.batch.count, self.batch.lengths)))
            steps = int((count - before)[self.origin >= 0].max(initial=0))
            self.stats.decode_steps += steps
            self.stats.row_steps += steps * running
            self.stats.max_rows = max(self.stats.max_rows, running)
            if self._harvest():
                self._interrupt()
                break
        self.stats.blocks_held_after = sum(pool.used for pool in self.pools)
        self.stats.peak_blocks = max(pool.peak_used / pool.size for pool in self.pools)
        return self.outputs, self.finished

    # -------------------------------------------------------------------------------------------- blocks
    def _pairs(self) -> int:
        """The (row, block) pairs the XLA path gathers: a shard's held blocks at most, bucketed."""
        if self.steps.impl != "xla":
            return 0
        held = [0] * self.shards
        for slot in np.flatnonzero(self.origin >= 0):
            held[self.shard(slot)] += len(self.blocks[slot])
        return pairs_bucket(max(held))

    def _give_blocks(self) -> None:
        """Blocks for every running row's next tokens (`AHEAD_TOKENS` where the pool allows all rows of the shard
        as many, else the next one), preempting the youngest rows of a shard whose pool runs out."""
        for shard, pool in enumerate(self.pools):
            mine = [s for s in np.flatnonzero(self.origin >= 0) if self.shard(s) == shard]
            ahead = {s: max(0, self._blocks_for(min(self.lengths[s] + AHEAD_TOKENS, self._longest(s)))
                            - len(self.blocks[s])) for s in mine}
            if sum(ahead.values()) > pool.free:
                ahead = {s: int(self.lengths[s] >= len(self.blocks[s]) * self.block_size) for s in mine}
            for slot in sorted(mine, key=lambda s: self.age[s]):
                while self.origin[slot] >= 0 and ahead[slot] > pool.free:
                    self._preempt(max((s for s in mine if self.origin[s] >= 0), key=lambda s: self.age[s]))
                if self.origin[slot] >= 0 and ahead[slot]:
                    self.blocks[slot] += pool.allocate(ahead[slot])
        self._upload_blocks()

    def _blocks_for(self, tokens: int) -> int:
        return -(-int(tokens) // self.block_size)

    def _longest(self, slot: int) -> int:
        """The tokens the slot's row may ever cache: its prompt and its cap."""
        row = self.origin[slot]
        return len(self.prompts[self.rows[row]]) + int(self.caps[row])

    def _upload_blocks(self) -> None:
        tables = np.zeros((len(self.origin), self.width), np.int32)
        capacity = np.zeros(len(self.origin), np.int32)
        for slot, blocks in enumerate(self.blocks):
            tables[slot, : len(blocks)] = blocks
            capacity[slot] = len(blocks) * self.block_size
        self.batch = self.steps.set_blocks(self.batch, jnp.asarray(tables), jnp.asarray(capacity))

    def _release(self, slot: int) -> None:
        self.pools[self.shard(slot)].release(self.blocks[slot])
        self.blocks[slot] = []
        self.origin[slot] = -1

    def _preempt(self, slot: int) -> None:
        """Free the slot's blocks and requeue its row, first in line, with what it generated so far."""
        row = int(self.origin[slot])
        (self.kept[row],) = self._generated([slot])
        self.batch = self.steps.finish(self.batch, jnp.asarray([slot], jnp.int32))
        self._release(slot)
        self.waiting.appendleft(row)
        self.stats.preempted += 1

    # ---------------------------------------------------------------------------------- rows in and out
    def _harvest(self) -> bool:
        """Copy out what the rows that finished generated, and free their slots and blocks; True when
        `on_finished` asked to stop."""
        finished = np.flatnonzero(np.asarray(self.batch.done) & (self.origin >= 0))
        stop = False
        if not len(finished):
            return stop
        for slot, generated in zip(finished, self._generated(finished)):
            row = int(self.origin[slot])
            self.outputs[row] = generated
            self.finished[row] = True
            self._release(slot)
            if self.on_finished is not None:
                stop = bool(self.on_finished(row, *generated)) or stop
        return stop

    def _interrupt(self) -> None:
        """End the call: the running rows' tokens so far copied out, their blocks freed; waiting rows keep what
        they had."""
        running = np.flatnonzero(self.origin >= 0)
        if len(running):
            for slot, generated in zip(running, self._generated(running)):
                self.outputs[self.origin[slot]] = generated
                self._release(slot)
            self.batch = self.steps.finish(self.batch, jnp.asarray(running, jnp.int32))
        empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
        for row in self.waiting:
            self.outputs[row] = self.kept.pop(row, empty)
        self.waiting.clear()

    def _generated(self, slots) -> list[tuple[np.ndarray, np.ndarray]]:
        """The tokens and log-probs the rows in `slots` generated so far (one copy from the device, its rows
        padded to a power of two)."""
        index = np.concatenate([slots, np.full(bucket(len(slots)) - len(slots), slots[0])])
        tokens, logprobs, count = jax.device_get(self.steps.take(
            (self.batch.tokens, self.batch.logprobs, self.batch.count), jnp.asarray(index)))
        return [(tokens[r, : count[r]], logprobs[r, : count[r]]) for r in range(len(slots))]

    def _sequence(self, row: int) -> list[int]:
        i = self.rows[row]
        return list(self.prompts[i]) + ([int(t) for t in self.kept[row][0]] if row in self.kept else [])

    def _admit(self) -> None:
        """Prefill waiting rows into free slots while their shard's pool has room (first come, first served)."""
        plans = []  # (shard, blocks of the prefilled sequence, [(row, slot, table)])
        free_slots = {s: [slot for slot in np.flatnonzero(self.origin < 0) if self.shard(slot) == s]
                      for s in range(self.shards)}
        while self.waiting:
            row = self.waiting[0]
            group = [row]
            if row not in self.kept:  # fresh samples of the same prompt next in line are admitted with it
                for other in itertools.islice(self.waiting, 1, None):
                    if other in self.kept or self.rows[other] != self.rows[row]:
                        break
                    group.append(other)
            plan = self._plan(group, free_slots)
            if plan is None:
                break
            plans.append(plan)
            for _ in plan[2]:
                self.waiting.popleft()
        if plans:
            self._start(plans)

    def _plan(self, group: list[int], free_slots) -> tuple | None:
        """Slots and blocks for the first rows of `group` in the shard with the most free blocks that has a free
        slot, or None when none has room for even the first."""
        length = len(self._sequence(group[0]))
        full, partial = divmod(length, self.block_size)
        for shard in sorted(free_slots, key=lambda s: -self.pools[s].free):
            pool, slots = self.pools[shard], free_slots[shard]
            # Room for the shard's running rows to grow stays free (at most a quarter of the pool): admitting into
            # it would preempt them, or the new rows, soon after (kv_capacity.py: with 1 block a row, 93-105% of
            # the generated tokens were prefilled again; with 256 tokens' worth 25-72%, as many rows in flight).
            running = sum(1 for s in np.flatnonzero(self.origin >= 0) if self.shard(s) == shard)
            headroom = min(running * self._blocks_for(ADMIT_HEADROOM_TOKENS), pool.size // 4)
            count = min(len(group), len(slots))
            # The sequence's blocks, then one own block per row: a copy of the partial one, or the next token's.
            while count and full + int(partial > 0) + count + headroom > pool.free:
                count -= 1
            if not count:
                continue
            sequence_blocks = pool.allocate(full + int(partial > 0))
            admitted = []
            for row in group[:count]:
                slot = slots.pop(0)
                pool.share(sequence_blocks[:full])
                admitted.append((row, slot, sequence_blocks[:full] + pool.allocate(1)))
                self.origin[slot] = row
                self.age[slot] = self.admitted
                self.admitted += 1
            return shard, sequence_blocks, admitted
        return None

    def _start(self, plans) -> None:
        """Prefill the planned sequences (each shard's in its part of the prefill batch), copy their partial
        blocks to their rows, and start the rows in their slots."""
        per_shard = bucket(max(sum(1 for p in plans if p[0] == s) for s in range(self.shards)))
        sequences = [self._sequence(p[2][0][0]) for p in plans]
        length = bucket(max(len(s) for s in sequences), MIN_PROMPT_BUCKET)
        prefill_width = -(-length // self.block_size)
        rows_in = per_shard * self.shards
        tokens = np.zeros((rows_in, length), np.int32)
        lengths = np.ones(rows_in, np.int32)  # filler sequences: one dummy token, written nowhere
        tables = np.full((rows_in, prefill_width), self.pools[0].size, np.int32)
        place = {}
        used = collections.Counter()
        copies = [([], []) for _ in range(self.shards)]
        for p, ((shard, blocks, admitted), sequence) in enumerate(zip(plans, sequences)):
            u = shard * per_shard + used[shard]
            used[shard] += 1
            place[p] = u
            tokens[u, : len(sequence)] = sequence
            lengths[u] = len(sequence)
            tables[u, : len(blocks)] = blocks
            if len(sequence) % self.block_size:
                for _, _, table in admitted:
                    copies[shard][0].append(blocks[-1])
                    copies[shard][1].append(table[-1])
        self.device_pools, logits = self.steps.prefill(self.engine._state, self.device_pools, jnp.asarray(tokens),
                                                       jnp.asarray(lengths), jnp.asarray(tables))
        self.stats.prefilled += len(plans)
        most = max(len(c[0]) for c in copies)
        if most:
            width = bucket(most)
            source = np.zeros((self.shards, width), np.int32)
            target = np.full((self.shards, width), self.pools[0].size, np.int32)
            for shard, (src, dst) in enumerate(copies):
                source[shard, : len(src)], target[shard, : len(dst)] = src, dst
            self.device_pools = self.steps.copy_blocks(self.device_pools, jnp.asarray(source.reshape(-1)),
                                                       jnp.asarray(target.reshape(-1)))
        for shard, blocks, _ in plans:  # the rows hold what they need of the sequence's blocks
            self.pools[shard].release(blocks)
        self._insert([(place[p], *entry) for p, plan in enumerate(plans) for entry in plan[2]], logits)

    def _insert(self, started, logits) -> None:
        size = bucket(len(started))
        max_tokens = self.params.max_tokens
        new = NewRows(
            at=np.full(size, len(self.origin), np.int32), source=np.zeros(size, np.int32),
            tables=np.zeros((size, self.width), np.int32), lengths=np.zeros(size, np.int32),
            capacity=np.zeros(size, np.int32), tokens=np.zeros((size, max_tokens), np.int32),
            logprobs=np.zeros((size, max_tokens), np.float32), count=np.zeros(size, np.int32),
            limit=np.zeros(size, np.int32), key=np.zeros((size, 2), np.int32),
        )
        for r, (source, row, slot, table) in enumerate(started):
            self.blocks[slot] = table
            kept_tokens, kept_logprobs = self.kept.pop(row, (np.zeros(0, np.int32), np.zeros(0, np.float32)))
            new.at[r], new.source[r] = slot, source
            new.tables[r, : len(table)] = table
            new.lengths[r] = len(self.prompts[self.rows[row]]) + len(kept_tokens)
            new.capacity[r] = len(table) * self.block_size
            new.tokens[r, : len(kept_tokens)], new.logprobs[r, : len(kept_tokens)] = kept_tokens, kept_logprobs
            new.count[r] = len(kept_tokens)
            new.limit[r] = self.caps[row]
            new.key[r] = self.keys[row]
            self.lengths[slot] = new.lengths[r]
        self.batch = self.steps.insert(self.batch, logits, NewRows(*map(jnp.asarray, new)), self.call_key)

    def _compact(self) -> None:
        """Gather the running rows into the smallest power-of-two batch that holds them, each in its own shard."""
        running = [[s for s in np.flatnonzero(self.origin >= 0) if self.shard(s) == d] for d in range(self.shards)]
        size = max(self.shards, bucket(max(len(r) for r in running) * self.shards))
        if size >= len(self.origin):
            return
        per_shard = size // self.shards
        index = np.zeros(size, np.int64)
        filler = np.ones(size, bool)
        for d, slots in enumerate(running):
            fill = slots[0] if slots else d * (len(self.origin) // self.shards)
            index[d * per_shard: (d + 1) * per_shard] = slots + [fill] * (per_shard - len(slots))
            filler[d * per_shard: d * per_shard + len(slots)] = False
        self.origin = np.where(filler, -1, self.origin[index])
        self.blocks = [[] if filler[s] else self.blocks[index[s]] for s in range(size)]
        self.age, self.lengths = self.age[index], self.lengths[index]
        taken = self.steps.take(self.batch, jnp.asarray(index))
        self.batch = taken._replace(done=taken.done | jnp.asarray(filler))
