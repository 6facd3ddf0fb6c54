"""Edge/cloud shard directories written by `splitllm quantize` (OPSC, paper eq. (1)).

DIR/edge.safetensors   what the edge runs: the embedding (8-bit, one group per row, or float32 at
                       16) and the decoder layers the OPSC assignment keeps, quantized in the
                       portable format of splitcli.quant (norm weights stay float32). With
                       Qw2 = none that is exactly layers [0, ℓ); with Qw2 set, every layer the
                       assignment gives bits, so the edge could move its split point later.
DIR/cloud.safetensors  full-precision float32 layers [ℓ, L) + final norm + LM head (untied from
                       the embedding: the edge's quantized embedding copy never feeds the head).
DIR/manifest.yaml      see `Manifest`.
DIR/config.json, tokenizer files, generation_config.json, chat_template.jinja
                       copied byte for byte from the source model directory, so DIR is
                       self-contained: a device needs nothing but DIR (choice documented in the
                       README). Rotary tables are not stored; they are computed from config.json.

Tensor names follow the Hugging Face model (`model.layers.3.mlp.up_proj.codes`, `lm_head.weight`).
Each shard's safetensors metadata repeats the format version, role, model hash and ℓ, so a shard
paired with the wrong manifest is refused even before its hash is compared.
Writing is deterministic: round-to-nearest quantization, sorted names, no timestamps.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..configio import io_reason
from ..errors import SplitLLMError
from .loader import file_sha256
from .safetensors_io import payload_bytes

# 2: int4 weights are stored as portable codes on every CPU. Version-1 shards written on a CPU
# without AVX-512 hold codes scrambled by that CPU's int4 kernel layout, and nothing in their bytes
# tells, so version 1 is refused outright.
# 3: 8-bit weights are per-output-channel symmetric int8 (the int8 kernel's format, Int8Linear)
# instead of group-wise asymmetric codes, which only a dequantize-per-call layer could run.
SHARD_FORMAT_VERSION = 3
_OLD_VERSIONS = {
    1: "its int4 weights may be laid out for the CPU that wrote them, and corrupt on any other",
    2: "its 8-bit weights are group-wise codes; 8-bit weights are now per-channel int8 for the int8 kernel",
}
EDGE_FILE, CLOUD_FILE, MANIFEST_FILE = "edge.safetensors", "cloud.safetensors", "manifest.yaml"
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json",
)
EMBED_BITS = (8, 16)
KV_BITS = (16, 8, 4)


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize. back_bits None = the edge keeps no layer beyond the OPSC front part;
    l_w None = ℓ. 16 bits anywhere means "keep in float32" (the runtime's precision).
    split_layer / group_size None = the model's defaults (L // 2; the widest of 128 / 64 that
    divides every layer width), filled in by `resolved` once the model is known."""

    split_layer: int | None
    front_bits: int = 4
    back_bits: int | None = None
    l_w: int | None = None
    method: str = "front"
    group_size: int | None = 64
    embed_bits: int = 8
    kv_bits: int = 16

    def __post_init__(self):
        from ..quant import KEEP_BITS, SUPPORTED_BITS

        allowed = SUPPORTED_BITS + (KEEP_BITS,)
        if self.front_bits not in allowed or (self.back_bits is not None and self.back_bits not in allowed):
            raise SplitLLMError(f"weight bits must be one of {allowed} (back bits may be 'none')")
        if self.method not in ("front", "back"):
            raise SplitLLMError(f"--method must be 'front' or 'back', got {self.method!r}")
        if self.group_size is not None and self.group_size < 1:
            raise SplitLLMError(f"--group-size must be positive, got {self.group_size}")
        if self.embed_bits not in EMBED_BITS:
            raise SplitLLMError(f"--embed-bits must be one of {EMBED_BITS}, got {self.embed_bits}")
        if self.kv_bits not in KV_BITS:
            raise SplitLLMError(f"--kv-bits must be one of {KV_BITS}, got {self.kv_bits}")

    @property
    def lw(self) -> int:
        return self.split_layer if self.l_w is None else self.l_w

    @classmethod
    def from_plan(cls, plan) -> "QuantSpec":
        """The shards a `splitcli.plan.schema.Plan` describes."""
        return cls(plan.split_layer, plan.q_w1, plan.q_w2, plan.l_w, plan.method, plan.group_size,
                   plan.embed_bits, plan.qa)

    def resolved(self, parts) -> "QuantSpec":
        """Model-dependent defaults filled in from the model's decoder parts, then validated."""
        from ..quant import default_group_size, layer_shapes_of

        ell = parts.num_layers // 2 if self.split_layer is None else self.split_layer
        group = default_group_size(layer_shapes_of(parts.layers[0])) if self.group_size is None else self.group_size
        spec = replace(self, split_layer=ell, group_size=group)
        spec.layer_bits(parts.num_layers)  # validates ℓ, ℓw and coverage before any work
        return spec

    def layer_bits(self, num_layers: int) -> list[int | None]:
        """Bits of every layer (None = not on the edge); the edge's own layers [0, ℓ) must be kept."""
        from ..quant import opsc_bits
        from .split import validate_split_layer

        validate_split_layer(self.split_layer, num_layers)
        bits = opsc_bits(num_layers, self.lw, self.front_bits, self.back_bits, self.method)
        dropped = [i for i in range(self.split_layer) if bits[i] is None]
        if dropped:
            raise SplitLLMError(
                f"the edge runs layers [0, {self.split_layer}) but this OPSC assignment keeps no copy of layers "
                f"{dropped[0]}..{dropped[-1]}: raise --lw or give --back-bits"
            )
        return bits


