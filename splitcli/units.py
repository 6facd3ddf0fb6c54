"""Parse and format human-readable quantities: sizes, bit rates, frequencies, times, SNR, percents.

Conventions (the one reading every command shares):
- Sizes are bytes. Decimal prefixes are powers of 1000 (``GB`` = 1e9), binary ones powers of 1024
  (``GiB`` = 2**30). A bare number is bytes. Case of the prefix letter is ignored (``gb`` = ``GB``)
  because a size never means bits here.
- Bit rates are bit/s. ``bit/s``, ``bps`` and ``b/s`` mean bits; ``B/s`` and ``Bps`` mean bytes
  (multiplied by 8). Prefixes are decimal (``Mbit/s`` = 1e6 bit/s). A bare number is bit/s.
- Frequencies are Hz (``10MHz`` = 1e7). A bare number is Hz.
- Times are seconds (``200ms`` = 0.2, ``50us`` = 5e-5). A bare number is seconds.
- SNR: ``10dB`` is converted to linear (10 ** (10/10) = 10.0); a bare number is already linear.
- Percents: ``1%`` = 0.01; a bare number is already a fraction.

Every parser accepts an int/float as well as a string, rejects NaN, infinities and negatives
(except dB values, which may be negative), and raises SplitLLMError with a one-line message that
names the accepted forms.
"""

from __future__ import annotations

import math
import re

from splitcli.errors import SplitLLMError

_NUMBER_RE = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([^\s\d].*?)?\s*$")

