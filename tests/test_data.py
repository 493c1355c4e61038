"""Data: column layouts, the recipe's exact messages, rendering, length filter, batch order, error-fix cache.

Fixtures: tests/fixtures/promptset_sample.jsonl (3 rows of ../shared/data/train_sample.jsonl in the Promptset
layout; one without a problem text) and tests/fixtures/minif2f_sample.jsonl (3 rows of minif2f.jsonl).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kimina_jax.config import DatasetConfig, load_config
from kimina_jax.data import (
    FixCache,
    PromptIterator,
    PromptRenderer,
    build_fix_prompts,
    build_tiny_tokenizer,
    load_prompt_dataset,
    make_messages,
    read_rows,
    train_iterator,
)
from kimina_jax.data.fix_cache import FIX_COUNTERS
from kimina_jax.data.pass_rates import PassRateMemory
from kimina_jax.errors import KiminaError
from kimina_jax.types import Completion, Prompt, Sample, Verdict

FIXTURES = Path(__file__).parent / "fixtures"
QWEN3_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen3_tokenizer"
HEADER = "import Mathlib\nimport Aesop\n\nset_option maxHeartbeats 0\n\nopen BigOperators Real Nat Topology Rat\n\n"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def renderer(tokenizer):
    return PromptRenderer(tokenizer, max_prompt_length=512)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- messages
def test_messages_byte_for_byte():
    messages = make_messages("Show that 1 + 1 = 2.", "theorem t : 1 + 1 = 2 := by sorry")
    assert messages == (
        {"role": "system", "content": "You are an expert in mathematics and proving theorems in Lean 4."},
        {
            "role": "user",
            "content": "Think about and solve the following problems step by step in Lean 4.\n"
            "\n"
            "# Problem:\n"
            "Show that 1 + 1 = 2.\n"
            "\n"
            "# Formal Statement:\n"
            "```lean4\n"
            "theorem t : 1 + 1 = 2 := by sorry\n"
            "```\n",
        },
    )


def test_missing_problem_renders_None():
    rows = read_rows(DatasetConfig(files=[str(FIXTURES / "promptset_sample.jsonl")]))
    row = rows[2]
    assert row.problem is None
    user = make_messages(row.problem, row.formal_statement)[1]["content"]
    assert "\n\n# Problem:\nNone\n\n# Formal Statement:\n```lean4\nimport Mathlib\n" in user


# ---------------------------------------------------------------------------------------------- layouts
def test_promptset_layout():
    rows = read_rows(DatasetConfig(files=[str(FIXTURES / "promptset_sample.jsonl")], layout="promptset"))
    raw = [json.loads(line) for line in (FIXTURES / "promptset_sample.jsonl").read_text().splitlines()]
    assert [r.statement_id for r in rows] == [r["statement_id"] for r in raw]
    assert [r.problem for r in rows] == [r["natural_language"] for r in raw]
    assert [r.formal_statement for r in rows] == [r["formal_statement"] for r in raw]
    assert [r.data_source for r in rows] == [r["source"] for r in raw]
    assert rows[1].origin.endswith("promptset_sample.jsonl:2")


def test_minif2f_layout_prepends_header_and_keeps_doc_comment():
    path = FIXTURES / "minif2f_sample.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    rows = read_rows(DatasetConfig(files=[str(path)], where={"split": "test"}, name="minif2f_test"))
    assert [r.statement_id for r in rows] == [raw[0]["name"], raw[1]["name"]]
    # The informal problem is the doc comment verbatim, as the original prepare_data.py renames informal_prefix.
    assert rows[0].problem == raw[0]["informal_prefix"] and rows[0].problem.startswith("/-- ")
    assert rows[0].formal_statement == HEADER + raw[0]["formal_statement"]
    assert {r.data_source for r in rows} == {"minif2f_test"}


def test_minif2f_statement_with_its_own_imports_is_kept(tmp_path):
    statement = "import Mathlib\n\ntheorem t : True := by\n"
    path = write_jsonl(tmp_path / "m.jsonl", [json.dumps({"name": "t", "informal_prefix": "/-- x -/\n",
                                                         "formal_statement": statement, "header": HEADER})])
    assert read_rows(DatasetConfig(files=[str(path)])) [0].formal_statement == statement


def test_numina_layout_and_bundled_files():
    rows = read_rows(DatasetConfig(files=["bundled:train.jsonl"]))
    assert len(rows) == 64
    assert sum(r.problem is None for r in rows) == 32
    first = json.loads((Path(__file__).parents[1] / "kimina_jax/data/bundled/train.jsonl").read_text().splitlines()[0])
    assert (rows[0].statement_id, rows[0].data_source) == (first["uuid"], first["source"])
    assert len(read_rows(DatasetConfig(files=["bundled:minif2f_test.jsonl"]))) == 16


def test_source_name_defaults_to_dataset_name(tmp_path):
    path = FIXTURES / "minif2f_sample.jsonl"
    assert read_rows(DatasetConfig(files=[str(path)]))[0].data_source == "minif2f_sample"


def test_where_and_limit():
    path = str(FIXTURES / "minif2f_sample.jsonl")
    valid = read_rows(DatasetConfig(files=[path], where={"split": "valid"}))
    assert [r.statement_id for r in valid] == ["amc12a_2019_p21"]
    assert len(read_rows(DatasetConfig(files=[path, path], limit=4))) == 4
    with pytest.raises(KiminaError, match="'where' names column 'role'"):
        read_rows(DatasetConfig(files=[path], where={"role": "train-pool"}))


def test_parquet_through_datasets_matches_jsonl(tmp_path):
    import datasets

    jsonl = FIXTURES / "promptset_sample.jsonl"
    parquet = tmp_path / "train.parquet"
    datasets.Dataset.from_list([json.loads(line) for line in jsonl.read_text().splitlines()]).to_parquet(str(parquet))
    from_parquet = read_rows(DatasetConfig(files=[str(parquet)]))
    from_jsonl = read_rows(DatasetConfig(files=[str(jsonl)]))
    assert [(r.statement_id, r.problem, r.formal_statement, r.data_source) for r in from_parquet] == [
        (r.statement_id, r.problem, r.formal_statement, r.data_source) for r in from_jsonl
    ]
    assert from_parquet[2].origin.endswith("train.parquet row 3")
    # A folder (e.g. a downloaded copy of a Hub dataset) goes through datasets.load_dataset as a Hub name would.
    from_folder = read_rows(DatasetConfig(files=[str(tmp_path)]))
    assert [r.formal_statement for r in from_folder] == [r.formal_statement for r in from_jsonl]


def test_json_array_file(tmp_path):
    records = [json.loads(line) for line in (FIXTURES / "promptset_sample.jsonl").read_text().splitlines()]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(records))
    assert len(read_rows(DatasetConfig(files=[str(path)]))) == 3


# ---------------------------------------------------------------------------------------------- bad input
GOOD = json.dumps({"statement_id": "a", "natural_language": "p", "formal_statement": "theorem a : True := by sorry"})


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"statement_id": "b", "natural_language": "p", ', r"rows.jsonl:3: not valid JSON"),
        ('{"statement_id": "b", "natural_language": "p"}', r"rows.jsonl:3: missing column 'formal_statement'"),
        ('{"statement_id": "b", "natural_language": 7, "formal_statement": "x"}',
         r"rows.jsonl:3: 'natural_language' must be a string or null"),
        ('{"statement_id": "b", "natural_language": "p", "formal_statement": ""}',
         r"rows.jsonl:3: 'formal_statement' must be a non-empty string"),
        ('{"statement_id": null, "natural_language": "p", "formal_statement": "x"}',
         r"rows.jsonl:3: 'statement_id' must be a string or int"),
        ('["not", "an", "object"]', r"rows.jsonl:3: a row must be a JSON object"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, bad_line, expected):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, "", bad_line])
    with pytest.raises(KiminaError, match=expected):
        read_rows(DatasetConfig(files=[str(path)], layout="promptset"))


def test_unknown_layout_and_missing_files(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [json.dumps({"question": "q", "answer": "a"})])
    with pytest.raises(KiminaError, match=r"odd.jsonl:1: cannot tell the column layout.*promptset: statement_id"):
        read_rows(DatasetConfig(files=[str(path)]))
    with pytest.raises(KiminaError, match="dataset file 'nowhere/train.parquet' does not exist"):
        read_rows(DatasetConfig(files=["nowhere/train.parquet"]))
    with pytest.raises(KiminaError, match="bundled dataset 'bundled:nope.jsonl' does not exist; bundled files:"):
        read_rows(DatasetConfig(files=["bundled:nope.jsonl"]))


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(KiminaError, match=r"cannot load dataset 'AI-MO/no-such-set-for-tests'.*local parquet/jsonl"):
        read_rows(DatasetConfig(files=["AI-MO/no-such-set-for-tests"]))


# ---------------------------------------------------------------------------------------------- rendering
def chatml(messages) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def test_tiny_tokenizer_renders_chatml(tokenizer, renderer):
    messages = make_messages(None, "theorem t : 1 + 1 = 2 := by sorry")
    assert renderer.render(messages) == chatml(messages)
    ids = renderer.encode(messages)
    assert tokenizer.decode(list(ids)) == chatml(messages)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    think = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert tokenizer.encode("<think>\nplan\n</think>", add_special_tokens=False)[0] == think[0]
    assert "<think>" in tokenizer.decode(think, skip_special_tokens=True)  # not "special": kept in text
    assert len(tokenizer) == 1024


def test_tiny_tokenizer_is_the_same_in_every_process(tokenizer):
    code = "from kimina_jax.data import build_tiny_tokenizer; print(build_tiny_tokenizer().backend_tokenizer.to_str())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).parents[1]).stdout.strip()
    assert other == tokenizer.backend_tokenizer.to_str()


@pytest.mark.skipif(not QWEN3_TOKENIZER.is_dir(), reason="needs ../shared/data/qwen3_tokenizer (the shared data beside the repo)")
def test_qwen3_chat_template_rendering():
    from kimina_jax.data import load_tokenizer

    tokenizer = load_tokenizer(str(QWEN3_TOKENIZER))
    renderer = PromptRenderer(tokenizer, max_prompt_length=8192)
    rows = read_rows(DatasetConfig(files=[str(FIXTURES / "minif2f_sample.jsonl")]))
    prompt = renderer.prompt(rows[0])
    assert renderer.render(prompt.messages) == chatml(prompt.messages)
    assert prompt.token_ids[:1] == (151644,)  # <|im_start|>
    assert tokenizer.decode(list(prompt.token_ids)) == chatml(prompt.messages)


def test_prompt_objects(renderer):
    dataset = load_prompt_dataset(DatasetConfig(files=[str(FIXTURES / "promptset_sample.jsonl")]), renderer, True)
    prompt = dataset[0]
    assert isinstance(prompt, Prompt) and prompt.turn == 1
    assert prompt.statement_id == "lean_workbook_10009" and prompt.data_source == "goedel_lean_workbook"
    assert prompt.messages == make_messages(dataset.rows[0].problem, dataset.rows[0].formal_statement)
    assert prompt.token_ids == renderer.encode(prompt.messages)


def test_overlong_prompts_are_dropped_and_counted_or_fail(tokenizer):
    cfg = DatasetConfig(files=["bundled:train.jsonl"])
    full = PromptRenderer(tokenizer, 4096)
    lengths = full.lengths([make_messages(r.problem, r.formal_statement) for r in read_rows(cfg)])
    limit = int(np.median(lengths))
    dataset = load_prompt_dataset(cfg, PromptRenderer(tokenizer, limit), filter_overlong=True)
    assert dataset.dropped == sum(n > limit for n in lengths) > 0
    assert len(dataset) == sum(n <= limit for n in lengths)
    assert all(len(dataset[i].token_ids) <= limit for i in range(len(dataset)))
    first_long = next(i for i, n in enumerate(lengths) if n > limit)
    with pytest.raises(KiminaError, match=rf"train.jsonl:{first_long + 1}: prompt is {lengths[first_long]} tokens"):
        load_prompt_dataset(cfg, PromptRenderer(tokenizer, limit), filter_overlong=False)


# ---------------------------------------------------------------------------------------------- batch order
def fake_prompts(n: int) -> list[Prompt]:
    return [Prompt(f"s{i}", (), f"theorem s{i}", (i,)) for i in range(n)]


def ids(batch: list[Prompt]) -> list[str]:
    return [p.statement_id for p in batch]


def test_order_is_seeded_and_each_epoch_is_a_permutation():
    data = fake_prompts(10)
    it = PromptIterator(data, batch_size=3, seed=7)
    assert it.steps_per_epoch == 3
    epoch0 = [ids(it.next_batch()) for _ in range(3)]
    assert it.epoch == 1 and it.batch == 0
    seen = sum(epoch0, [])
    assert len(set(seen)) == 9
    again = PromptIterator(data, batch_size=3, seed=7)
    assert [ids(again.next_batch()) for _ in range(3)] == epoch0
    other = PromptIterator(data, batch_size=3, seed=8)
    assert [ids(other.next_batch()) for _ in range(3)] != epoch0
    assert [ids(it.next_batch()) for _ in range(3)] != epoch0  # a new permutation each epoch
    plain = PromptIterator(data, batch_size=3, seed=7, shuffle=False)
    assert ids(plain.next_batch()) == ["s0", "s1", "s2"]


def test_resume_continues_the_same_order_with_fix_cache():
    data = fake_prompts(9)
    fix = [Prompt(f"fix{i}", (), "", (), turn=2) for i in range(5)]

    def make():
        cache = FixCache(size=4, rate=0.5, seed=3)
        return PromptIterator(data, batch_size=4, seed=1, fix_cache=cache), cache

    straight, cache = make()
    batches = []
    for step in range(7):
        batches.append(ids(straight.next_batch()))
        cache.add(fix[step % 5 : step % 5 + 1])

    first, cache_a = make()
    for step in range(3):
        first.next_batch()
        cache_a.add(fix[step % 5 : step % 5 + 1])
    saved = json.loads(json.dumps(first.state_dict()))  # as in a checkpoint: the position and the fix cache

    resumed, cache_b = make()
    resumed.load_state_dict(saved)
    rest = []
    for step in range(3, 7):
        rest.append(ids(resumed.next_batch()))
        cache_b.add(fix[step % 5 : step % 5 + 1])
    assert rest == batches[3:]
    assert any(s.startswith("fix") for s in sum(batches, []))


def test_a_batch_drawn_ahead_is_drawn_again_after_a_resume():
    """Off-policy: step t+1's batch is drawn while step t trains; a checkpoint of step t must not skip it."""
    data = fake_prompts(9)

    def make():
        cache = FixCache(size=4, rate=0.5, seed=3)
        cache.add([Prompt(f"fix{i}", (), "", (), turn=2) for i in range(3)])
        return PromptIterator(data, batch_size=4, seed=1, fix_cache=cache)

    straight = make()
    expected = [ids(straight.next_batch()) for _ in range(3)]
    running = make()
    running.next_batch()
    before = running.state_dict()
    assert ids(running.next_batch(ahead=True)) == expected[1]
    saved = json.loads(json.dumps(running.state_dict()))  # a checkpoint of step 1, taken while batch 2 generates
    assert saved == json.loads(json.dumps(before))
    resumed = make()
    resumed.load_state_dict(saved)
    assert [ids(resumed.next_batch()) for _ in range(2)] == expected[1:]
    running.use_ahead()  # step 2 trains on it: checkpoints move past it
    state = running.state_dict()
    assert (state["epoch"], state["batch"], state["fix_cache"]["draws"]) == (1, 0, 2)  # 2 batches an epoch


