"""Shared fixtures: the tiny random-weight model the tests build, and the real default model."""

from __future__ import annotations

import numpy as np
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
def backend():
    """SmolLM2's tokenizers.Tokenizer, read from the cached GGUF (no model weights)."""
    from nbchat.models import resolve
    from nbchat.tokenizer import load_tokenizer

    return load_tokenizer(resolve(progress=False).path).backend_tokenizer


@pytest.fixture(scope="session")
def compiler(backend):
    """A grammar compiler for SmolLM2's tokenizer, stop id 2 (<|im_end|>)."""
    from nbchat.engine.constraints import GrammarCompiler

    return GrammarCompiler.for_tokenizer(backend, vocab_size=backend.get_vocab_size(), stop_ids=[2])


@pytest.fixture(scope="session")
def structural_ids(backend) -> np.ndarray:
    """Token ids whose text closes or separates JSON (quote, brace, bracket, comma) plus EOS; the
    random sampler favours them half the time so that strings, numbers and arrays end."""
    texts = backend.decode_batch([[i] for i in range(backend.get_vocab_size())])
    ids = [i for i, t in enumerate(texts) if any(c in t for c in '"}],')]
    return np.array(sorted(set(ids) | {2}))


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir):
    """A real `nbchat serve` of the tiny model on a free loopback port, with an API key (tests/serving.py)."""
    from tests.serving import running_server

    with running_server(str(tiny_model_dir), api_key="sk-nbchat-test-0123456789") as server:
        yield server
