"""Tokenizer loading: a transformers fast tokenizer (with the model's chat template) from a GGUF file's
metadata or from a Hugging Face directory, and the token ids that end a reply.

transformers' own GGUF tokenizer path reads the file through torch, which nbchat does not depend on,
so for a GGUF we read the metadata with the `gguf` package and hand it to transformers' converter
(the same one `from_pretrained(gguf_file=...)` uses). The converted tokenizer is saved next to the
GGUF so later loads skip the ~3 s metadata parse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Tokens that end an assistant turn in the common chat formats (ChatML, Llama 3, Phi-3, Gemma, ...);
# a model's reply stops at whichever of these its vocabulary has, besides its EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

_GGUF_TOKENIZER_CACHE_VERSION = "1"


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """The tokenizer of a model: ``path`` is a ``.gguf`` file or a Hugging Face layout directory."""
    path = Path(path)
    if path.suffix == ".gguf":
        return _load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def stop_token_ids(tokenizer: PreTrainedTokenizerFast, model_dir: Path | None = None) -> frozenset[int]:
    """EOS, the end-of-turn tokens the vocabulary has, and the generation config's eos ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    generation_config = model_dir / "generation_config.json" if model_dir else None
    if generation_config and generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return frozenset(ids)


def _load_gguf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    stat = gguf_path.stat()
    cache_dir = gguf_path.with_name(gguf_path.name + ".tokenizer")
    stamp = f"{_GGUF_TOKENIZER_CACHE_VERSION}:{stat.st_size}:{stat.st_mtime_ns}"
    stamp_file = cache_dir / "source-stamp"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return PreTrainedTokenizerFast.from_pretrained(str(cache_dir))

    tokenizer = _convert_gguf_tokenizer(gguf_path)
    try:
        tokenizer.save_pretrained(str(cache_dir))
        stamp_file.write_text(stamp)
    except OSError:
        pass  # a read-only model directory only costs the faster reload
    return tokenizer


def _convert_gguf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    from nbchat.engine.weights import read_gguf_metadata

    metadata = read_gguf_metadata(gguf_path)
    grouped = {
        group: {
            name: metadata[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in metadata
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    backend, _ = convert_gguf_tokenizer(metadata["general.architecture"], grouped["tokenizer"])
    tokens = grouped["tokenizer"]["tokens"]

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=grouped["tokenizer_config"].get("chat_template"),
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
    )