def test_resume_with_other_data_is_refused():
    it = PromptIterator(fake_prompts(9), batch_size=3, seed=1)
    with pytest.raises(KiminaError, match="checkpoint was taken with 9 prompts in batches of 3"):
        PromptIterator(fake_prompts(10), batch_size=3, seed=1).load_state_dict(it.state_dict())


def test_processes_get_disjoint_shares_of_each_global_batch():
    data = fake_prompts(20)
    cache_prompts = [Prompt("fix", (), "", (), turn=2)]
    whole = PromptIterator(data, 8, seed=2, fix_cache=FixCache(10, 0.5, 0))
    whole.fix_cache.add(cache_prompts)
    parts = []
    for p in range(4):
        part = PromptIterator(data, 8, seed=2, fix_cache=FixCache(10, 0.5, 0), process_index=p, process_count=4)
        part.fix_cache.add(cache_prompts)
        parts.append(part)
    for _ in range(5):
        shares = [ids(part.next_batch()) for part in parts]
        assert all(len(s) == 2 for s in shares)
        assert sum(shares, []) == ids(whole.next_batch())


def test_too_small_dataset_or_uneven_split():
    with pytest.raises(KiminaError, match="has 3 prompts after filtering, fewer than one batch"):
        PromptIterator(fake_prompts(3), batch_size=4, seed=0)
    with pytest.raises(KiminaError, match="not divisible by the 3 processes"):
        PromptIterator(fake_prompts(8), batch_size=4, seed=0, process_count=3)


