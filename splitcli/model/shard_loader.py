"""Build the edge half from edge.safetensors alone, and the cloud half from cloud.safetensors alone.

The model skeleton is created on the meta device from the shard directory's config.json, so no
float weights exist until a shard fills them: the edge process holds exactly its shard's tensors
(minus 24 bytes of qmeta per quantized module, which are read and dropped), and the cloud's
layers stay on meta in the edge process (and vice versa). Rotary tables are recomputed on the CPU.

Checks, each a one-line SplitLLMError: manifest format version; the caller's expected model hash
and ℓ; the shard's size and sha256 against the manifest (truncated / tampered); the shard's own
metadata (role, version, model hash, ℓ); and the exact set of tensors the manifest implies.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SplitLLMError
from .loader import _load_errors, _quiet_transformers, file_sha256
from .safetensors_io import read_header, read_tensors
from .shards import CLOUD_FILE, EDGE_FILE, SHARD_FORMAT_VERSION, Manifest, decode_metadata, read_manifest, shard_metadata
from .split import CloudHalf, EdgeHalf, decoder_parts


class QuantEdgeHalf(EdgeHalf):
    """EdgeHalf whose KV cache is quantized at the manifest's kv_bits (16 = float cache)."""

    def __init__(self, parts, split_layer: int, kv_bits: int = 16):
        super().__init__(parts, split_layer)
        self.kv_bits = kv_bits

    def new_cache(self):
        if self.kv_bits == 16:
            return super().new_cache()
        from ..quant import KVQuantConfig, QuantizedKVCache

        return QuantizedKVCache(KVQuantConfig(bits=self.kv_bits))


@dataclass
class ShardHalf:
    """A half loaded from a shard directory: the runnable half, its manifest and skeleton model."""

    half: object  # QuantEdgeHalf or CloudHalf
    manifest: Manifest
    model: nn.Module  # skeleton; tensors outside this half stay on the meta device
    shard_dir: Path


def check_manifest(manifest: Manifest, shard_dir: Path, split_layer: int | None = None,
                   model_sha256: str | None = None) -> None:
    if model_sha256 is not None and model_sha256 != manifest.model_sha256:
        raise SplitLLMError(
            f"{shard_dir} was quantized from a different model (sha256 {manifest.model_sha256[:12]}…, "
            f"this model is {model_sha256[:12]}…)"
        )
    if split_layer is not None and split_layer != manifest.split_layer:
        raise SplitLLMError(
            f"{shard_dir} is split at ℓ={manifest.split_layer}, not {split_layer}: re-run `splitllm quantize` "
            f"or drop --split-layer"
        )


def _check_file(path: Path, manifest: Manifest, role: str) -> None:
    want = manifest.files.get(path.name)
    if not path.is_file():
        raise SplitLLMError(f"{path} is missing")
    if not isinstance(want, dict):
        raise SplitLLMError(f"manifest has no entry for {path.name}")
    size = path.stat().st_size
    if size != want.get("bytes"):
        raise SplitLLMError(f"{path} is {size} bytes, the manifest says {want.get('bytes')} (truncated or replaced)")
    if file_sha256(path) != want.get("sha256"):
        raise SplitLLMError(f"{path} does not match the sha256 in its manifest (corrupt or tampered)")
    meta = decode_metadata(read_header(path)[1])
    expect = shard_metadata(role, manifest.model_sha256, manifest.split_layer)
    if meta.get("format_version") != str(SHARD_FORMAT_VERSION) or meta.get("format") != expect["format"]:
        raise SplitLLMError(f"{path} is not a version-{SHARD_FORMAT_VERSION} splitllm {role} shard")
    for key in ("model_sha256", "split_layer"):
        if meta.get(key) != expect[key]:
            raise SplitLLMError(f"{path} was written for {key}={meta.get(key)}, its manifest says {expect[key]}")


