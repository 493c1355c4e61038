"""The JAX sampler against transformers and the trainer's log-probs, its sampling statistics, the weight stream
for vLLM, the log-prob mismatch metric and the tpu-inference layout."""
from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kimina_jax.data.tokenizer import build_tiny_tokenizer
from kimina_jax.errors import KiminaError
from kimina_jax.models import iter_hf_tensors, load_hf_checkpoint
from kimina_jax.parallel import make_mesh, shard_params
from kimina_jax.rollout import (
    JaxSampler, SampleRequest, SamplingParams, VllmEngine, logprob_diff, make_completion,
)
from kimina_jax.rollout.tpu_inference import to_tpu_inference_layout
from kimina_jax.rollout.weights import hf_torch_tensors
from tests.rollout_fixtures import perturbed, trainer_logprobs
from tests.tiny_models import make_hf_model, save_hf_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 40))]  # different lengths, batched together
EOS = 2  # tests/tiny_models.py


@pytest.fixture(scope="module")
def tiny_model(tiny_hf_folder):
    return load_hf_checkpoint(tiny_hf_folder)


@pytest.fixture(scope="module")
def vocab8_model(tmp_path_factory):
    """A tiny model over 8 tokens whose next-token distributions are far from uniform (scaled lm_head)."""
    hf_model = make_hf_model(tie=False, seed=3, vocab_size=8)
    with torch.no_grad():
        hf_model.lm_head.weight.mul_(2.0)
    return load_hf_checkpoint(save_hf_model(hf_model, tmp_path_factory.mktemp("vocab8")))


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of `counts` against `probs` (categories with probability 0 must have no counts)."""
    assert counts[probs == 0].sum() == 0
    expected = counts.sum() * probs[probs > 0]
    stat = float((((counts[probs > 0] - expected) ** 2) / expected).sum())
    dof = int((probs > 0).sum()) - 1
    return float(jax.scipy.special.gammaincc(dof / 2, stat / 2))


# ------------------------------------------------------------------------------------------------ JaxSampler
def greedy_reference(hf_model, prompt, max_tokens: int) -> list[int]:
    with torch.no_grad():
        generated = hf_model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens, eos_token_id=EOS, pad_token_id=0
        )
    return generated[0, len(prompt):].tolist()


@pytest.mark.parametrize("block_size", [4, 16])
def test_greedy_matches_transformers_generate(hf_folder, block_size):
    folder, hf_model = hf_folder
    sampler = JaxSampler(load_hf_checkpoint(folder), block_size=block_size)
    out = sampler.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40))
    for prompt, (completion,) in zip(PROMPTS, out):
        expected = greedy_reference(hf_model, prompt, 40)
        assert list(completion.token_ids) == expected
        assert completion.finish_reason == ("stop" if expected[-1] == EOS else "length")


def test_logprobs_equal_the_trainers_recomputed_logprobs(tiny_model):
    sampler = JaxSampler(tiny_model, block_size=4)  # rows over many blocks, the last one partly filled
    filtered = SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=50, max_tokens=24, seed=1)
    sampled = sampler.generate(PROMPTS, filtered)  # the log-probs stay those of the full distribution
    greedy = sampler.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))
    for completions, temperature in ((sampled, 0.7), (greedy, 0.0)):
        for completion in (c for row in completions for c in row):
            prompt = PROMPTS[completion.prompt_index]
            expected = trainer_logprobs(tiny_model, prompt, completion.token_ids, temperature)
            np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4, rtol=0)


def record_calls(sampler: JaxSampler, name: str) -> list[tuple]:
    """(positional arguments, result) of every later call of one of the sampler's jitted pieces."""
    calls, jitted = [], getattr(sampler._steps, name)

    def recorded(*args, **kwargs):
        calls.append((args, jitted(*args, **kwargs)))
        return calls[-1][1]

    setattr(sampler._steps, name, recorded)
    return calls


