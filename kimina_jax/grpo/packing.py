"""Pack (prompt, response) items into fixed-shape rows: several sequences per row, no padding to the maximum.

Layout of a `PackedBatch` (all arrays [rows, length], numpy):
- each item is one segment `prompt + response` in one row; `segment_ids` numbers the segments of a row 1..k
  (0 = padding) and `positions` restart at 0 at every segment start;
- every per-token array is aligned to the INPUT position t: entry t describes the prediction made at t, whose
  target is `targets[r, t]` (the next token of the same segment). `loss_mask` is 1 where that target is a
  response token, so an item with P prompt and R response tokens has loss positions start+P-1 ... start+P+R-2
  and its last response token is input only. `advantages`, `old_logp`, `ref_logp`, `loss_weights` and
  `is_weights` are set on loss positions and 0 elsewhere; `old_logp[r, t]` is the log-prob of `targets[r, t]`.
- `loss_weights` (see `math.sequence_token_weights`) make the loss of the whole batch a plain weighted token
  sum, sum(loss_weights * token_loss), so cutting the rows into micro-batches and adding up their weighted
  sums gives the same loss and gradient. The KL and entropy terms use the same weights (verl aggregates them
  with the same mode). Call `pack_samples` once per mini-batch: its normalisers are the totals of the items
  it is given.

Shapes: the train step cuts the rows into micro-batches of `rows_multiple` rows (one share per data-parallel
device), all rows of a micro-batch of one length from the configured buckets (`row_length_buckets`: 16 per
octave), and compiles once per (micro-batches, row length) of each run of micro-batches of one length.
`row_lengths` gives each row's length; the arrays are as wide as the longest, shorter rows padded on the host
only. A batch takes the first of two plans, or the second where
it saves `MIXED_LENGTHS_SAVING` of the token slots (it compiles more row lengths, sooner):
- one length: the fewest slots (ties: fewer rows) into which first-fit-decreasing fits the items, with a
  micro-batch count from `micro_batch_count` (at most four significant bits: few shapes), spread over
  exactly that many rows by first-fit-decreasing into the smallest row capacity that still fits them (MULTIFIT);
- mixed lengths: micro-batch after micro-batch, longest items first, the length whose first-fit filling leaves
  the fewest slots for the rest (a few fullest fillings tried ahead). With few micro-batches per mini-batch (the
  dry run: 64 sequences of up to 8192 tokens on 8 devices) one length wastes most of a micro-batch; shorter last
  micro-batches take the rest.
At most `MAX_SEGMENTS_PER_ROW` sequences share a row. A micro-batch's rows are spread evenly and dealt to its
row slots by load, back and forth from one micro-batch to the next, so each device's rows hold about the same
number of tokens (as verl's sequence-length balancing): the cuDNN kernel's attention work follows the real
tokens, and devices wait for the busiest.
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
# Row lengths tried for each micro-batch of a mixed-length plan, its fullest fillings: more pack tighter, slower.
LOOKAHEAD = 4
# Mixed row lengths compile the train step for more lengths, sooner: taken where they save this share of the slots.
MIXED_LENGTHS_SAVING = 0.02


class PackItem(NamedTuple):
    """One response to pack; a plain tuple in this order works too."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    advantage: float
    old_logp: np.ndarray | None = None  # [len(response_ids)]: log-prob of each response token, if known
    ref_logp: np.ndarray | None = None  # same, under the reference policy (KL on)


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
    row_lengths: np.ndarray  # int32 [rows]: the slots of each row the train step computes (the rest are padding)
    # float32 [rows, length]: the rollout correction's importance weights (`corrected`); None: none
    is_weights: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def row_length(self) -> int:
        """The longest row's length: the arrays' width."""
        return self.tokens.shape[1]

    @property
    def num_items(self) -> int:
        return len(self.item_row)

    @property
    def padding_fraction(self) -> float:
        """Share of the token slots the train step computes (`row_lengths`) that hold no item token."""
        return 1 - float(np.sum(self.segment_ids > 0)) / float(np.sum(self.row_lengths))

    def micro_batches(self, rows_multiple: int) -> list[tuple[slice, int]]:
        """(rows, row length) of each micro-batch, `rows_multiple` consecutive rows of one length, in order.
        Raises KiminaError where the rows do not cut that way."""
        if self.num_rows % rows_multiple:
            raise KiminaError(f"packed batch has {self.num_rows} rows, not a multiple of {rows_multiple} (micro-batch "
                              "rows x data-parallel devices): pack with rows_multiple=TrainStep.rows_multiple")
        micro_batches = []
        for start in range(0, self.num_rows, rows_multiple):
            lengths = set(self.row_lengths[start : start + rows_multiple].tolist())
            if len(lengths) > 1:
                raise KiminaError(f"packed batch rows {start}-{start + rows_multiple - 1} (one micro-batch of "
                                  f"{rows_multiple}) have different lengths {sorted(lengths)}: pack with "
                                  "rows_multiple=TrainStep.rows_multiple")
            micro_batches.append((slice(start, start + rows_multiple), lengths.pop()))
        return micro_batches

    def token_arrays(self) -> dict[str, np.ndarray]:
        """Every [rows, length] array by name (the optional log-probs only when present), e.g. to device_put
        them all with one batch sharding."""
        names = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "advantages", "loss_weights",
                 "old_logp", "ref_logp", "is_weights")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def response_values(self, per_token: np.ndarray) -> list[np.ndarray]:
        """Cut a [rows, length] array aligned like `loss_mask` (e.g. recomputed log-probs) back into one
        [response length] array per item, in the order the items were given."""
        values = np.asarray(per_token)
        return [values[row, span].copy() for row, span in self._response_spans()]

    def token_values(self, per_item: Sequence[np.ndarray]) -> np.ndarray:
        """The inverse of `response_values`: one [response length] array per item into a [rows, length] float32
        array aligned like `loss_mask`, 0 elsewhere."""
        out = np.zeros(self.tokens.shape, np.float32)
        for values, (row, span) in zip(per_item, self._response_spans()):
            out[row, span] = values
        return out

    def _response_spans(self) -> list[tuple[int, slice]]:
        """Each item's row and loss positions (those of its response tokens' predictions), in item order."""
        spans = []
        for row, start, length, prompt_length in zip(
            self.item_row, self.item_start, self.item_length, self.item_prompt_length
        ):
            first = start + prompt_length - 1
            spans.append((row, slice(first, first + length - prompt_length)))
        return spans

    def corrected(
        self, weights: Sequence[np.ndarray] | None, keep: Sequence[np.ndarray] | None, *, loss_agg_mode: str,
        max_response_len: int | None = None,
    ) -> PackedBatch:
        """This batch with a rollout correction (grpo/rollout_correction.py): per item, token `weights` (None:
        none) and kept tokens `keep` (None: all). A rejected token leaves the loss mask, and the loss weights are
        recomputed over the kept tokens (`loss_agg_mode` and `max_response_len` as packed), so the aggregation's
        normalisers count only them, as verl's rejection-masked response mask does."""
        changes = {}
        if weights is not None:
            changes["is_weights"] = self.token_values(weights)
        if keep is not None:
            counts = np.array([np.count_nonzero(k) for k in keep])
            per_item = np.asarray(sequence_token_weights(counts, loss_agg_mode, max_len=max_response_len))
            changes["loss_mask"] = self.token_values(keep)
            changes["loss_weights"] = self.token_values([k * w for k, w in zip(keep, per_item)])
        return dataclasses.replace(self, **changes)


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
    ...): eight per octave, so that one-length plans meet few (micro-batches, row length) shapes."""
    shift = max(0, needed.bit_length() - 4)
    return max(1, -(-needed >> shift) << shift)


def pack_samples(
    items: Sequence[PackItem | tuple],
    row_buckets: Sequence[int],
    *,
    loss_agg_mode: str,
    max_response_len: int | None = None,
    rows_multiple: int = 1,
    mixed_lengths: bool = True,
    pad_id: int = 0,
) -> PackedBatch:
    """Pack one mini-batch of items into micro-batches of `rows_multiple` rows, each of one bucket length (see the
    module docstring); `mixed_lengths=False`: all of one length.

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
    plan = _plan(row_buckets, lengths, rows_multiple, mixed_lengths)
    rows = [row for _, micro in plan for row in micro]
    row_lengths = np.array([length for length, micro in plan for _ in micro], np.int32)

    shape = (len(rows), int(row_lengths.max()))
    tokens = np.full(shape, pad_id, np.int32)
    targets = np.full(shape, pad_id, np.int32)
    positions = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    loss_mask = np.zeros(shape, np.float32)
    advantages = np.zeros(shape, np.float32)
    loss_weights = np.zeros(shape, np.float32)
    has_old = items[0].old_logp is not None
    has_ref = items[0].ref_logp is not None
    old_logp = np.zeros(shape, np.float32) if has_old else None
    ref_logp = np.zeros(shape, np.float32) if has_ref else None
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
        row_lengths=row_lengths,
    )


