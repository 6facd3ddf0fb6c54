"""The checked-in generated protocol code is what split.proto produces today."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "splitcli" / "serve" / "proto"
GENERATED = ("split_pb2.py", "split_pb2_grpc.py")


def test_generated_code_is_current(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    # Same relative path as the checked-in run, so imports and `source:` comments match.
    rel = Path("splitcli/serve/proto/split.proto")
    (tmp_path / rel.parent).mkdir(parents=True)
    shutil.copy(PROTO_DIR / "split.proto", tmp_path / rel)
    rc = protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                      str(tmp_path / rel)])
    assert rc == 0
    for name in GENERATED:
        fresh = (tmp_path / rel.parent / name).read_text()
        assert fresh == (PROTO_DIR / name).read_text(), (
            f"{name} is stale: regenerate it (command in split.proto's header comment)")


def test_messages_round_trip():
    from splitcli.serve.proto import split_pb2 as pb

    msg = pb.ClientMessage(step=pb.Step(step_id=3, position=7, n_tokens=1, payload=b"\x00\x01", chunk_count=1))
    back = pb.ClientMessage.FromString(msg.SerializeToString())
    assert back.WhichOneof("kind") == "step" and back.step.payload == b"\x00\x01" and back.step.position == 7
    codec = pb.CodecSettings(tau_quantile=0.999, q_bar=6)
    assert codec.HasField("tau_quantile") and not codec.HasField("tau")
