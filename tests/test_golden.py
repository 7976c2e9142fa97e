"""Golden tokens: our greedy decoding of the real SmolLM2-135M-Instruct GGUF equals transformers +
torch float32 on the same file (tests/golden/smollm2_greedy.json, made by tests/golden/make_golden.py)
for all 64 tokens of each prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GOLDEN = json.loads((Path(__file__).parent / "golden" / "smollm2_greedy.json").read_text())

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_file() -> Path:
    from nbchat.errors import ModelNotFoundError
    from nbchat.models import DEFAULT_MODEL, resolve

    try:
        source = resolve(DEFAULT_MODEL, progress=False)
    except ModelNotFoundError as missing:
        pytest.skip(f"the default model file is not available: {missing}")
    assert source.path.name == GOLDEN["model_file"]
    return source.path


@pytest.fixture(scope="module")
def generator(model_file):
    from nbchat.engine.generate import Generator
    from nbchat.engine.weights import load_gguf

    config, params = load_gguf(model_file, "float32", progress=False)
    return Generator(config, params)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda case: case["messages"][-1]["content"][:30])
def test_greedy_tokens_equal_the_transformers_reference(generator, case):
    from nbchat.engine.generate import SamplingParams

    events = generator.generate(
        case["prompt_ids"], SamplingParams(temperature=0.0), max_new_tokens=GOLDEN["new_tokens"]
    )
    generated = [event.token_id for event in events]
    assert len(generated) == GOLDEN["new_tokens"] == 64
    first_difference = next(
        (i for i, (a, b) in enumerate(zip(generated, case["generated_ids"], strict=True)) if a != b), None
    )
    assert generated == case["generated_ids"], (
        f"first difference at step {first_difference} (reference top-1/top-2 logit gap there: "
        f"{case['top1_top2_logit_gap'][first_difference]})"
    )


def test_the_golden_prompts_tokenize_to_the_reference_ids(model_file):
    from nbchat.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_file)
    for case in GOLDEN["cases"]:
        assert tokenizer(case["prompt_text"], add_special_tokens=False)["input_ids"] == case["prompt_ids"]
