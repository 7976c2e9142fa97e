"""Chat panel benchmark: what the front end gets from the kernel side of the panel.

    python -m benchmarks.panel [--model NAME_OR_PATH] [--max-tokens 128] [--repeats 3]
                               [--output benchmarks/results/panel.json]

Runs ``ChatPanel.send`` in an IPython shell (the engine loaded and compiled first) and records each
custom message a front end would receive. Reports the time from Send to the first streamed text
(the first delta message), the redraw rate while streaming (delta messages a second; the panel caps
it at ~15) against the decode rate (tokens a second), and the bytes sent per redraw (the text added
plus the current message's HTML, never the transcript). The browser test records the same times as
the page sees them (tests/browser/output/.../panel-timings.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "panel.json"
PROMPT = "Write a long story about a dragon who learns to program. Use several paragraphs."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: the default model)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    import anywidget
    from IPython.core.interactiveshell import InteractiveShell

    from nbchat.models import DEFAULT_MODEL
    from nbchat.notebook.panel import ChatPanel

    model = args.model or DEFAULT_MODEL
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbchat")
    shell.run_line_magic("config", f"ChatMagics.model = {model!r}")
    shell.run_line_magic("config", "ChatMagics.temperature = 0.0")
    shell.run_line_magic("config", f"ChatMagics.max_tokens = {args.max_tokens}")

    received: list[tuple[float, dict]] = []
    def record(self, message, buffers=None):  # what the front end would receive, when
        received.append((time.perf_counter(), message))

    anywidget.AnyWidget.send = record
    panel = ChatPanel(shell=shell)
    panel.send("Hi")  # load and compile outside the measurement

    runs = []
    for repeat in range(args.repeats):
        panel.new_chat()
        received.clear()
        sent_at = time.perf_counter()
        # A new prompt each time: no cached prefix beyond the chat template.
        panel.send(f"Story {repeat + 1}. {PROMPT}")
        deltas = [(at, message) for at, message in received if message["kind"] == "delta"]
        first, last = deltas[0][0], deltas[-1][0]
        usage = panel._conversation.turns[-1].usage or {}
        streamed = last - first
        runs.append({
            "send_to_first_token_ms": (first - sent_at) * 1000,
            "redraws": len(deltas),
            "redraws_per_s": (len(deltas) - 1) / streamed if streamed > 0 else None,
            "tokens_per_s": (usage.get("completion_tokens", 0) - 1) / streamed if streamed > 0 else None,
            "bytes_per_redraw": statistics.mean(len(json.dumps(message)) for _, message in deltas),
        })

    summary = {key: statistics.median(run[key] for run in runs if run[key] is not None) for key in runs[0]}
    print(f"panel on {model}, {args.max_tokens} tokens, median of {args.repeats}")
    print(f"{'measure':<26}{'value':>10}")
    for key, value in summary.items():
        print(f"{key:<26}{value:>10.1f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": model, "max_tokens": args.max_tokens, "runs": runs,
                                       "median": summary}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