def check_shard_version(version, where: str) -> None:
    if version == SHARD_FORMAT_VERSION:
        return
    why = f" ({_OLD_VERSIONS[version]})" if version in _OLD_VERSIONS else ""
    raise SplitLLMError(
        f"{where}: shard format version {version!r} is not supported{why}; this splitllm reads version "
        f"{SHARD_FORMAT_VERSION}: re-run `splitllm quantize`"
    )


@dataclass(frozen=True)
class Manifest:
    """manifest.yaml. `files` maps a shard name to {"bytes": file size, "sha256": hex}."""

    model_id: str
    model_sha256: str
    num_layers: int
    split_layer: int
    l_w: int
    method: str
    front_bits: int
    back_bits: int | None
    layer_bits: tuple  # per layer, None = not on the edge
    group_size: int
    embed_bits: int
    kv_bits: int
    files: dict = field(default_factory=dict)
    format_version: int = SHARD_FORMAT_VERSION

    def __post_init__(self):
        check_shard_version(self.format_version, "manifest")
        if len(self.layer_bits) != self.num_layers:
            raise SplitLLMError(f"manifest lists bits for {len(self.layer_bits)} layers, not {self.num_layers}")
        if not 1 <= self.split_layer < self.num_layers:
            raise SplitLLMError(f"manifest split layer {self.split_layer} is outside 1..{self.num_layers - 1}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.split_layer, self.front_bits, self.back_bits, self.l_w, self.method,
                         self.group_size, self.embed_bits, self.kv_bits)

    def edge_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.layer_bits) if b is not None]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_bits"] = list(self.layer_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Manifest":
        if not isinstance(d, dict):
            raise SplitLLMError(f"{where} is not a splitllm manifest (expected a mapping)")
        check_shard_version(d.get("format_version"), where)
        try:
            return cls(**{**d, "layer_bits": tuple(d["layer_bits"])})
        except (TypeError, KeyError) as e:
            raise SplitLLMError(f"{where} is malformed: {e}") from None