def _check_items(items: list[PackItem]) -> None:
    for field in ("old_logp", "ref_logp"):
        present = [getattr(item, field) is not None for item in items]
        if any(present) and not all(present):
            raise KiminaError(f"pack_samples: item {present.index(not present[0])} differs from item 0 in "
                              f"whether `{field}` is given; give it for all items or none")
    for index, item in enumerate(items):
        if len(item.prompt_ids) == 0:
            raise KiminaError(f"pack_samples: item {index} has an empty prompt (the first response token "
                              "needs a position to be predicted from)")
        for field in ("old_logp", "ref_logp"):
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


Plan = list[tuple[int, list[list[int]]]]  # micro-batches: (row length, item indices of each row)


def _plan(row_buckets: Sequence[int], lengths: list[int], rows_multiple: int, mixed_lengths: bool) -> Plan:
    """The micro-batches, longest rows first, each row's items spread and the rows dealt (`_deal`): the
    one-length plan, or (`mixed_lengths`) the mixed-length plan where it saves `MIXED_LENGTHS_SAVING` of the
    slots."""
    shortest = _pick_bucket(row_buckets, lengths)
    buckets = sorted(set(row_buckets))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    best = _one_length(lengths, order, [bucket for bucket in buckets if bucket >= shortest], rows_multiple)
    target = (1 - MIXED_LENGTHS_SAVING) * _slots(best)
    if mixed_lengths and sum(lengths) <= target:  # else no plan can save that much
        mixed = _mixed_lengths(lengths, order, buckets, rows_multiple)
        best = mixed if _slots(mixed) <= target else best
    return _deal([(length, _spread(lengths, rows)) for length, rows in best], lengths)


