"""ModelConfig from Hugging Face config.json and from GGUF metadata: each supported architecture, the
RoPE settings, and each refusal naming the field at fault."""

from __future__ import annotations

import pytest

from nbchat.engine.config import (
    Llama3RopeScaling,
    ModelConfig,
    config_from_gguf,
    config_from_hf,
    llama3_rope_factors,
    llama3_scaling_from_rope_freqs,
)
from nbchat.errors import UnsupportedModelError

# Trimmed copies of real config.json files (the fields transformers reads).
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 100000,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": True,
}
MISTRAL_7B_V03 = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "vocab_size": 32768,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
}


def with_fields(base: dict, **fields) -> dict:
    return {**base, **fields}


# --- config.json ---------------------------------------------------------------------------------------


def test_llama_config():
    assert config_from_hf(SMOLLM2_135M) == ModelConfig(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        context_length=8192,
        rope_scaling=None,
        attention_bias=False,
        tie_word_embeddings=True,
    )


def test_llama3_rope_scaling_and_explicit_head_dim():
    config = config_from_hf(LLAMA_32_1B)

    assert config.rope_scaling == Llama3RopeScaling(
        factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    assert (config.head_dim, config.rope_theta, config.context_length) == (64, 500000.0, 131072)


def test_transformers_5_rope_parameters_carry_theta_and_type():
    rope = dict(LLAMA_32_1B["rope_scaling"], rope_theta=250000.0)
    config = config_from_hf(
        with_fields(LLAMA_32_1B, rope_scaling=None, rope_theta=None, rope_parameters=rope)
    )

    assert config.rope_theta == 250000.0
    assert config.rope_scaling.factor == 32.0
    default = config_from_hf(
        with_fields(SMOLLM2_135M, rope_parameters={"rope_type": "default", "rope_theta": 7.0})
    )
    assert (default.rope_theta, default.rope_scaling) == (7.0, None)


def test_mistral_config_without_sliding_window():
    config = config_from_hf(MISTRAL_7B_V03)

    assert (config.architecture, config.head_dim, config.num_kv_heads) == ("mistral", 128, 8)
    assert not config.attention_bias and not config.tie_word_embeddings


def test_mistral_window_as_long_as_the_context_is_full_attention():
    config = config_from_hf(with_fields(MISTRAL_7B_V03, sliding_window=32768))
    assert config.context_length == 32768


def test_qwen2_config_always_has_qkv_bias():
    config = config_from_hf(QWEN25_05B)

    assert config.architecture == "qwen2"
    assert config.attention_bias
    assert (config.head_dim, config.rms_norm_eps, config.tie_word_embeddings) == (64, 1e-6, True)


def test_qwen2_sliding_window_flag_on_but_no_layer_past_max_window_layers():
    config = config_from_hf(
        with_fields(QWEN25_05B, use_sliding_window=True, sliding_window=4096, max_window_layers=24)
    )
    assert config.num_layers == 24


def test_model_type_stands_in_for_missing_architectures():
    fields = {key: value for key, value in SMOLLM2_135M.items() if key != "architectures"}
    assert config_from_hf(fields).architecture == "llama"


def test_defaults_follow_transformers():
    minimal = {
        key: SMOLLM2_135M[key]
        for key in ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    }
    minimal |= {"num_attention_heads": 8, "max_position_embeddings": 2048}

    config = config_from_hf(minimal)

    assert (config.num_kv_heads, config.head_dim) == (8, 72)
    assert (config.rope_theta, config.rms_norm_eps, config.tie_word_embeddings) == (10000.0, 1e-6, False)


def test_config_is_hashable_for_jit():
    assert hash(config_from_hf(LLAMA_32_1B)) == hash(config_from_hf(LLAMA_32_1B))


@pytest.mark.parametrize(
    ("config_json", "message"),
    [
        (
            with_fields(SMOLLM2_135M, architectures=["GPT2LMHeadModel"]),
            r"'architectures' is \['GPT2LMHeadModel'\]; nbchat supports LlamaForCausalLM, "
            r"MistralForCausalLM, Qwen2ForCausalLM",
        ),
        (
            {k: v for k, v in with_fields(SMOLLM2_135M, model_type="gemma").items() if k != "architectures"},
            r"'model_type' is 'gemma'.*LlamaForCausalLM",
        ),
        (
            with_fields(LLAMA_32_1B, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
            r"'rope_scaling\.rope_type' is 'yarn'",
        ),
        (
            with_fields(SMOLLM2_135M, rope_scaling={"type": "linear", "factor": 2.0}),
            r"'rope_scaling\.rope_type' is 'linear'",
        ),
        (
            with_fields(SMOLLM2_135M, rope_scaling={"type": "dynamic", "factor": 2.0}),
            r"rope_type' is 'dynamic'",
        ),
        (
            with_fields(SMOLLM2_135M, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
            r"'rope_parameters\.rope_type' is 'longrope'",
        ),
        (
            with_fields(LLAMA_32_1B, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
            r"lacks 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'",
        ),
        (
            with_fields(SMOLLM2_135M, rope_parameters={"full_attention": {"rope_type": "default"}}),
            r"'rope_parameters' holds per-layer-type RoPE settings",
        ),
        (with_fields(SMOLLM2_135M, partial_rotary_factor=0.5), r"'partial_rotary_factor' is 0\.5"),
        (
            with_fields(MISTRAL_7B_V03, sliding_window=4096),
            r"'sliding_window' is 4096, smaller than the context length 32768",
        ),
        (
            {k: v for k, v in MISTRAL_7B_V03.items() if k != "sliding_window"},
            r"'sliding_window' is 4096",  # MistralConfig's default when the field is absent
        ),
        (
            with_fields(QWEN25_05B, use_sliding_window=True, sliding_window=4096),
            r"'sliding_window' is 4096, smaller than the context length 32768",
        ),
        (with_fields(SMOLLM2_135M, hidden_act="gelu"), r"'hidden_act' is 'gelu'"),
        (with_fields(SMOLLM2_135M, mlp_bias=True), r"'mlp_bias' is true"),
        (with_fields(SMOLLM2_135M, attention_bias=True), r"'attention_bias' is true.*o_proj bias"),
        (
            with_fields(SMOLLM2_135M, quantization_config={"quant_method": "awq", "bits": 4}),
            r"'quantization_config' marks a 'awq'-quantized checkpoint",
        ),
        (
            {k: v for k, v in SMOLLM2_135M.items() if k != "hidden_size"},
            r"lacks the required field 'hidden_size'",
        ),
        (
            with_fields(SMOLLM2_135M, num_hidden_layers=0),
            r"'num_hidden_layers' must be a positive integer, got 0",
        ),
        (
            with_fields(SMOLLM2_135M, num_key_value_heads=4),
            r"9 attention heads are not a multiple of 4 key/value heads",
        ),
    ],
)
def test_config_json_refusals_name_the_field(config_json, message):
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(config_json)


# --- GGUF metadata ---------------------------------------------------------------------------------------

SMOLLM2_GGUF_METADATA = {
    "general.architecture": "llama",
    "llama.block_count": 30,
    "llama.context_length": 8192,
    "llama.embedding_length": 576,
    "llama.feed_forward_length": 1536,
    "llama.attention.head_count": 9,
    "llama.attention.head_count_kv": 3,
    "llama.rope.freq_base": 100000.0,
    "llama.attention.layer_norm_rms_epsilon": 9.999999747378752e-06,
    "llama.vocab_size": 49152,
    "llama.rope.dimension_count": 64,
}


def gguf_metadata(**fields) -> dict:
    return {**SMOLLM2_GGUF_METADATA, **{key.replace("__", "."): value for key, value in fields.items()}}


def test_gguf_llama_config():
    config = config_from_gguf(SMOLLM2_GGUF_METADATA, tie_word_embeddings=True)

    assert config == ModelConfig(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=9.999999747378752e-06,
        rope_theta=100000.0,
        context_length=8192,
        tie_word_embeddings=True,
    )


def test_gguf_qwen2_has_qkv_bias():
    metadata = {key.replace("llama.", "qwen2."): value for key, value in SMOLLM2_GGUF_METADATA.items()}
    metadata["general.architecture"] = "qwen2"

    config = config_from_gguf(metadata, tie_word_embeddings=False)

    assert (config.architecture, config.attention_bias, config.tie_word_embeddings) == ("qwen2", True, False)


def test_gguf_vocab_size_from_metadata_then_embedding_then_tokens():
    without = {key: value for key, value in SMOLLM2_GGUF_METADATA.items() if key != "llama.vocab_size"}
    assert config_from_gguf(SMOLLM2_GGUF_METADATA, tie_word_embeddings=True, vocab_size=7).vocab_size == 49152
    assert config_from_gguf(without, tie_word_embeddings=True, vocab_size=49280).vocab_size == 49280
    tokens = {**without, "tokenizer.ggml.tokens": ["a", "b", "c"]}
    assert config_from_gguf(tokens, tie_word_embeddings=True).vocab_size == 3
    with pytest.raises(UnsupportedModelError, match="lacks the required field 'llama.vocab_size'"):
        config_from_gguf(without, tie_word_embeddings=True)


def test_gguf_head_dim_from_key_length():
    config = config_from_gguf(
        gguf_metadata(
            llama__attention__key_length=128,
            llama__attention__value_length=128,
            llama__rope__dimension_count=128,
        ),
        tie_word_embeddings=True,
    )
    assert config.head_dim == 128


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (
            gguf_metadata(general__architecture="phi3"),
            r"'general\.architecture' is 'phi3'; nbchat supports 'llama', 'qwen2'",
        ),
        (gguf_metadata(llama__rope__scaling__type="yarn"), r"'llama\.rope\.scaling\.type' is 'yarn'"),
        (gguf_metadata(llama__rope__scaling__type="linear"), r"'llama\.rope\.scaling\.type' is 'linear'"),
        (gguf_metadata(llama__rope__scale_linear=4.0), r"'llama\.rope\.scale_linear' is 4\.0"),
        (
            gguf_metadata(llama__rope__dimension_count=32),
            r"'llama\.rope\.dimension_count' is 32.*partial rotary",
        ),
        (gguf_metadata(llama__attention__sliding_window=4096), r"'llama\.attention\.sliding_window' is 4096"),
        (
            gguf_metadata(llama__attention__head_count_kv=[3] * 30),
            r"'llama\.attention\.head_count_kv' varies per layer",
        ),
        (
            gguf_metadata(llama__attention__key_length=64, llama__attention__value_length=32),
            r"'llama\.attention\.key_length' \(64\) and 'llama\.attention\.value_length' \(32\) differ",
        ),
        (
            {k: v for k, v in SMOLLM2_GGUF_METADATA.items() if k != "llama.block_count"},
            r"lacks the required field 'llama\.block_count'",
        ),
        (
            {k: v for k, v in SMOLLM2_GGUF_METADATA.items() if k != "llama.attention.layer_norm_rms_epsilon"},
            r"'llama\.attention\.layer_norm_rms_epsilon'",
        ),
    ],
)
def test_gguf_refusals_name_the_field(metadata, message):
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_gguf(metadata, tie_word_embeddings=True)


@pytest.mark.parametrize(
    ("scaling", "head_dim"),
    [
        (Llama3RopeScaling(8.0, 1.0, 4.0, 8192), 128),  # Llama 3.1 8B
        (Llama3RopeScaling(32.0, 1.0, 4.0, 8192), 64),  # Llama 3.2 1B
    ],
)
def test_llama3_scaling_recovered_from_rope_freqs(scaling, head_dim):
    import numpy as np

    # As llama.cpp stores them: float32.
    factors = np.array(llama3_rope_factors(scaling, head_dim, 500000.0), dtype=np.float32)
    metadata = gguf_metadata(
        llama__rope__freq_base=500000.0,
        llama__rope__dimension_count=head_dim,
        llama__attention__key_length=head_dim,
        llama__context_length=131072,
    )

    assert llama3_scaling_from_rope_freqs(factors, head_dim, 500000.0) == scaling
    assert (
        config_from_gguf(metadata, tie_word_embeddings=True, rope_freqs=factors.tolist()).rope_scaling
        == scaling
    )


def test_llama3_rope_factors_match_transformers():
    factors = llama3_rope_factors(Llama3RopeScaling(8.0, 1.0, 4.0, 8192), 128, 500000.0)
    # Llama 3.1 8B: transformers' llama3 inv_freq divided into the unscaled one (transformers 5.24) gives
    # 1 for i < 29, 8 for i > 34 and this band between.
    band = [1.207484, 1.553415, 2.026313, 2.69453, 3.684253, 5.257327]
    assert factors[:29] == [1.0] * 29 and factors[35:] == [8.0] * 29
    assert factors[29:35] == pytest.approx(band, rel=1e-6)


def test_rope_freqs_that_are_not_llama3_are_refused():
    with pytest.raises(UnsupportedModelError, match="'rope_freqs.weight' does not follow llama3"):
        llama3_scaling_from_rope_freqs([1.0] * 16 + [2.0] * 16, 64, 10000.0)
    with pytest.raises(
        UnsupportedModelError, match="'rope_freqs.weight' has 3 entries; expected head_dim / 2 = 32"
    ):
        llama3_scaling_from_rope_freqs([1.0, 2.0, 3.0], 64, 10000.0)
