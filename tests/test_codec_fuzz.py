"""Malformed frames: truncated, bit-flipped, forged (with a recomputed crc) or garbage input must
only ever raise FrameError, never another exception, a crash or a huge allocation."""

import struct
import zlib

import numpy as np
import torch

from splitcli.codec import (CodecConfig, FrameError, calibrate_channel_class, calibrate_channel_scale, calibrate_config,
                            decode, encode)
from splitcli.codec.calibrate import calibrate_from_samples
from splitcli.codec.frame import FLAG_COMPACT
from splitcli.plan.codec_settings import CodecSettings

CAPS = dict(max_tokens=128, max_hidden=256, max_elements=8192)


def _seed_frames():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 16, generator=g) * 3
    x[2, 5] = 900.0
    calibrated = CodecConfig(tau=5.0, tau_quantile=None, q_bar=6, channel_scale=calibrate_channel_scale(x, 5.0),
                             channel_class=calibrate_channel_class(x, 5.0, 4))
    wide = torch.randn(32, 256, generator=g) * 3
    static = calibrate_config(wide, CodecConfig(q_bar=6, delta=0.0), n_classes=None)
    static_cls = calibrate_config(wide * torch.linspace(0.2, 5, 256), CodecConfig(q_bar=6, delta=0.0), n_classes=4)
    # format v3: the rotation (seed in the header), with the channel scale, classes and static model
    rot_cal = calibrate_from_samples(wide * torch.linspace(0.2, 5, 256),
                                     CodecSettings(tau=8.0, q_bar=5, rotation="hadamard", rotation_seed=77,
                                                   channel_alpha=0.5, n_classes=4))
    frames = [
        (encode(x, CodecConfig(tau=5.0, tau_quantile=None, q_bar=5, delta=0.2)), None),
        (encode(x, CodecConfig(tau=5.0, tau_quantile=None, q_bar=4, entropy=False)), None),
        (encode(x.bfloat16(), CodecConfig(tau=2.0, tau_quantile=None, q_bar=8, q_min=3, delta=0.05)), None),
        (encode(x[:1] + 50, CodecConfig(tau=float("inf"), tau_quantile=None, q_bar=6)), None),   # zero points
        (encode(x[:0], CodecConfig(tau=1.0, tau_quantile=None)), None),
        (encode(x, calibrated), calibrated),
        (encode(x.repeat(8, 1), calibrated), calibrated),
        (encode(wide[:1], static), static),      # rans-static
        (encode(wide[:1] * torch.linspace(0.2, 5, 256), static_cls), static_cls),   # rans-static per class
        (encode(torch.zeros(4, 8), CodecConfig(tau=1.0, tau_quantile=None)), None),
        (encode(x, CodecConfig(tau=5.0, tau_quantile=None, q_bar=4, rotation_seed=3)), None),
        (encode(x.half(), CodecConfig(tau=float("inf"), tau_quantile=None, q_bar=3, rotation_seed=4, entropy=False)), None),
        (encode(wide[:1], rot_cal), rot_cal),                      # v3 compact, rans-static
        (encode(wide, rot_cal), rot_cal),                          # v3, per-class models
    ]
    for f, s in frames:   # the seeds themselves are valid
        decode(f, s, **CAPS)
    return frames


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _mutants(rng, frame: bytes):
    n = len(frame)
    kind = rng.integers(7)
    if kind == 0:                                   # truncation
        yield frame[: rng.integers(n)]
    elif kind == 1:                                 # bit flips, crc left stale
        b = bytearray(frame)
        for _ in range(rng.integers(1, 9)):
            b[rng.integers(n)] ^= 1 << rng.integers(8)
        yield bytes(b)
    elif kind == 2:                                 # bit flips with a valid crc: exercises the parser
        b = bytearray(frame[:-4])
        for _ in range(rng.integers(1, 4)):
            b[rng.integers(len(b))] ^= 1 << rng.integers(8)
        yield _with_crc(bytes(b))
    elif kind == 3:                                 # forged header fields with a valid crc
        b = bytearray(frame[:-4])
        if b[6] & FLAG_COMPACT:                     # hidden, n_outliers, body_len (u16)
            off = int(rng.choice([9, 11, 13]))
            struct.pack_into("<H", b, off, int(rng.choice([0, 1, 2, 255, 256, 65535, rng.integers(2**16)])))
        else:
            off = int(rng.choice([10, 14, 26, 30]))     # tokens, hidden, n_outliers, body_len
            val = int(rng.choice([0, 1, 2, 255, 65535, 65536, 2**31, 2**32 - 1, rng.integers(2**32)]))
            struct.pack_into("<I", b, off, val)
        yield _with_crc(bytes(b))
    elif kind == 4:                                 # truncated / extended body with a valid crc
        body = frame[:-4]
        cut = rng.integers(len(body))
        yield _with_crc(body[:cut]) if rng.integers(2) else _with_crc(body + rng.bytes(rng.integers(1, 16)))
    elif kind == 5:                                 # garbage after a valid magic
        yield _with_crc(b"SLCF" + rng.bytes(rng.integers(0, 200)))
    else:                                           # plain garbage
        yield rng.bytes(rng.integers(0, 300))


def test_fuzzed_frames_only_raise_frame_error():
    rng = np.random.default_rng(12345)
    seeds = _seed_frames()
    counts = {"ok": 0, "rejected": 0}
    for i in range(12_000):
        frame, scale = seeds[i % len(seeds)]
        for mutant in _mutants(rng, frame):
            try:
                y = decode(mutant, scale, **CAPS)
            except FrameError:
                counts["rejected"] += 1
            else:
                counts["ok"] += 1
                assert y.dim() == 2 and y.numel() <= CAPS["max_elements"]
    assert counts["rejected"] + counts["ok"] == 12_000
    assert counts["rejected"] > 10_000, counts
    print(counts)


def test_non_bytes_input_raises_frame_error():
    for bad in (None, 42, "SLCF", [1, 2, 3]):
        try:
            decode(bad)
        except FrameError:
            continue
        raise AssertionError(f"decode({bad!r}) did not raise FrameError")
