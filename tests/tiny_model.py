"""A tiny random-weight chat model in Hugging Face layout, built by the tests (no network).

A 2-layer Llama with a small byte-level BPE tokenizer trained on a few sentences, ChatML special
tokens and a ChatML chat template: enough to drive every code path (templates, streaming, stop
tokens, prefix reuse, magics) in seconds. Its replies are gibberish by construction.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nbchat.engine.config import ModelConfig

# The engine-level tiny config (no tokenizer): model and generator tests build random params for it.
TINY_ENGINE_CONFIG = ModelConfig(
    architecture="llama",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    context_length=1024,
    tie_word_embeddings=True,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

_CORPUS = [
    "Hello! How are you today? I am a small language model used for testing.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # {braces} and [brackets]",
    "Jupyter notebooks mix code, text and results; a chat cell streams its reply in place.",
    "Bonjour, ça va ? Très bien, merci. 你好，世界。 Emoji: 🙂 🚀 ✨",
    'JSON looks like {"name": "value", "items": [1, 2, 3], "ok": true, "none": null}.',
    "user: assistant: system: ## user ## assistant - * 1. 2. 3. | table | row |",
]


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer


def make_tiny_model_dir(directory: Path, *, seed: int = 0, vocab_size: int = 384) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json into ``directory``."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "chat_template": CHATML_TEMPLATE,
                "model_max_length": TINY_CONFIG["max_position_embeddings"],
            },
            indent=1,
        )
    )
    config = dict(TINY_CONFIG, vocab_size=tokenizer.get_vocab_size())
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    save_file(_random_weights(config, seed), str(directory / "model.safetensors"))
    return directory


def _random_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    q_out, kv_out = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd

    def linear(out_features: int, in_features: int) -> np.ndarray:
        # Scaled so that activations keep unit size and the logits are far from uniform.
        return (rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    weights = {
        "model.embed_tokens.weight": rng.standard_normal((v, d)).astype(np.float32),
        "model.norm.weight": norm(),
        "lm_head.weight": linear(v, d) * 4.0,
    }
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        weights |= {
            prefix + "input_layernorm.weight": norm(),
            prefix + "self_attn.q_proj.weight": linear(q_out, d),
            prefix + "self_attn.k_proj.weight": linear(kv_out, d),
            prefix + "self_attn.v_proj.weight": linear(kv_out, d),
            prefix + "self_attn.o_proj.weight": linear(d, q_out),
            prefix + "post_attention_layernorm.weight": norm(),
            prefix + "mlp.gate_proj.weight": linear(f, d),
            prefix + "mlp.up_proj.weight": linear(f, d),
            prefix + "mlp.down_proj.weight": linear(d, f),
        }
    return weights