def test_train_iterator_from_tiny_recipe(renderer):
    cfg = load_config("tiny", env={})
    it = train_iterator(cfg.data, PromptRenderer(renderer.tokenizer, cfg.data.max_prompt_length))
    assert it.fix_cache is not None and it.fix_cache.rate == 0.5
    batch = it.next_batch()
    assert len(batch) == 4 and all(p.turn == 1 and p.token_ids for p in batch)
    assert it.steps_per_epoch == 16


# ---------------------------------------------------------------------------------------------- pass rates
def test_pass_rate_memory_keeps_the_last_visits_and_round_trips():
    memory = PassRateMemory(visits=2)
    memory.record("a", 4, 4, 4)
    memory.record("a", 2, 4, 4)
    memory.record("a", 3, 3, 4)  # one sample unverified: a pass rate of 1, yet not solved in all 4 samples
    memory.record("b", 4, 4, 4)
    assert not memory.solved("b")  # one visit of the 2 needed
    memory.record("b", 4, 4, 4)
    memory.record("c", 0, 0, 4)
    assert memory.pass_rates("a") == [0.5, 1.0]  # the oldest visit is forgotten
    assert (memory.solved("a"), memory.solved("b"), memory.solved("new")) == (False, True, False)
    assert np.isnan(memory.pass_rates("c")).all() and memory.pass_rates("new") == []

    restored = PassRateMemory(visits=2)
    restored.load_state_dict(json.loads(json.dumps(memory.state_dict())))  # as in a checkpoint
    assert restored.state_dict() == memory.state_dict() and len(restored) == 3
    shorter = PassRateMemory(visits=1)  # a resumed run that looks at fewer visits keeps the latest
    shorter.load_state_dict(memory.state_dict())
    assert shorter.pass_rates("a") == [1.0] and shorter.solved("b") and not shorter.solved("a")