def read_manifest(shard_dir: Path) -> Manifest:
    import yaml

    path = Path(shard_dir) / MANIFEST_FILE
    try:
        if not path.is_file():
            raise SplitLLMError(f"{shard_dir} holds no {MANIFEST_FILE}: expected a directory written by `splitllm quantize`")
        text = path.read_text(encoding="utf-8")
    except OSError as e:  # a name too long, EIO, a permission denied...
        raise SplitLLMError(f"cannot read {path}: {io_reason(e)}") from None
    except UnicodeDecodeError as e:
        raise SplitLLMError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SplitLLMError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError as e:  # a hostile file nested past the interpreter's limit
        raise SplitLLMError(f"{path} is not a splitllm manifest: {io_reason(e)}") from None
    return Manifest.from_dict(raw, str(path))


def shard_metadata(role: str, model_sha256: str, split_layer: int) -> dict[str, str]:
    return {"format": f"splitllm-{role}", "format_version": str(SHARD_FORMAT_VERSION),
            "model_sha256": model_sha256, "split_layer": str(split_layer)}


def encode_metadata(meta: dict[str, str]) -> dict[str, str]:
    """One key holding sorted JSON: safetensors writes its metadata map in hash order, which
    changes between runs, so several keys would make otherwise identical files differ."""
    return {"splitllm": json.dumps(meta, sort_keys=True)}


def decode_metadata(raw: dict[str, str]) -> dict[str, str]:
    try:
        meta = json.loads(raw.get("splitllm", "{}"))
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


# ---------------------------------------------------------------- what goes into each shard

def edge_state_dict(parts, spec: QuantSpec, progress=None) -> dict[str, torch.Tensor]:
    """The edge shard's tensors. Quantizes copies: the model itself is left untouched."""
    from ..quant import QuantEmbedding, quantize_layers_, quantized_state_dict

    bits = spec.layer_bits(parts.num_layers)
    emb = parts.embed_tokens
    if spec.embed_bits == 16:
        out = {"model.embed_tokens.weight": emb.weight.detach().float().contiguous().clone()}
    else:
        holder = nn.Module()
        holder.embed_tokens = QuantEmbedding.from_embedding(emb, bits=spec.embed_bits)  # one group per row
        out = {f"model.{k}": v for k, v in quantized_state_dict(holder).items()}
    kept = [i for i, b in enumerate(bits) if b is not None]
    for n, i in enumerate(kept):
        layer = nn.ModuleList([copy.deepcopy(parts.layers[i])])
        quantize_layers_(layer, [0], bits[i], spec.group_size, use_int4_kernel=True)
        for k, v in quantized_state_dict(layer).items():
            out[f"model.layers.{i}.{k[2:]}"] = v.contiguous()
        if progress:
            progress(n + 1, len(kept), f"edge layer {i} at {bits[i]} bits")
    return out


def cloud_state_dict(parts, split_layer: int) -> dict[str, torch.Tensor]:
    """Float32 layers [ℓ, L) + final norm + LM head (cloned: no storage shared with the embedding)."""
    out = {}
    for i in range(split_layer, parts.num_layers):
        for k, v in parts.layers[i].state_dict().items():
            out[f"model.layers.{i}.{k}"] = v.detach().contiguous().clone()
    for k, v in parts.norm.state_dict().items():
        out[f"model.norm.{k}"] = v.detach().contiguous().clone()
    for k, v in parts.lm_head.state_dict().items():
        out[f"lm_head.{k}"] = v.detach().contiguous().clone()
    return out


def predicted_edge_bytes(parts, spec: QuantSpec) -> int:
    """Eq. (1) over the edge's kept layers + the embedding: the edge shard's exact payload."""
    from ..quant import layer_shapes_of, layer_weight_bytes, quantized_matrix_bytes

    emb = parts.embed_tokens.weight
    v, d = emb.shape
    total = v * d * 4 if spec.embed_bits == 16 else quantized_matrix_bytes(v, d, spec.embed_bits, d)
    for i, b in enumerate(spec.layer_bits(parts.num_layers)):
        total += layer_weight_bytes(layer_shapes_of(parts.layers[i]), b, spec.group_size)
    return total


