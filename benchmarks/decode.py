"""Decode benchmark: the engine on the default model, and transformers + torch on the same prompt.

    python -m benchmarks.decode [--model PATH_OR_NAME] [--dtypes float32,bfloat16] [--new-tokens 128]
                                [--repeats 3] [--no-float-weights] [--no-transformers]
                                [--output benchmarks/results/decode.json]

Measures, at batch 1 with greedy decoding (no stop ids, so every run makes exactly --new-tokens):
load time, compile time of the prefill and decode programs cold and from the persistent cache,
time to first token (TTFT), prefill and decode tokens per second at an 80- and a 1000-token prompt,
peak RSS, and the turn latency of a 10-turn chat with and without prefix reuse; for each dtype as
loaded by default (decode reads the GGUF's packed block codes) and for float32 reading float weights
in decode too (``load_gguf(pack=False)``, the engine before packing). Each configuration
runs in its own subprocess so its peak RSS is its own; compile times are measured in two fresh
subprocesses sharing an empty cache directory (the first compiles, the second loads). Compare
engines within one run only: on a shared 2-core machine the spread between runs is 10-15%.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_LENGTHS = (80, 1000)
CHAT_TURNS = 10
CHAT_REPLY_TOKENS = 32
RESULTS = Path(__file__).parent / "results" / "decode.json"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_prompt(length: int, vocab_size: int, seed: int) -> list[int]:
    """Token ids of ordinary text-like tokens (ids 200..vocab/2), distinct per seed so no run reuses
    another's cache."""
    import numpy as np

    return np.random.default_rng(seed).integers(200, vocab_size // 2, length).tolist()


def time_generation(events) -> tuple[float, float, int]:
    """(seconds to the first event, seconds from the first to the last event, events) of a stream
    whose generate() call has just been made."""
    start = time.perf_counter()
    first = last = None
    count = 0
    for _ in events:
        last = time.perf_counter()
        first = first or last
        count += 1
    return first - start, last - first, count


# -- workers (each runs in its own process) ------------------------------------------------------------


def engine_label(pack: bool) -> str:
    return "nbchat" if pack else "nbchat, float weights"


def nbchat_worker(model_path: str, dtype: str, pack: bool, new_tokens: int, repeats: int) -> dict:
    from nbchat.engine.generate import Generator, SamplingParams
    from nbchat.engine.weights import load_gguf
    from nbchat.tokenizer import load_tokenizer

    started = time.perf_counter()
    config, params = load_gguf(model_path, dtype, progress=False, pack=pack)
    load_seconds = time.perf_counter() - started
    generator = Generator(config, params)
    greedy = SamplingParams(temperature=0.0)
    result: dict = {"engine": engine_label(pack), "dtype": dtype, "load_s": load_seconds, "prompts": {}}

    for length in PROMPT_LENGTHS:
        warm = synthetic_prompt(length, config.vocab_size, seed=0)
        started = time.perf_counter()
        list(generator.generate(warm, greedy, max_new_tokens=new_tokens))  # compiles this shape's programs
        first_run_s = time.perf_counter() - started
        runs = []
        for repeat in range(repeats):
            prompt = synthetic_prompt(length, config.vocab_size, seed=repeat + 1)
            ttft, decode_s, count = time_generation(
                generator.generate(prompt, greedy, max_new_tokens=new_tokens)
            )
            assert count == new_tokens and generator.last_reused_tokens == 0
            runs.append({"ttft_s": ttft, "decode_tok_s": (count - 1) / decode_s})
        ttft = statistics.median(r["ttft_s"] for r in runs)
        result["prompts"][str(length)] = {
            "first_run_s": first_run_s,
            "ttft_ms": ttft * 1e3,
            "prefill_tok_s": length / ttft,
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "runs": runs,
        }

    tokenizer = load_tokenizer(Path(model_path))
    result["chat"] = {
        "with_prefix_reuse": chat_turns(generator, tokenizer, new_tokens=CHAT_REPLY_TOKENS, reuse=True),
        "without_prefix_reuse": chat_turns(generator, tokenizer, new_tokens=CHAT_REPLY_TOKENS, reuse=False),
    }
    result["peak_rss_mb"] = peak_rss_mb()
    return result


CHAT_QUESTIONS = [
    "Hi! Can you tell me what a prime number is?",
    "Give me three examples.",
    "Why is 1 not a prime?",
    "What is the largest prime you know?",
    "How do computers check whether a number is prime?",
    "What is a Mersenne prime?",
    "Who was Euclid?",
    "Summarize our conversation so far.",
    "What should I read next about number theory?",
    "Thanks! One last question: is 91 prime?",
]


def chat_turns(generator, tokenizer, *, new_tokens: int, reuse: bool) -> list[dict]:
    """Turn latencies of a 10-turn chat that resends its history each turn (fixed-length replies so
    turns compare). Run twice: the first pass compiles, the second is measured."""
    from nbchat.engine.generate import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    for _pass in ("compile", "measure"):
        messages = [{"role": "system", "content": "You are a concise, friendly math tutor."}]
        generator.drop_cache()
        turns = []
        for question in CHAT_QUESTIONS[:CHAT_TURNS]:
            messages.append({"role": "user", "content": question})
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            prompt = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
            if not reuse:
                generator.drop_cache()
            started = time.perf_counter()
            reply = [
                event.token_id for event in generator.generate(prompt, greedy, max_new_tokens=new_tokens)
            ]
            turn_s = time.perf_counter() - started
            messages.append(
                {"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)}
            )
            turns.append(
                {
                    "prompt_tokens": len(prompt),
                    "reused_tokens": generator.last_reused_tokens,
                    "turn_ms": turn_s * 1e3,
                }
            )
    return turns


def compile_worker(model_path: str, dtype: str, pack: bool) -> dict:
    """Lower and compile the prefill (the 80-token prompt's bucket) and decode programs."""
    import jax
    import numpy as np

    from nbchat.engine import cache as kv_cache
    from nbchat.engine import jax_setup, model, sampling
    from nbchat.engine.generate import DECODE_RESERVE, plan_prefill, step_program
    from nbchat.engine.weights import load_gguf

    jax_setup.enable_persistent_compilation_cache()
    config, params = load_gguf(model_path, dtype, progress=False, pack=pack)
    params = model.unstack_layers(params)
    capacity = kv_cache.capacity_for(PROMPT_LENGTHS[0] + DECODE_RESERVE, config.context_length)
    cache = kv_cache.empty_cache(config, 1, capacity)
    state = sampling.initial_state([[1]], config.vocab_size, 0)
    settings = sampling.sampling_arrays([sampling.SamplingParams()], config.vocab_size)
    bits = np.full((1, -(-config.vocab_size // 32)), -1, np.int32)
    top = sampling.MAX_TOP_LOGPROBS
    sample = sampling.Sample(np.zeros(1, np.int32), np.zeros(1, np.float32), np.zeros((1, top), np.int32),
                             np.zeros((1, top), np.float32))
    program = step_program(config)
    ((_, padded, _),) = plan_prefill(0, PROMPT_LENGTHS[0], config.context_length)
    timings = {}
    for name, length in (("prefill", padded), ("decode", 1)):
        tokens = np.zeros((1, length), np.int32)
        started = time.perf_counter()
        zeros = np.zeros(1, np.int32)
        program.lower(
            params, cache, tokens, zeros, zeros, np.ones(1, bool), state, settings, bits, sample
        ).compile()
        timings[f"{name}_compile_s"] = time.perf_counter() - started
    del jax
    return timings


def transformers_worker(model_path: str, new_tokens: int, repeats: int, threads: int, mode: str) -> dict:
    """The same greedy decoding in transformers + torch float32, either through ``generate()`` (how
    it is normally used; token times from a streamer) or as a bare loop of forwards with the KV
    cache (``generate`` without its per-step overhead: the strongest baseline)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    path = Path(model_path)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    load_seconds = time.perf_counter() - started
    vocab = model.config.vocab_size
    result: dict = {
        "engine": f"transformers {'generate()' if mode == 'generate' else 'loop'}, {threads} thr",
        "dtype": "float32",
        "load_s": load_seconds,
        "prompts": {},
    }

    def bare_loop(prompt: list[int]):
        with torch.inference_mode():
            output = model(input_ids=torch.tensor([prompt]), use_cache=True)
            token = output.logits[0, -1].argmax()
            yield int(token)
            cache = output.cache
            for _ in range(new_tokens - 1):
                output = model(input_ids=token.view(1, 1), cache=cache, use_cache=True)
                cache = output.cache
                token = output.logits[0, -1].argmax()
                yield int(token)

    class TokenClock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):  # first call: the prompt; then one call per new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def with_generate(prompt: list[int]) -> tuple[float, float, int]:
        clock = TokenClock()
        ids = torch.tensor([prompt])
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=clock,
                pad_token_id=0,
            )
        tokens = clock.times[1:]
        return tokens[0] - started, tokens[-1] - tokens[0], len(tokens)

    def measure(prompt: list[int]) -> tuple[float, float, int]:
        return with_generate(prompt) if mode == "generate" else time_generation(bare_loop(prompt))

    for length in PROMPT_LENGTHS:
        measure(synthetic_prompt(length, vocab, seed=0))
        runs = []
        for repeat in range(repeats):
            ttft, decode_s, count = measure(synthetic_prompt(length, vocab, seed=repeat + 1))
            assert count == new_tokens
            runs.append({"ttft_s": ttft, "decode_tok_s": (count - 1) / decode_s})
        ttft = statistics.median(r["ttft_s"] for r in runs)
        result["prompts"][str(length)] = {
            "ttft_ms": ttft * 1e3,
            "prefill_tok_s": length / ttft,
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "runs": runs,
        }
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# -- the driver ----------------------------------------------------------------------------------------


def run_worker(args: list[str], env: dict | None = None) -> dict:
    """Run one worker in a fresh process; the result records the machine's 1-minute load average
    before and after (other processes on a small machine skew every number)."""
    command = [sys.executable, "-m", "benchmarks.decode", "--worker", *args]
    load_before = os.getloadavg()[0]
    completed = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent
    )
    if completed.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{completed.stderr[-4000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-float-weights",
        action="store_true",
        help="skip the float32 run that reads float weights in decode too (load_gguf(pack=False))",
    )
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, *rest = args.worker
        if kind == "nbchat":
            result = nbchat_worker(rest[0], rest[1], rest[2] == "packed", int(rest[3]), int(rest[4]))
        elif kind == "compile":
            result = compile_worker(rest[0], rest[1], rest[2] == "packed")
        else:
            result = transformers_worker(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), rest[4])
        print(json.dumps(result))
        return

    from nbchat.models import resolve

    source = resolve(args.model)
    if source.kind != "gguf":
        parser.error("the benchmark loads GGUF files; pass a .gguf path or a registry name")
    model_path = str(source.path)
    report: dict = {
        "model": source.name,
        "new_tokens": args.new_tokens,
        "machine": machine_description(),
        "runs": [],
    }
    variants = [(dtype, "packed") for dtype in args.dtypes.split(",")]
    if not args.no_float_weights:
        variants.append(("float32", "float"))
    for dtype, weights in variants:
        print(f"nbchat {dtype}, {weights} weights ...", file=sys.stderr)
        worker_args = [model_path, dtype, weights]
        result = run_worker(["nbchat", *worker_args, str(args.new_tokens), str(args.repeats)])
        with tempfile.TemporaryDirectory() as empty_home:
            env = {**os.environ, "NBCHAT_HOME": empty_home}
            result["compile_cold"] = run_worker(["compile", *worker_args], env)
            result["compile_warm"] = run_worker(["compile", *worker_args], env)
        report["runs"].append(result)
    if not args.no_transformers and transformers_available():
        # generate() with torch's default threads is how transformers is normally run. The bare
        # loop is the strongest baseline; with one thread too, because on a busy machine torch's
        # spinning threads collapse (measured 1.4 tok/s with 2 threads against 13.7 with 1).
        cores = os.cpu_count() or 1
        for mode, threads in dict.fromkeys([("generate", cores), ("loop", cores), ("loop", 1)]):
            print(f"transformers float32, {mode}, {threads} threads ...", file=sys.stderr)
            worker_args = [
                "transformers",
                model_path,
                str(args.new_tokens),
                str(args.repeats),
                str(threads),
                mode,
            ]
            report["runs"].append(run_worker(worker_args))

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"\nwrote {args.output}")


def transformers_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) for name in ("torch", "transformers", "accelerate"))


def machine_description() -> str:
    import platform

    import jax

    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    return f"{model}, {os.cpu_count()} cores, jax {jax.__version__}"


def format_report(report: dict) -> str:
    lines = [
        f"model {report['model']}, batch 1, greedy, {report['new_tokens']} new tokens; {report['machine']}",
        "",
    ]
    header = (
        "engine",
        "dtype",
        "prompt",
        "load s",
        "compile cold s",
        "compile warm s",
        "TTFT ms",
        "prefill tok/s",
        "decode tok/s",
        "peak RSS MB",
        "load avg",
    )
    rows = []
    references = [r for r in report["runs"] if r["engine"].startswith("transformers")]
    for run in report["runs"]:
        for length, numbers in run["prompts"].items():
            cold = run.get("compile_cold", {})
            warm = run.get("compile_warm", {})
            rows.append(
                (
                    run["engine"],
                    run["dtype"],
                    length,
                    f"{run['load_s']:.2f}",
                    f"{compile_seconds(cold):.2f}" if cold else "-",
                    f"{compile_seconds(warm):.2f}" if warm else "-",
                    f"{numbers['ttft_ms']:.0f}",
                    f"{numbers['prefill_tok_s']:.0f}",
                    f"{numbers['decode_tok_s']:.1f}",
                    f"{run['peak_rss_mb']:.0f}",
                    "{:.1f}-{:.1f}".format(*run.get("load_average", (0, 0))),
                )
            )
    lines += table(header, rows)
    if references:
        lines.append("")
        for run in report["runs"]:
            if not run["engine"].startswith("nbchat"):
                continue
            for length, numbers in run["prompts"].items():
                ref = max((r["prompts"][length] for r in references), key=lambda p: p["decode_tok_s"])
                standard = next(
                    (r["prompts"][length] for r in references if "generate()" in r["engine"]), ref
                )

                lines.append(
                    f"{run['engine']} {run['dtype']}, {length}-token prompt, against transformers float32 "
                    "generate(): "
                    f"{ratios(numbers, standard)}; against its fastest run: {ratios(numbers, ref)} "
                    "(above 1: nbchat is faster)"
                )
    for run in report["runs"]:
        if "chat" not in run:
            continue
        lines += [
            "",
            f"10-turn chat, {run['engine']} {run['dtype']}, {CHAT_REPLY_TOKENS}-token replies: "
            "turn latency ms",
        ]
        chat = run["chat"]
        rows = []
        for i, (reused, fresh) in enumerate(
            zip(chat["with_prefix_reuse"], chat["without_prefix_reuse"], strict=True)
        ):
            rows.append(
                (
                    str(i + 1),
                    str(reused["prompt_tokens"]),
                    str(reused["reused_tokens"]),
                    f"{reused['turn_ms']:.0f}",
                    f"{fresh['turn_ms']:.0f}",
                )
            )
        lines += table(("turn", "prompt tokens", "reused", "with reuse", "without reuse"), rows)
    return "\n".join(lines)


def ratios(ours: dict, base: dict) -> str:
    decode = ours["decode_tok_s"] / base["decode_tok_s"]
    return f"decode x{decode:.2f}, TTFT x{base['ttft_ms'] / ours['ttft_ms']:.2f}"


def compile_seconds(timings: dict) -> float:
    return sum(value for key, value in timings.items() if key.endswith("_compile_s"))


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells):
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


if __name__ == "__main__":
    main()
