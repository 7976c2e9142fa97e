"""Constrained-decoding benchmark: decode speed with and without a JSON-schema grammar, same prompt,
same run, on the default model.

    python -m benchmarks.constrained [--model NAME_OR_PATH] [--new-tokens 128] [--repeats 5]
                                     [--output benchmarks/results/constrained.json]

Two levels, each alternating unconstrained and constrained runs (A B A B ...) so that a shared
machine's drift hits both alike:

- engine: ``Generator.generate`` on the rendered prompt, greedy, no stop ids (every run makes exactly
  --new-tokens tokens), the constrained run with a ``GrammarConstraint`` whose host time
  (``allowed_bitmask`` + ``advance``) is measured per token;
- api: ``engine.chat.completions.create(stream=True)``, the same prompt, with and without
  ``response_format={"type": "json_schema", ...}`` (the EOS id banned by logit_bias in both, so both
  run to max_tokens; the schema needs more items than fit, so the grammar never ends first).

Decode tok/s counts the tokens after the first over the time from the first to the last token (TTFT
and prefill excluded). The overhead is constrained ms/token over unconstrained ms/token, minus one,
from the medians of the repeats. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "constrained.json"
PROMPT = "List people with their name, age, city, a few tags and whether they are verified, as JSON."
# Every object state a JSON reply goes through (keys, strings, integers, enums, nested arrays,
# booleans); minItems keeps the grammar open past --new-tokens, so both runs make the same count.
SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "city": {"enum": ["Paris", "London", "Berlin", "Madrid", "Rome"]},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
                    "verified": {"type": "boolean"},
                },
                "required": ["name", "age", "city", "tags", "verified"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA, "strict": True}}


class TimedConstraint:
    """A constraint that records the host seconds each step spends in it."""

    def __init__(self, constraint):
        self._constraint = constraint
        self.seconds: list[float] = []

    def allowed_bitmask(self):
        started = time.perf_counter()
        mask = self._constraint.allowed_bitmask()
        self.seconds.append(time.perf_counter() - started)
        return mask

    def advance(self, token_id: int) -> None:
        started = time.perf_counter()
        self._constraint.advance(token_id)
        self.seconds[-1] += time.perf_counter() - started


def decode_rate(timestamps: list[float]) -> tuple[float, int]:
    """(ms per token, tokens) over the tokens after the first."""
    tokens = len(timestamps) - 1
    return (timestamps[-1] - timestamps[0]) * 1e3 / tokens, tokens


def engine_level(loaded, generator, compiler, prompt_ids: list[int], new_tokens: int, repeats: int) -> dict:
    from nbchat.engine.generate import SamplingParams
    from nbchat.plan import strict_schema

    greedy = SamplingParams(temperature=0.0)

    def run(constrained: bool) -> dict:
        constraint = TimedConstraint(compiler.json_schema(strict_schema(SCHEMA))) if constrained else None
        stamps, ids = [], []
        for event in generator.generate(prompt_ids, greedy, max_new_tokens=new_tokens, constraint=constraint):
            stamps.append(time.perf_counter())
            ids.append(event.token_id)
        ms_per_token, tokens = decode_rate(stamps)
        result = {"ms_per_token": ms_per_token, "tokens": tokens + 1}
        if constraint is not None:
            host_ms = np.array(constraint.seconds[1:]) * 1e3  # the decode steps' masks
            result |= {
                "mask_ms_mean": float(host_ms.mean()),
                "mask_ms_p50": float(np.median(host_ms)),
                "mask_ms_p99": float(np.percentile(host_ms, 99)),
                "mask_ms_max": float(host_ms.max()),
                "text": loaded.tokenizer.decode(ids),
            }
        return result

    run(False), run(True)  # compile and warm the prefix cache
    return alternate(run, repeats)


def api_level(engine, new_tokens: int, repeats: int) -> dict:
    eos_banned = {str(token_id): -100 for token_id in engine._loaded.stop_ids}

    def run(constrained: bool) -> dict:
        extra = {"response_format": RESPONSE_FORMAT} if constrained else {}
        stamps, content = [], []
        stream = engine.chat.completions.create(
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            temperature=0.0,
            max_tokens=new_tokens,
            logit_bias=eos_banned,
            stream_options={"include_usage": True},
            **extra,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
                content.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        ms_per_token, chunks = decode_rate(stamps)
        # A chunk can carry several tokens (a character split across tokens): rate over tokens.
        ms_per_token *= chunks / max(1, usage.completion_tokens - 1)
        result = {"ms_per_token": ms_per_token, "tokens": usage.completion_tokens}
        if constrained:
            result["text"] = "".join(content)
        return result

    run(False), run(True)
    return alternate(run, repeats)


def alternate(run, repeats: int) -> dict:
    runs = {"unconstrained": [], "json_schema": []}
    for _ in range(repeats):
        runs["unconstrained"].append(run(False))
        runs["json_schema"].append(run(True))
    summary = {}
    for mode, results in runs.items():
        ms = statistics.median(r["ms_per_token"] for r in results)
        summary[mode] = {
            "ms_per_token": ms,
            "tok_s": 1e3 / ms,
            "tokens": results[0]["tokens"],
            "ms_per_token_runs": [r["ms_per_token"] for r in results],
        }
        if "mask_ms_mean" in results[0]:
            for key in ("mask_ms_mean", "mask_ms_p50", "mask_ms_p99", "mask_ms_max"):
                summary[mode][key] = statistics.median(r[key] for r in results)
        if "text" in results[0]:
            summary[mode]["sample_text"] = results[0]["text"][:200]
    # Pairwise: each constrained run against the unconstrained run just before it.
    pairs = zip(runs["unconstrained"], runs["json_schema"], strict=True)
    ratios = [constrained["ms_per_token"] / plain["ms_per_token"] for plain, constrained in pairs]
    plain_ms = summary["unconstrained"]["ms_per_token"]
    summary["overhead_pct"] = (summary["json_schema"]["ms_per_token"] / plain_ms - 1) * 100
    summary["overhead_pct_pairwise_median"] = (statistics.median(ratios) - 1) * 100
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from nbchat.api import Engine
    from nbchat.engine.constraints import GrammarCompiler
    from nbchat.plan import strict_schema

    engine = Engine(args.model).load()
    loaded, generator = engine._loaded, engine._generator
    compiler = GrammarCompiler.for_tokenizer(
        loaded.tokenizer, vocab_size=loaded.config.vocab_size, stop_ids=loaded.stop_ids
    )
    _, prompt_ids = engine.render_prompt([{"role": "user", "content": PROMPT}])
    started = time.perf_counter()
    compiler.json_schema(strict_schema(SCHEMA))
    compile_ms = (time.perf_counter() - started) * 1e3

    print("engine level ...", file=sys.stderr)
    engine_result = engine_level(loaded, generator, compiler, prompt_ids, args.new_tokens, args.repeats)
    print("api level ...", file=sys.stderr)
    api_result = api_level(engine, args.new_tokens, args.repeats)
    report = {
        "model": loaded.name,
        "dtype": loaded.dtype,
        "device": engine.model_info.device,
        "machine": machine_description(),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "schema_compile_ms": compile_ms,
        "engine": engine_result,
        "api": api_result,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"\nwrote {args.output}")


def machine_description() -> str:
    import os
    import platform

    import jax

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__}"


def format_report(report: dict) -> str:
    lines = [
        f"{report['model']} ({report['dtype']}, {report['device']}), greedy, {report['prompt_tokens']} "
        f"prompt tokens, {report['new_tokens']} new tokens, median of {report['repeats']} alternating "
        "runs",
        report["machine"],
        f"schema compile: {report['schema_compile_ms']:.1f} ms",
        "",
    ]
    header = ("level", "mode", "decode tok/s", "ms/token", "mask ms mean / p50 / p99 / max", "overhead")
    rows = []
    for level in ("engine", "api"):
        result = report[level]
        for mode in ("unconstrained", "json_schema"):
            entry = result[mode]
            mask = ""
            if "mask_ms_mean" in entry:
                mask = " / ".join(
                    f"{entry[key]:.3f}"
                    for key in ("mask_ms_mean", "mask_ms_p50", "mask_ms_p99", "mask_ms_max")
                )
            overhead = ""
            if mode == "json_schema":
                overhead = (
                    f"{result['overhead_pct']:+.1f}% "
                    f"(pairwise {result['overhead_pct_pairwise_median']:+.1f}%)"
                )
            rows.append(
                (level, mode, f"{entry['tok_s']:.1f}", f"{entry['ms_per_token']:.2f}", mask, overhead)
            )
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, tuple("-" * w for w in widths), *rows):
        lines.append(" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    sample = report["engine"]["json_schema"].get("sample_text", "")
    lines += ["", f"constrained sample: {sample[:120]!r}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