def skeleton(shard_dir: Path):
    """The model from the directory's config.json, every parameter on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_transformers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = AutoConfig.from_pretrained(str(shard_dir), local_files_only=True)
        except _load_errors() as e:
            raise SplitLLMError(f"cannot read {shard_dir}/config.json: {str(e).splitlines()[0][:200]}") from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    # Non-persistent buffers (rotary inv_freq) are computed, never stored: rebuild them on the CPU.
    rot = model.model.rotary_emb
    model.model.rotary_emb = type(rot)(config=model.config)
    return model


def _load_into(module: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    from ..quant import load_quantized_

    try:
        load_quantized_(module, sd)
    except (RuntimeError, ValueError) as e:  # shape mismatches from load_state_dict
        raise SplitLLMError(f"{where} does not fit the model in config.json: {str(e).splitlines()[0][:160]}") from None


def _split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}


def _assert_real(modules, where: str) -> None:
    for m in modules:
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.is_meta:
                raise SplitLLMError(f"{where}: {name} was not filled from the shard (unsupported model layout)")


def _open_shard(shard_dir: Path, file: str, kind: str, split_layer, model_sha256):
    """Check the manifest and one shard file, build the meta skeleton, read the shard's tensors."""
    manifest = read_manifest(shard_dir)
    check_manifest(manifest, shard_dir, split_layer, model_sha256)
    path = shard_dir / file
    _check_file(path, manifest, kind)
    model = skeleton(shard_dir)
    n_layers = decoder_parts(model).num_layers
    if n_layers != manifest.num_layers:
        raise SplitLLMError(f"config.json has {n_layers} layers, the manifest {manifest.num_layers}")
    tensors, _ = read_tensors(path)
    return manifest, path, model, tensors


def load_edge(shard_dir: Path, split_layer: int | None = None, model_sha256: str | None = None) -> ShardHalf:
    """The edge half from DIR/edge.safetensors (+ config.json); never opens cloud.safetensors."""
    shard_dir = Path(shard_dir)
    manifest, path, model, tensors = _open_shard(shard_dir, EDGE_FILE, "edge", split_layer, model_sha256)
    holder = nn.Module()
    holder.embed_tokens = model.model.embed_tokens
    embed = {f"embed_tokens.{k}": v for k, v in _split_prefix(tensors, "model.embed_tokens.").items()}
    _load_into(holder, embed, f"{path} (embedding)")
    model.model.embed_tokens = holder.embed_tokens  # untied: lm_head keeps the meta original
    for i in manifest.edge_layers():
        sd = _split_prefix(tensors, f"model.layers.{i}.")
        if not sd:
            raise SplitLLMError(f"{path} lacks layer {i}, which its manifest says the edge keeps")
        _load_into(model.model.layers[i], sd, f"{path} (layer {i})")
    if tensors:
        raise SplitLLMError(f"{path} holds tensors its manifest does not explain, e.g. {sorted(tensors)[0]}")
    parts = decoder_parts(model)
    kept = [parts.layers[i] for i in manifest.edge_layers()]
    _assert_real([parts.embed_tokens, parts.rotary_emb, *kept], str(path))
    return ShardHalf(QuantEdgeHalf(parts, manifest.split_layer, manifest.kv_bits), manifest, model, shard_dir)


def load_cloud(shard_dir: Path, split_layer: int | None = None, model_sha256: str | None = None) -> ShardHalf:
    """The cloud half from DIR/cloud.safetensors (+ config.json); never opens edge.safetensors."""
    shard_dir = Path(shard_dir)
    manifest, path, model, tensors = _open_shard(shard_dir, CLOUD_FILE, "cloud", split_layer, model_sha256)
    for i in range(manifest.split_layer, manifest.num_layers):
        sd = _split_prefix(tensors, f"model.layers.{i}.")
        if not sd:
            raise SplitLLMError(f"{path} lacks layer {i}, which the cloud runs at ℓ={manifest.split_layer}")
        _load_into(model.model.layers[i], sd, f"{path} (layer {i})")
    _load_into(model.model.norm, _split_prefix(tensors, "model.norm."), f"{path} (final norm)")
    _load_into(model.get_output_embeddings(), _split_prefix(tensors, "lm_head."), f"{path} (LM head)")
    if tensors:
        raise SplitLLMError(f"{path} holds tensors its manifest does not explain, e.g. {sorted(tensors)[0]}")
    parts = decoder_parts(model)
    cloud_layers = [parts.layers[i] for i in range(manifest.split_layer, manifest.num_layers)]
    _assert_real([parts.norm, parts.lm_head, parts.rotary_emb, *cloud_layers], str(path))
    return ShardHalf(CloudHalf(parts, manifest.split_layer), manifest, model, shard_dir)


def resident_bytes(module: nn.Module) -> int:
    """Bytes of every non-meta parameter and buffer (each storage once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_meta or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


def load_tokenizer(shard_dir: Path):
    from transformers import AutoTokenizer

    _quiet_transformers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoTokenizer.from_pretrained(str(shard_dir), local_files_only=True)
        except _load_errors() as e:
            raise SplitLLMError(f"cannot load the tokenizer from {shard_dir}: {str(e).splitlines()[0][:200]}") from None
