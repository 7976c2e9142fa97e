"""ModelConfig: the static shape and numerics of a Llama-family decoder.

A frozen, hashable dataclass so it can be a static argument of jitted functions. Built from GGUF
metadata or from a Hugging Face ``config.json``; strict: a field the engine does not implement raises
``UnsupportedModelError`` naming it instead of running a different model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nbchat.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# Storage dtypes of float weights (every product computes in float32).
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1-style frequency-dependent RoPE scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int  # rows of the embedding / output head (may exceed the tokenizer's vocabulary)
    hidden_size: int  # D
    intermediate_size: int  # F, the SwiGLU width
    num_layers: int  # L
    num_heads: int  # Hq
    num_kv_heads: int  # Hkv (grouped-query attention when < Hq)
    head_dim: int  # hd
    rms_norm_eps: float
    rope_theta: float
    context_length: int  # the longest sequence the model was trained for
    rope_scaling: Llama3RopeScaling | None = None
    attention_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    tie_word_embeddings: bool = False  # output head shares the embedding matrix


# Hugging Face `architectures` entries -> our architecture names.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# llama.cpp's `general.architecture` values. llama.cpp converts Mistral checkpoints as "llama".
GGUF_ARCHITECTURES = ("llama", "qwen2")

# What transformers assumes when config.json omits a field (the same for the three classes).
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_RMS_NORM_EPS = 1e-6
# MistralConfig's default: a Mistral config.json without `sliding_window` gets a 4096-token window.
_MISTRAL_DEFAULT_SLIDING_WINDOW = 4096


def _positive_int(source: Mapping[str, Any], key: str, where: str, default: Any = None) -> int:
    value = source.get(key, default)
    if value is None:
        raise UnsupportedModelError(f"{where} lacks the required field {key!r}.")
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value <= 0:
        raise UnsupportedModelError(f"{where} field {key!r} must be a positive integer, got {value!r}.")
    return int(value)


def _head_dim(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int | None, where: str) -> int:
    """Check that grouped-query attention divides evenly; return the head dimension."""
    if num_heads % num_kv_heads:
        raise UnsupportedModelError(
            f"{where}: {num_heads} attention heads are not a multiple of {num_kv_heads} key/value heads."
        )
    if head_dim is None:
        if hidden_size % num_heads:
            raise UnsupportedModelError(
                f"{where}: hidden size {hidden_size} is not divisible by {num_heads} heads and no head "
                "dimension is given."
            )
        head_dim = hidden_size // num_heads
    if head_dim % 2:
        raise UnsupportedModelError(
            f"{where}: head dimension {head_dim} is odd; rotary embeddings need it even."
        )
    return head_dim


# ---------------------------------------------------------------------------------------------------------
# Hugging Face config.json


def _hf_architecture(config_json: Mapping[str, Any]) -> str:
    supported = ", ".join(HF_ARCHITECTURES)
    architectures = config_json.get("architectures")
    if architectures:
        if isinstance(architectures, str):
            architectures = [architectures]
        for name in architectures:
            if name in HF_ARCHITECTURES:
                return HF_ARCHITECTURES[name]
        raise UnsupportedModelError(
            f"config.json field 'architectures' is {list(architectures)!r}; nbchat supports {supported}."
        )
    model_type = config_json.get("model_type")
    if model_type in SUPPORTED_ARCHITECTURES:
        return model_type
    raise UnsupportedModelError(
        f"config.json names no supported architecture ('architectures' missing, 'model_type' is "
        f"{model_type!r}); nbchat supports {supported}."
    )


def _hf_rope(config_json: Mapping[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """(rope_theta, rope_scaling), with transformers' precedence: `rope_scaling`, then
    `rope_parameters`, then the top-level `rope_theta`, then the default."""
    field_name = "rope_scaling" if config_json.get("rope_scaling") else "rope_parameters"
    rope = config_json.get(field_name) or {}
    if not isinstance(rope, Mapping):
        raise UnsupportedModelError(f"config.json field {field_name!r} must be an object, got {rope!r}.")
    if any(isinstance(value, Mapping) for value in rope.values()):
        raise UnsupportedModelError(
            f"config.json field {field_name!r} holds per-layer-type RoPE settings ({sorted(rope)}); "
            "nbchat supports one RoPE setting for all layers."
        )
    rope_theta = rope.get("rope_theta", config_json.get("rope_theta", _DEFAULT_ROPE_THETA))
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, int | float) or rope_theta <= 0:
        raise UnsupportedModelError(
            f"config.json field 'rope_theta' must be a positive number, got {rope_theta!r}."
        )
    partial_rotary_factor = rope.get("partial_rotary_factor", config_json.get("partial_rotary_factor"))
    if partial_rotary_factor not in (None, 1, 1.0):
        raise UnsupportedModelError(
            f"config.json field 'partial_rotary_factor' is {partial_rotary_factor}; nbchat rotates "
            "whole heads (1.0) only."
        )

    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type == "default":
        return float(rope_theta), None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"config.json field '{field_name}.rope_type' is {rope_type!r}; nbchat supports RoPE scaling "
            "'llama3' only (or none)."
        )
    where = f"config.json field {field_name!r} (rope_type 'llama3')"
    missing = [
        name
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if rope.get(name) is None
    ]
    if missing:
        raise UnsupportedModelError(f"{where} lacks {', '.join(map(repr, missing))}.")
    scaling = Llama3RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=_positive_int(rope, "original_max_position_embeddings", where),
    )
    if scaling.factor <= 0 or scaling.high_freq_factor <= scaling.low_freq_factor:
        raise UnsupportedModelError(
            f"{where} needs factor > 0 and high_freq_factor > low_freq_factor: {scaling}."
        )
    return float(rope_theta), scaling


def _hf_check_sliding_window(config_json: Mapping[str, Any], architecture: str, context_length: int) -> None:
    """Refuse a sliding attention window that limits attention within the context (as transformers
    would apply it: Mistral always, Qwen2 only with `use_sliding_window` on layers past
    `max_window_layers` or marked in `layer_types`; Llama has none)."""
    if architecture == "mistral":
        window = config_json.get("sliding_window", _MISTRAL_DEFAULT_SLIDING_WINDOW)
        windowed = window is not None
    elif architecture == "qwen2":
        window = config_json.get("sliding_window")
        if not config_json.get("use_sliding_window", False) or window is None:
            return
        max_window_layers = config_json.get("max_window_layers", 28)
        layer_types = config_json.get("layer_types") or [
            "sliding_attention" if i >= max_window_layers else "full_attention"
            for i in range(config_json.get("num_hidden_layers", 0))
        ]
        windowed = "sliding_attention" in layer_types
    else:
        return
    if windowed and window < context_length:
        raise UnsupportedModelError(
            f"config.json field 'sliding_window' is {window}, smaller than the context length "
            f"{context_length} ('max_position_embeddings'): sliding-window attention is not supported."
        )


def config_from_hf(config_json: Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face ``config.json`` (Llama, Mistral or Qwen2 causal LM).

    Strict: a setting that would make the engine compute a different model than transformers does
    (RoPE scaling other than llama3, a sliding window shorter than the context, biases the decoder
    lacks, another activation, a quantized checkpoint) raises ``UnsupportedModelError`` naming the field.
    """
    where = "config.json"
    architecture = _hf_architecture(config_json)

    quantization = config_json.get("quantization_config")
    if quantization:
        method = (
            quantization.get("quant_method", "unknown") if isinstance(quantization, Mapping) else "unknown"
        )
        raise UnsupportedModelError(
            f"config.json field 'quantization_config' marks a {method!r}-quantized checkpoint; nbchat loads "
            "unquantized safetensors or GGUF files."
        )
    hidden_act = config_json.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise UnsupportedModelError(
            f"config.json field 'hidden_act' is {hidden_act!r}; nbchat supports 'silu' only."
        )
    if config_json.get("mlp_bias"):
        raise UnsupportedModelError("config.json field 'mlp_bias' is true; nbchat's MLP has no biases.")
    if architecture == "qwen2":
        attention_bias = True  # Qwen2 always has q/k/v biases, and no o_proj bias.
    else:
        attention_bias = bool(config_json.get("attention_bias", False))
        if attention_bias:
            raise UnsupportedModelError(
                f"config.json field 'attention_bias' is true: for {architecture} that adds an o_proj bias, "
                "which nbchat's decoder does not have."
            )

    hidden_size = _positive_int(config_json, "hidden_size", where)
    num_heads = _positive_int(config_json, "num_attention_heads", where)
    num_kv_heads = _positive_int(config_json, "num_key_value_heads", where, default=num_heads)
    head_dim = None
    if config_json.get("head_dim") is not None:
        head_dim = _positive_int(config_json, "head_dim", where)
    context_length = _positive_int(config_json, "max_position_embeddings", where)
    _hf_check_sliding_window(config_json, architecture, context_length)
    rope_theta, rope_scaling = _hf_rope(config_json)

    return ModelConfig(
        architecture=architecture,
        vocab_size=_positive_int(config_json, "vocab_size", where),
        hidden_size=hidden_size,
        intermediate_size=_positive_int(config_json, "intermediate_size", where),
        num_layers=_positive_int(config_json, "num_hidden_layers", where),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=_head_dim(hidden_size, num_heads, num_kv_heads, head_dim, where),
        rms_norm_eps=float(config_json.get("rms_norm_eps", _DEFAULT_RMS_NORM_EPS)),
        rope_theta=rope_theta,
        context_length=context_length,
        rope_scaling=rope_scaling,
        attention_bias=attention_bias,
        tie_word_embeddings=bool(config_json.get("tie_word_embeddings", False)),
    )