def skipping(data, batch_size, visits=1, **kwargs) -> PromptIterator:
    return PromptIterator(
        data, batch_size, seed=1, shuffle=False, pass_rates=PassRateMemory(visits), skip_solved=True, **kwargs
    )


def test_solved_statements_are_left_out_of_later_epochs():
    it = skipping(fake_prompts(10), batch_size=2)
    assert [ids(it.next_batch()) for _ in range(5)] == [["s0", "s1"], ["s2", "s3"], ["s4", "s5"], ["s6", "s7"],
                                                      ["s8", "s9"]]
    assert (it.drawn_epoch, it.skipped_solved, it.epoch) == (0, 0, 1)
    for statement in ("s1", "s3", "s7"):
        it.pass_rates.record(statement, 4, 4, 4)
    it.pass_rates.record("s5", 3, 4, 4)  # one sample failed: not solved
    # Epoch 1: 7 rows, 3 batches (the remainder left out, as in every epoch).
    assert ids(it.next_batch()) == ["s0", "s2"]
    assert (it.drawn_epoch, it.skipped_solved) == (1, 3)
    it.pass_rates.record("s0", 4, 4, 4)  # solved mid-epoch: left out from the next epoch on, not this one
    assert [ids(it.next_batch()) for _ in range(2)] == [["s4", "s5"], ["s6", "s8"]]
    assert ids(it.next_batch()) == ["s2", "s4"] and (it.drawn_epoch, it.skipped_solved) == (2, 4)

    same = PromptIterator(fake_prompts(10), 2, seed=1, shuffle=False)  # nothing solved: the order of no skipping
    nothing_solved = skipping(fake_prompts(10), batch_size=2)
    assert [ids(nothing_solved.next_batch()) for _ in range(7)] == [ids(same.next_batch()) for _ in range(7)]


