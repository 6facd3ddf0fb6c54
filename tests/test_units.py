import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcli.errors import SplitLLMError
from splitcli.units import (
    format_bitrate, format_bytes, format_time, parse_bitrate, parse_frequency, parse_percent,
    parse_size, parse_snr, parse_time,
)


@pytest.mark.parametrize("text, expected", [
    ("16GB", 16_000_000_000),
    ("512MiB", 512 * 2**20),
    ("1.5 GiB", int(1.5 * 2**30)),
    ("1024", 1024),
    (1024, 1024),
    ("0", 0),
    ("2kB", 2000),
    ("2KiB", 2048),
    ("3 bytes", 3),
    ("1e3B", 1000),
    ("1gb", 1_000_000_000),
    (" 7 MB ", 7_000_000),
])
def test_parse_size_good(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "16 GX", "-1GB", "nan", "inf", "1.2.3GB", None,
                                  True, [1], "16 Gbit", float("nan"), float("inf")])
def test_parse_size_bad(text):
    with pytest.raises(SplitLLMError) as info:
        parse_size(text)
    message = str(info.value)
    assert "\n" not in message and "GiB" in message


@pytest.mark.parametrize("text, expected", [
    ("1e6", 1e6), ("10 Mbit/s", 1e7), ("10Mbps", 1e7), ("500 kb/s", 5e5), ("2 MB/s", 1.6e7),
    ("1 GBps", 8e9), (2500, 2500.0), ("0", 0.0),
])
def test_parse_bitrate(text, expected):
    assert parse_bitrate(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text", ["10 MHz", "fast", "-1 Mbit/s", "10 Mbit"])
def test_parse_bitrate_bad(text):
    with pytest.raises(SplitLLMError, match="Mbit/s"):
        parse_bitrate(text)


@pytest.mark.parametrize("text, expected", [
    ("10MHz", 1e7), ("20 kHz", 2e4), ("2.4GHz", 2.4e9), ("1e6", 1e6), ("5hz", 5.0),
])
def test_parse_frequency(text, expected):
    assert parse_frequency(text) == pytest.approx(expected, rel=1e-12)


def test_parse_frequency_bad():
    with pytest.raises(SplitLLMError, match="MHz"):
        parse_frequency("10 Mbit/s")


@pytest.mark.parametrize("text, expected", [
    ("200ms", 0.2), ("0.2s", 0.2), ("50us", 5e-5), ("50µs", 5e-5), ("10ns", 1e-8),
    ("2min", 120.0), ("0.5", 0.5), (3, 3.0),
])
def test_parse_time(text, expected):
    assert parse_time(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text", ["200 mss", "-1s", "soon"])
def test_parse_time_bad(text):
    with pytest.raises(SplitLLMError, match="200ms"):
        parse_time(text)


@pytest.mark.parametrize("text, expected", [
    ("10dB", 10.0), ("0 dB", 1.0), ("-3dB", 10 ** -0.3), ("20 DB", 100.0), ("10", 10.0), (0.5, 0.5),
])
def test_parse_snr(text, expected):
    assert parse_snr(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text", ["0", "-2", "10 dBm", "loud"])
def test_parse_snr_bad(text):
    with pytest.raises(SplitLLMError, match="10dB"):
        parse_snr(text)


@pytest.mark.parametrize("text, expected", [("1%", 0.01), ("0.01", 0.01), ("150%", 1.5), ("0%", 0.0)])
def test_parse_percent(text, expected):
    assert parse_percent(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text", ["1 %%", "-1%", "1 pct"])
def test_parse_percent_bad(text):
    with pytest.raises(SplitLLMError, match="1%"):
        parse_percent(text)


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1024) == "1.0 KiB"
    assert format_bytes(12.3 * 2**20) == "12.3 MiB"
    assert format_bytes(2**80) == f"{2**80 / 2**50:.1f} PiB"
    assert format_bytes(-2048) == "-2.0 KiB"
    assert format_bytes(math.inf) == "inf B"


def test_format_bitrate_and_time():
    assert format_bitrate(1.5e6) == "1.5 Mbit/s"
    assert format_time(0.0123) == "12.3 ms"
    assert format_time(5e-5) == "50.0 us"
    assert format_time(2.5) == "2.50 s"
    assert format_time(0) == "0.00 s"


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=2**50))
def test_size_roundtrip_bytes(n):
    assert parse_size(str(n)) == n
    assert parse_size(f"{n}B") == n


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=0, max_value=1e6, allow_nan=False), st.sampled_from(["KiB", "MiB", "GiB"]))
def test_binary_sizes_scale(value, unit):
    scale = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    assert parse_size(f"{value!r}{unit}") == round(value * scale)


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=-60, max_value=60, allow_nan=False))
def test_snr_db_roundtrip(db):
    assert 10 * math.log10(parse_snr(f"{db!r}dB")) == pytest.approx(db, abs=1e-9)
