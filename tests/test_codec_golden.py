"""Golden frames: fixed inputs must give these exact bytes. If a change breaks this test, the wire
format changed: bump FORMAT_VERSION deliberately and re-pin."""

import hashlib

import torch

from splitcli.codec import CodecConfig, decode, encode_with_stats

SMALL_HEX = (
    "534c4346020000040200040000000c000000000020419a99993e0200000012000000030303030000803f0000803f"
    "0000803f0000803f0000010001000000030007000000204200005ec2482292b57d8411c9da3e9288646d1f4944b2"
    "d0dc42bf"
)
RANS_SHA256 = "3b56c77c57d962c716aeb212ec868740dd02864235ef3ea24330604ce7808e94"


def _small():
    x = ((torch.arange(48) % 13) - 6).float().reshape(4, 12) / 2    # exact binary fractions
    x[1, 3] = 40.0
    x[2, 7] = -55.5
    return x


def _rans_input():
    i = torch.arange(64 * 32)
    x = (((i * 7919) % 61) - 30).float().reshape(64, 32) / 8
    x[::9, 5] = 100.0
    return x


def test_small_raw_frame_is_pinned_byte_for_byte():
    frame, stats = encode_with_stats(_small(), CodecConfig(tau=10.0, tau_quantile=None, q_bar=4, delta=0.3))
    assert stats.path == "raw" and stats.n_outliers == 2
    assert frame.hex() == SMALL_HEX
    y = decode(bytes.fromhex(SMALL_HEX))
    assert y[1, 3] == 40.0 and y[2, 7] == -55.5
    assert float((y - _small()).abs().max()) <= 0.5


def test_rans_frame_is_pinned():
    frame, stats = encode_with_stats(_rans_input(), CodecConfig(tau=3.0, tau_quantile=None, q_bar=5, delta=0.1))
    assert stats.path == "rans" and len(frame) == 4302
    assert hashlib.sha256(frame).hexdigest() == RANS_SHA256


CLASS_SHA256 = "bc91daceac1dda7e3ec240d3052eb8d0b19304c9dda0097ea0c8dbe65a2a5dbc"
STATIC_MODEL = ((341, 57, 57, 284, 57, 57, 284, 57, 57, 284, 57, 57, 4437, 57, 57, 57, 4324, 57, 57, 4096, 57,
                 57, 284, 57, 57, 284, 57, 57, 284, 57, 57, 284),)
# version 2: a one-token frame takes the compact header (15 bytes, no row count): 133 -> 112 bytes
STATIC_HEX = (
    "534c434602006105050001000054009440c0da05abaaaa3d8fe630472b582e56b66af3cab8d02d9e72b8545dfcb57cadca05"
    "40d70330c7789b810a2d34bb22ae0ac97437371893e7006ca748927ab80d514ab6d231d73b4a9d69b4ec6aac2e576702206bc8"
    "bd29f60a0000002d3368e5"
)


def test_class_model_frame_is_pinned():
    i = torch.arange(64 * 32)
    v = ((i * 7919) % 61).float()
    x = torch.where(v < 40, (v % 3) - 1, v - 50).reshape(64, 32) / 4
    x = x * (1 + 3 * (torch.arange(32) % 2)).float()
    x[::9, 5] = 100.0
    cfg = CodecConfig(tau=30.0, tau_quantile=None, q_bar=5, delta=0.1, channel_class=tuple(c % 2 for c in range(32)))
    frame, stats = encode_with_stats(x, cfg)
    assert stats.path == "rans-class" and len(frame) == 1302
    assert hashlib.sha256(frame).hexdigest() == CLASS_SHA256


def test_static_model_frame_is_pinned():
    i = torch.arange(256)
    v = ((i * 7919) % 61).float()
    x = torch.where(v < 50, (v % 3) - 1, v - 55).reshape(1, 256) / 4
    cfg = CodecConfig(tau=30.0, tau_quantile=None, q_bar=5, q_min=5, delta=0.0, symbol_model=STATIC_MODEL)
    frame, stats = encode_with_stats(x, cfg)
    assert stats.path == "rans-static" and len(frame) == 112
    assert frame.hex() == STATIC_HEX
    assert torch.allclose(decode(frame, cfg), x, atol=float(x.abs().max()) / 15)
