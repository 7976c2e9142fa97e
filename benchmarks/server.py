"""HTTP serving benchmark: N concurrent streaming clients against `nbchat serve`, and against
llama-cpp-python's server on the same GGUF where ``llama_cpp`` is importable.

    python -m benchmarks.server [--model smollm2-135m-instruct] [--clients 1,4,16] [--max-tokens 128]
                                [--output benchmarks/results/server.json] [--no-llama-cpp]

Each server runs in its own subprocess on a free loopback port; before each measured round it is
warmed up by a round of the same client count and reply length on other prompts.
Then, for each client count N, N clients (the official ``openai`` async client) each stream one
reply of up to --max-tokens tokens (distinct prompts, so no client reuses another's cached prefix)
at the same moment. Reported per N: aggregate tokens per second (all completion tokens over the wall
time of the round), time to first token p50/p95, and per-stream decode tokens per second (median).
Compare servers within one run only: on a shared 2-core machine the spread between runs is large.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "server.json"
STARTUP_TIMEOUT_S = 600
TOPICS = ("a lighthouse keeper", "a lost robot", "the first snow", "a river town", "an old violin",
          "a night train", "a mountain village", "a clockmaker", "a desert well", "a city garden",
          "a winter market", "a ship in fog", "a hidden library", "a summer storm", "a baker's dawn",
          "a fox in the city")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int, log_path: Path) -> subprocess.Popen:
    """Start a server and wait until it answers /v1/models (nbchat: /health 200)."""
    import httpx

    log = open(log_path, "wb")  # noqa: SIM115 - the process writes to it until stopped
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                if health.status_code in (200, 404):  # llama-cpp-python's server has no /health
                    return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{command[:4]} was not ready after {STARTUP_TIMEOUT_S} s; see {log_path}")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def one_stream(client, model: str, reader: str, topic: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, stream=True, stream_options={"include_usage": True}, max_tokens=max_tokens,
        temperature=0.7, seed=1,
        # The reader first: prompts of different rounds and clients share no text a prefix cache
        # could reuse beyond the chat template's own tokens.
        messages=[{"role": "user", "content": f"{reader}: write a long, detailed story about {topic}."}],
    )
    content_chunks = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            content_chunks += 1
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    # llama-cpp-python's server ignores stream_options.include_usage; it sends one token per chunk.
    tokens = tokens or content_chunks
    decode_s = (last - first) if first and last else 0.0
    return {"ttft_s": (first or time.perf_counter()) - started, "tokens": tokens,
            "tokens_per_s": (tokens - 1) / decode_s if decode_s > 0 and tokens > 1 else 0.0}


async def one_round(base_url: str, model: str, clients: int, max_tokens: int, reader: str = "Reader") -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=1800) as client:
        started = time.perf_counter()
        streams = await asyncio.gather(*(
            one_stream(client, model, f"{reader} {index}", TOPICS[index % len(TOPICS)], max_tokens)
            for index in range(clients)))
        wall = time.perf_counter() - started
    ttfts = sorted(stream["ttft_s"] for stream in streams)
    total = sum(stream["tokens"] for stream in streams)
    return {
        "clients": clients,
        "wall_s": wall,
        "completion_tokens": total,
        "aggregate_tokens_per_s": total / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "per_stream_tokens_per_s_median": statistics.median(stream["tokens_per_s"] for stream in streams),
    }


def bench_server(name: str, command: list[str], port: int, model: str, client_counts: list[int],
                 max_tokens: int, log_dir: Path) -> list[dict]:
    process = start(command, port, log_dir / f"{name}.log")
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        rows = []
        for clients in client_counts:
            # Warm-up at this client count: what a batch of that size compiles or loads first. The
            # same reply length (the cache's capacity depends on it), other prompts (a server that
            # caches prefixes would otherwise start the measured round with its prompts cached).
            asyncio.run(one_round(base_url, model, clients, max_tokens, reader="Warm-up reader"))
            row = {"server": name, **asyncio.run(one_round(base_url, model, clients, max_tokens))}
            print_row(row)
            rows.append(row)
        return rows
    finally:
        stop(process)


def print_row(row: dict) -> None:
    print(f"{row['server']:<18} {row['clients']:>7} {row['completion_tokens']:>7} {row['wall_s']:>8.1f} "
          f"{row['aggregate_tokens_per_s']:>10.1f} {row['ttft_p50_s']:>9.2f} {row['ttft_p95_s']:>9.2f} "
          f"{row['per_stream_tokens_per_s_median']:>12.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama-cpp-python's server")
    args = parser.parse_args(argv)
    client_counts = [int(count) for count in args.clients.split(",")]

    from nbchat.models import resolve

    source = resolve(args.model)
    log_dir = Path(tempfile.mkdtemp(prefix="nbchat-bench-server-"))
    print(f"model {source.name} ({source.path}); {args.max_tokens} tokens per stream; logs in {log_dir}")
    print(f"{'server':<18} {'clients':>7} {'tokens':>7} {'wall s':>8} {'agg tok/s':>10} {'ttft p50':>9} "
          f"{'ttft p95':>9} {'stream tok/s':>12}")
    port = free_port()
    nbchat_command = [sys.executable, "-m", "nbchat.cli", "serve", "--model", args.model, "--port", str(port)]
    rows = bench_server("nbchat serve", nbchat_command, port, source.name, client_counts, args.max_tokens,
                        log_dir)

    llama_cpp = "skipped (--no-llama-cpp)" if args.no_llama_cpp else None
    if llama_cpp is None and importlib.util.find_spec("llama_cpp") is None:
        llama_cpp = "skipped: llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')"
    if llama_cpp is None and source.kind != "gguf":
        llama_cpp = f"skipped: {source.name} is not a GGUF file"
    if llama_cpp is None:
        port = free_port()
        # --interrupt_requests False: by default a new request cuts the running stream short (its
        # client sees the stream end with no tokens); queued, every client gets its full reply.
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(source.path), "--port", str(port),
                   "--n_ctx", "4096", "--model_alias", source.name, "--interrupt_requests", "False"]
        rows += bench_server("llama-cpp-python", command, port, source.name, client_counts, args.max_tokens,
                             log_dir)
        llama_cpp = "measured"
    else:
        print(f"llama-cpp-python server: {llama_cpp}")

    ratios = {}
    for clients in client_counts:
        ours = [row for row in rows if row["server"] == "nbchat serve" and row["clients"] == clients]
        theirs = [row for row in rows if row["server"] == "llama-cpp-python" and row["clients"] == clients]
        if ours and theirs:
            ratio = ours[0]["aggregate_tokens_per_s"] / theirs[0]["aggregate_tokens_per_s"]
            ratios[str(clients)] = ratio
            print(f"{clients} clients: nbchat serve / llama-cpp-python aggregate tok/s = {ratio:.2f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "server", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": source.name, "max_tokens": args.max_tokens, "clients": client_counts, "rows": rows,
        "llama_cpp": llama_cpp, "aggregate_ratio_vs_llama_cpp": ratios,
        "machine": {"python": platform.python_version(), "machine": platform.machine(),
                    "cpus": os.cpu_count()},
    }
    args.output.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