def test_when_less_than_a_batch_is_unsolved_nothing_is_left_out():
    it = skipping(fake_prompts(4), batch_size=2)
    it.next_batch(), it.next_batch()
    for statement in ("s0", "s1", "s2"):
        it.pass_rates.record(statement, 4, 4, 4)
    assert [ids(it.next_batch()) for _ in range(2)] == [["s0", "s1"], ["s2", "s3"]]
    assert it.skipped_solved == 0


def test_a_resumed_epoch_leaves_out_what_it_left_out_before():
    """The rows left out are decided when an epoch starts and saved with the position, also while a batch is
    drawn ahead (off-policy); statements solved since then are left out from the next epoch."""
    def make():
        return skipping(fake_prompts(6), batch_size=2, fix_cache=FixCache(4, 0.5, 3))

    running = make()
    [running.next_batch() for _ in range(3)]
    running.pass_rates.record("s0", 4, 4, 4)
    assert ids(running.next_batch()) == ["s1", "s2"]  # epoch 1 leaves s0 out: 5 rows, 2 batches
    running.pass_rates.record("s1", 4, 4, 4)
    assert ids(running.next_batch(ahead=True)) == ["s3", "s4"]
    saved = json.loads(json.dumps(running.state_dict()))  # a checkpoint taken while that batch generates
    assert (saved["epoch"], saved["batch"], saved["skipped_rows"]) == (1, 1, [0])

    resumed = make()
    resumed.load_state_dict(saved)
    assert ids(resumed.next_batch()) == ["s3", "s4"]  # s1 was solved after epoch 1 started: still in it
    running.use_ahead()
    assert [ids(resumed.next_batch()) for _ in range(2)] == [ids(running.next_batch()) for _ in range(2)] == [
        ["s2", "s3"], ["s4", "s5"]]  # epoch 2 leaves s0 and s1 out
    assert resumed.state_dict() == running.state_dict()


