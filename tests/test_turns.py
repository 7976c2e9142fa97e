"""The turn runner (nbchat.turns) on the real Engine and the tiny model: a turn streams into its
observer, a stop from another thread ends it at the next chunk with the partial reply kept, and the
gate lets one turn run at a time."""

from __future__ import annotations

import threading

import pytest

from nbchat.errors import InvalidRequestError
from nbchat.tools import ToolRegistry
from nbchat.turns import TurnControl, TurnGate, run_turn


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from nbchat.api import Engine

    return Engine(model=str(tiny_model_dir)).load()


class Recorder:
    """A TurnObserver that keeps what it is told; ``on_append`` runs after each delta."""

    def __init__(self, on_append=None):
        self.deltas: list[str] = []
        self.finished: dict | None = None
        self.discarded = False
        self.on_append = on_append

    def start(self, metadata=None):
        self.metadata = metadata

    def append(self, delta):
        self.deltas.append(delta)
        if self.on_append:
            self.on_append(self)

    def tool_call_delta(self, index, *, name=None, arguments=""):
        raise AssertionError("no tools offered")

    def end_step(self):
        return []

    def show_call(self, call):
        pass

    def warn(self, message):
        raise AssertionError(message)

    def discard(self):
        self.discarded = True

    def finish(self, *, interrupted=False, truncated=False, metadata=None):
        self.finished = {"interrupted": interrupted, "metadata": metadata}


def request(max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": "Hello"}], "stream": True, "max_tokens": max_tokens,
            "temperature": 0.0, "stream_options": {"include_usage": True}}


def test_a_turn_streams_into_its_observer(engine):
    observer = Recorder()
    exchange = run_turn(lambda r: engine.chat.completions.create(**r), request(8), observer, ToolRegistry(),
                        metadata={"turn": 0})
    text = "".join(observer.deltas)
    assert exchange.reply == [{"role": "assistant", "content": text}]
    assert exchange.usage["completion_tokens"] <= 8 and not exchange.last.interrupted
    assert observer.finished["metadata"]["nbchat"]["finish_reason"] == exchange.last.finish_reason


def test_a_stop_from_another_thread_ends_the_turn_at_the_next_chunk(engine):
    control = TurnControl()
    chunks_after_stop: list[int] = []

    def stop_after_three(observer):
        if len(observer.deltas) == 3:
            threading.Thread(target=control.stop).start()
            threading.Event().wait(0.2)  # the stop has landed before the next chunk is read
        elif control.stopped:
            chunks_after_stop.append(len(observer.deltas))

    observer = Recorder(stop_after_three)
    exchange = run_turn(lambda r: engine.chat.completions.create(**r), request(200), observer, ToolRegistry(),
                        control=control)
    assert exchange.last.interrupted and observer.finished["interrupted"]
    assert len(observer.deltas) == 3 and not chunks_after_stop
    assert exchange.reply[0]["content"] == "".join(observer.deltas)  # the partial reply is kept


def test_a_first_request_error_propagates_and_discards(engine):
    observer = Recorder()
    bad = {**request(8), "max_tokens": 10**6}
    with pytest.raises(InvalidRequestError):
        run_turn(lambda r: engine.chat.completions.create(**r), bad, observer, ToolRegistry())
    assert observer.discarded and observer.finished is None


def test_the_gate_runs_one_turn_at_a_time_and_an_interrupt_while_waiting_stops_the_runner():
    gate, control = TurnGate(), TurnControl()
    assert gate.acquire(control=control) and gate.busy
    waits: list[str] = []

    def interrupted_wait():
        waits.append("waiting")
        raise KeyboardInterrupt

    assert gate.acquire(on_wait=interrupted_wait) is False
    assert waits == ["waiting"] and control.stopped
    gate.release(control)
    assert not gate.busy and gate.acquire() and not gate.stop_all()
    gate.release()
