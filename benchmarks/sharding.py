"""Sharding benchmark: decode speed of the default model on one device and on a mesh of several.

    python -m benchmarks.sharding [--model PATH_OR_NAME] [--devices 2] [--new-tokens 128]
                                  [--repeats 3] [--output benchmarks/results/sharding.json]

Each configuration runs in its own process (JAX fixes its device count when it starts): one device;
N forced host devices with no mesh (``NBCHAT_MESH=none``, the control: the same process layout,
nothing sharded); N devices on the model axis (tensor parallel, the automatic choice); N devices on
the data axis (cache rows split, parameters replicated). Each measures greedy decode tokens per
second at batch 1 (an 80-token prompt, median of --repeats) and the aggregate of N concurrent
streams, and records its first reply's token ids so the table can say whether they equal the
one-device ones. On CPU, forced host devices share the same cores (XLA runs each device's part on
the same thread pool), so no speed-up is expected there: the ratio shows the cost of the
collectives. Compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.decode import machine_description, peak_rss_mb, synthetic_prompt, table, time_generation

RESULTS = Path(__file__).parent / "results" / "sharding.json"
PROMPT_LENGTH = 80


def worker(model: str, new_tokens: int, repeats: int, streams: int) -> dict:
    import jax

    from nbchat.engine.generate import Generator, SamplingParams
    from nbchat.engine.sharding import choose_mesh, describe
    from nbchat.models import load

    mesh = choose_mesh()
    loaded = load(model, progress=False)
    generator = Generator(loaded.config, loaded.decoder, mesh)
    greedy, vocab = SamplingParams(temperature=0.0), loaded.config.vocab_size
    started = time.perf_counter()
    reply = [e.token_id for e in generator.generate(synthetic_prompt(PROMPT_LENGTH, vocab, 0), greedy,
                                                     max_new_tokens=new_tokens)]
    first_run_s = time.perf_counter() - started
    rates = []
    for repeat in range(repeats):
        prompt = synthetic_prompt(PROMPT_LENGTH, vocab, seed=repeat + 1)
        _, decode_s, count = time_generation(generator.generate(prompt, greedy, max_new_tokens=new_tokens))
        rates.append((count - 1) / decode_s)

    def concurrent(seed: int) -> float:
        """Aggregate tok/s of ``streams`` sequences generating at once."""
        counts = [0] * streams

        def run(index: int) -> None:
            prompt = synthetic_prompt(PROMPT_LENGTH, vocab, seed=seed + index)
            counts[index] = sum(1 for _ in generator.generate(prompt, greedy, max_new_tokens=new_tokens))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts) / (time.perf_counter() - started)

    concurrent(100)  # compiles the batched programs
    aggregate = statistics.median(concurrent(200 + 10 * repeat) for repeat in range(repeats))
    return {
        "devices": len(jax.devices()),
        "mesh": describe(mesh),
        "first_run_s": first_run_s,
        "decode_tok_s": statistics.median(rates),
        "runs_tok_s": rates,
        "streams": streams,
        "aggregate_tok_s": aggregate,
        "reply_ids": reply,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_worker(devices: int, mesh: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", NBCHAT_MESH=mesh)
    command = [sys.executable, "-m", "benchmarks.sharding", "--worker", "--model", args.model,
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
               "--streams", str(args.devices)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env,
                               cwd=Path(__file__).parent.parent)
    if completed.returncode != 0:
        raise RuntimeError(f"worker ({devices} devices, NBCHAT_MESH={mesh}) failed:\n"
                           f"{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from nbchat.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.model, args.new_tokens, args.repeats, args.streams)))
        return
    n = args.devices
    configurations = [
        ("1 device", 1, "none"),
        (f"{n} devices, no mesh", n, "none"),
        (f"{n} devices, model={n}", n, f"model={n}"),
        (f"{n} devices, data={n}", n, f"data={n}"),
    ]
    results = []
    for label, devices, mesh in configurations:
        result = run_worker(devices, mesh, args) | {"label": label}
        results.append(result)
        print(f"{label}: {result['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    base = results[0]
    rows = [
        (r["label"], f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x",
         f"{r['aggregate_tok_s']:.1f}", f"{r['aggregate_tok_s'] / base['aggregate_tok_s']:.2f}x",
         f"{r['first_run_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
         "yes" if r["reply_ids"] == base["reply_ids"] else "NO")
        for r in results
    ]
    header = ("configuration", "decode tok/s", "vs 1 device", f"{n} streams tok/s", "vs 1 device",
              "first reply s", "peak RSS MB", "same tokens")
    report = {"machine": machine_description(), "model": args.model, "new_tokens": args.new_tokens,
              "prompt_tokens": PROMPT_LENGTH, "results": results}
    print(f"{report['machine']}; {args.model}, {PROMPT_LENGTH}-token prompt, {args.new_tokens} greedy tokens")
    print("\n".join(table(header, rows)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
