"""The ``nbchat`` command: ``pull`` a model, show ``info``, ``chat`` in the terminal, ``run`` a notebook,
``serve`` the OpenAI-compatible HTTP API, ``install-kernel`` (the chat kernel's kernelspec).

A thin client of nbchat.models and nbchat.api, like every other surface.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version

from nbchat.errors import NbchatError
from nbchat.models import DEFAULT_MODEL, REGISTRY, cache_dir, cached_models, pull


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nbchat", description="Notebook-native chat with a local LLM.")
    commands = parser.add_subparsers(dest="command", required=True)

    pull_parser = commands.add_parser("pull", help="fetch a model into the cache")
    pull_parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name or HF repo id")

    commands.add_parser("info", help="models, cache directory, devices and versions")

    chat_parser = commands.add_parser("chat", help="chat in the terminal (empty line or Ctrl-D quits)")
    _add_generation_options(chat_parser)
    chat_parser.add_argument("--system", "-s", help="system prompt")

    run_parser = commands.add_parser(
        "run", help="execute a notebook in a kernel, printing its chat exchanges"
    )
    run_parser.add_argument("notebook", help="path of the .ipynb file")

    serve_parser = commands.add_parser("serve", help="serve the model over OpenAI's HTTP API")
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument("--model", "-m", default=DEFAULT_MODEL, help="registry name, .gguf, directory")
    serve_parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    serve_parser.add_argument(
        "--api-key", default=None, help="require this key (Authorization: Bearer KEY); or $NBCHAT_API_KEY"
    )
    serve_parser.add_argument("--access-log", action="store_true", help="uvicorn's access log too")

    kernel_parser = commands.add_parser(
        "install-kernel", help="install the chat kernel's kernelspec (optionally bound to a model)"
    )
    where = kernel_parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="into your Jupyter data directory")
    where.add_argument("--sys-prefix", action="store_true", help=f"into this environment ({sys.prefix})")
    where.add_argument("--prefix", help="into PREFIX/share/jupyter/kernels")
    kernel_parser.add_argument("--name", default="nbchat", help="kernelspec name (default: nbchat)")
    kernel_parser.add_argument("--display-name", help="name shown in the launcher")
    kernel_parser.add_argument(
        "--model", help="the kernel's default model: a registry name, a .gguf path, an HF repo id or a URL"
    )

    args = parser.parse_args(argv)
    try:
        if args.command == "pull":
            source = pull(args.model)
            print(f"{source.name}: {source.path}")
        elif args.command == "info":
            print_info()
        elif args.command == "chat":
            run_chat(args)
        elif args.command == "install-kernel":
            from nbchat.notebook.kernelspec import install

            prefix = sys.prefix if args.sys_prefix else args.prefix
            target = install(
                name=args.name,
                model=args.model,
                display_name=args.display_name,
                user=args.user,
                prefix=prefix,
            )
            print(f"Installed kernelspec {args.name!r} in {target}")
        elif args.command == "run":
            from nbchat.notebook.run import run

            return run(args.notebook)
        elif args.command == "serve":
            return run_serve(args)
    except NbchatError as error:
        print(f"nbchat: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nnbchat: interrupted", file=sys.stderr)
        return 130
    return 0


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=None)


def print_info() -> None:
    print(f"nbchat {_version('jupyter-nbchat')}")
    print(f"cache directory: {cache_dir()}  (set NBCHAT_HOME to move it)")
    cached = set(cached_models())
    print("registry models:")
    for name, entry in REGISTRY.items():
        print(f"  {name:<24} {'cached' if name in cached else 'not cached':<11} {entry.description}")
    for name in sorted(cached - set(REGISTRY)):
        print(f"  {name:<24} cached")
    import jax  # after the cheap lines, so a broken JAX install still shows them

    print(f"devices: {', '.join(f'{d.platform}:{d.id} ({d.device_kind})' for d in jax.devices())}")
    packages = ("jax", "jaxlib", "flax", "transformers", "tokenizers", "gguf", "llguidance", "ipython")
    print("versions: " + ", ".join(f"{name} {_version(name)}" for name in packages))
    print(f"python {platform.python_version()} on {platform.machine()}")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _stream_reply(engine, messages: list[dict], args: argparse.Namespace) -> str:
    """Print the reply as it streams and return its text."""
    stream = engine.chat.completions.create(
        messages=messages,
        stream=True,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    pieces = []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
                print(choice.delta.content, end="", flush=True)
    print()
    return "".join(pieces)


def _converse(engine, turns: Iterable[str], args: argparse.Namespace, messages: list[dict]) -> None:
    for user_text in turns:
        messages.append({"role": "user", "content": user_text})
        try:
            reply = _stream_reply(engine, messages, args)
        except BaseException:
            messages.pop()  # the turn failed: keep the history as it was before it
            raise
        messages.append({"role": "assistant", "content": reply})


def _load_engine(args: argparse.Namespace):
    """Load the model before the first prompt, so its progress bars never mix with a reply."""
    from nbchat.api import Engine

    engine = Engine(args.model, dtype=args.dtype).load()
    info = engine.model_info
    print(f"{info.name}: {info.dtype} on {info.device}, context {info.context_length}", file=sys.stderr)
    return engine


def run_chat(args: argparse.Namespace) -> None:
    engine = _load_engine(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def prompts():
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                return
            if not line:
                return
            print("assistant> ", end="", flush=True)
            yield line

    _converse(engine, prompts(), args, messages)


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def run_serve(args: argparse.Namespace) -> int:
    from nbchat.server import serve

    api_key = args.api_key or os.environ.get("NBCHAT_API_KEY") or None
    if args.host not in _LOOPBACK_HOSTS and api_key is None:
        print(
            f"nbchat serve: warning: binding {args.host} with no API key: anyone who can reach this machine "
            "can use the model. Pass --api-key KEY or set NBCHAT_API_KEY.",
            file=sys.stderr,
        )
    return serve(args.model, host=args.host, port=args.port, api_key=api_key, dtype=args.dtype,
                 access_log=args.access_log)


if __name__ == "__main__":
    sys.exit(main())
