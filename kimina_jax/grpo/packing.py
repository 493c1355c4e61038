"""Pack (prompt, response) items into fixed-shape rows: several sequences per row, no padding to the maximum.

Layout of a `PackedBatch` (all arrays [rows, length], numpy):
- each item is one segment `prompt + response` in one row; `segment_ids` numbers the segments of a row 1..k
  (0 = padding) and `positions` restart at 0 at every segment start;
- every per-token array is aligned to the INPUT position t: entry t describes the prediction made at t, whose
  target is `targets[r, t]` (the next token of the same segment). `loss_mask` is 1 where that target is a
  response token, so an item with P prompt and R response tokens has loss positions start+P-1 ... start+P+R-2
  and its last response token is input only. `advantages`, `old_logp`, `ref_logp` and `loss_weights` are
  `rollout_logp` are set on loss positions and 0 elsewhere; `old_logp[r, t]` is the log-prob of `targets[r, t]`.
- `loss_weights` (see `math.sequence_token_weights`) make the loss of the whole batch a plain weighted token
  sum, sum(loss_weights * token_loss), so cutting the rows into micro-batches and adding up their weighted
  sums gives the same loss and gradient. The KL and entropy terms use the same weights (verl aggregates them
  with the same mode). Call `pack_samples` once per mini-batch: its normalisers are the totals of the items
  it is given.

Shapes: the train step cuts the rows into micro-batches of `rows_multiple` rows (one share per data-parallel
device) and compiles once per (micro-batch count, row length), so both come from small sets: row lengths
from the configured buckets (`row_length_buckets`: 16 per octave), micro-batch counts from
`micro_batch_count` (at most four significant bits). Of those shapes a batch takes the one with the fewest
token slots (ties: fewer micro-batches, i.e. fewer weight gathers) into which first-fit-decreasing fits its
items, so that the row count needs no rounding up. Items are then spread over exactly that many rows by
first-fit-decreasing into the smallest row capacity that still fits them (at most `MAX_SEGMENTS_PER_ROW`
sequences per row). Rows are ordered by load and dealt to the micro-batches' row slots back and forth, so each
device's rows hold about the same number of tokens (as verl's sequence-length balancing): the cuDNN kernel's
attention work follows the real tokens, and devices wait for the busiest.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from kimina_jax.errors import KiminaError
from kimina_jax.grpo.math import sequence_token_weights
from kimina_jax.models.attention import FLASH_BLOCK, MAX_SEGMENTS_PER_ROW

# Row lengths per octave of `row_length_buckets`: rows overshoot what a batch needs by about 1/16 at most.
BUCKETS_PER_OCTAVE = 16


class PackItem(NamedTuple):
    """One response to pack; a plain tuple in this order works too."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    advantage: float
    old_logp: np.ndarray | None = None  # [len(response_ids)]: log-prob of each response token, if known
    ref_logp: np.ndarray | None = None  # same, under the reference policy (KL on)
    rollout_logp: np.ndarray | None = None  # same, as the rollout engine reported them (off-policy correction)


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Items packed into rows; see the module docstring for the alignment of the per-token arrays."""

    tokens: np.ndarray  # int32 [rows, length]
    targets: np.ndarray  # int32 [rows, length]: next token in the same segment, pad_id where none
    positions: np.ndarray  # int32 [rows, length]
    segment_ids: np.ndarray  # int32 [rows, length]
    loss_mask: np.ndarray  # float32 [rows, length]
    advantages: np.ndarray  # float32 [rows, length]
    loss_weights: np.ndarray  # float32 [rows, length]
    old_logp: np.ndarray | None  # float32 [rows, length]; None when no item carried them
    ref_logp: np.ndarray | None  # float32 [rows, length]; None when no item carried them
    item_row: np.ndarray  # int32 [items]: the row of item i
    item_start: np.ndarray  # int32 [items]: the column where item i's prompt starts
    item_length: np.ndarray  # int32 [items]: prompt + response tokens
    item_prompt_length: np.ndarray  # int32 [items]
    rollout_logp: np.ndarray | None = None  # float32 [rows, length]; None when no item carried them

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def row_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_items(self) -> int:
        return len(self.item_row)

    @property
    def padding_fraction(self) -> float:
        """Share of the batch's token slots that hold no item token."""
        return float(np.mean(self.segment_ids == 0))

    def token_arrays(self) -> dict[str, np.ndarray]:
        """Every [rows, length] array by name (the optional log-probs only when present), e.g. to device_put
        them all with one batch sharding."""
        names = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "advantages", "loss_weights",
                 "old_logp", "ref_logp", "rollout_logp")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def response_values(self, per_token: np.ndarray) -> list[np.ndarray]:
        """Cut a [rows, length] array aligned like `loss_mask` (e.g. recomputed log-probs) back into one
        [response length] array per item, in the order the items were given."""
        values = np.asarray(per_token)
        out = []
        for row, start, length, prompt_length in zip(
            self.item_row, self.item_start, self.item_length, self.item_prompt_length
        ):
            first = start + prompt_length - 1
            out.append(values[row, first : first + length - prompt_length].copy())
        return out


