"""The JAX/Flax engine: model config, weights, the decoder, KV cache, sampling and the generation loop.

Knows nothing of notebooks or of OpenAI's wire format: it turns prompt token ids into a stream of
token events.
"""
