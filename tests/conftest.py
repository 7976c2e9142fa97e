"""Shared fixtures: the tiny random-weight model the tests build, and the real default model."""

from __future__ import annotations

import pytest

from tests.tiny_model import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random-weight Llama in Hugging Face layout, with a small BPE tokenizer (ChatML)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from nbchat.models import load

    return load(str(tiny_model_dir), progress=False)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct GGUF), fetched into the cache on first use."""
    from nbchat.models import DEFAULT_MODEL, load

    return load(DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir):
    """A real `nbchat serve` of the tiny model on a free loopback port, with an API key (tests/serving.py)."""
    from tests.serving import running_server

    with running_server(str(tiny_model_dir), api_key="sk-nbchat-test-0123456789") as server:
        yield server