def row_length_buckets(max_length: int, min_length: int = 256) -> tuple[int, ...]:
    """From `min_length` below `max_length`, `BUCKETS_PER_OCTAVE` evenly spaced lengths per octave (multiples of
    the flash kernels' `FLASH_BLOCK`, so fewer in the short octaves), then `max_length` itself."""
    if max_length < 1 or min_length < 1:
        raise KiminaError(f"row length buckets need positive lengths, got max {max_length}, min {min_length}")
    buckets = []
    octave = min_length
    while octave < max_length:
        step = max(FLASH_BLOCK, octave // BUCKETS_PER_OCTAVE)
        buckets += [length for length in range(octave, 2 * octave, step) if length < max_length]
        octave *= 2
    return (*buckets, max_length)


def micro_batch_count(needed: int) -> int:
    """The smallest micro-batch count >= `needed` with at most four significant bits (1-16, 18, 20, ..., 32, 36,
    ...): eight per octave, so compilations stay few while rounding up wastes less than a power of two's."""
    shift = max(0, needed.bit_length() - 4)
    return max(1, -(-needed >> shift) << shift)


def pack_samples(
    items: Sequence[PackItem | tuple],
    row_buckets: Sequence[int],
    *,
    loss_agg_mode: str,
    max_response_len: int | None = None,
    rows_multiple: int = 1,
    pad_id: int = 0,
) -> PackedBatch:
    """Pack one mini-batch of items into rows of one bucket length, `rows_multiple` x `micro_batch_count(...)`
    of them (see the module docstring).

    `max_response_len` is the L of `seq-mean-token-sum-norm`. Deterministic: the same items give the same
    batch. Raises KiminaError for an item longer than the largest bucket, an empty prompt, log-prob arrays
    of the wrong length, or log-probs given for some items but not others.
    """
    items = [PackItem(*item) for item in items]
    if not items:
        raise KiminaError("pack_samples got no items")
    if rows_multiple < 1:
        raise KiminaError(f"rows_multiple must be >= 1, got {rows_multiple}")
    _check_items(items)
    lengths = [len(item.prompt_ids) + len(item.response_ids) for item in items]
    row_length, num_rows, fitted = _pick_shape(row_buckets, lengths, rows_multiple)
    rows = _deal(_spread(lengths, row_length, num_rows, fitted), lengths, rows_multiple)

    shape = (num_rows, row_length)
    tokens = np.full(shape, pad_id, np.int32)
    targets = np.full(shape, pad_id, np.int32)
    positions = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    loss_mask = np.zeros(shape, np.float32)
    advantages = np.zeros(shape, np.float32)
    loss_weights = np.zeros(shape, np.float32)
    has_old = items[0].old_logp is not None
    has_ref = items[0].ref_logp is not None
    has_rollout = items[0].rollout_logp is not None
    old_logp = np.zeros(shape, np.float32) if has_old else None
    ref_logp = np.zeros(shape, np.float32) if has_ref else None
    rollout_logp = np.zeros(shape, np.float32) if has_rollout else None
    item_row = np.zeros(len(items), np.int32)
    item_start = np.zeros(len(items), np.int32)

    response_lengths = np.array([len(item.response_ids) for item in items])
    weights = np.asarray(
        sequence_token_weights(response_lengths, loss_agg_mode, max_len=max_response_len), np.float32
    )
    for row, members in enumerate(rows):
        start = 0
        for segment, index in enumerate(members, start=1):
            item = items[index]
            prompt_length, length = len(item.prompt_ids), lengths[index]
            span = slice(start, start + length)
            sequence = np.concatenate([np.asarray(item.prompt_ids), np.asarray(item.response_ids)])
            tokens[row, span] = sequence
            targets[row, start : start + length - 1] = sequence[1:]
            positions[row, span] = np.arange(length)
            segment_ids[row, span] = segment
            loss = slice(start + prompt_length - 1, start + length - 1)
            loss_mask[row, loss] = 1.0
            advantages[row, loss] = item.advantage
            loss_weights[row, loss] = weights[index]
            if has_old:
                old_logp[row, loss] = item.old_logp
            if has_ref:
                ref_logp[row, loss] = item.ref_logp
            if has_rollout:
                rollout_logp[row, loss] = item.rollout_logp
            item_row[index], item_start[index] = row, start
            start += length

    return PackedBatch(
        tokens=tokens,
        targets=targets,
        positions=positions,
        segment_ids=segment_ids,
        loss_mask=loss_mask,
        advantages=advantages,
        loss_weights=loss_weights,
        old_logp=old_logp,
        ref_logp=ref_logp,
        item_row=item_row,
        item_start=item_start,
        item_length=np.array(lengths, np.int32),
        item_prompt_length=np.array([len(item.prompt_ids) for item in items], np.int32),
        rollout_logp=rollout_logp,
    )


def _check_items(items: list[PackItem]) -> None:
    for field in ("old_logp", "ref_logp", "rollout_logp"):
        present = [getattr(item, field) is not None for item in items]
        if any(present) and not all(present):
            raise KiminaError(f"pack_samples: item {present.index(not present[0])} differs from item 0 in "
                              f"whether `{field}` is given; give it for all items or none")
    for index, item in enumerate(items):
        if len(item.prompt_ids) == 0:
            raise KiminaError(f"pack_samples: item {index} has an empty prompt (the first response token "
                              "needs a position to be predicted from)")
        for field in ("old_logp", "ref_logp", "rollout_logp"):
            values = getattr(item, field)
            if values is not None and np.shape(values) != (len(item.response_ids),):
                raise KiminaError(f"pack_samples: item {index} `{field}` has shape {np.shape(values)}, expected "
                                  f"({len(item.response_ids)},) (one per response token)")


def _pick_bucket(row_buckets: Sequence[int], lengths: list[int]) -> int:
    longest = max(lengths)
    fitting = [bucket for bucket in sorted(row_buckets) if bucket >= longest]
    if not fitting:
        index = lengths.index(longest)
        raise KiminaError(f"pack_samples: item {index} has {longest} tokens (prompt + response), more than the "
                          f"largest row length bucket {max(row_buckets, default=0)}")
    return fitting[0]


def _pick_shape(
    row_buckets: Sequence[int], lengths: list[int], rows_multiple: int
) -> tuple[int, int, list[list[int]]]:
    """(row length, rows, first-fit-decreasing's rows there): the fewest token slots (ties: fewer rows) into
    which first-fit-decreasing fits the items, rows being `rows_multiple` x a `micro_batch_count`."""
    shortest = _pick_bucket(row_buckets, lengths)
    buckets = sorted(bucket for bucket in set(row_buckets) if bucket >= shortest)
    total = sum(lengths)
    needed = max(-(-total // (rows_multiple * buckets[-1])), -(-len(lengths) // (rows_multiple * MAX_SEGMENTS_PER_ROW)))
    micro = micro_batch_count(needed)
    best = None  # (slots, row length, rows, packing)
    # More rows cost at least `shortest` each, so once those alone reach the best, nothing better follows; at one
    # row per item everything fits, so the loop ends.
    while best is None or rows_multiple * micro * shortest < best[0]:
        rows = rows_multiple * micro
        for length in buckets:
            if length * rows < total:
                continue
            if best is not None and length * rows >= best[0]:
                break
            fitted = _first_fit_decreasing(lengths, length, max_rows=rows)
            if fitted is not None:
                best = (length * rows, length, rows, fitted)
                break
        micro = micro_batch_count(micro + 1)
    return best[1:]


def _first_fit_decreasing(lengths: list[int], capacity: int, max_rows: int | None = None) -> list[list[int]] | None:
    """Item indices per row: longest first (ties by index), each into the first row with room for its tokens and
    one more segment (the cuDNN attention kernel takes at most `MAX_SEGMENTS_PER_ROW` per row). None where that
    takes more than `max_rows` rows."""
    limit = len(lengths) if max_rows is None else min(max_rows, len(lengths))
    # One row past the limit, always empty, so that every item finds a first row; taking it means too many rows.
    free = np.full(limit + 1, capacity)
    segments = np.zeros(limit + 1, np.int64)
    rows: list[list[int]] = [[] for _ in range(limit + 1)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = int(np.argmax((free >= lengths[index]) & (segments < MAX_SEGMENTS_PER_ROW)))
        if row == limit:
            return None
        rows[row].append(index)
        free[row] -= lengths[index]
        segments[row] += 1
    return [members for members in rows if members]


def _spread(lengths: list[int], capacity: int, num_rows: int, fitted: list[list[int]]) -> list[list[int]]:
    """Item indices over exactly `num_rows` rows, the fullest as empty as first-fit-decreasing gets it: a binary
    search over the row capacity (MULTIFIT), so that the rows, and with them the devices, carry similar loads.
    `fitted`: first-fit-decreasing's rows at `capacity` (found by `_pick_shape`), the answer when none smaller
    fits."""
    rows = fitted
    low, high = max(max(lengths), -(-sum(lengths) // num_rows)), capacity
    while low < high:
        middle = (low + high) // 2
        found = _first_fit_decreasing(lengths, middle, max_rows=num_rows)
        if found is None:
            low = middle + 1
        else:
            high, rows = middle, found
    return rows + [[] for _ in range(num_rows - len(rows))]


def _deal(rows: list[list[int]], lengths: list[int], rows_multiple: int) -> list[list[int]]:
    """The rows by load, heaviest first, dealt to the `rows_multiple` row slots of each micro-batch in turn
    forwards and backwards: each micro-batch's rows (one device's share each) carry similar loads, and every
    slot about the same total."""
    loads = [sum(lengths[index] for index in members) for members in rows]
    order = sorted(range(len(rows)), key=lambda row: (-loads[row], row))
    dealt = []
    for micro, start in enumerate(range(0, len(order), rows_multiple)):
        chunk = order[start : start + rows_multiple]
        dealt += chunk[::-1] if micro % 2 else chunk
    return [rows[row] for row in dealt]