def test_train_iterator_skip_solved_keys(renderer):
    cfg = load_config("tiny", ["data.skip_solved.enabled=true", "data.skip_solved.visits=3"], env={})
    it = train_iterator(cfg.data, PromptRenderer(renderer.tokenizer, cfg.data.max_prompt_length))
    assert it.skip_solved and it.pass_rates.visits == 3
    assert it._statement_ids == [row.statement_id for row in it.dataset.rows]


# ---------------------------------------------------------------------------------------------- fix cache
def test_fix_cache_fifo_and_rates():
    prompts = [Prompt(f"p{i}", (), "", (), turn=2) for i in range(10)]
    cache = FixCache(size=3, rate=1.0, seed=0)
    assert cache.draw(5) == [None] * 5  # empty: never drawn from
    cache.add(prompts[:2])
    cache.add(prompts[2:5])
    assert len(cache) == 3
    drawn = cache.draw(200)
    assert {p.statement_id for p in drawn} == {"p2", "p3", "p4"}  # the newest 3
    never = FixCache(size=3, rate=0.0, seed=0)
    never.add(prompts)
    assert never.draw(100) == [None] * 100
    half = FixCache(size=10, rate=0.5, seed=0)
    half.add(prompts)
    taken = sum(p is not None for _ in range(20) for p in half.draw(200))
    assert abs(taken / 4000 - 0.5) < 0.03