def predicted_cloud_bytes(parts, split_layer: int) -> int:
    from ..quant import layer_shapes_of, layer_weight_bytes

    total = sum(layer_weight_bytes(layer_shapes_of(parts.layers[i]), 16, 64) for i in range(split_layer, parts.num_layers))
    return total + 4 * sum(t.numel() for m in (parts.norm, parts.lm_head) for t in m.state_dict().values())


# ---------------------------------------------------------------- writing

def check_out_dir(out: Path, force: bool) -> None:
    """Refuse a file, or a non-empty directory without --force (checked before any long work)."""
    if out.exists() and not out.is_dir():
        raise SplitLLMError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SplitLLMError(f"{out} already exists and is not empty: pass --force to overwrite its files")
    if not out.exists() and not out.parent.is_dir():
        raise SplitLLMError(f"directory {out.parent} does not exist")


def _save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(dict(sorted(tensors.items())), str(tmp), metadata=encode_metadata(meta))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; follow the user's umask like the rest of DIR
    tmp.replace(path)


def write_shards(lm, model_dir: Path, spec: QuantSpec, out: Path, force: bool = False, progress=None) -> Manifest:
    """Quantize `lm` (a LoadedModel read from `model_dir`) into `out`; returns the manifest written.

    progress(done, total, description) is called as the work advances.
    """
    import yaml

    from .split import decoder_parts

    check_out_dir(out, force)
    parts = decoder_parts(lm.model)
    bits = spec.layer_bits(parts.num_layers)
    if spec.kv_bits != 16 and any(t != "full_attention" for t in parts.layer_types[: spec.split_layer]):
        raise SplitLLMError("--kv-bits 8/4 supports full-attention edge layers only; use --kv-bits 16")
    out.mkdir(exist_ok=True)
    n_kept = sum(b is not None for b in bits)
    total = n_kept + 3
    edge = edge_state_dict(parts, spec, progress=lambda n, _, d: progress and progress(n, total, d))
    _save(edge, out / EDGE_FILE, shard_metadata("edge", lm.sha256, spec.split_layer))
    del edge
    if progress:
        progress(n_kept + 1, total, "cloud layers")
    _save(cloud_state_dict(parts, spec.split_layer), out / CLOUD_FILE, shard_metadata("cloud", lm.sha256, spec.split_layer))
    if progress:
        progress(n_kept + 2, total, "config and tokenizer")
    for name in COPIED_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copyfile(Path(model_dir) / name, out / name)
    files = {n: {"bytes": (out / n).stat().st_size, "sha256": file_sha256(out / n)} for n in (EDGE_FILE, CLOUD_FILE)}
    manifest = Manifest(
        model_id=lm.model_id, model_sha256=lm.sha256, num_layers=parts.num_layers,
        split_layer=spec.split_layer, l_w=spec.lw, method=spec.method, front_bits=spec.front_bits,
        back_bits=spec.back_bits, layer_bits=tuple(bits), group_size=spec.group_size,
        embed_bits=spec.embed_bits, kv_bits=spec.kv_bits, files=files,
    )
    tmp = out / (MANIFEST_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(manifest.to_dict(), sort_keys=True))
    tmp.replace(out / MANIFEST_FILE)
    if progress:
        progress(total, total, "done")
    return manifest


def dir_digest(out: Path) -> str:
    """sha256 over every file of a shard directory (names and contents, sorted): one number to compare."""
    h = hashlib.sha256()
    for p in sorted(Path(out).iterdir()):
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def shard_payload_bytes(out: Path) -> dict[str, int]:
    return {n: payload_bytes(Path(out) / n) for n in (EDGE_FILE, CLOUD_FILE)}