_DECIMAL = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_BINARY = {"ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40, "pi": 2.0**50}

_SIZE_FORMS = "a byte count like 1024, 512KB, 16GB (x1000) or 512MiB, 1.5 GiB (x1024)"
_BITRATE_FORMS = "a bit rate like 1e6, 10 Mbit/s, 10Mbps, 500 kb/s or 2 MB/s (bytes, x8)"
_FREQ_FORMS = "a frequency like 1e6, 10MHz, 20 kHz or 2.4GHz"
_TIME_FORMS = "a time like 0.2, 0.2s, 200ms, 50us, 10ns or 2min"
_SNR_FORMS = "an SNR like 10dB, -3 dB or a positive linear ratio like 10"
_PERCENT_FORMS = "a percentage like 1% or a fraction like 0.01"


def _split(text: object, forms: str, what: str) -> tuple[float, str]:
    """Split '12.5 MiB' into (12.5, 'MiB'); numbers pass through with an empty unit."""
    if isinstance(text, bool):
        raise SplitLLMError(f"invalid {what} {text!r}: expected {forms}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    elif isinstance(text, str):
        match = _NUMBER_RE.match(text)
        if match is None:
            raise SplitLLMError(f"invalid {what} {text!r}: expected {forms}")
        value, unit = float(match.group(1)), (match.group(2) or "")
    else:
        raise SplitLLMError(f"invalid {what} {text!r}: expected {forms}")
    if not math.isfinite(value):
        raise SplitLLMError(f"invalid {what} {text!r}: must be finite; expected {forms}")
    return value, unit


def _nonnegative(value: float, text: object, forms: str, what: str) -> float:
    if value < 0:
        raise SplitLLMError(f"invalid {what} {text!r}: must not be negative; expected {forms}")
    return value


def _prefix_scale(prefix: str) -> float | None:
    key = prefix.lower()
    if key in _BINARY:
        return _BINARY[key]
    if key in _DECIMAL:
        return _DECIMAL[key]
    return None


def parse_size(text: object) -> int:
    """Bytes from '16GB', '512MiB', '1.5 GiB', '1024', 1024 (rounded to the nearest byte)."""
    value, unit = _split(text, _SIZE_FORMS, "size")
    scale = 1.0
    if unit:
        match = re.fullmatch(r"([kmgtp]i?)?b(?:ytes?)?", unit, flags=re.IGNORECASE)
        if match is None:
            raise SplitLLMError(f"invalid size {text!r}: unknown unit {unit!r}; expected {_SIZE_FORMS}")
        scale = _prefix_scale(match.group(1) or "")  # type: ignore[assignment]
    return int(round(_nonnegative(value, text, _SIZE_FORMS, "size") * scale))


def parse_bitrate(text: object) -> float:
    """Bit/s from '10 Mbit/s', '10Mbps', '500 kb/s', '2 MB/s' (bytes: x8) or a bare number."""
    value, unit = _split(text, _BITRATE_FORMS, "bit rate")
    scale = 1.0
    if unit:
        # The b/B case decides bits vs bytes, so only the prefix letter is case-insensitive.
        match = re.fullmatch(r"([kKmMgGtT]?)(bit/s|bits/s|bps|b/s|B/s|Bps)", unit)
        if match is None:
            raise SplitLLMError(
                f"invalid bit rate {text!r}: unknown unit {unit!r}; expected {_BITRATE_FORMS}"
            )
        scale = _DECIMAL[match.group(1).lower()]
        if match.group(2) in ("B/s", "Bps"):
            scale *= 8.0
    return _nonnegative(value, text, _BITRATE_FORMS, "bit rate") * scale


def parse_frequency(text: object) -> float:
    """Hz from '10MHz', '20 kHz', '2.4GHz' or a bare number."""
    value, unit = _split(text, _FREQ_FORMS, "frequency")
    scale = 1.0
    if unit:
        match = re.fullmatch(r"([kmgt]?)hz", unit, flags=re.IGNORECASE)
        if match is None:
            raise SplitLLMError(
                f"invalid frequency {text!r}: unknown unit {unit!r}; expected {_FREQ_FORMS}"
            )
        scale = _DECIMAL[match.group(1).lower()]
    return _nonnegative(value, text, _FREQ_FORMS, "frequency") * scale


_TIME_SCALE = {
    "": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6,
    "ns": 1e-9, "min": 60.0, "h": 3600.0,
}


def parse_time(text: object) -> float:
    """Seconds from '200ms', '0.2s', '50us', '2min' or a bare number (seconds)."""
    value, unit = _split(text, _TIME_FORMS, "time")
    if unit not in _TIME_SCALE:
        raise SplitLLMError(f"invalid time {text!r}: unknown unit {unit!r}; expected {_TIME_FORMS}")
    return _nonnegative(value, text, _TIME_FORMS, "time") * _TIME_SCALE[unit]


def parse_snr(text: object) -> float:
    """Linear SNR from '10dB' (-> 10.0) or a bare positive linear ratio."""
    value, unit = _split(text, _SNR_FORMS, "SNR")
    if unit.lower() == "db":
        return 10.0 ** (value / 10.0)
    if unit:
        raise SplitLLMError(f"invalid SNR {text!r}: unknown unit {unit!r}; expected {_SNR_FORMS}")
    if value <= 0:
        raise SplitLLMError(f"invalid SNR {text!r}: a linear SNR must be > 0; expected {_SNR_FORMS}")
    return value


def parse_percent(text: object) -> float:
    """Fraction from '1%' (-> 0.01) or a bare fraction (0.01)."""
    value, unit = _split(text, _PERCENT_FORMS, "percentage")
    if unit == "%":
        value /= 100.0
    elif unit:
        raise SplitLLMError(
            f"invalid percentage {text!r}: unknown unit {unit!r}; expected {_PERCENT_FORMS}"
        )
    return _nonnegative(value, text, _PERCENT_FORMS, "percentage")


def _format_scaled(value: float, base: float, prefixes: tuple[str, ...], unit: str) -> str:
    if not math.isfinite(value):
        return f"{value} {unit}"
    sign = "-" if value < 0 else ""
    magnitude = abs(value)
    index = 0
    while magnitude >= base and index < len(prefixes) - 1:
        magnitude /= base
        index += 1
    if index == 0 and float(magnitude).is_integer():
        return f"{sign}{int(magnitude)} {prefixes[0]}{unit}"
    return f"{sign}{magnitude:.1f} {prefixes[index]}{unit}"


def format_bytes(n_bytes: float) -> str:
    """Binary units: 1024 -> '1.0 KiB', 12_897_485 -> '12.3 MiB', 512 -> '512 B'."""
    return _format_scaled(float(n_bytes), 1024.0, ("", "Ki", "Mi", "Gi", "Ti", "Pi"), "B")


def format_bitrate(bits_per_s: float) -> str:
    """Decimal units: 1.5e6 -> '1.5 Mbit/s'."""
    return _format_scaled(float(bits_per_s), 1000.0, ("", "k", "M", "G", "T"), "bit/s")


def format_time(seconds: float) -> str:
    """0.0123 -> '12.3 ms', 5e-5 -> '50.0 us', 2.5 -> '2.50 s'."""
    if not math.isfinite(seconds):
        return f"{seconds} s"
    magnitude = abs(seconds)
    if magnitude >= 1.0 or magnitude == 0.0:
        return f"{seconds:.2f} s"
    if magnitude >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    if magnitude >= 1e-6:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e9:.1f} ns"