def test_rows_admitted_into_a_running_batch_decode_as_if_alone(hf_folder):
    """More rows than batch rows: waiting rows are prefilled into rows freed mid-decode, next to rows that keep
    going (stop ids make the lengths vary), and still give transformers' greedy tokens and the trainer's
    log-probs: nothing of a row's previous occupant is seen."""
    folder, hf_model = hf_folder
    model = load_hf_checkpoint(folder)
    prompts = PROMPTS + [[3, 4], list(range(40, 52)), [7] * 9, list(range(60, 66))]
    stop_ids = tuple(range(60, 100))
    sampler = JaxSampler(model, max_batch_rows=2, block_size=4)
    inserts = record_calls(sampler, "insert")
    greedy = sampler.generate(prompts, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=stop_ids))
    assert len(inserts) >= 3
    lengths = set()
    for prompt, (completion,) in zip(prompts, greedy):
        expected = greedy_reference(hf_model, prompt, 30)
        cut = next((k + 1 for k, t in enumerate(expected) if t in stop_ids), len(expected))
        assert list(completion.token_ids) == expected[:cut]
        lengths.add(cut)
    assert len(lengths) >= 3
    params = SamplingParams(n=3, temperature=0.8, max_tokens=30, seed=4, stop_token_ids=stop_ids)
    sampled = sampler.generate(prompts, params)
    for completion in (c for row in sampled for c in row):
        expected = trainer_logprobs(model, prompts[completion.prompt_index], completion.token_ids, 0.8)
        np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4, rtol=0)
    alone = JaxSampler(model, max_batch_rows=1).generate(prompts, params)
    assert [[c.token_ids for c in row] for row in sampled] == [[c.token_ids for c in row] for row in alone]


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)], ids=["fsdp8", "2x2x2"])
def test_sampling_on_a_mesh_splits_rows_not_weights(tiny_model, mesh_shape):
    """The trainer's parameters split over a mesh: the sampler decodes its rows data-parallel with weights split
    over `tensor` alone (no weight gathers per step) and samples what one device samples."""
    data, fsdp, tensor = mesh_shape
    mesh = make_mesh(data, fsdp, tensor)
    graphdef, state = nnx.split(tiny_model)
    sampler = JaxSampler(nnx.merge(graphdef, shard_params(state, mesh)))
    decodes = record_calls(sampler, "decode")
    params = SamplingParams(n=4, temperature=0.8, top_p=0.9, max_tokens=12, seed=3)
    sharded = sampler.generate(PROMPTS, params)
    alone = JaxSampler(tiny_model).generate(PROMPTS, params)
    for row, same in zip(sharded, alone):
        assert [c.token_ids for c in row] == [c.token_ids for c in same]
        for completion, reference in zip(row, same):
            np.testing.assert_allclose(completion.logprobs, reference.logprobs, atol=1e-5, rtol=0)
    for leaf in jax.tree.leaves(sampler._state):
        assert set(jax.tree.leaves(tuple(leaf.sharding.spec))) <= {"tensor"}
    q_proj = sampler._state["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]  # [hidden, heads * dim]
    assert q_proj.sharding.shard_shape(q_proj.shape) == (q_proj.shape[0], q_proj.shape[1] // tensor)
    _, (pools, rows) = decodes[0]
    for pool in pools[0]:  # keys, values [2 KV heads, blocks, block size, head_dim]: blocks split as rows
        assert pool.sharding.shard_shape(pool.shape) == (2 // tensor, pool.shape[1] // (data * fsdp),
                                                         *pool.shape[2:])
    assert rows.tokens.sharding.shard_shape(rows.tokens.shape) == (16 // (data * fsdp), 12)  # 12 rows, 16 slots


def blocks_bytes(model, blocks: int, block_size: int = 16) -> int:
    cfg = model.config
    return blocks * block_size * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32


def test_a_pool_smaller_than_one_row_is_refused_and_a_tight_one_preempts(tiny_model):
    """kv_cache_bytes is the block pool: one row at its longest must fit (else a clear error); a pool that holds
    fewer rows than want to run admits by free blocks and preempts, and the seeded samples stay the same."""
    prompts = [[5, 6, 7, 8, 9], list(range(20, 40)), [3] * 30]  # 5-token prompt: 16 + 48 slots = 4 blocks
    with pytest.raises(KiminaError, match=r"rollout.jax.kv_cache_bytes holds 3 KV blocks .* one row of 64 tokens"):
        JaxSampler(tiny_model, kv_cache_bytes=blocks_bytes(tiny_model, 4) - 1).generate(
            prompts[:1], SamplingParams(max_tokens=48))
    params = SamplingParams(n=3, temperature=1.0, max_tokens=40, seed=2)
    roomy = JaxSampler(tiny_model, eos_token_ids=())
    expected = roomy.generate(prompts, params)
    assert roomy.last_call.preempted == 0 and roomy.last_call.max_rows == 9
    tight = JaxSampler(tiny_model, eos_token_ids=(), kv_cache_bytes=blocks_bytes(tiny_model, 10))
    got = tight.generate(prompts, params)
    stats = tight.last_call
    assert stats.preempted >= 2 and stats.max_rows < 9 and stats.peak_blocks == 1.0
    assert stats.blocks_held_after == 0  # every block free again
    assert [[c.token_ids for c in row] for row in got] == [[c.token_ids for c in row] for row in expected]
    for row, same in zip(got, expected):
        for completion, reference in zip(row, same):
            np.testing.assert_allclose(completion.logprobs, reference.logprobs, atol=1e-5, rtol=0)
    metrics = tight.take_metrics()
    assert metrics["rollout/preempted"] == stats.preempted and metrics["rollout/kv_blocks_used/max"] == 1.0
    assert 1 <= metrics["rollout/rows_in_flight/mean"] <= metrics["rollout/rows_in_flight/max"] == stats.max_rows
    assert tight.take_metrics() == {}  # taken: nothing since


def test_a_prompt_is_prefilled_once_for_its_samples_which_share_its_blocks(tiny_model):
    """Four samples of a 40-token prompt (two full blocks of 16 and a partial one): one prefill of one sequence;
    the samples hold the two full blocks together and one block each (the partial one copied, then written)."""
    sampler = JaxSampler(tiny_model, eos_token_ids=())
    prefills = record_calls(sampler, "prefill")
    (completions,) = sampler.generate([list(range(1, 41))], SamplingParams(n=4, max_tokens=8, seed=0))
    assert sampler.last_call.prefilled == 1 and len(prefills) == 1
    (_, pools, tokens, lengths, tables), _ = prefills[0]
    assert tokens.shape[0] == 1 and int(lengths[0]) == 40
    pool_size = pools[0][0].shape[1]  # keys [kv_heads, blocks, block_size, head_dim]
    # Peak: 2 shared + 4 own blocks, and the prompt's partial block until copied.
    assert sampler.last_call.peak_blocks * pool_size == 2 + 4 + 1
    assert sampler.last_call.blocks_held_after == 0
    greedy = SamplingParams(n=4, max_tokens=8, temperature=0)
    assert len({c.token_ids for c in sampler.generate([list(range(1, 41))], greedy)[0]}) == 1
    alone = JaxSampler(tiny_model, eos_token_ids=(), max_batch_rows=1).generate(
        [list(range(1, 41))], SamplingParams(n=4, max_tokens=8, seed=0))[0]
    assert [c.token_ids for c in completions] == [c.token_ids for c in alone]


def test_a_continued_sample_goes_on_as_if_never_stopped(tiny_model):
    """continue_samples from a response's first tokens gives the uninterrupted response (seeded: a row's stream is
    its key and token count), the head's log-probs handed back as given; a fresh request equals `generate`'s."""
    sampler = JaxSampler(tiny_model, eos_token_ids=())
    params = SamplingParams(max_tokens=24, seed=5)
    full = sampler.continue_samples(
        [SampleRequest(tuple(PROMPTS[0]), (7, 1)), SampleRequest(tuple(PROMPTS[1]), (0, 0))], params)
    assert [len(r.token_ids) for r in full] == [24, 24] and all(r.finish_reason == "length" for r in full)
    assert full[1].token_ids == sampler.generate([PROMPTS[1]], params)[0][0].token_ids  # key (0, 0): prompt 0, sample 0
    head = np.full(9, -1.5, np.float32)  # any behaviour log-probs: an older policy's
    (continued,) = sampler.continue_samples(
        [SampleRequest(tuple(PROMPTS[0]), (7, 1), full[0].token_ids[:9], head)], params)
    assert continued.token_ids == full[0].token_ids
    np.testing.assert_array_equal(continued.logprobs[:9], head)
    np.testing.assert_allclose(continued.logprobs[9:], full[0].logprobs[9:], atol=1e-5, rtol=0)


def test_a_call_stops_when_told_and_hands_back_the_unfinished(tiny_model):
    """on_finished is told of each request as it finishes; once it says stop, the running and waiting requests
    come back unfinished with their tokens so far (a waiting continued one with what it had), every block free."""
    sampler = JaxSampler(tiny_model, eos_token_ids=(), max_batch_rows=4)
    caps = [3, 5, 40, 40, 40, 40]
    requests = [SampleRequest(tuple(PROMPTS[i % 3]), (i, 0), max_tokens=cap) for i, cap in enumerate(caps)]
    requests[5] = dataclasses.replace(requests[5], response=(4, 4), logprobs=np.array([-1.0, -2.0], np.float32))
    told = []

    def on_finished(i, result):
        told.append((i, len(result.token_ids), result.finish_reason))
        return len(told) == 2

    results = sampler.continue_samples(requests, SamplingParams(max_tokens=40, seed=1), on_finished)
    assert told == [(0, 3, "length"), (1, 5, "length")]
    assert [r.finished for r in results] == [True, True, False, False, False, False]
    # Four slots: request 4 started in request 0's, so 2-4 were running and stopped part way; 5 still waited.
    assert all(0 < len(results[i].token_ids) < 40 for i in (2, 3, 4))
    assert results[5].token_ids == (4, 4)
    np.testing.assert_array_equal(results[5].logprobs, [-1.0, -2.0])
    assert all(len(r.logprobs) == len(r.token_ids) for r in results)
    assert sampler.last_call.blocks_held_after == 0
    with pytest.raises(KiminaError, match="request 0 has 2 tokens"):
        sampler.continue_samples([SampleRequest((5, 6), (0, 0), (1, 2), np.zeros(2, np.float32), max_tokens=2)],
                                 SamplingParams(max_tokens=8))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_first_token_frequencies_follow_the_softmax(vocab8_model, temperature):
    prompt, n = [1, 5, 3, 7], 6000
    probs = softmax(np.asarray(vocab8_model(jnp.asarray([prompt]))[0][0, -1], np.float64) / temperature)
    assert probs.max() > 0.25 and probs.min() * n >= 5  # skewed, yet every token expected often enough
    sampler = JaxSampler(vocab8_model, max_batch_rows=n)
    (completions,) = sampler.generate([prompt], SamplingParams(n=n, temperature=temperature, max_tokens=1, seed=0))
    counts = np.bincount([c.token_ids[0] for c in completions], minlength=8)
    assert chi_square_p_value(counts, probs) > 1e-3
    # The test has power: the same counts reject the distribution at twice the temperature.
    wrong = softmax(np.log(probs) / 2)
    assert chi_square_p_value(counts, wrong) < 1e-6


def nucleus_mask(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The smallest set of most likely tokens whose mass reaches top_p (independent of the sampler's code)."""
    order = np.argsort(-probs, axis=-1)
    sorted_probs = np.take_along_axis(probs, order, -1)
    keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p
    mask = np.zeros_like(keep_sorted)
    np.put_along_axis(mask, order, keep_sorted, -1)
    return mask


def top_k_mask(probs: np.ndarray, k: int) -> np.ndarray:
    kth = -np.sort(-probs, axis=-1)[..., k - 1 : k]
    return probs >= kth


@pytest.mark.parametrize("filter_kind", ["top_p", "top_k"])
def test_filtered_sampling_stays_inside_the_kept_tokens(vocab8_model, filter_kind):
    prompt, n, steps = [1, 5, 3, 7], 512, 6
    params = (
        SamplingParams(n=n, top_p=0.6, max_tokens=steps, seed=0) if filter_kind == "top_p"
        else SamplingParams(n=n, top_k=3, max_tokens=steps, seed=0)
    )
    keep = (lambda p: nucleus_mask(p, 0.6)) if filter_kind == "top_p" else (lambda p: top_k_mask(p, 3))
    sampler = JaxSampler(vocab8_model, eos_token_ids=(), max_batch_rows=n)  # no stop: every row has `steps` tokens
    (completions,) = sampler.generate([prompt], params)
    tokens = np.array([c.token_ids for c in completions])
    sequences = np.concatenate([np.tile(prompt, (n, 1)), tokens], axis=1)
    logits = np.asarray(vocab8_model(jnp.asarray(sequences))[0], np.float64)[:, len(prompt) - 1 : -1]
    kept = keep(softmax(logits))  # [n, steps, vocab]
    assert np.take_along_axis(kept, tokens[..., None], -1).all(), "sampled a token outside the kept set"
    # The first token's kept set is the same for every row: its frequencies follow the renormalised softmax there.
    first = softmax(logits[0, 0]) * kept[0, 0]
    assert 2 <= kept[0, 0].sum() < 8
    assert chi_square_p_value(np.bincount(tokens[:, 0], minlength=8), first / first.sum()) > 1e-3


def test_samples_come_back_grouped_complete_and_reproducible(tiny_model):
    stop_ids = tuple(range(30, 90))  # many stop ids, so that some rows stop early
    params = SamplingParams(n=3, max_tokens=8, seed=7, stop_token_ids=stop_ids)
    small_batches = JaxSampler(tiny_model, max_batch_rows=2).generate(PROMPTS, params)
    sampler = JaxSampler(tiny_model, max_batch_rows=64, block_size=2)
    prefills = record_calls(sampler, "prefill")
    one_batch = sampler.generate(PROMPTS, params)
    assert [args[2].shape[0] for args, _ in prefills] == [4]  # 3 prompts prefilled once for 9 rows (a 16-row batch)
    assert len(small_batches) == len(PROMPTS)
    stops = set(stop_ids) | {EOS}
    for i, row in enumerate(small_batches):
        assert [(c.prompt_index, c.sample_index) for c in row] == [(i, 0), (i, 1), (i, 2)]
        for completion, same in zip(row, one_batch[i]):
            assert completion.token_ids == same.token_ids  # batching and decode phases keep seeded samples
            assert 1 <= len(completion.token_ids) <= 8 and completion.logprobs.shape == (len(completion.token_ids),)
            assert not stops & set(completion.token_ids[:-1])
            ends_on_stop = completion.token_ids[-1] in stops
            assert completion.finish_reason == ("stop" if ends_on_stop else "length")
            assert ends_on_stop or len(completion.token_ids) == 8
            assert completion.text == ""  # no tokenizer given
    assert any(c.finish_reason == "stop" for row in small_batches for c in row)
    assert len({c.token_ids for row in small_batches for c in row}) > len(PROMPTS)  # samples differ
    unseeded = JaxSampler(tiny_model)
    first, second = (unseeded.generate(PROMPTS[:1], SamplingParams(n=4, max_tokens=8)) for _ in range(2))
    assert [c.token_ids for c in first[0]] != [c.token_ids for c in second[0]]


def test_text_is_the_tokenizers_decoding_without_special_tokens(tiny_model):
    tokenizer = build_tiny_tokenizer()  # the tiny recipe's byte-level BPE; its EOS <|im_end|> is id 2 too
    assert tokenizer.eos_token_id == EOS
    sampler = JaxSampler(tiny_model, tokenizer=tokenizer)
    assert sampler.eos_token_ids == (EOS,)
    completions = sampler.generate(PROMPTS, SamplingParams(n=4, max_tokens=12, seed=0))
    for completion in (c for row in completions for c in row):
        assert completion.text == tokenizer.decode(list(completion.token_ids), skip_special_tokens=True)
    assert any(c.text for row in completions for c in row)


def test_bad_requests_get_clear_errors(tiny_model):
    sampler = JaxSampler(tiny_model)  # max_len: the config's 512 positions
    with pytest.raises(KiminaError, match="prompt list is empty"):
        sampler.generate([], SamplingParams())
    with pytest.raises(KiminaError, match=r"prompt 1 has 500 tokens; with max_tokens=20 .*allowed prompt length: 492"):
        sampler.generate([[3], [3] * 500], SamplingParams(max_tokens=20))
    with pytest.raises(KiminaError, match="prompt 0 has token id 999, outside the vocabulary"):
        sampler.generate([[1, 999]], SamplingParams())
    with pytest.raises(KiminaError, match="prompt 0 has no tokens"):
        sampler.generate([[]], SamplingParams())
    for field, value in [("n", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0)]:
        with pytest.raises(KiminaError, match=f"SamplingParams.{field}"):
            SamplingParams(**{field: value})
    with pytest.raises(KiminaError, match="expected a Qwen3ForCausalLM"):
        sampler.update_weights({"not": "params"})


def test_update_weights_switches_to_the_new_parameters(tiny_model):
    sampler = JaxSampler(tiny_model)
    params = SamplingParams(n=2, max_tokens=6, seed=0)
    for new in (perturbed(tiny_model, 0.05, seed=1), perturbed(tiny_model, 0.05, seed=2)):
        sampler.update_weights(new)
        for completion in sampler.generate(PROMPTS[:1], params)[0]:
            expected = trainer_logprobs(new, PROMPTS[0], completion.token_ids)
            np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4, rtol=0)
    newest = perturbed(tiny_model, 0.05, seed=3)
    sampler.update_weights(nnx.state(newest, nnx.Param))  # the parameters alone work too
    (completion,) = sampler.generate(PROMPTS[:1], SamplingParams(max_tokens=6, seed=0))[0]
    np.testing.assert_allclose(
        completion.logprobs, trainer_logprobs(newest, PROMPTS[0], completion.token_ids), atol=1e-4, rtol=0
    )
    # Parameters sharded over a mesh, as the trainer holds them, sample the same.
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    sharded = jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, P("x") if x.shape[0] % 8 == 0 else P())),
        nnx.state(newest, nnx.Param),
    )
    sampler.update_weights(sharded)
    (same,) = sampler.generate(PROMPTS[:1], SamplingParams(max_tokens=6, seed=0))[0]
    assert same.token_ids == completion.token_ids
    np.testing.assert_allclose(same.logprobs, completion.logprobs, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ weight stream
def test_weight_stream_equals_the_transformers_state_dict(hf_folder):
    folder, hf_model = hf_folder
    expected = hf_model.state_dict()  # a tied model's lm_head.weight too (the embedding): vLLM's reload needs it
    streamed = dict(hf_torch_tensors(load_hf_checkpoint(folder)))
    assert set(streamed) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor), name
    halves = dict(hf_torch_tensors(load_hf_checkpoint(folder), dtype=torch.bfloat16))
    for name, tensor in expected.items():
        assert halves[name].dtype == torch.bfloat16 and torch.equal(halves[name], tensor.to(torch.bfloat16)), name


def test_weight_stream_is_lazy_zero_copy_and_gathers_sharded_params(tiny_model):
    stream = hf_torch_tensors(tiny_model)
    name, first = next(stream)  # one tensor is produced, nothing else yet
    assert name == "model.embed_tokens.weight"
    assert first.data_ptr() == tiny_model.model.embed_tokens.embedding[...].unsafe_buffer_pointer()  # DLPack view

    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    graphdef, state = nnx.split(tiny_model)
    sharded_state = jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, P("x") if x.shape[0] % 8 == 0 else P())), state
    )
    sharded = nnx.merge(graphdef, sharded_state)
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(sharded_state))
    reference = dict(hf_torch_tensors(tiny_model))
    for name, tensor in hf_torch_tensors(sharded):
        assert torch.equal(tensor, reference[name]), name


