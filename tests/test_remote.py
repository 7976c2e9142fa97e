"""RemoteEngine (the openai client behind the notebook's engine interface) and the magics' URL
handling, against a real `nbchat serve` of the tiny model on loopback.
"""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from nbchat.errors import EndpointError, InvalidRequestError
from nbchat.models import DEFAULT_MODEL
from nbchat.notebook.engines import backend_model
from nbchat.remote import RemoteEngine, api_key_and_source, mask_key, split_endpoint
from tests.serving import free_port

HI = [{"role": "user", "content": "Hello! How are you today?"}]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("http://h:8000/v1", (None, "http://h:8000/v1")), ("https://h/v1/", (None, "https://h/v1")),
     ("m@http://h:8000/v1", ("m", "http://h:8000/v1")), ("org/m@https://h/v1", ("org/m", "https://h/v1")),
     ("smollm2-135m-instruct", None), ("./models/x.gguf", None), ("user@host", None)],
)
def test_split_endpoint(model, expected):
    assert split_endpoint(model) == expected


def test_base_url_serves_models_that_are_not_urls():
    assert backend_model(DEFAULT_MODEL, None) == DEFAULT_MODEL
    assert backend_model(DEFAULT_MODEL, "http://h/v1") == "http://h/v1"
    assert backend_model("llama", "http://h/v1") == "llama@http://h/v1"
    assert backend_model("m@http://other/v1", "http://h/v1") == "m@http://other/v1"


def test_keys_come_from_the_caller_then_the_environment_and_show_masked(monkeypatch):
    monkeypatch.delenv("NBCHAT_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert api_key_and_source(None) == (None, "none")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-key-0000")
    assert api_key_and_source(None) == ("sk-openai-key-0000", "OPENAI_API_KEY")
    monkeypatch.setenv("NBCHAT_API_KEY", "sk-nbchat-key-1111")
    assert api_key_and_source(None) == ("sk-nbchat-key-1111", "NBCHAT_API_KEY")
    assert api_key_and_source("sk-given") == ("sk-given", "config")
    assert mask_key("sk-nbchat-key-1111") == "sk-...1111"
    assert mask_key("short") == "*****" and mask_key(None) is None


@pytest.fixture(scope="module")
def remote(tiny_server):
    return RemoteEngine(tiny_server.base_url, api_key=tiny_server.api_key)


def test_streams_what_the_openai_client_gets(remote, tiny_server, tiny_model_dir):
    assert remote.models() == [tiny_model_dir.name] and remote.model == tiny_model_dir.name
    request = dict(messages=HI, temperature=0, max_tokens=8)
    expected = tiny_server.client().chat.completions.create(model=tiny_model_dir.name, **request)
    stream = remote.chat.completions.create(**request, stream=True, stream_options={"include_usage": True},
                                            top_k=4)  # top_k is no openai parameter: sent in the body
    with stream:
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        expected.choices[0].message.content)
    assert chunks[-1].usage.model_dump() == expected.usage.model_dump()


def test_render_prompt_is_the_servers_prompt(remote):
    text, ids = remote.render_prompt(HI)
    assert text == "<|im_start|>user\nHello! How are you today?<|im_end|>\n<|im_start|>assistant\n"
    assert len(ids) == remote.chat.completions.create(messages=HI, max_tokens=1).usage.prompt_tokens


def test_a_bad_request_is_the_servers_invalid_request_error(remote):
    with pytest.raises(InvalidRequestError) as raised:
        remote.chat.completions.create(messages=HI, temperature=7, stream=True)
    assert raised.value.param == "temperature" and raised.value.code == "invalid_value"
    assert "\n" not in str(raised.value)


def test_endpoint_failures_are_one_line_endpoint_errors(tiny_server):
    with pytest.raises(EndpointError, match=r"refused the API key \(401\)"):
        RemoteEngine(tiny_server.base_url, api_key="sk-wrong").models()
    with pytest.raises(EndpointError, match=r"answered 404: The model 'nope'"):
        RemoteEngine(tiny_server.base_url, model="nope", api_key=tiny_server.api_key).chat.completions.create(
            messages=HI)
    with pytest.raises(EndpointError, match=r"cannot reach http://127.0.0.1:\d+/v1 \(ConnectError"):
        RemoteEngine(f"http://127.0.0.1:{free_port()}/v1").models()


# --- the magics with endpoints --------------------------------------------------------------------


@pytest.fixture
def magics():
    shell = InteractiveShell.instance()
    loaded_before = "ChatMagics" in shell.magics_manager.registry
    shell.run_line_magic("load_ext", "nbchat")
    magics = shell.magics_manager.registry["ChatMagics"]
    saved = {name: getattr(magics, name) for name in ("model", "base_url", "api_key")}
    saved_conversations = dict(magics.conversations)
    yield shell, magics
    for name, value in saved.items():
        setattr(magics, name, value)
    magics.conversations = saved_conversations
    if not loaded_before:
        shell.run_line_magic("unload_ext", "nbchat")


def test_model_url_checks_the_endpoint_before_switching(magics, tiny_server, tiny_model_dir, capsys):
    shell, chat = magics
    before = chat.model
    with pytest.raises(UsageError, match="refused the API key"):
        chat._cmd_model(f"{tiny_server.base_url} --api-key sk-wrong")
    with pytest.raises(UsageError, match=f"does not serve 'nope'; it serves: {tiny_model_dir.name}"):
        chat._cmd_model(f"nope@{tiny_server.base_url} --api-key {tiny_server.api_key}")
    assert chat.model == before  # nothing changed by a failed switch
    chat._cmd_model(f"{tiny_model_dir.name}@{tiny_server.base_url} --api-key {tiny_server.api_key}")
    assert chat.model == f"{tiny_model_dir.name}@{tiny_server.base_url}"
    assert chat.api_key == tiny_server.api_key
    assert "remote endpoint" in capsys.readouterr().out
    with pytest.raises(UsageError, match="--api-key is for a remote endpoint"):
        chat._cmd_model("smollm2-135m-instruct --api-key x")


def test_base_url_sends_chats_to_the_endpoint(magics, tiny_server, tiny_model_dir):
    shell, chat = magics
    chat.base_url, chat.api_key, chat.model = tiny_server.base_url, tiny_server.api_key, DEFAULT_MODEL
    reply = chat._chat_cell("--new --max-tokens 3 -t 0", "Hello!")
    assert reply.usage["completion_tokens"] >= 1
    assert isinstance(chat._engine_for(chat.model), RemoteEngine)
