"""The strict safetensors reader: exact round trip, and every malformed file refused cleanly."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import save_file

from splitcli.errors import SplitLLMError
from splitcli.model.safetensors_io import payload_bytes, read_header, read_tensors


@pytest.fixture
def good(tmp_path):
    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.tensor([1, 2, 255], dtype=torch.uint8),
        "c": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "empty": torch.zeros(0, 5, dtype=torch.int32),
        "scalar": torch.tensor(7, dtype=torch.int64),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    return path, tensors


def test_round_trip_exact(good):
    path, tensors = good
    out, meta = read_tensors(path)
    assert meta == {"k": "v"} and set(out) == set(tensors)
    for k, t in tensors.items():
        assert out[k].dtype == t.dtype and out[k].shape == t.shape and torch.equal(out[k], t)
    assert payload_bytes(path) == sum(t.numel() * t.element_size() for t in tensors.values())
    sub, _ = read_tensors(path, ["b"])
    assert list(sub) == ["b"]
    with pytest.raises(SplitLLMError, match="lacks"):
        read_tensors(path, ["zzz"])


def test_malformed_files_refused(good, tmp_path):
    path, _ = good
    data = path.read_bytes()
    cases = {
        "empty": b"",
        "short": data[:5],
        "huge_header": struct.pack("<Q", 1 << 40) + b"{}",
        "garbage": struct.pack("<Q", 4) + b"\xff\xfe{[",
        "truncated": data[:-1],
        "longer": data + b"\0",
        "list_header": struct.pack("<Q", 2) + b"[]",
    }
    for name, blob in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(SplitLLMError):
            read_header(p)
    with pytest.raises(SplitLLMError, match="cannot read"):
        read_header(tmp_path / "missing.safetensors")


def test_offsets_must_tile_payload(tmp_path):
    import json

    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
              "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}  # overlap
    raw = json.dumps(header).encode()
    p = tmp_path / "overlap.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0\0\0")
    with pytest.raises(SplitLLMError, match="tile"):
        read_header(p)
    header["b"] = {"dtype": "F32", "shape": [2], "data_offsets": [2, 4]}  # shape needs 8 bytes
    raw = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(SplitLLMError, match="shape needs"):
        read_header(p)