# ---------------------------------------------------------------------------------------------------------
# GGUF metadata


def llama3_rope_factors(scaling: Llama3RopeScaling, head_dim: int, rope_theta: float) -> list[float]:
    """Per-frequency divisors of Llama 3 RoPE scaling, as llama.cpp stores them in ``rope_freqs.weight``:
    rotary frequency i is ``rope_theta ** (-2i / head_dim) / factors[i]`` (transformers' llama3 rope)."""
    original = scaling.original_max_position_embeddings
    low_freq_wavelen = original / scaling.low_freq_factor
    high_freq_wavelen = original / scaling.high_freq_factor
    factors = []
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi * rope_theta ** (2 * i / head_dim)
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = (original / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            factors.append(1.0 / ((1 - smooth) / scaling.factor + smooth))
    return factors


def llama3_scaling_from_rope_freqs(
    rope_freqs: Sequence[float], head_dim: int, rope_theta: float
) -> Llama3RopeScaling:
    """Recover Llama 3 RoPE scaling from the ``rope_freqs.weight`` tensor llama.cpp writes instead of
    metadata keys. The factors depend on original_max_position_embeddings only through its ratios to
    low_freq_factor and high_freq_factor, so the fit fixes low_freq_factor = 1 (Llama 3.x's value);
    the result must reproduce every stored factor or the model is refused.
    """
    not_llama3 = UnsupportedModelError(
        "GGUF tensor 'rope_freqs.weight' does not follow llama3 RoPE scaling, the only scaling nbchat "
        "supports."
    )
    factors = [float(value) for value in rope_freqs]
    if len(factors) != head_dim // 2:
        raise UnsupportedModelError(
            f"GGUF tensor 'rope_freqs.weight' has {len(factors)} entries; expected head_dim / 2 = "
            f"{head_dim // 2}."
        )
    factor = max(factors)
    # In the transition band 1/f = 1/factor + s (1 - 1/factor), where s = (orig/wavelen - low)/(high - low)
    # is linear in 1/wavelen: fit that line through the band.
    inverse_wavelens, smooths = [], []
    for i, value in enumerate(factors):
        if 1.0 + 1e-6 < value < factor * (1 - 1e-6):
            inverse_wavelens.append(1.0 / (2 * math.pi * rope_theta ** (2 * i / head_dim)))
            smooths.append((1.0 / value - 1.0 / factor) / (1.0 - 1.0 / factor))
    if len(inverse_wavelens) < 2:
        raise not_llama3
    n = len(inverse_wavelens)
    mean_x, mean_y = sum(inverse_wavelens) / n, sum(smooths) / n
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(inverse_wavelens, smooths, strict=True))
    slope = covariance / sum((x - mean_x) ** 2 for x in inverse_wavelens)  # orig / (high - low)
    intercept = mean_y - slope * mean_x  # -low / (high - low)
    if slope <= 0 or intercept >= 0:
        raise not_llama3
    original = round(-slope / intercept)
    scaling = Llama3RopeScaling(
        factor=factor,
        low_freq_factor=1.0,
        # Rounded so that factors stored as float32 give back the round values they were made from.
        high_freq_factor=round(1.0 + original / slope, 4),
        original_max_position_embeddings=original,
    )
    expected = llama3_rope_factors(scaling, head_dim, rope_theta)
    if any(abs(stored - fitted) > 1e-3 * fitted for stored, fitted in zip(factors, expected, strict=True)):
        raise not_llama3
    return scaling


