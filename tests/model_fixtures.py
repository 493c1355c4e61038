"""Fixtures: tiny HF model folders (tied and untied) shared by the model, rollout and GRPO tests."""
from __future__ import annotations

import pytest

from tests.tiny_models import make_hf_model, save_hf_model


@pytest.fixture(scope="session", params=[False, True], ids=["untied", "tied"])
def hf_folder(request, tmp_path_factory):
    """(folder, torch model) for an untied and a tied tiny Qwen3."""
    model = make_hf_model(tie=request.param)
    folder = save_hf_model(model, tmp_path_factory.mktemp(f"hf_{request.param}"))
    return folder, model


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory):
    """One untied tiny Qwen3 folder (path only)."""
    return save_hf_model(make_hf_model(tie=False, seed=1), tmp_path_factory.mktemp("hf_tiny"))
