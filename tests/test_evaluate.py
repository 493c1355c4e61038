"""Evaluation (SPEC 8): the fix-turn targets, `validate`, the config evaluation reads (training's sections and
recipes; the short flags as aliases), and the CLI end to end on 8 MiniF2F test statements
(tests/fixtures/minif2f_test8.jsonl: the first 8 `test` rows of ../shared/data/minif2f.jsonl) against the real
Kimina Lean Server with the stand-in REPL (NOT Lean).

A random tiny model would never write a proof, so the end-to-end tests use a tiny Qwen3 first trained (a few
seconds of Adam) to answer three prompts with fixed responses the stand-in judges:
- problem A, turn 1: the statement with an empty proof (stand-in: "unsolved goals" error -> feedback);
- problem A, turn 2 (the fix prompt made from that feedback): the statement with a proof (valid);
- problem B, turn 1: the statement with a proof (valid).
Every other problem gets text without its theorem: no proof, acc 0. With 8 problems: acc_turn_1 = 1/8 (B) and
acc_turn_2 = 2/8 (A and B) for every metric.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kimina_jax.checkpoint import Checkpointer
from kimina_jax.run_folder import write_model_files
from kimina_jax.config import DatasetConfig, ErrorFixConfig, TinyModelConfig
from kimina_jax.data import PromptRenderer, build_fix_prompts, build_tiny_tokenizer, load_prompt_dataset
from kimina_jax.eval import fix_targets, summarize, validate
from kimina_jax.evaluate import format_table, main
from kimina_jax.models import save_hf_checkpoint
from kimina_jax.models.tiny import build_tiny_model
from kimina_jax.reward import Rewarder, StandinVerifier
from kimina_jax.rollout import JaxSampler, SamplingParams, make_completion
from kimina_jax.types import Completion, Prompt, Sample, Verdict
from tests.lean_harness.server import FaultProxy
from tests.test_eval_metrics import VALUES

MINIF2F_8 = Path(__file__).parent / "fixtures/minif2f_test8.jsonl"
PROBLEM_A, PROBLEM_B = "mathd_numbertheory_3", "numbertheory_4x3m7y3neq2003"
MAX_PROMPT, MAX_TOKENS = 512, 96


def test_summary_table_heads_with_turn_1_acc():
    averaged, _ = summarize(VALUES, 2, (1, 2), error_fix=True)
    summary = {"n": 2, "k": [1, 2], "error_fix": True, "data_source": "minif2f_test", "problems": 2,
               "verifier": "lean", "metrics": averaged, "counts": {}}
    rows = format_table(summary).splitlines()
    header = rows[1].split()
    acc = next(row for row in rows if row.startswith("acc "))
    turn_2 = next(row for row in rows if row.startswith("acc_turn_2"))
    assert acc.split()[-len(header):][header.index("mean@2")] == "25.00%"  # turn 1: 1 of 4
    assert turn_2.split()[-len(header):][header.index("mean@2")] == "75.00%"  # within one fix: 3 of 4
    assert "turn 1" in acc and "within one fix" in turn_2


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def hand_made(turn: int, status: str | None, feedback: str = "", index: int = 0) -> Sample:
    prompt = Prompt("p", ({"role": "user", "content": "prove it"},), "theorem p : True := by", (1, 2, 3), turn=turn)
    completion = Completion(0, index, (4, 5), "my proof", np.zeros(2, np.float32), "stop")
    verdict = None if status is None else Verdict(status)
    acc = float(status == "valid")
    return Sample(prompt, completion, verdict, acc, acc, "No error.", None if status is None else "code", feedback)


def test_fix_targets_are_failed_verified_samples_with_feedback(tiny_tokenizer):
    renderer = PromptRenderer(tiny_tokenizer, 256)
    samples = [
        hand_made(1, "lean_error", "# Error 1: ...", index=0),
        hand_made(1, "valid", index=1),
        hand_made(1, None, index=2),  # no proof extracted: no feedback
        hand_made(1, "server_error", index=3),
        hand_made(1, "timeout", "# System Error: ...", index=4),
        hand_made(1, "lean_error", "x" * 3001, index=5),
        hand_made(2, "lean_error", "# Error 1: ...", index=6),  # only one fix turn
    ]
    targets, counts = fix_targets(samples, renderer, max_feedback_chars=3000)
    assert [position for position, _ in targets] == [0, 4]
    for position, prompt in targets:
        assert prompt.turn == 2 and prompt.statement_id == "p"
        assert prompt.messages[-2:] == (
            {"role": "assistant", "content": "my proof"}, {"role": "user", "content": samples[position].feedback}
        )
    assert counts["multiturn/turn_1/added_in_database"] == 2
    assert counts["multiturn/turn_1/unverified"] == 1 and counts["multiturn/turn_1/feedback_too_long"] == 1
    assert counts["multiturn/turn_2/exceed_max_turn"] == 1


# ---------------------------------------------------------------------------------------------- the trained tiny model
def proof_block(statement: str, proof: str) -> str:
    return f"```lean4\n{statement.rstrip()}{proof}\n```"


@pytest.fixture(scope="module")
def taught(tiny_tokenizer):
    """(model, 8 turn-1 prompts, renderer, the responses) with the model taught the three answers of the docstring."""
    tok = tiny_tokenizer
    renderer = PromptRenderer(tok, MAX_PROMPT)
    prompts = load_prompt_dataset(DatasetConfig(files=[str(MINIF2F_8)], where={"split": "test"}), renderer, False)
    prompts = prompts.all_prompts()
    by_id = {p.statement_id: p for p in prompts}
    raw = {row["name"]: row for row in map(json.loads, MINIF2F_8.read_text().splitlines())}
    answers = {
        "A1": proof_block(raw[PROBLEM_A]["formal_statement"], ""),
        "A2": proof_block(raw[PROBLEM_A]["formal_statement"], "\n  norm_num"),
        "B1": proof_block(raw[PROBLEM_B]["formal_statement"], "\n  omega"),
    }
    # The fix prompt A's turn-1 answer gets (the local stand-in gives the feedback the server's stand-in REPL gives).
    ids = tok.encode(answers["A1"], add_special_tokens=False)
    first = make_completion(0, 0, ids, np.zeros(len(ids)), "stop", tok)
    (failed,) = Rewarder(StandinVerifier()).score_groups([by_id[PROBLEM_A]], [[first]])
    (fix_prompt,), _ = build_fix_prompts([failed], renderer, 3000)
    lessons = [(by_id[PROBLEM_A], answers["A1"]), (fix_prompt, answers["A2"]), (by_id[PROBLEM_B], answers["B1"])]

    length = max(len(p.token_ids) + len(tok.encode(a, add_special_tokens=False)) + 1 for p, a in lessons)
    tokens, mask = np.zeros((3, length), np.int32), np.zeros((3, length), np.float32)
    for row, (prompt, answer) in enumerate(lessons):
        sequence = [*prompt.token_ids, *tok.encode(answer, add_special_tokens=False), tok.eos_token_id]
        tokens[row, : len(sequence)] = sequence
        mask[row, len(prompt.token_ids) - 1 : len(sequence) - 1] = 1.0  # predict the answer and its EOS
    model = build_tiny_model(TinyModelConfig(), len(tok), eos_token_id=tok.eos_token_id, seed=0)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens, mask):
        def loss(model):
            logits, _ = model(tokens[:, :-1])
            target = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
            weights = mask[:, :-1]
            least_likely = jnp.where(weights > 0, jnp.exp(target), 1.0).min()
            return -(target * weights).sum() / weights.sum(), least_likely

        (_, least_likely), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        optimizer.update(model, grads)
        return least_likely

    for _ in range(300):
        # Every answer token at >= 0.98: top-p 0.95 sampling then keeps only that token (deterministic answers).
        if float(step(model, optimizer, jnp.asarray(tokens), jnp.asarray(mask))) > 0.98:
            break
    else:
        pytest.fail("the tiny model did not learn its three answers")
    return model, prompts, renderer, answers


@pytest.fixture(scope="module")
def taught_folder(taught, tiny_tokenizer, tmp_path_factory):
    """The taught model as an HF folder with the tiny tokenizer."""
    folder = tmp_path_factory.mktemp("taught_hf")
    save_hf_checkpoint(taught[0], folder)
    tiny_tokenizer.save_pretrained(str(folder))
    return folder


def test_validate_gives_verls_names_and_counts_fixes(taught):
    model, prompts, renderer, answers = taught
    params = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_tokens=MAX_TOKENS, seed=3)
    metrics, samples = validate(
        JaxSampler(model, tokenizer=renderer.tokenizer), Rewarder(StandinVerifier()), prompts, params, renderer,
        error_fix=ErrorFixConfig(), data_source="minif2f_test",
    )
    turn_1 = [s for s in samples if s.prompt.turn == 1]
    fixes = [s for s in samples if s.prompt.turn == 2]
    assert len(turn_1) == 16 and len(fixes) == 2
    assert {s.completion.text for s in turn_1 if s.prompt.statement_id == PROBLEM_A} == {answers["A1"]}
    assert all(f.prompt.statement_id == PROBLEM_A and f.completion.text == answers["A2"] and f.acc == 1 for f in fixes)
    assert sorted(f.completion.sample_index for f in fixes) == [0, 1]  # each fix carries its sample's index
    assert metrics["val-core/minif2f_test/acc/mean@2"] == 0.125  # turn 1 (B), the fix turn not folded in
    assert metrics["val-core/minif2f_test/acc/best@2/mean"] == 0.125
    assert metrics["val-aux/minif2f_test/acc_turn_1/best@2/mean"] == 0.125
    assert metrics["val-aux/minif2f_test/acc_turn_2/mean@2"] == 0.25
    assert metrics["val-aux/minif2f_test/acc_turn_2/best@2/mean"] == 0.25
    assert metrics["val-aux/minif2f_test/acc_turn_1/pass@2"] == 0.125
    assert metrics["val-aux/minif2f_test/unverified/turn_1"] == 0 and metrics["val-aux/minif2f_test/fix_attempts"] == 2


# ---------------------------------------------------------------------------------------------- the CLI
def cli(folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(folder), "--dataset", str(MINIF2F_8), "--split", "test", "--n", "4", "--k", "1,2,4",
        "--error-fix", "--engine", "jax", "--dtype", "float32", "--out", str(out), "--max-tokens", str(MAX_TOKENS),
        "--max-prompt-length", str(MAX_PROMPT), "--batch-problems", "5", "--name", "minif2f_test", *extra,
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.lean_server
def test_cli_end_to_end_with_error_fix_and_resume(taught, taught_folder, lean_server, tmp_path, monkeypatch, capsys):
    answers = taught[3]
    out = tmp_path / "results"
    with FaultProxy(lean_server.url) as counting:  # a pass-through proxy that counts the requests it relays
        monkeypatch.setenv("LEAN_SERVER_API_URL", counting.url)
        assert main(cli(taught_folder, out)) == 0
        first_requests = counting.requests
        table = capsys.readouterr().out

        records = read_jsonl(out / "samples.jsonl")
        assert {"problem", "turn", "sample_index", "response", "proof", "verdict", "format_error"} <= set(records[0])
        turn_1 = [r for r in records if r["turn"] == 1]
        fixes = [r for r in records if r["turn"] == 2]
        assert len(turn_1) == 32 and len({(r["problem"], r["sample_index"]) for r in turn_1}) == 32
        for r in turn_1:
            if r["problem"] == PROBLEM_A:
                assert (r["response"], r["verdict"], r["acc"]) == (answers["A1"], "lean_error", 0.0)
                assert "unsolved goals" in r["feedback"] and r["proof"].endswith(":= by")
            elif r["problem"] == PROBLEM_B:
                assert (r["response"], r["verdict"], r["acc"]) == (answers["B1"], "valid", 1.0)
            else:
                assert r["verdict"] is None and r["proof"] is None and r["acc"] == 0.0  # no proof: nothing sent
        assert sorted((r["problem"], r["sample_index"]) for r in fixes) == [(PROBLEM_A, i) for i in range(4)]
        assert all(r["response"] == answers["A2"] and r["verdict"] == "valid" for r in fixes)

        summary = json.loads((out / "summary.json").read_text())
        assert summary["problems"] == 8 and summary["data_source"] == "minif2f_test"
        for name in ("mean@4", "pass@1", "pass@2", "pass@4", "best@2/mean", "best@4/mean"):
            assert summary["metrics"]["acc_turn_1"][name] == 0.125, name
            assert summary["metrics"]["acc_turn_2"][name] == 0.25, name
        assert summary["val_metrics"]["val-core/minif2f_test/acc/mean@4"] == 0.125
        assert summary["val_metrics"]["val-aux/minif2f_test/acc_turn_2/mean@4"] == 0.25
        assert summary["val_metrics"]["val-aux/minif2f_test/acc_turn_1/best@4/mean"] == 0.125
        assert summary["counts"]["samples_turn_2"] == 4 and summary["counts"]["unverified_turn_1"] == 0
        assert summary["samples_verified_this_run"] == 36
        assert "acc (turn 1)" in table and "12.50%" in table and "within one fix" in table and "25.00%" in table
        assert first_requests > 0

        # Rerun: everything is verified already, so nothing is generated and the server gets no request.
        assert main(cli(taught_folder, out)) == 0
        assert counting.requests == first_requests
        again = json.loads((out / "summary.json").read_text())
        assert again["samples_verified_this_run"] == 0
        assert again["metrics"] == summary["metrics"]

        # A run killed mid-way: B's samples and A's fixes missing, one sample left unverified, a half-written line.
        kept = [r for r in records if r["problem"] != PROBLEM_B and r["turn"] == 1]
        a0 = next(i for i, r in enumerate(kept) if r["problem"] == PROBLEM_A and r["sample_index"] == 0)
        kept[a0] = {**kept[a0], "verdict": "unverified", "verdict_error": "HTTP 503", "acc": 0.0, "feedback": ""}
        text = "".join(json.dumps(r) + "\n" for r in kept) + '{"problem": "mathd_alg'
        (out / "samples.jsonl").write_text(text)
        assert main(cli(taught_folder, out)) == 0
        resumed = json.loads((out / "summary.json").read_text())
        assert resumed["samples_verified_this_run"] == 4 + 4 + 1  # B's samples, A's fixes, A's unverified one
        assert resumed["metrics"] == summary["metrics"]
        assert counting.requests > first_requests
        latest = {(r["problem"], r["turn"], r["sample_index"]): r for r in read_jsonl(out / "samples.jsonl")}
        assert len(latest) == 36 and latest[(PROBLEM_A, 1, 0)]["verdict"] == "lean_error"
        original = next(r for r in turn_1 if r["problem"] == PROBLEM_A and r["sample_index"] == 0)
        assert latest[(PROBLEM_A, 1, 0)]["response_tokens"] == original["response_tokens"] > 0

        # A larger --n adds samples 4..7 (and their fixes) to the folder's.
        argv = cli(taught_folder, out)
        argv[argv.index("--n") + 1], argv[argv.index("--k") + 1] = "8", "1,8"
        assert main(argv) == 0
        extended = json.loads((out / "summary.json").read_text())
        assert extended["samples_verified_this_run"] == 8 * 4 + 4
        assert extended["metrics"]["acc_turn_1"]["mean@8"] == 0.125 and extended["metrics"]["acc"]["pass@8"] == 0.125

    # Other sampling settings in the same folder: refused.
    assert main(cli(taught_folder, out, "--temperature", "0.5")) == 2
    assert "other settings (temperature: 1.0 there, 0.5 now)" in capsys.readouterr().err


@pytest.mark.lean_server
def test_cli_runs_on_a_training_recipe(taught_folder, lean_server, tmp_path, monkeypatch):
    """`--config <training recipe>`: its validation sampling (top-p 0.95), verifier and vLLM settings, with the short
    flags and `key=value` overrides on top (the tiny model's lengths; fp32, as it was taught)."""
    monkeypatch.setenv("LEAN_SERVER_API_URL", lean_server.url)
    out = tmp_path / "results"
    recipe = Path(__file__).parents[1] / "configs/kimina_prover_1.7B.yaml"
    argv = ["--config", str(recipe), "--model", str(taught_folder), "--dataset", str(MINIF2F_8), "--n", "2", "--k",
            "1,2", "--engine", "jax", "--dtype", "float32", "--out", str(out), f"data.max_prompt_length={MAX_PROMPT}",
            f"data.max_response_length={MAX_TOKENS}", "eval.dataset.name=minif2f_test", "eval.error_fix=true"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampling"] == {"temperature": 1.0, "top_p": 0.95, "top_k": -1, "max_tokens": MAX_TOKENS, "seed": 0}
    assert summary["data_source"] == "minif2f_test" and summary["verifier"] == "lean"
    assert summary["metrics"]["acc"]["mean@2"] == 0.125 and summary["metrics"]["acc_turn_2"]["mean@2"] == 0.25
    settings = json.loads((out / "settings.json").read_text())
    assert settings["max_feedback_chars"] == 3000 and settings["max_prompt_length"] == MAX_PROMPT


def test_cli_reads_a_training_checkpoint_with_its_saved_lengths(taught, tiny_tokenizer, tmp_path, capsys):
    model = taught[0]
    run = tmp_path / "run"
    write_model_files(run, model.config.to_dict(), tiny_tokenizer)
    checkpointer = Checkpointer(run, async_save=False)
    checkpointer.save(
        7, params=nnx.state(model, nnx.Param), opt_state={"count": jnp.zeros((), jnp.int32)}, rng_key=jax.random.key(0),
        loop_state={"step": 7}, config={"model": {"param_dtype": "float32"},
                                        "data": {"max_prompt_length": MAX_PROMPT, "max_response_length": MAX_TOKENS}},
    )
    checkpointer.close()
    out = tmp_path / "results"
    argv = ["--model", str(run), "--dataset", str(MINIF2F_8), "--n", "1", "--k", "1", "--error-fix", "--engine", "jax",
            "--out", str(out), "--verifier", "standin"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "LOCAL STAND-IN" in printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"].endswith("checkpoints/7") and summary["sampling"]["max_tokens"] == MAX_TOKENS
    assert summary["verifier"] == "standin (LOCAL STAND-IN, NOT Lean)"
    assert summary["metrics"]["acc"]["mean@1"] == summary["metrics"]["acc_turn_1"]["mean@1"] == 0.125
    assert summary["metrics"]["acc_turn_2"]["mean@1"] == 0.25
    source = summary["data_source"]
    assert summary["val_metrics"][f"val-core/{source}/acc/mean@1"] == 0.125
    assert summary["val_metrics"][f"val-aux/{source}/acc_turn_2/mean@1"] == 0.25
    acc_row = next(line for line in printed.out.splitlines() if line.startswith("acc (turn 1)"))
    assert acc_row.split()[3] == "12.50%"  # label, 3 words; then mean@1


def test_n_below_the_largest_k_is_refused(tmp_path, capsys):
    argv = ["--model", str(tmp_path), "--dataset", str(MINIF2F_8), "--n", "4", "--k", "1,8", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "--n 4 is smaller than the largest --k (8)" in capsys.readouterr().err
