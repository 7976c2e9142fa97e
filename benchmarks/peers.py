"""nbchat side by side with llama.cpp (and optionally transformers + torch) on the same GGUF, the same
chat messages and each engine's public streaming chat API, in the same run.

    python -m benchmarks.peers [--model NAME_OR_PATH] [--new-tokens 128] [--repeats 2]
                               [--transformers] [--no-concurrent] [--quick]
                               [--output benchmarks/results/peers.json]

Engines: ``nbchat.Engine(path).chat.completions.create(messages=..., stream=True, ...)``;
llama-cpp-python's ``Llama(model_path=path, n_ctx=2048, verbose=False).create_chat_completion(...)``
(its default threads: ``cpu_count() // 2`` for decode, recorded in the JSON); with ``--transformers``,
``AutoModelForCausalLM.from_pretrained(gguf_file=...)`` in float32 and ``generate()`` with a streamer.
A peer whose package is not importable is skipped with a one-line reason (llama-cpp-python is not a
project dependency; CI never runs this benchmark).

Every reply is greedy (temperature 0) and exactly ``--new-tokens`` long: both engines get the same
``logit_bias`` of -100 on the model's stop ids (EOS and end-of-turn tokens; nbchat.tokenizer's
``stop_token_ids``), so no reply ends early; transformers gets ``min_new_tokens`` (which masks EOS
the same way). Each reply is checked to end with ``finish_reason == "length"`` (and, for nbchat, a
usage count equal to ``--new-tokens``), so tokens are counted, not chunks. llama-cpp-python applies a
logit_bias in Python on each token (a copy of the logits): that cost is part of its numbers.

Messages: a system message of synthetic text (decode.py's ``synthetic_prompt`` ids, decoded) and a
fixed user instruction, sized so the rendered prompt is ~84 or ~1076 tokens; every call gets fresh
text, so no engine reuses more than the template's first three tokens from a cached prefix.

Rows (each engine in its own fresh processes; medians of ``--repeats``):
- decode tok/s (tokens after the first over the time from the first to the last streamed text) and
  time to first streamed text, at both prompt lengths, after one warm-up call per length;
- first reply in a fresh process: from the parent launching the interpreter to the first streamed
  text (imports + load + compile + prefill), with nbchat's persistent compilation cache cold (an
  empty ``NBCHAT_HOME``, which is where jax_setup puts it) and warm (a second process on that dir);
  llama.cpp and transformers have no such cache, so both rows show their one fresh-process figure;
- load time (``Engine.load()`` / ``Llama(...)`` / ``from_pretrained``), peak RSS after the short
  prompts, after the long ones and after a 10-turn chat (decode.py's questions, 32-token replies);
- concurrent requests: 1/4/8/16 requests of 64 tokens at the short length, aggregate tok/s (all
  tokens over the wall time from the first request to the last token). nbchat: one thread per
  request, all calling ``create`` at once (continuous batching; a warm-up round per count compiles
  that batch size). llama.cpp: a ``Llama`` is not thread-safe, so its requests run one after another,
  as its own server does with one slot.

Times across processes use ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for the whole machine).
The machine's load average at start and end is recorded: compare engines within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.decode import CHAT_QUESTIONS, machine_description, peak_rss_mb, synthetic_prompt, table

RESULTS = Path(__file__).parent / "results" / "peers.json"
PROMPT_TOKENS = {"short": 84, "long": 1076}
QUICK_PROMPT_TOKENS = {"short": 40, "long": 200}
CHAT_REPLY_TOKENS = 32
CONCURRENT_COUNTS = (1, 4, 8, 16)
CONCURRENT_TOKENS = 64
INSTRUCTION = "Continue the text above."
ENGINES = ("nbchat", "llama.cpp", "transformers")

# A stream, as every engine's adapter yields it: (streamed text, finish_reason, completion tokens
# when the engine reports a usage count).
Piece = tuple[str | None, str | None, int | None]
StreamFn = Callable[[list[dict], int], Iterator[Piece]]


# -- the engines' public chat APIs ----------------------------------------------------------------------


def open_nbchat(model_path: str, banned: dict[int, float]) -> tuple[Callable[[], None], StreamFn, dict]:
    import nbchat

    engine = nbchat.Engine(model_path)

    def stream(messages: list[dict], max_tokens: int) -> Iterator[Piece]:
        chunks = engine.chat.completions.create(
            messages=messages,
            stream=True,
            temperature=0,
            max_tokens=max_tokens,
            logit_bias=banned,
            stream_options={"include_usage": True},
        )
        for chunk in chunks:
            for choice in chunk.choices:
                yield choice.delta.content, choice.finish_reason, None
            if chunk.usage is not None:
                yield None, None, chunk.usage.completion_tokens

    return engine.load, stream, {}


def open_llama_cpp(model_path: str, banned: dict[int, float]) -> tuple[Callable[[], None], StreamFn, dict]:
    from llama_cpp import Llama

    holder: dict = {}
    info: dict = {}

    def load() -> None:
        holder["llm"] = Llama(model_path=model_path, n_ctx=2048, verbose=False)
        info.update(n_threads=holder["llm"].n_threads, n_threads_batch=holder["llm"].n_threads_batch)

    def stream(messages: list[dict], max_tokens: int) -> Iterator[Piece]:
        chunks = holder["llm"].create_chat_completion(
            messages=messages, stream=True, temperature=0, max_tokens=max_tokens, logit_bias=banned
        )
        for chunk in chunks:
            for choice in chunk["choices"]:
                yield choice["delta"].get("content"), choice.get("finish_reason"), None

    return load, stream, info


def open_transformers(model_path: str, banned: dict[int, float]) -> tuple[Callable[[], None], StreamFn, dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    path = Path(model_path)
    holder: dict = {}

    def load() -> None:
        holder["tokenizer"] = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        holder["model"] = model.eval()

    class TokenQueue(BaseStreamer):
        """Hands each new token to the consuming thread (the first put() is the prompt)."""

        def __init__(self):
            self.tokens: queue.Queue = queue.Queue()
            self.prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                self.tokens.put(int(value.reshape(-1)[0]))
            self.prompt_seen = True

        def end(self):
            self.tokens.put(None)

    def stream(messages: list[dict], max_tokens: int) -> Iterator[Piece]:
        ids = holder["tokenizer"].apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        streamer = TokenQueue()

        def generate() -> None:
            with torch.inference_mode():
                holder["model"].generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens,
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=0,
                )

        worker = threading.Thread(target=generate)
        worker.start()
        count = 0
        while (token := streamer.tokens.get()) is not None:
            count += 1
            yield holder["tokenizer"].decode([token]) or " ", None, None
        worker.join()
        yield None, "length" if count == max_tokens else "stop", count

    return load, stream, {}


OPENERS = {"nbchat": open_nbchat, "llama.cpp": open_llama_cpp, "transformers": open_transformers}


# -- measuring one reply --------------------------------------------------------------------------------


def timed_reply(stream: StreamFn, messages: list[dict], max_tokens: int) -> dict:
    """Time to the first streamed text, decode tok/s after it, and a check that the reply made exactly
    ``max_tokens`` tokens (finish_reason "length", and the usage count where the engine gives one)."""
    started = time.monotonic()
    times: list[float] = []
    finish = tokens = None
    for text, finish_reason, usage_tokens in stream(messages, max_tokens):
        if text:
            times.append(time.monotonic())
        finish = finish_reason or finish
        tokens = usage_tokens if usage_tokens is not None else tokens
    if finish != "length" or tokens not in (None, max_tokens):
        raise RuntimeError(f"the reply ended early ({finish}, {tokens} tokens): the stop ids were not banned")
    return {
        "started": started,
        "first": times[0],
        "last": times[-1],
        "ttft_s": times[0] - started,
        "decode_tok_s": (max_tokens - 1) / (times[-1] - times[0]),
    }


def concurrent_requests(
    stream: StreamFn, messages: list[list[dict]], max_tokens: int, parallel: bool
) -> dict:
    """All requests at once from their own threads (parallel) or one after another; aggregate tok/s."""
    replies: list[dict] = [{} for _ in messages]
    started = time.monotonic()
    if parallel:
        barrier = threading.Barrier(len(messages))

        def request(index: int) -> None:
            barrier.wait()
            replies[index] = timed_reply(stream, messages[index], max_tokens)

        threads = [threading.Thread(target=request, args=(index,)) for index in range(len(messages))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if not all(replies):
            raise RuntimeError("a concurrent request failed (its traceback is above)")
        started = min(reply["started"] for reply in replies)
    else:
        replies = [timed_reply(stream, one, max_tokens) for one in messages]
    return {
        "requests": len(messages),
        "aggregate_tok_s": len(messages) * max_tokens / (max(r["last"] for r in replies) - started),
        "per_stream_decode_tok_s": statistics.median(r["decode_tok_s"] for r in replies),
        "ttft_ms": statistics.median(r["ttft_s"] for r in replies) * 1e3,
    }


# -- workers (each runs in its own fresh process) -------------------------------------------------------


def worker(engine: str, job: dict) -> dict:
    """``job["mode"]`` "first": load and stream one reply (the first-reply row); "full": every row."""
    imported_at = time.monotonic()
    banned = {int(token): -100.0 for token in job["banned"]}
    load, stream, info = OPENERS[engine](job["model_path"], banned)
    import_s = time.monotonic() - imported_at
    started = time.monotonic()
    load()
    result: dict = {"engine": engine, "import_s": import_s, "load_s": time.monotonic() - started, **info}
    prompts = iter(job["prompts"]["short"])
    first = timed_reply(stream, next(prompts), job["new_tokens"])
    result["first_reply_s"] = first["first"] - job["launched"]
    if job["mode"] == "first":
        return result

    result["lengths"] = {}
    for name, pool in job["prompts"].items():
        pool = iter(pool) if name != "short" else prompts
        timed_reply(stream, next(pool), job["new_tokens"])  # warm-up: compiles this length's programs
        runs = [timed_reply(stream, next(pool), job["new_tokens"]) for _ in range(job["repeats"])]
        result["lengths"][name] = {
            "ttft_ms": statistics.median(r["ttft_s"] for r in runs) * 1e3,
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "runs": [{"ttft_ms": r["ttft_s"] * 1e3, "decode_tok_s": r["decode_tok_s"]} for r in runs],
            "peak_rss_mb": peak_rss_mb(),
        }
    if engine != "transformers":
        messages = [{"role": "system", "content": "You are a concise, friendly math tutor."}]
        for question in CHAT_QUESTIONS:
            messages.append({"role": "user", "content": question})
            reply = "".join(text or "" for text, _, _ in stream(messages, CHAT_REPLY_TOKENS))
            messages.append({"role": "assistant", "content": reply})
        result["chat_peak_rss_mb"] = peak_rss_mb()
    if job["concurrent"] and engine != "transformers":
        parallel = engine == "nbchat"
        rows = []
        for count in job["concurrent"]:
            # nbchat: a warm-up round first compiles this batch size's programs; the second is measured
            for _round in range(2 if parallel else 1):
                row = concurrent_requests(
                    stream, [next(prompts) for _ in range(count)], job["concurrent_tokens"], parallel
                )
            rows.append(row)
        result["concurrent"] = rows
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_worker(engine: str, job: dict, env: dict | None = None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump({**job, "launched": time.monotonic()}, handle)
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks.peers", "--worker", engine, handle.name],
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).parent.parent,
        )
    finally:
        os.unlink(handle.name)
    if completed.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# -- the driver -----------------------------------------------------------------------------------------


def fresh_messages(tokenizer, target: int, seed: int) -> list[dict]:
    """Chat messages whose rendered prompt is ``target`` tokens (or within a token or two): synthetic
    text in the system message, which is what makes each call's prefix fresh."""
    content_length = target
    for _attempt in range(6):
        text = tokenizer.decode(synthetic_prompt(content_length, tokenizer.vocab_size, seed))
        messages = [{"role": "system", "content": text}, {"role": "user", "content": INSTRUCTION}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        length = len(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
        if length == target:
            break
        content_length += target - length
    return messages


def unavailable(engine: str) -> str | None:
    """Why a peer cannot run here, or None."""
    import importlib.util

    needs = {"nbchat": ("nbchat",), "llama.cpp": ("llama_cpp",), "transformers": ("torch", "transformers")}
    missing = [name for name in needs[engine] if importlib.util.find_spec(name) is None]
    return f"{', '.join(missing)} is not importable" if missing else None


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--transformers", action="store_true", help="also run transformers + torch float32")
    parser.add_argument("--no-concurrent", action="store_true", help="skip the 1/4/8/16 concurrent requests")
    parser.add_argument("--quick", action="store_true", help="smoke test: short prompts, 16 new tokens")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        engine, job_path = args.worker
        print(json.dumps(worker(engine, json.loads(Path(job_path).read_text()))))
        return

    from nbchat.models import resolve
    from nbchat.tokenizer import load_tokenizer, stop_token_ids

    source = resolve(args.model)
    if source.kind != "gguf":
        parser.error("every peer loads the GGUF file; pass a .gguf path or a registry name")
    lengths = QUICK_PROMPT_TOKENS if args.quick else PROMPT_TOKENS
    new_tokens = 16 if args.quick else args.new_tokens
    concurrent = [] if args.no_concurrent else list((1, 4) if args.quick else CONCURRENT_COUNTS)
    tokenizer = load_tokenizer(source.path)
    seeds = iter(range(1, 10**6))
    calls_per_worker = {"short": 2 + args.repeats + 2 * sum(concurrent), "long": 1 + args.repeats}

    def job(mode: str) -> dict:
        return {
            "mode": mode,
            "model_path": str(source.path),
            "new_tokens": new_tokens,
            "repeats": args.repeats,
            "banned": sorted(stop_token_ids(tokenizer)),
            "concurrent": concurrent,
            "concurrent_tokens": min(CONCURRENT_TOKENS, new_tokens),
            "prompts": {
                name: [
                    fresh_messages(tokenizer, lengths[name], next(seeds))
                    for _ in range(calls_per_worker[name] if mode == "full" else 1)
                ]
                for name in (lengths if mode == "full" else ("short",))
            },
        }

    report: dict = {
        "model": source.name,
        "new_tokens": new_tokens,
        "prompt_tokens": lengths,
        "repeats": args.repeats,
        "banned_stop_ids": sorted(stop_token_ids(tokenizer)),
        "machine": machine_description(),
        "load_average_start": list(os.getloadavg()),
        "engines": {},
        "skipped": {},
    }
    engines = [engine for engine in ENGINES if engine != "transformers" or args.transformers]
    for engine in engines:
        reason = unavailable(engine)
        if reason:
            report["skipped"][engine] = reason
            print(f"skipping {engine}: {reason}", file=sys.stderr)
            continue
        print(f"{engine} ...", file=sys.stderr)
        full = [run_worker(engine, job("full")) for _ in range(args.repeats)]
        first_cold, first_warm = [], []
        for _ in range(args.repeats):
            if engine == "nbchat":
                with tempfile.TemporaryDirectory() as empty_home:
                    env = {**os.environ, "NBCHAT_HOME": empty_home}
                    first_cold.append(run_worker(engine, job("first"), env))
                    first_warm.append(run_worker(engine, job("first"), env))
            else:
                first_warm.append(run_worker(engine, job("first")))
        report["engines"][engine] = {
            "full": full,
            "first_cold": first_cold or first_warm,
            "first_warm": first_warm,
        }
    report["load_average_end"] = list(os.getloadavg())
    report["rows"] = summary_rows(report)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"\nwrote {args.output}")


def summary_rows(report: dict) -> list[dict]:
    """One row per measure: each engine's median and nbchat / llama.cpp."""
    lengths = report["prompt_tokens"]
    measures: list[tuple[str, Callable[[dict], float | None]]] = []
    for name, tokens in lengths.items():
        measures.append(
            (
                f"decode tok/s, {tokens}-token prompt",
                lambda e, n=name: median_of([r["lengths"][n] for r in e["full"]], "decode_tok_s"),
            )
        )
    for name, tokens in lengths.items():
        measures.append(
            (
                f"time to first token ms, {tokens}-token prompt",
                lambda e, n=name: median_of([r["lengths"][n] for r in e["full"]], "ttft_ms"),
            )
        )
    measures += [
        (
            "first reply s, fresh process, warm compile cache",
            lambda e: median_of(e["first_warm"], "first_reply_s"),
        ),
        (
            "first reply s, fresh process, cold compile cache",
            lambda e: median_of(e["first_cold"], "first_reply_s"),
        ),
        ("import s", lambda e: median_of(e["full"], "import_s")),
        ("load s", lambda e: median_of(e["full"], "load_s")),
    ]
    for name, tokens in lengths.items():
        measures.append(
            (
                f"peak RSS MB after the {tokens}-token prompts",
                lambda e, n=name: median_of([r["lengths"][n] for r in e["full"]], "peak_rss_mb"),
            )
        )
    measures.append(
        (
            "peak RSS MB after a 10-turn chat",
            lambda e: (
                median_of(e["full"], "chat_peak_rss_mb") if "chat_peak_rss_mb" in e["full"][0] else None
            ),
        )
    )
    first_full = next(iter(report["engines"].values()), {"full": [{}]})["full"][0]
    for index, row in enumerate(first_full.get("concurrent", [])):
        count = row["requests"]

        def aggregate(e: dict, i: int = index) -> float | None:
            rows = [r["concurrent"][i] for r in e["full"] if "concurrent" in r]
            return median_of(rows, "aggregate_tok_s") if rows else None

        measures.append((f"{count} concurrent requests, aggregate tok/s", aggregate))
    rows = []
    for label, measure in measures:
        values = {engine: measure(numbers) for engine, numbers in report["engines"].items()}
        ours, theirs = values.get("nbchat"), values.get("llama.cpp")
        rows.append(
            {"measure": label, **values, "nbchat/llama.cpp": ours / theirs if ours and theirs else None}
        )
    return rows


def format_report(report: dict) -> str:
    engines = list(report["engines"])
    header = ("measure", *engines, "nbchat/llama.cpp")
    cells = [
        (
            row["measure"],
            *(_number(row.get(engine)) for engine in engines),
            f"{row['nbchat/llama.cpp']:.2f}" if row["nbchat/llama.cpp"] else "-",
        )
        for row in report["rows"]
    ]
    start, end = report["load_average_start"][0], report["load_average_end"][0]
    lines = [
        f"model {report['model']}, greedy, {report['new_tokens']} new tokens, "
        f"medians of {report['repeats']}; "
        f"{report['machine']}; load average {start:.2f} -> {end:.2f}",
        *(f"skipped {engine}: {reason}" for engine, reason in report["skipped"].items()),
        "",
        *table(header, cells),
    ]
    llama = report["engines"].get("llama.cpp", {}).get("full", [{}])[0]
    if "n_threads" in llama:
        lines.append(
            f"\nllama.cpp threads: {llama['n_threads']} decode, {llama['n_threads_batch']} batch; "
            "its concurrent requests run one after another (a Llama is not thread-safe)"
        )
    return "\n".join(lines)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


if __name__ == "__main__":
    main()
