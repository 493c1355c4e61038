"""Packing: exact reconstruction, row invariants, buckets, and loss weights that agree with the math."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kimina_jax.errors import KiminaError
from kimina_jax.grpo import AGG_MODES, PackItem, aggregate_loss, pack_samples, ppo_token_loss, row_length_buckets
from kimina_jax.grpo import grpo_advantages
from kimina_jax.models.attention import MAX_SEGMENTS_PER_ROW
from tests.test_grpo_math import ref_aggregate

BUCKETS = (32, 64, 128)
MAX_RESPONSE = 40


def random_items(seed, count=23, with_logp=True):
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        prompt = rng.integers(1, 1000, rng.integers(1, 20))
        response = rng.integers(1, 1000, rng.integers(0, MAX_RESPONSE + 1))
        logp = (lambda: -rng.random(len(response)).astype(np.float32)) if with_logp else (lambda: None)
        items.append(PackItem(prompt.tolist(), response.tolist(), float(rng.normal()), logp(), logp()))
    return items


def test_every_item_is_reconstructed_exactly():
    items = random_items(0)
    batch = pack_samples(items, BUCKETS, loss_agg_mode="token-mean", rows_multiple=4, pad_id=-1)
    assert batch.num_rows % 4 == 0 and batch.num_items == len(items)
    for index, item in enumerate(items):
        row, start = batch.item_row[index], batch.item_start[index]
        p, r = len(item.prompt_ids), len(item.response_ids)
        span = slice(start, start + p + r)
        np.testing.assert_array_equal(batch.tokens[row, span], item.prompt_ids + item.response_ids)
        np.testing.assert_array_equal(batch.positions[row, span], np.arange(p + r))
        assert len(set(batch.segment_ids[row, span].tolist())) == 1
        # Targets are the next token of the same segment; the segment's last slot predicts nothing.
        np.testing.assert_array_equal(batch.targets[row, start : start + p + r - 1], (item.prompt_ids + item.response_ids)[1:])
        assert batch.targets[row, start + p + r - 1] == -1
        # Loss positions are exactly those whose target is a response token.
        expected_mask = np.zeros(p + r)
        expected_mask[p - 1 : p + r - 1] = 1
        np.testing.assert_array_equal(batch.loss_mask[row, span], expected_mask)
        np.testing.assert_array_equal(batch.targets[row, span][expected_mask == 1], item.response_ids)
        np.testing.assert_allclose(batch.advantages[row, span], expected_mask * np.float32(item.advantage))
    for got, item in zip(batch.response_values(batch.old_logp), items):
        np.testing.assert_array_equal(got, item.old_logp)
    for got, item in zip(batch.response_values(batch.ref_logp), items):
        np.testing.assert_array_equal(got, item.ref_logp)


def test_row_invariants_and_padding_fraction():
    items = random_items(1, count=40)
    batch = pack_samples(items, BUCKETS, loss_agg_mode="token-mean", rows_multiple=3)
    owner = -np.ones(batch.tokens.shape, int)
    for index in range(batch.num_items):
        row, start, length = batch.item_row[index], batch.item_start[index], batch.item_length[index]
        assert np.all(owner[row, start : start + length] == -1), "items overlap"
        owner[row, start : start + length] = index
    assert np.array_equal(owner >= 0, batch.segment_ids > 0), "a slot is neither padding nor one item's"
    for row in range(batch.num_rows):
        segments = batch.segment_ids[row]
        used = segments[segments > 0]
        # Segments are contiguous, numbered 1..k from the left, padding only at the end of the row.
        assert np.all(np.diff(segments[: len(used)]) >= 0) and np.all(segments[len(used):] == 0)
        assert sorted(set(used.tolist())) == list(range(1, len(set(used.tolist())) + 1))
        starts = np.flatnonzero(np.diff(np.concatenate([[0], segments])) != 0)
        assert all(batch.positions[row, s] == 0 for s in starts)
    padding = batch.segment_ids == 0
    arrays = batch.token_arrays()
    assert len(arrays) == 9 and all(a.shape == (batch.num_rows, batch.row_length) for a in arrays.values())
    assert all(np.all(a[padding] == 0) for a in arrays.values())
    # A row holds nothing past its length; the padding fraction counts the slots the train step computes.
    assert all(np.all(batch.segment_ids[row, length:] == 0) for row, length in enumerate(batch.row_lengths))
    total = sum(len(i.prompt_ids) + len(i.response_ids) for i in items)
    assert batch.padding_fraction == pytest.approx(1 - total / batch.row_lengths.sum())


def item(length):
    return PackItem([1], [2] * (length - 1), 0.0)


def test_shape_selection_and_spreading():
    items = [item(5), item(4), item(3), item(3), item(1)]
    # The fewest slots, ties to fewer rows: one row of 16 rather than two of 8.
    batch = pack_samples(items, (8, 16), loss_agg_mode="token-mean")
    assert batch.tokens.shape == (1, 16) and batch.item_start.tolist() == [0, 5, 9, 12, 15]
    # Two rows (rows_multiple) of 8: longest first into the first row with room, [5, 3] and [4, 3, 1].
    batch = pack_samples(items, (8, 16), loss_agg_mode="token-mean", rows_multiple=2)
    assert batch.tokens.shape == (2, 8) and batch.padding_fraction == 0.0
    assert batch.item_row.tolist() == [0, 1, 0, 1, 1]
    assert batch.item_start.tolist() == [0, 0, 5, 4, 7]
    assert pack_samples([item(9)], (8, 16), loss_agg_mode="token-mean").row_length == 16
    assert pack_samples([item(16)], (16, 8), loss_agg_mode="token-mean").row_length == 16
    with pytest.raises(KiminaError, match=r"item 1 has 17 tokens.*largest row length bucket 16"):
        pack_samples([item(3), item(17)], (8, 16), loss_agg_mode="token-mean")
    # A row holds at most MAX_SEGMENTS_PER_ROW sequences (cuDNN's packed attention), even with room left.
    many = pack_samples([item(2)] * 100, (1024,), loss_agg_mode="token-mean")
    assert many.num_rows == 4 and many.segment_ids.max(axis=1).tolist() == [25] * 4
    assert MAX_SEGMENTS_PER_ROW < 50


def test_buckets():
    assert row_length_buckets(4096, 1024) == tuple(range(1024, 4097, 128))  # multiples of the flash block
    assert row_length_buckets(32768, 16384) == tuple(range(16384, 32769, 1024))  # 16 per octave
    assert row_length_buckets(10000, 8192) == (8192, 8704, 9216, 9728, 10000)
    assert row_length_buckets(64, 64) == (64,)


def rl_lengths(rng, prompts=32, n=8, max_prompt=1024, max_response=3072):
    """Prompt + response lengths of one mini-batch as RL makes them: a prompt length per group, long-tailed
    response lengths, some cut at the maximum."""
    lengths = []
    for _ in range(prompts):
        prompt = int(np.clip(rng.lognormal(np.log(max_prompt / 16), 0.5), 16, max_prompt))
        responses = np.clip(rng.lognormal(np.log(max_response / 4), 0.8, n), 16, max_response)
        lengths += [prompt + int(r) for r in responses]
    return lengths


def test_little_padding_on_a_device_mesh():
    """Eight data-parallel devices, the 1.7B recipe's mini-batch (32 prompts x 8) and length ratio: rows neither
    rounded up to a multiple of 8 nor micro-batch counts to a power of two (issue 17: 5-7% padded tokens)."""
    rng = np.random.default_rng(0)
    buckets = row_length_buckets(4096)
    batches = [pack_samples([item(length) for length in rl_lengths(rng)], buckets, loss_agg_mode="token-mean",
                            rows_multiple=8) for _ in range(8)]
    padding = [batch.padding_fraction for batch in batches]
    assert np.mean(padding) <= 0.015 and max(padding) <= 0.025, padding
    for batch in batches:  # micro-batches of 8 rows of one bucket length
        assert all(length in buckets for _, length in batch.micro_batches(8))


def test_few_micro_batches_take_several_row_lengths():
    """The dry run (8 prompts x 8 responses of up to 8192 tokens, 8 devices) packs into 3-4 micro-batches of 8
    rows: rows of one length waste 8-9% of the slots (issue 17), shorter last micro-batches keep it under 5%."""
    rng = np.random.default_rng(3)
    buckets = row_length_buckets(8192)
    padding, lengths_used = [], []
    for _ in range(8):
        lengths = rl_lengths(rng, prompts=8, max_prompt=1684, max_response=6508)
        batch = pack_samples([item(length) for length in lengths], buckets, loss_agg_mode="token-mean",
                             rows_multiple=8)
        padding.append(batch.padding_fraction)
        lengths_used.append([length for _, length in batch.micro_batches(8)])
    assert np.mean(padding) <= 0.05, padding
    assert any(len(set(lengths)) > 1 for lengths in lengths_used), lengths_used
    assert all(lengths == sorted(lengths, reverse=True) for lengths in lengths_used)  # one length after another


def test_mixed_lengths_when_they_take_fewer_slots():
    # Two rows per micro-batch: one length needs 3 x 2 rows of 8 (48 slots), a last micro-batch of rows of 4 fits
    # the short items (40 slots).
    items = [item(8), item(3), item(8), item(8), item(3), item(8)]
    batch = pack_samples(items, (4, 8), loss_agg_mode="token-mean", rows_multiple=2)
    assert batch.row_lengths.tolist() == [8, 8, 8, 8, 4, 4] and batch.tokens.shape == (6, 8)
    assert batch.micro_batches(2) == [(slice(0, 2), 8), (slice(2, 4), 8), (slice(4, 6), 4)]
    assert sorted(batch.item_row[[1, 4]].tolist()) == [4, 5] and batch.padding_fraction == pytest.approx(2 / 40)
    # Asked for one length (algorithm.mixed_row_lengths false), or where nothing is saved: one length.
    assert set(pack_samples(items, (4, 8), loss_agg_mode="token-mean", rows_multiple=2,
                            mixed_lengths=False).row_lengths.tolist()) == {8}
    assert set(pack_samples([item(5), item(4), item(3), item(3), item(1)], (4, 8), loss_agg_mode="token-mean",
                            rows_multiple=2).row_lengths.tolist()) == {8}
    with pytest.raises(KiminaError, match=r"rows 3-5 .* different lengths \[4, 8\]"):
        batch.micro_batches(3)
    with pytest.raises(KiminaError, match="6 rows, not a multiple of 4"):
        batch.micro_batches(4)


def test_devices_get_balanced_rows():
    """Each device's rows (one row slot of every micro-batch) hold about the same number of tokens, and the rows
    of one micro-batch (run side by side) too."""
    batch = pack_samples([item(length) for length in rl_lengths(np.random.default_rng(1))], row_length_buckets(4096),
                         loss_agg_mode="token-mean", rows_multiple=8)
    loads = (batch.segment_ids > 0).sum(axis=1).reshape(-1, 8)  # [micro-batch, device]
    per_device = loads.sum(axis=0)
    assert per_device.max() - per_device.min() <= 0.02 * per_device.mean(), per_device
    assert np.all(loads.max(axis=1) - loads.min(axis=1) <= 0.1 * batch.row_length), loads


def test_shapes_are_row_length_buckets():
    """A run's mini-batches (a fixed number of prompts, some responses left out as unverified) cut into
    micro-batches whose row lengths are buckets: the train step compiles once per row length, whatever the
    micro-batch counts."""
    rng = np.random.default_rng(2)
    buckets = row_length_buckets(4096)
    shapes = set()
    for _ in range(24):
        lengths = rl_lengths(rng)[: 256 - int(rng.integers(0, 17))]
        batch = pack_samples([item(length) for length in lengths], buckets, loss_agg_mode="token-mean",
                             rows_multiple=8)
        shapes.update(length for _, length in batch.micro_batches(8))
    assert shapes <= set(buckets), sorted(shapes)


def test_packing_is_deterministic_and_takes_plain_tuples():
    items = random_items(2)
    first = pack_samples(items, BUCKETS, loss_agg_mode="seq-mean-token-mean")
    again = pack_samples([tuple(i) for i in items], BUCKETS, loss_agg_mode="seq-mean-token-mean")
    for field in dataclasses.fields(first):
        np.testing.assert_array_equal(getattr(first, field.name), getattr(again, field.name))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_loss_weights_agree_with_aggregate_loss(mode):
    """sum(weights * token loss) over the packed rows == aggregate_loss over one row per response, and the
    packed rows cut into micro-batches add up to the same number."""
    items = random_items(3, count=30)
    items[4] = items[4]._replace(response_ids=[], old_logp=np.zeros(0), ref_logp=np.zeros(0))  # no sequence
    batch = pack_samples(items, BUCKETS, loss_agg_mode=mode, max_response_len=MAX_RESPONSE, rows_multiple=4)
    rng = np.random.default_rng(5)
    logp = -rng.random(batch.tokens.shape).astype(np.float32)
    token_loss, _ = ppo_token_loss(logp, batch.old_logp, batch.advantages, 0.2, 0.3, 3.0)
    token_loss = np.asarray(token_loss)
    packed = float(np.sum(batch.loss_weights * token_loss))

    # The same per-token values, one padded row per response.
    per_item = batch.response_values(token_loss)
    unpacked = np.zeros((len(items), MAX_RESPONSE))
    mask = np.zeros((len(items), MAX_RESPONSE))
    for index, values in enumerate(per_item):
        unpacked[index, : len(values)], mask[index, : len(values)] = values, 1
    np.testing.assert_allclose(packed, float(aggregate_loss(unpacked, mask, mode, MAX_RESPONSE)), rtol=1e-5)
    np.testing.assert_allclose(packed, ref_aggregate(unpacked, mask, mode, MAX_RESPONSE), rtol=1e-5)

    for pieces in (2, 4):
        cut = sum(float(np.sum(w * l)) for w, l in zip(np.split(batch.loss_weights, pieces), np.split(token_loss, pieces)))
        np.testing.assert_allclose(cut, packed, rtol=1e-5)


def test_advantages_flow_from_grpo_to_packed_tokens():
    items = random_items(4, count=8, with_logp=False)
    scores = np.array([1, 0, 0, 1, 1, 1, 1, 1], np.float32)
    advantages = np.asarray(grpo_advantages(scores, np.array([0, 0, 0, 0, 1, 1, 1, 1])))
    items = [item._replace(advantage=float(a)) for item, a in zip(items, advantages)]
    batch = pack_samples(items, BUCKETS, loss_agg_mode="token-mean")
    assert batch.old_logp is None and batch.ref_logp is None
    for values, item in zip(batch.response_values(batch.advantages), items):
        np.testing.assert_array_equal(values, np.full(len(item.response_ids), item.advantage, np.float32))


def test_bad_items_are_named():
    good = PackItem([1, 2], [3, 4], 0.5, np.zeros(2), None)
    with pytest.raises(KiminaError, match="item 1 has an empty prompt"):
        pack_samples([good, PackItem([], [3], 0.0, np.zeros(1))], BUCKETS, loss_agg_mode="token-mean")
    with pytest.raises(KiminaError, match=r"item 1 `old_logp` has shape \(3,\), expected \(2,\)"):
        pack_samples([good, PackItem([1], [3, 4], 0.0, np.zeros(3))], BUCKETS, loss_agg_mode="token-mean")
    with pytest.raises(KiminaError, match="item 1 differs from item 0 in whether `old_logp`"):
        pack_samples([good, PackItem([1], [3], 0.0)], BUCKETS, loss_agg_mode="token-mean")
    with pytest.raises(KiminaError, match="no items"):
        pack_samples([], BUCKETS, loss_agg_mode="token-mean")
    with pytest.raises(KiminaError, match="unknown loss aggregation mode"):
        pack_samples([good], BUCKETS, loss_agg_mode="sum")