def config_from_gguf(
    metadata: Mapping[str, Any],
    *,
    tie_word_embeddings: bool,
    vocab_size: int | None = None,
    rope_freqs: Sequence[float] | None = None,
) -> ModelConfig:
    """Build a ModelConfig from GGUF metadata (llama.cpp keys: ``{arch}.block_count`` ...).

    What the metadata does not say comes from the tensors, which the loader passes:
    ``tie_word_embeddings`` (true when there is no ``output.weight``), ``vocab_size`` (rows of
    ``token_embd.weight``, used when ``{arch}.vocab_size`` is absent) and ``rope_freqs`` (the
    ``rope_freqs.weight`` tensor, llama.cpp's form of Llama 3 RoPE scaling).
    """
    architecture = metadata.get("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF field 'general.architecture' is {architecture!r}; nbchat supports "
            f"{', '.join(map(repr, GGUF_ARCHITECTURES))} (Mistral GGUFs are 'llama')."
        )
    where = "GGUF metadata"
    prefix = architecture + "."

    def positive_int(name: str, default: Any = None) -> int:
        return _positive_int(metadata, prefix + name, where, default)

    hidden_size = positive_int("embedding_length")
    num_heads = positive_int("attention.head_count")
    if isinstance(metadata.get(prefix + "attention.head_count_kv"), list | tuple):
        raise UnsupportedModelError(
            f"GGUF field '{prefix}attention.head_count_kv' varies per layer; not supported."
        )
    num_kv_heads = positive_int("attention.head_count_kv", default=num_heads)
    head_dim = metadata.get(prefix + "attention.key_length")
    value_dim = metadata.get(prefix + "attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(
            f"GGUF fields '{prefix}attention.key_length' ({head_dim}) and '{prefix}attention.value_length' "
            f"({value_dim}) differ; nbchat needs equal key and value head dimensions."
        )
    if head_dim is not None:
        head_dim = positive_int("attention.key_length")
    head_dim = _head_dim(hidden_size, num_heads, num_kv_heads, head_dim, where)
    rope_dim = metadata.get(prefix + "rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UnsupportedModelError(
            f"GGUF field '{prefix}rope.dimension_count' is {rope_dim}, not the head dimension {head_dim}: "
            "partial rotary embeddings are not supported."
        )
    scaling_type = metadata.get(prefix + "rope.scaling.type", "none")
    if scaling_type != "none":
        raise UnsupportedModelError(
            f"GGUF field '{prefix}rope.scaling.type' is {scaling_type!r}; nbchat supports no RoPE scaling or "
            "llama3 scaling (stored as the rope_freqs.weight tensor)."
        )
    linear_scale = metadata.get(prefix + "rope.scale_linear", 1.0)
    if linear_scale != 1.0:
        raise UnsupportedModelError(
            f"GGUF field '{prefix}rope.scale_linear' is {linear_scale}; linear RoPE scaling is not supported."
        )
    context_length = positive_int("context_length")
    sliding_window = metadata.get(prefix + "attention.sliding_window")
    if sliding_window and sliding_window < context_length:
        raise UnsupportedModelError(
            f"GGUF field '{prefix}attention.sliding_window' is {sliding_window}, smaller than the context "
            f"length {context_length}: sliding-window attention is not supported."
        )
    rope_theta = float(metadata.get(prefix + "rope.freq_base", _DEFAULT_ROPE_THETA))
    rope_scaling = None
    if rope_freqs is not None:
        rope_scaling = llama3_scaling_from_rope_freqs(rope_freqs, head_dim, rope_theta)

    # Rows of the embedding, when the metadata does not say; else the tokenizer's vocabulary.
    if vocab_size is None and "tokenizer.ggml.tokens" in metadata:
        vocab_size = len(metadata["tokenizer.ggml.tokens"])
    vocab_size = positive_int("vocab_size", default=vocab_size)
    rms_norm_eps = metadata.get(prefix + "attention.layer_norm_rms_epsilon")
    if rms_norm_eps is None:
        raise UnsupportedModelError(
            f"{where} lacks the required field '{prefix}attention.layer_norm_rms_epsilon'."
        )
    return ModelConfig(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=positive_int("feed_forward_length"),
        num_layers=positive_int("block_count"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(rms_norm_eps),
        rope_theta=rope_theta,
        context_length=context_length,
        rope_scaling=rope_scaling,
        attention_bias=architecture == "qwen2",
        tie_word_embeddings=tie_word_embeddings,
    )
