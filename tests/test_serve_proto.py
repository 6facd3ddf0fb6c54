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


def test_v3_codec_settings_and_calibrated_config_round_trip():
    """Settings and the calibrated config cross the wire field for field (the cloud decodes with
    exactly the edge's state); an older edge's settings (no v3 fields) read as the v3 defaults."""
    import numpy as np

    from splitcli.codec.calibrate import calibrate_settings
    from splitcli.plan.codec_settings import CodecSettings
    from splitcli.serve.proto import split_pb2 as pb
    from splitcli.serve.protocol import codec_config_from_pb, codec_config_to_pb, codec_from_pb, codec_to_pb

    for settings in (CodecSettings(rotation="hadamard", rotation_seed=2**32 - 1, channel_alpha=0.5,
                                   target_rel_error=0.1, tau=0.0), CodecSettings()):
        back = pb.CodecSettings.FromString(codec_to_pb(settings).SerializeToString())
        assert codec_from_pb(back) == settings
    old = pb.CodecSettings(tau_quantile=0.999, q_bar=6, q_bar_min=2, delta=0.05, entropy=True, n_classes=8)
    assert codec_from_pb(old) == CodecSettings()
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    x[:, 3] *= 50  # one dominant channel, as SmolLM2 has
    for settings in (CodecSettings(rotation="hadamard", rotation_seed=5, channel_alpha=0.5),
                     CodecSettings(channel_alpha=1.0, target_rel_error=0.2), CodecSettings(tau=1.0, entropy=False)):
        cfg, _ = calibrate_settings(x, settings)
        wire = pb.CodecConfig.FromString(codec_config_to_pb(cfg).SerializeToString())
        got = codec_config_from_pb(wire, 64)
        assert got == cfg and got._scale_crc == cfg._scale_crc and got._static_crc == cfg._static_crc


def test_a_rotation_the_model_cannot_take_is_named():
    import pytest

    from splitcli.codec import CodecConfig
    from splitcli.errors import SplitLLMError
    from splitcli.plan.codec_settings import CodecSettings
    from splitcli.serve.protocol import check_codec_config

    settings = CodecSettings(rotation="hadamard", rotation_seed=3, tau=1.0, entropy=False)
    cfg = CodecConfig.from_settings(settings)
    check_codec_config(cfg, settings, 576)  # 9 x 64: supported
    with pytest.raises(SplitLLMError, match="rotation hadamard does not support the model's hidden size 2050"):
        check_codec_config(cfg, settings, 2050)  # odd factor 1025 > 1024
