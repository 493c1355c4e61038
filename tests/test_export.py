"""`python -m kimina_jax.export` writes folders that transformers and vLLM load with our logits."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from kimina_jax.export import main as export_main
from kimina_jax.models import load_hf_checkpoint
from tests.vllm_support import VLLM_CPU_ARGS, VLLM_ENV, requires_vllm


def test_export_cli_from_hf_folder(tiny_hf_folder, tmp_path, capsys):
    out = tmp_path / "exported"
    assert export_main(["--checkpoint", str(tiny_hf_folder), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    ids = np.arange(3, 15)[None]
    ours = np.asarray(load_hf_checkpoint(tiny_hf_folder)(jnp.asarray(ids))[0])
    with torch.no_grad():
        ref = transformers.Qwen3ForCausalLM.from_pretrained(out)(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4


def test_export_cli_reports_bad_input(tmp_path, capsys):
    assert export_main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert export_main(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2


def test_export_copies_tokenizer_files(tiny_hf_folder, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    out = tmp_path / "with_tok"
    assert export_main(["--checkpoint", str(tiny_hf_folder), "--out", str(out), "--tokenizer", str(tok)]) == 0
    assert (out / "tokenizer_config.json").is_file()


@requires_vllm
@pytest.mark.vllm
def test_vllm_loads_export_with_matching_prompt_logprobs(tiny_hf_folder, tmp_path):
    out = tmp_path / "for_vllm"
    assert export_main(["--checkpoint", str(tiny_hf_folder), "--out", str(out)]) == 0
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 128, size=20)]
    # vLLM runs in a child process so its engine does not outlive this test inside pytest.
    script = textwrap.dedent(f"""
        import json
        from vllm import LLM, SamplingParams
        llm = LLM(model={str(out)!r}, skip_tokenizer_init=True, seed=0, **{VLLM_CPU_ARGS!r})
        res = llm.generate([{{"prompt_token_ids": {ids!r}}}], SamplingParams(max_tokens=1, prompt_logprobs=0))
        print("RESULT", json.dumps([None] + [next(iter(d.values())).logprob for d in res[0].prompt_logprobs[1:]]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, **VLLM_ENV})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    vllm_logprobs = np.array(json.loads(line[7:])[1:])
    logits = np.asarray(load_hf_checkpoint(out)(jnp.asarray([ids]))[0][0], dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    ours = logp[np.arange(len(ids) - 1), ids[1:]]
    assert np.abs(ours - vllm_logprobs).max() <= 1e-4
