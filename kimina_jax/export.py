"""`python -m kimina_jax.export --checkpoint DIR --out DIR`: write a Hugging Face folder (transformers/vLLM)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from kimina_jax.run_folder import load_model_for_export, step_folder, writable_folder
from kimina_jax.errors import KiminaError
from kimina_jax.models import load_hf_checkpoint, save_hf_checkpoint
from kimina_jax.models.hf import TOKENIZER_FILES


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m kimina_jax.export", description=__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="an HF folder, a training run folder (its newest step) or a step <run>/checkpoints/<step>")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written tensors (default: as stored)")
    parser.add_argument("--tokenizer", default=None, help="folder to copy tokenizer files from (default: found)")
    return parser.parse_args(argv)


def _load(checkpoint: Path):
    """(model, tokenizer folder or None, generation config or None) from either kind of checkpoint."""
    if (checkpoint / "config.json").is_file():
        has_tokenizer = any((checkpoint / name).is_file() for name in TOKENIZER_FILES)
        gen_path = checkpoint / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        return load_hf_checkpoint(checkpoint), checkpoint if has_tokenizer else None, gen
    step = step_folder(checkpoint, "--checkpoint")
    if step is None:
        raise KiminaError(f"--checkpoint {checkpoint}: neither an HF folder (config.json) nor a training run folder "
                          "(checkpoints/) or checkpoint step folder (params/)")
    model, tokenizer_dir = load_model_for_export(step)
    return model, tokenizer_dir, None


def export(checkpoint: str | Path, out: str | Path, dtype: str | None = None, tokenizer: str | None = None) -> Path:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise KiminaError(f"--checkpoint {checkpoint}: no such folder")
    writable_folder(out, "--out")
    model, found_tokenizer, gen = _load(checkpoint)
    total = model.config.num_params * (2 if dtype in ("bfloat16", "float16") else 4)
    with tqdm(total=total, unit="B", unit_scale=True, desc="export") as bar:
        return save_hf_checkpoint(
            model, out, tokenizer_dir=tokenizer or found_tokenizer, dtype=dtype, generation_config=gen,
            progress=bar.update,
        )


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.dtype, args.tokenizer)
    except KiminaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
