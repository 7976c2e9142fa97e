"""Concurrent streams benchmark: 1, 4, 8 and 16 greedy streams of 128 tokens at once on the default
model, through one Generator (continuous batching).

    python -m benchmarks.batch [--model NAME_OR_PATH] [--streams 1,4,8,16] [--new-tokens 128]
                               [--output benchmarks/results/batch.json]

Each stream is its own thread consuming its own ``Generator.generate`` iterator, with a distinct
80-token prompt (no stream reuses another's prefix). Per configuration: two warm-up rounds (they
compile that batch size's programs), then a measured one. Reported: aggregate tok/s (all tokens over the
wall time from the first request to the last token, prefills included), steady aggregate tok/s (the
tokens made while every stream was decoding, over that time), per-stream decode tok/s, and the
ratios to one stream; plus the time of one bare decode step at each batch size and the arithmetic
rate it implies (2 x parameters x rows FLOPs per step), to say whether a step is bound by compute
or by memory. Compare within one run only: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from benchmarks.decode import machine_description, synthetic_prompt

RESULTS = Path(__file__).parent / "results" / "batch.json"
PROMPT_LENGTH = 80


def run_streams(generator, prompts: list[list[int]], new_tokens: int) -> dict:
    """Run one stream per prompt at once; times of every token of every stream."""
    from nbchat.engine.generate import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    times: list[list[float]] = [[] for _ in prompts]
    barrier = threading.Barrier(len(prompts) + 1)

    def stream(index: int) -> None:
        events = generator.generate(prompts[index], greedy, max_new_tokens=new_tokens)
        barrier.wait()
        for _ in events:
            times[index].append(time.perf_counter())

    threads = [threading.Thread(target=stream, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    assert all(len(stream_times) == new_tokens for stream_times in times)
    last = max(stream_times[-1] for stream_times in times)
    all_decoding = max(stream_times[0] for stream_times in times)
    first_done = min(stream_times[-1] for stream_times in times)
    steady_tokens = sum(sum(all_decoding <= t <= first_done for t in stream_times) for stream_times in times)
    return {
        "streams": len(prompts),
        "aggregate_tok_s": len(prompts) * new_tokens / (last - started),
        "steady_aggregate_tok_s": steady_tokens / (first_done - all_decoding),
        "per_stream_decode_tok_s": statistics.median(
            (new_tokens - 1) / (stream_times[-1] - stream_times[0]) for stream_times in times
        ),
        "time_to_first_token_ms": statistics.median((t[0] - started) * 1e3 for t in times),
        "batch_size": generator.batch_size,
    }


def step_times(config, params, sizes: list[int], capacity: int, repeats: int = 20) -> dict[str, float]:
    """Milliseconds of one bare decode step per batch size (jitted program only, no host work)."""
    import jax
    import numpy as np
    from flax import nnx

    from nbchat.engine import cache as kv_cache
    from nbchat.engine import sampling
    from nbchat.engine.generate import step_program

    graphdef, params = nnx.split(params)  # the loaded Decoder, split as the Generator does
    program = step_program(config, graphdef)
    vocab = config.vocab_size
    top = sampling.MAX_TOP_LOGPROBS
    timings = {}
    for size in sizes:
        cache = kv_cache.empty_cache(config, size, capacity)
        state = jax.device_put(sampling.initial_state([[1]] * size, vocab, 0))
        settings = jax.device_put(sampling.sampling_arrays([sampling.SamplingParams(temperature=0.0)] * size,
                                                           vocab))
        bits = jax.numpy.full((size, -(-vocab // 32)), -1, jax.numpy.int32)
        sample = sampling.Sample(np.zeros(size, np.int32), np.zeros(size, np.float32),
                                 np.zeros((size, top), np.int32), np.zeros((size, top), np.float32))
        lengths = np.full(size, PROMPT_LENGTH, np.int32)
        advancing = np.ones(size, bool)
        for index in range(repeats + 3):
            if index == 3:
                # Dispatch is asynchronous: wait for the warm-up steps (a program's first run sets up
                # its matmul kernels, ~0.8 s here) before the clock starts.
                jax.block_until_ready(sample)
                started = time.perf_counter()
            cache, state, sample = program(params, cache, sample.token_ids[:, None], lengths,
                                           np.zeros(size, np.int32), advancing, state, settings, bits, sample)
        jax.block_until_ready(sample)
        timings[str(size)] = (time.perf_counter() - started) / repeats * 1e3
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from flax import nnx

    from nbchat.engine.generate import Generator
    from nbchat.engine.model import Matrix
    from nbchat.engine.weights import load_gguf
    from nbchat.models import resolve

    source = resolve(args.model)
    if source.kind != "gguf":
        parser.error("the benchmark loads GGUF files; pass a .gguf path or a registry name")
    config, params = load_gguf(str(source.path), "float32", progress=False)
    # every weight a step multiplies by, packed or not (the tied embedding is the head)
    n_params = sum(module.in_features * module.out_features for _, module in nnx.iter_graph(params)
                   if isinstance(module, Matrix))
    generator = Generator(config, params)
    counts = [int(n) for n in args.streams.split(",")]
    rows = []
    for count in counts:
        # Two warm-up rounds: the threads' arrival order decides which batch sizes and capacities a
        # round passes through, and one warm-up left the 4-stream round compiling (TTFT 5.4 s).
        for round_index in range(3):  # warm-up, warm-up, measured
            seed = 1000 * count + 250 * round_index
            prompts = [synthetic_prompt(PROMPT_LENGTH, config.vocab_size, seed + i) for i in range(count)]
            generator.drop_cache()  # back to one slot: each configuration starts alike
            row = run_streams(generator, prompts, args.new_tokens)
        rows.append(row)
    capacity = 256  # the cache an 80-token prompt and a 128-token reply decode in
    steps = step_times(config, params, sorted({1, *[r["batch_size"] for r in rows]}), capacity)
    one = rows[0]
    print(f"{'streams':>7} {'aggregate':>10} {'steady':>10} {'ratio':>6} {'per stream':>10} "
          f"{'TTFT ms':>8} {'batch':>5}")
    for row in rows:
        row["ratio_to_one"] = row["aggregate_tok_s"] / one["aggregate_tok_s"]
        row["steady_ratio_to_one"] = row["steady_aggregate_tok_s"] / one["steady_aggregate_tok_s"]
        print(f"{row['streams']:>7} {row['aggregate_tok_s']:>10.1f} {row['steady_aggregate_tok_s']:>10.1f} "
              f"{row['steady_ratio_to_one']:>6.2f} {row['per_stream_decode_tok_s']:>10.1f} "
              f"{row['time_to_first_token_ms']:>8.0f} {row['batch_size']:>5}")
    print(f"\nbare decode step ({capacity}-slot cache): ms per step, "
          f"GFLOP/s at 2 x {n_params / 1e6:.0f}M x rows")
    for size, ms in steps.items():
        print(f"  batch {size:>2}: {ms:6.1f} ms   {2 * n_params * int(size) / (ms / 1e3) / 1e9:6.1f} GFLOP/s")
    report = {"model": source.name, "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_LENGTH,
              "machine": machine_description(), "rows": rows, "step_ms": steps,
              "parameters": n_params}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