# ------------------------------------------------------------------------------------------------ metric
def test_logprob_diff_is_the_mean_and_max_absolute_difference():
    completions = [
        make_completion(0, 0, [4, 5, 6], [-1.0, -2.0, -0.5], "length"),
        make_completion(0, 1, [7], [-3.0], "stop"),
    ]
    diff = logprob_diff(completions, [[-1.5, -2.0, -0.25], [-2.0]])
    assert diff.mean == pytest.approx((0.5 + 0.0 + 0.25 + 1.0) / 4) and diff.max == pytest.approx(1.0)
    with pytest.raises(KiminaError, match="completion 1 has 1 tokens"):
        logprob_diff(completions, [[-1.5, -2.0, -0.25], [-2.0, -1.0]])
    with pytest.raises(KiminaError, match="2 completions but 1 trainer rows"):
        logprob_diff(completions, [[-1.0, -2.0, -0.5]])


# ------------------------------------------------------------------------------------------------ tpu-inference
def test_tpu_inference_layout_follows_its_documented_transforms(tiny_model):
    cfg = tiny_model.config
    hidden, heads, head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim

    def tpu_inference_layout(name: str, x: np.ndarray) -> np.ndarray:
        # tpu-inference's HF loader (models/jax/utils/weight_utils.py): q/k/v_proj reshaped to (heads, head_dim,
        # hidden) then transposed (2, 0, 1); o_proj reshaped to (hidden, heads, head_dim) then transposed (1, 2, 0);
        # gate/up/down_proj and lm_head transposed; embedding and norms unchanged.
        if any(p in name for p in ("q_proj", "k_proj", "v_proj")):
            return x.reshape(-1, head_dim, hidden).transpose(2, 0, 1)
        if "o_proj" in name:
            return x.reshape(hidden, heads, head_dim).transpose(1, 2, 0)
        if any(p in name for p in ("gate_proj", "up_proj", "down_proj", "lm_head")):
            return x.T
        return x

    expected = {
        name.removesuffix(".weight"): tpu_inference_layout(name, np.asarray(x))
        for name, x in iter_hf_tensors(tiny_model)
    }
    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))

    def spec(name):
        if any(p in name for p in ("q_proj", "k_proj", "v_proj")):
            return P(None, "model", None)
        return P("model", None, None) if "o_proj" in name else P()

    # A stand-in for tpu-inference's state: bf16 arrays of its shapes, heads sharded over the model axis.
    targets = {
        name: jax.device_put(jnp.zeros(x.shape, jnp.bfloat16), NamedSharding(mesh, spec(name)))
        for name, x in expected.items()
    }
    converted = dict(to_tpu_inference_layout(tiny_model, targets))
    assert set(converted) == set(expected)
    for name, array in converted.items():
        assert array.dtype == jnp.bfloat16 and array.sharding == targets[name].sharding, name
        in_bf16 = expected[name].astype(jnp.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(array, np.float32), in_bf16)
    padded = {**targets, "model.layers.0.self_attn.k_proj": jnp.zeros((hidden, 2 * cfg.num_key_value_heads, head_dim))}
    with pytest.raises(KiminaError, match="padded heads"):
        list(to_tpu_inference_layout(tiny_model, padded))


# ------------------------------------------------------------------------------------------------ vLLM missing
def test_vllm_engine_without_vllm_names_the_extra_to_install(tiny_hf_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed
    with pytest.raises(KiminaError, match=r"not installed: pip install 'kimina-jax\[gpu\]'.*'kimina-jax\[cpu-vllm\]'"):
        VllmEngine(tiny_hf_folder)
