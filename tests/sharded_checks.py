"""Run in a fresh process with several forced host devices by tests/test_sharding.py: generates with
sharded and unsharded engines and prints what it saw as one JSON object (the test asserts on it).

The device count is fixed when JAX starts, so these checks cannot run inside the pytest process.
Usage: ``XLA_FLAGS=--xla_force_host_platform_device_count=N python -m tests.sharded_checks DIR CASES``
with DIR a tiny Hugging Face model directory (tests/tiny_model.py), or ``-`` to skip the Engine
checks, and CASES the generator cases, e.g. ``wide-packed-grown,odd-float`` (see ``generator_checks``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading

import jax
import numpy as np
from flax import nnx

from nbchat.engine import model, sharding
from nbchat.engine.generate import Generator, SamplingParams
from tests.tiny_model import TINY_ENGINE_CONFIG

GREEDY = SamplingParams(temperature=0.0)
# Heads, kv heads and MLP width divisible by 2 and 4, with every packed matrix's word rows and
# 32-blocks too.
WIDE = dataclasses.replace(TINY_ENGINE_CONFIG, num_heads=8, num_kv_heads=4, head_dim=16)
# 3 kv heads (attention replicated on 2 and 4 devices), an MLP of 96: gate/up split, and down's 3
# blocks of 32 split by neither (packed down replicated, float down split).
ODD = dataclasses.replace(TINY_ENGINE_CONFIG, num_heads=6, num_kv_heads=3, head_dim=16, intermediate_size=96)
CONFIGS = {"wide": WIDE, "odd": ODD}
LEAVES = ("embed", "layers.0.attn.q", "layers.0.attn.o", "layers.0.mlp.gate", "layers.0.mlp.down")


def formats(config, packed: bool) -> dict[str, str]:
    if not packed:
        return {}
    names = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
    layers = {f"layers.{i}.{name}": "Q4_1" for i in range(config.num_layers) for name in names}
    return {"embed": "Q8_0"} | layers


def decoder(config, packed: bool) -> model.Decoder:
    """The same random weights on every call."""
    return model.Decoder(config, formats=formats(config, packed), rngs=nnx.Rngs(3))


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, TINY_ENGINE_CONFIG.vocab_size, n).tolist()


def greedy(generator: Generator, prompt_ids: list[int], new: int) -> tuple[list[int], list[float]]:
    events = list(generator.generate(prompt_ids, GREEDY, max_new_tokens=new))
    return [e.token_id for e in events], [e.logprob for e in events]


def specs(generator: Generator) -> dict[str, list]:
    """A few leaves' placements: "embed.weight" -> the spec, one entry per axis (None or the name)."""
    seen = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(generator._params)[0]:
        name = ".".join(sharding._names(path))
        if name.rsplit(".", 1)[0] in LEAVES:
            spec = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
            seen[name] = list(spec)
    return seen


def cache_spec(generator: Generator) -> list:
    buffer = generator._cache.k[0]
    return list(tuple(buffer.sharding.spec) + (None,) * (buffer.ndim - len(buffer.sharding.spec)))


def generator_checks(mesh, cases: list[str]) -> dict:
    """Per case ("wide-packed", "odd-float", ...; "-grown": past the first cache capacity and
    batched), greedy tokens of a sharded and an unsharded Generator over the same weights."""
    results = {}
    for case in cases:
        if case == "smollm2":
            results[case] = smollm2_check(mesh)
            continue
        name, kind, *extra = case.split("-")
        config, packed, grown = CONFIGS[name], kind == "packed", extra == ["grown"]
        plain = Generator(config, decoder(config, packed))
        sharded = Generator(config, decoder(config, packed), mesh)
        new = 240 if grown else 12  # 30 + 240 tokens outgrow the first capacity (256)
        expected, expected_logprobs = greedy(plain, prompt(30, 1), new)
        tokens, logprobs = greedy(sharded, prompt(30, 1), new)
        results[case] = {
            "tokens_equal": tokens == expected,
            "logprob_gap": float(np.max(np.abs(np.array(logprobs) - np.array(expected_logprobs)))),
            "specs": specs(sharded),
            "cache_spec": cache_spec(sharded),
            "capacity": sharded._cache.capacity,
        }
        if grown:
            results[case]["batched"] = batched_check(plain, sharded)
    return results


