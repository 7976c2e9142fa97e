"""Regenerate tests/golden/smollm2_greedy.json: the reference greedy tokens of SmolLM2-135M-Instruct.

The reference is transformers + torch (float32, CPU) loading the same GGUF file nbchat loads. For each
fixed chat prompt the script renders the model's chat template, then takes 64 greedy steps with a
plain argmax over the raw logits (no logits processors, no end-of-sequence stop), and writes the
prompt ids, the generated ids and the logit gap between the best and second-best token at each step
(a small gap marks a step where float rounding could flip the choice).

With ``--check-weights`` it also compares ``nbchat.engine.weights.load_gguf`` with transformers'
state dict for the file, tensor by tensor, and prints the largest absolute difference: this proves
that the dequantization and the undoing of llama.cpp's Q/K row permutation match transformers.

Needs torch and accelerate (``pip install -e .[reference]``); the tests never import this script.

    python tests/golden/make_golden.py [--gguf PATH] [--check-weights] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

DEFAULT_GGUF = (
    Path(os.environ.get("NBCHAT_HOME", Path.home() / ".cache" / "nbchat"))
    / "models"
    / "smollm2-135m-instruct"
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
OUTPUT = Path(__file__).with_name("smollm2_greedy.json")
NEW_TOKENS = 64

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "Write a short birthday message for my friend Sam, with emojis 🎉🎂🥳."}],
    [
        {"role": "system", "content": "Tu es un assistant serviable qui répond en français."},
        {"role": "user", "content": "Quelle est la différence entre une pomme et une poire ?"},
    ],
]


def greedy(model, prompt_ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Plain argmax decoding with the KV cache: the generated ids and each step's top-1 minus top-2 logit."""
    import torch

    generated, margins = [], []
    cache = None
    inputs = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(steps):
            output = model(input_ids=inputs, cache=cache, use_cache=True)
            cache = output.cache
            logits = output.logits[0, -1].float()
            top2 = torch.topk(logits, 2)
            token = int(top2.indices[0])
            generated.append(token)
            margins.append(round(float(top2.values[0] - top2.values[1]), 5))
            inputs = torch.tensor([[token]])
    return generated, margins


def check_weights(model, gguf_path: Path) -> float:
    """Max |nbchat - transformers| over all parameters (float32, dequantized at load); prints one
    line per parameter kind (the worst layer)."""
    import re

    import numpy as np
    from flax import nnx

    from nbchat.engine.weights import TENSOR_NAMES, _file_name, load_gguf

    _, decoder = load_gguf(gguf_path, "float32", progress=False, pack=False)
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    worst_by_kind: dict[str, float] = {}
    for path, variable in nnx.to_flat_state(nnx.state(decoder)):
        param = ".".join(map(str, path))
        reference = state[_file_name(param, 1)]
        kind = re.sub(r"^layers\.\d+\.", "layers.{i}.", param)
        diff = float(np.abs(np.asarray(variable[...]) - reference).max())
        worst_by_kind[kind] = max(worst_by_kind.get(kind, 0.0), diff)
    for kind, diff in worst_by_kind.items():
        print(f"  {kind:30s} {TENSOR_NAMES[kind][1]:50s} max abs diff {diff:.3g}")
    return max(worst_by_kind.values())


def permutation_sensitivity(model, gguf_path: Path) -> float:
    """Max |GGUF rows as stored - transformers| for attn_q of layer 0: how wrong skipping the
    un-permutation would be (so a near-zero diff above is meaningful)."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(gguf_path)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    stored = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))
    reference = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    return float(np.abs(stored - reference).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="the SmolLM2-135M-Instruct GGUF file")
    parser.add_argument("--check-weights", action="store_true", help="compare load_gguf with transformers")
    parser.add_argument("--no-write", action="store_true", help="print, do not write the JSON")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    directory, file_name = str(args.gguf.parent), args.gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=torch.float32)
    model.eval()

    if args.check_weights:
        print("load_gguf vs transformers state dict:")
        worst = check_weights(model, args.gguf)
        print(f"max abs diff over all parameters: {worst:.3g}")
        stored_diff = permutation_sensitivity(model, args.gguf)
        print(f"blk.0.attn_q.weight rows as stored (not un-permuted) vs transformers: {stored_diff:.3g}")

    cases = []
    for messages in PROMPTS:
        prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        generated_ids, margins = greedy(model, prompt_ids, NEW_TOKENS)
        cases.append(
            {
                "messages": messages,
                "prompt_text": prompt_text,
                "prompt_ids": prompt_ids,
                "generated_ids": generated_ids,
                "generated_text": tokenizer.decode(generated_ids),
                "top1_top2_logit_gap": margins,
            }
        )
        print(f"{messages[-1]['content']!r} -> {tokenizer.decode(generated_ids)!r}")
        print(f"  smallest top1-top2 logit gap {min(margins):.4f} at step {margins.index(min(margins))}")

    golden = {
        "model_file": file_name,
        "reference": "transformers GGUF loader, float32, CPU; argmax over raw logits, no EOS stop",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "new_tokens": NEW_TOKENS,
        "cases": cases,
    }
    if not args.no_write:
        text = json.dumps(golden, indent=1, ensure_ascii=False)
        # One line per list of numbers keeps the file short and its diffs readable.
        text = re.sub(r"\[\s+([-0-9.e,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m[1]) + "]", text)
        OUTPUT.write_text(text + "\n")
        print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
