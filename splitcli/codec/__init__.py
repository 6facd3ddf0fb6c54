"""Intermediate-output codec (paper §2.3): threshold splitting + TAB-Q + rANS, as a byte frame."""

from splitcli.codec.calibrate import (calibrate_channel_class, calibrate_channel_scale, calibrate_config,
                                      calibrate_symbol_model)
from splitcli.codec.config import FORMAT_VERSION, CodecConfig
from splitcli.codec.frame import CodecStats, FrameError, decode, encode, encode_with_stats
from splitcli.codec.threshold import calibrate_tau

__all__ = ["FORMAT_VERSION", "CodecConfig", "CodecStats", "FrameError", "calibrate_channel_class",
           "calibrate_channel_scale", "calibrate_config", "calibrate_symbol_model", "calibrate_tau", "decode",
           "encode", "encode_with_stats"]