def smollm2_check(mesh) -> dict:
    """The default model (its GGUF's packed codes), 16 greedy tokens of a chat-like prompt."""
    from nbchat.models import DEFAULT_MODEL, load
    from nbchat.templates import render_messages, tokenize_prompt

    loaded = load(DEFAULT_MODEL, progress=False)
    text = render_messages(loaded.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    prompt_ids = tokenize_prompt(loaded.tokenizer, text)
    expected, expected_logprobs = greedy(Generator(loaded.config, loaded.decoder), prompt_ids, 16)
    sharded = Generator(loaded.config, loaded.decoder, mesh)  # places the decoder's own arrays
    tokens, logprobs = greedy(sharded, prompt_ids, 16)
    return {
        "tokens_equal": tokens == expected,
        "logprob_gap": float(np.max(np.abs(np.array(logprobs) - np.array(expected_logprobs)))),
        "specs": specs(sharded),
        "cache_spec": cache_spec(sharded),
    }


def batched_check(plain: Generator, sharded: Generator) -> dict:
    """Two threads generating at once on the sharded generator: each gets its tokens alone."""
    prompts = [prompt(10 + 7 * i, 10 + i) for i in range(2)]
    alone = [greedy(plain, p, 16)[0] for p in prompts]
    together: list = [None] * 2

    def run(index: int) -> None:
        together[index] = greedy(sharded, prompts[index], 16)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return {"equal": together == alone, "batch_size": sharded.batch_size, "cache_spec": cache_spec(sharded)}


def error_of(call) -> dict | None:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - reported to the test, which checks the type
        return {"type": type(error).__name__, "param": getattr(error, "param", None), "message": str(error)}
    return None


def engine_checks(model_dir: str) -> dict:
    from nbchat import Engine

    messages = [{"role": "user", "content": "Hello! How are you today?"}]
    request = dict(messages=messages, temperature=0, max_tokens=16, logprobs=True)
    plain = Engine(model_dir, mesh="none").load()
    sharded = Engine(model_dir).load()  # automatic: every device on the model axis

    def reply(engine) -> tuple[list[str], list[float]]:
        content = engine.chat.completions.create(**request).choices[0].logprobs.content
        return [t.token for t in content], [t.logprob for t in content]

    def distribution(engine) -> list:
        return [(c.token_id, c.logprob) for c in engine.next_token_distribution(messages, top=5).top]

    expected, expected_logprobs = reply(plain)
    tokens, logprobs = reply(sharded)
    together: list = [None] * 2
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, reply(sharded)[0]))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    expected_top, top = distribution(plain), distribution(sharded)
    os.environ[sharding.ENV_VAR] = "model=1000"
    env_error = error_of(lambda: Engine(model_dir).load())
    os.environ[sharding.ENV_VAR] = "tensor=2"
    env_syntax_error = error_of(lambda: Engine(model_dir).load())
    del os.environ[sharding.ENV_VAR]
    return {
        "tokens_equal": tokens == expected,
        "reply_tokens": len(tokens),
        "logprob_gap": float(np.max(np.abs(np.array(logprobs) - np.array(expected_logprobs)))),
        "threads_equal": together == [expected] * 2,
        "top_ids_equal": [t for t, _ in top] == [t for t, _ in expected_top],
        "top_logprob_gap": float(np.max(np.abs(np.array(top) - np.array(expected_top))[:, 1])),
        "mesh": sharding.describe(sharded.mesh),
        "plain_mesh": sharding.describe(plain.mesh),
        "repr": repr(sharded),
        "device": sharded.model_info.device,
        "arg_error": error_of(lambda: Engine(model_dir, mesh="model=1000")),
        "arg_type_error": error_of(lambda: Engine(model_dir, mesh=2)),
        "env_error": env_error,
        "env_syntax_error": env_syntax_error,
    }


def main() -> None:
    model_dir, cases = sys.argv[1], sys.argv[2].split(",")
    os.environ.pop(sharding.ENV_VAR, None)
    mesh = sharding.choose_mesh()
    results = {"devices": len(jax.devices()), "mesh": sharding.describe(mesh),
               "generator": generator_checks(mesh, cases)}
    if model_dir != "-":
        results["engine"] = engine_checks(model_dir)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