def _slots(plan: Plan) -> int:
    return sum(len(rows) * length for length, rows in plan)


def _one_length(lengths: list[int], order: list[int], buckets: list[int], rows_multiple: int) -> Plan:
    """All rows of one length: the fewest token slots (ties: fewer rows) into which first-fit-decreasing fits the
    items, rows being `rows_multiple` x a `micro_batch_count`; the rows' loads evened out (`_spread`) and cut, by
    load, into micro-batches of similar rows."""
    total, shortest = sum(lengths), buckets[0]
    micro = micro_batch_count(max(-(-total // (rows_multiple * buckets[-1])),
                                  -(-len(lengths) // (rows_multiple * MAX_SEGMENTS_PER_ROW))))
    best = None  # (slots, row length, rows)
    # More rows cost at least `shortest` each, so once those alone reach the best, nothing better follows; at one
    # row per item everything fits, so the loop ends.
    while best is None or rows_multiple * micro * shortest < best[0]:
        num_rows = rows_multiple * micro
        for length in buckets:
            if length * num_rows < total:
                continue
            if best is not None and length * num_rows >= best[0]:
                break
            rows, left = _first_fit(lengths, order, length, num_rows)
            if not left:
                best = (length * num_rows, length, rows)
                break
        micro = micro_batch_count(micro + 1)
    _, length, rows = best
    rows = sorted(_spread(lengths, rows), key=lambda row: -_load(lengths, row))
    return [(length, rows[start : start + rows_multiple]) for start in range(0, len(rows), rows_multiple)]


def _mixed_lengths(lengths: list[int], order: list[int], buckets: list[int], rows_multiple: int) -> Plan:
    """Micro-batches of their own row lengths, longest items first: each takes, of its `LOOKAHEAD` fullest
    fillings (`_fillings`), the one after which filling the rest fullest-first needs the shortest rows in all;
    the lengths sorted, longest first, so that micro-batches of one length follow each other."""
    plan, remaining = [], order
    while remaining:
        options = _fillings(lengths, remaining, buckets, rows_multiple)[:LOOKAHEAD]
        length, rows, remaining = min(options, key=lambda option: option[0] + _fullest_first(lengths, option[2],
                                                                                             buckets, rows_multiple))
        plan.append((length, rows))
    return sorted(plan, key=lambda micro: -micro[0])


def _fullest_first(lengths: list[int], remaining: list[int], buckets: list[int], rows_multiple: int) -> int:
    """The sum of the row lengths of micro-batches taking `remaining`, each the fullest filling of what is left."""
    total = 0
    while remaining:
        length, _, remaining = _fillings(lengths, remaining, buckets, rows_multiple)[0]
        total += length
    return total


def _fillings(
    lengths: list[int], remaining: list[int], buckets: list[int], rows_multiple: int
) -> list[tuple[int, list[list[int]], list[int]]]:
    """(row length, rows, items left) of `_first_fit` into one micro-batch, for each bucket from the longest
    remaining item's up to the first that takes them all; the fullest (tokens / slots) first, ties shorter."""
    fillings = []
    for length in buckets:
        if length < lengths[remaining[0]]:
            continue
        rows, left = _first_fit(lengths, remaining, length, rows_multiple)
        fillings.append((length, rows, left))
        if not left:
            break
    return sorted(fillings, key=lambda filling: -sum(_load(lengths, row) for row in filling[1]) / filling[0])


def _first_fit(lengths: list[int], order: list[int], capacity: int, num_rows: int) -> tuple[list[list[int]], list[int]]:
    """The items of `order`, in that order, each into the first of `num_rows` rows with room for its tokens and
    one more segment (the cuDNN attention kernel takes at most `MAX_SEGMENTS_PER_ROW` per row); the rows and the
    items that fit none, in order. Plain lists: faster than array operations over the few rows of a micro-batch."""
    free, segments = [capacity] * num_rows, [0] * num_rows
    rows: list[list[int]] = [[] for _ in range(num_rows)]
    left = []
    for index in order:
        length = lengths[index]
        for row in range(num_rows):
            if free[row] >= length and segments[row] < MAX_SEGMENTS_PER_ROW:
                rows[row].append(index)
                free[row] -= length
                segments[row] += 1
                break
        else:
            left.append(index)
    return rows, left


def _spread(lengths: list[int], rows: list[list[int]]) -> list[list[int]]:
    """The same items over as many rows, the fullest as empty as first-fit-decreasing gets it: a binary search over
    the row capacity (MULTIFIT), so that the rows, and with them the devices, carry similar loads; `rows` where
    none fills less than their fullest."""
    members = sorted((index for row in rows for index in row), key=lambda i: (-lengths[i], i))
    if not members:
        return rows
    low = max(lengths[members[0]], -(-sum(lengths[i] for i in members) // len(rows)))
    high = max(_load(lengths, row) for row in rows)
    while low < high:
        middle = (low + high) // 2
        found, left = _first_fit(lengths, members, middle, len(rows))
        if left:
            low = middle + 1
        else:
            high, rows = middle, found
    return rows


def _deal(plan: Plan, lengths: list[int]) -> Plan:
    """Each micro-batch's rows by load, heaviest first, backwards in every other micro-batch: the rows of a
    micro-batch go to the devices in turn, so each device's row slot carries about the same total."""
    dealt = []
    for index, (length, rows) in enumerate(plan):
        rows = sorted(rows, key=lambda row: -_load(lengths, row))
        dealt.append((length, rows[::-1] if index % 2 else rows))
    return dealt


def _load(lengths: list[int], row: list[int]) -> int:
    return sum(lengths[index] for index in row)
