"""A kernel interrupt stops the chat panel's reply, in a real IPython kernel (jupyter_client): while
the kernel is idle (the reply runs off the main thread), and while a ``%%chat`` cell waits for it.

The kernel runs the tiny model; its streams are slowed (each chunk 50 ms) so a reply is still
running when the interrupt comes.
"""

from __future__ import annotations

import time

import pytest

from nbchat.notebook.run import kernel_manager

SLOW_STREAMS = """
import time
magics = get_ipython().magics_manager.registry["ChatMagics"]
real_open = magics._open_stream

def slow_open(engine, request):
    stream = real_open(engine, request)
    class Slow:
        def __iter__(self):
            for chunk in stream:
                time.sleep(0.05)
                yield chunk
        def close(self):
            stream.close()
    return Slow()

magics._open_stream = slow_open
"""


@pytest.fixture
def kernel(tmp_path, tiny_model_dir):
    manager = kernel_manager(tmp_path)
    manager.start_kernel(cwd=str(tmp_path))
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    run = Runner(client)
    run(f"%load_ext nbchat\n%config ChatMagics.model = {str(tiny_model_dir)!r}\n"
        "%config ChatMagics.max_tokens = 400\n%config ChatMagics.temperature = 0.0")
    run(SLOW_STREAMS)
    run("import nbchat\npanel = nbchat.ChatPanel()\npanel.send('Warm up')")  # loads and compiles
    yield manager, run
    client.stop_channels()
    manager.shutdown_kernel(now=True)


class Runner:
    """Runs code in the kernel and returns its stdout (a failure raises with the traceback)."""

    def __init__(self, client):
        self.client = client

    def __call__(self, code: str, *, interrupt_after: float | None = None, manager=None) -> str:
        msg_id = self.client.execute(code)
        started = time.monotonic()
        out: list[str] = []
        interrupted = False
        while True:
            due = interrupt_after is not None and time.monotonic() - started > interrupt_after
            if due and not interrupted:
                manager.interrupt_kernel()
                interrupted = True
            try:
                message = self.client.get_iopub_msg(timeout=0.2)
            except Exception:  # queue.Empty: nothing yet
                assert time.monotonic() - started < 120, "the kernel did not answer"
                continue
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream" and content["name"] == "stdout":
                out.append(content["text"])
            elif kind == "error":
                raise AssertionError("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(out)


def test_an_interrupt_while_the_kernel_is_idle_stops_the_panel_reply(kernel):
    manager, run = kernel
    run("panel.send('Tell me a long story', wait=False)\ntime.sleep(0.5)")
    assert run("print(panel.busy)").strip() == "True"  # idle kernel, reply still streaming
    manager.interrupt_kernel()
    out = run(
        "panel._worker.join(5)\nturn = panel._conversation.turns[-1]\n"
        "print(panel.busy, turn.interrupted, len(turn.reply_text) > 0)"
    )
    assert out.strip() == "False True True"


def test_an_interrupt_while_a_cell_waits_stops_both(kernel):
    manager, run = kernel
    run("panel.send('Another long story', wait=False)")
    out = run("%%chat\nAre you there?", interrupt_after=1.0, manager=manager)
    assert "Waiting for the chat panel's reply to finish..." in out
    assert "Interrupted: the chat panel's reply was stopped (and kept); this cell did not run." in out
    out = run("panel._worker.join(5)\nturns = panel._conversation.turns\n"
              "print(len(turns), turns[-1].interrupted, panel.busy)")
    assert out.strip() == "2 True False"