def test_fix_cache_state_round_trip():
    user = ({"role": "user", "content": "x"},)
    prompts = [Prompt(f"p{i}", user, "fs", (1, 2, i), turn=2, data_source="d") for i in range(4)]
    cache = FixCache(size=3, rate=0.5, seed=5)
    cache.add(prompts)
    cache.draw(4)
    state = json.loads(json.dumps(cache.state_dict()))
    copy = FixCache(size=3, rate=0.5, seed=5)
    copy.load_state_dict(state)
    assert copy.state_dict() == cache.state_dict()
    assert [cache.draw(6) for _ in range(3)] == [copy.draw(6) for _ in range(3)]


def make_sample(prompt: Prompt, status: str | None, feedback: str = "", text: str = "<think>x</think> y") -> Sample:
    completion = Completion(0, 0, (5, 6), text, np.zeros(2, np.float32), "stop")
    verdict = Verdict(status) if status is not None else None
    acc = float(status == "valid")
    return Sample(prompt, completion, verdict, score=acc, acc=acc, format_error="No error.", feedback=feedback)


def test_build_fix_prompts_messages_and_counts(renderer):
    turn1 = renderer.prompt(read_rows(DatasetConfig(files=[str(FIXTURES / "promptset_sample.jsonl")]))[0])
    feedback = "# Error 1:\nError message: \nlinarith failed\n\n"
    samples = [
        make_sample(turn1, "lean_error", feedback, text="my proof attempt"),
        make_sample(turn1, "valid"),
        make_sample(turn1, None),  # no proof extracted: nothing was sent
        make_sample(turn1, "lean_error", ""),
        make_sample(turn1, "lean_error", "e" * 3001),
        make_sample(turn1, "lean_error", "e" * 3000, text="word " * 600),  # fits the feedback limit, not the prompt
        make_sample(turn1, "unverified"),
    ]
    prompts, counts = build_fix_prompts(samples, renderer, max_feedback_chars=3000)
    assert len(prompts) == 1
    fix = prompts[0]
    assert fix.messages == (
        *turn1.messages,
        {"role": "assistant", "content": "my proof attempt"},
        {"role": "user", "content": feedback},
    )
    assert (fix.turn, fix.statement_id, fix.formal_statement) == (2, turn1.statement_id, turn1.formal_statement)
    assert fix.token_ids == renderer.encode(fix.messages)
    assert counts == {
        **{f"multiturn/turn_2/{k}": 0 for k in FIX_COUNTERS},
        "multiturn/turn_1/valid": 1,
        "multiturn/turn_1/filtered": 2,
        "multiturn/turn_1/feedback_too_long": 1,
        "multiturn/turn_1/max_prompt_token_len_exceeded": 1,
        "multiturn/turn_1/exceed_max_turn": 0,
        "multiturn/turn_1/added_in_database": 1,
        "multiturn/turn_1/unverified": 1,
    }
    # A failed turn-2 sample gets no third turn.
    _, counts = build_fix_prompts([make_sample(fix, "lean_error", feedback)], renderer, 3000)
    assert counts["multiturn/turn_2/exceed_max_turn"] == 1


def test_without_the_fix_turn_failures_exceed_max_turn(renderer):
    # The original's last turn is turn 1 with the fix turn off: a failure with feedback is past it.
    turn1 = renderer.prompt(read_rows(DatasetConfig(files=[str(FIXTURES / "promptset_sample.jsonl")]))[0])
    feedback = "# Error 1:\nError message: \nlinarith failed\n\n"
    samples = [
        make_sample(turn1, "lean_error", feedback),
        make_sample(turn1, "lean_error", feedback),
        make_sample(turn1, "valid"),
        make_sample(turn1, "lean_error", "e" * 3001),
    ]
    prompts, counts = build_fix_prompts(samples, renderer, 3000, error_fix=False)
    assert prompts == []
    assert counts == {
        **{f"multiturn/turn_1/{k}": 0 for k in FIX_COUNTERS},
        "multiturn/turn_1/valid": 1,
        "multiturn/turn_1/feedback_too_long": 1,
        "multiturn/turn_1/exceed_max_turn": 2,
    }
