"""What both ends of a format-4 split hold (`PredictiveCodec`): the predictor, the KLT, the step,
the symbol models and the decoder's shrink of one model at one split layer, validated on
construction, saved as .npz, and the working forms the encoder and decoder multiply by (float32,
and fp16 for a decode step's products). The frames themselves: `splitcli.codec.predictive`.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import constriction
import numpy as np
import torch

from splitcli.errors import SplitLLMError

#: Version of the saved codec file (the arrays and their meaning). 2 added the optional shaping T
#: (and T⁻¹); version-1 files (no shaping) still load.
FILE_VERSION = 2
_FILE_VERSIONS = (1, 2)
#: Symbols are coded in [-K, K]; larger ones escape.
K = 255
_FP16_SAFE = 60000.0     # predictor weights up to which fp16 holds them (below its max: no inf)
_SHAPE_TOLERANCE = 1e-3  # |T T⁻¹ - I| past which a file's shaping is refused (float32 rounding is ~1e-6)

_Categorical = constriction.stream.model.Categorical


@dataclass(frozen=True, eq=False)
class PredictiveCodec:
    """Everything both ends hold for format-4 frames of one model at one split layer.

    W [2H + 1, H] float32: the token predictor; U [H, H] float32 orthogonal; step: δ;
    crms [H]: calibration RMS of each KLT component; classes [H] uint8 in [0, C);
    gain_edges [G - 1]: the gain levels' inner thresholds; gain_max: the largest calibration gain;
    gain_probs [G]; sym_probs [G, C, 2K + 1]: the static symbol models; shrink [G, H]: the decoder's
    gain per (gain level, component), E[y q] / E[q²] on the fit text (ones: none); emb_crc: crc32 of
    the input-embedding matrix the predictor was fitted with (checked where the codec meets a model);
    shape, shape_inv [H, H] float32 or None: T and T⁻¹, the shaping by the cloud's Fisher
    (`predictive_fit.fisher_shaping`): the residual is coded as (x - P) T U and decoded as
    P + z Uᵀ T⁻¹, so the error lands where the cloud's loss is least sensitive (None: T = I).
    """

    W: np.ndarray
    U: np.ndarray
    step: float
    crms: np.ndarray
    classes: np.ndarray
    gain_edges: np.ndarray
    gain_max: float
    gain_probs: np.ndarray
    sym_probs: np.ndarray
    shrink: np.ndarray
    emb_crc: int
    info: dict = field(default_factory=dict)     # how it was fitted (text, windows, targets): not coded
    version: int = FILE_VERSION
    shape: np.ndarray | None = None
    shape_inv: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.version not in _FILE_VERSIONS:
            raise SplitLLMError(f"predictive codec file version {self.version!r} is not supported "
                                f"(this build reads versions {', '.join(map(str, _FILE_VERSIONS))})")
        H = self.U.shape[0] if getattr(self.U, "ndim", 0) == 2 else -1
        arrays = dict(W=(self.W, (2 * H + 1, H), np.float32), U=(self.U, (H, H), np.float32),
                      crms=(self.crms, (H,), np.float32), classes=(self.classes, (H,), np.uint8),
                      gain_edges=(self.gain_edges, None, np.float32), gain_probs=(self.gain_probs, None, np.float64),
                      sym_probs=(self.sym_probs, None, np.float64), shrink=(self.shrink, None, np.float32))
        if (self.shape is None) != (self.shape_inv is None) or (self.shape is not None and self.version < 2):
            raise SplitLLMError("predictive codec shaping needs both T and T⁻¹ (and a version-2 file)")
        if self.shape is not None:
            arrays.update(shape=(self.shape, (H, H), np.float32), shape_inv=(self.shape_inv, (H, H), np.float32))
        for name, (arr, shape, dtype) in arrays.items():
            if not isinstance(arr, np.ndarray) or (shape is not None and arr.shape != shape):
                raise SplitLLMError(f"predictive codec {name} must be an array of shape {shape}")
            if not np.isfinite(arr.astype(np.float64)).all():
                raise SplitLLMError(f"predictive codec {name} has NaN or Inf entries")
            object.__setattr__(self, name, np.ascontiguousarray(arr, dtype=dtype))
        G, C = len(self.gain_probs), int(self.classes.max()) + 1
        if H < 1 or G < 1 or self.gain_edges.shape != (G - 1,) or self.sym_probs.shape != (G, C, 2 * K + 1) \
                or self.shrink.shape != (G, H):
            raise SplitLLMError("predictive codec tables do not agree on hidden size, gain levels and classes")
        if not (math.isfinite(self.step) and self.step > 0 and math.isfinite(self.gain_max)):
            raise SplitLLMError(f"predictive codec step must be finite and > 0, got {self.step!r}")
        if (self.crms <= 0).any() or (self.gain_probs <= 0).any() or (self.sym_probs < 0).any() \
                or (self.sym_probs.sum(-1) <= 0).any() or (np.diff(self.gain_edges) < 0).any() \
                or (self.shrink <= 0).any() or (self.shrink > 4).any():
            raise SplitLLMError("predictive codec tables hold invalid probabilities, RMS or thresholds")
        if self.shape is not None and \
                np.abs(self.shape.astype(np.float64) @ self.shape_inv - np.eye(H)).max() > _SHAPE_TOLERANCE:
            raise SplitLLMError("predictive codec shape_inv is not the inverse of its shape")

    @property
    def hidden(self) -> int:
        return self.U.shape[0]

    @cached_property
    def crc(self) -> int:
        """crc32 of everything that shapes a frame: frames carry it, so a mismatch is a FrameError."""
        crc = zlib.crc32(np.float64(self.step).tobytes())
        shaping = () if self.shape is None else (self.shape, self.shape_inv)    # unshaped: the version-1 crc
        for arr in (self.W, self.U, self.crms, self.classes, self.gain_edges, self.gain_probs, self.sym_probs,
                    self.shrink, *shaping):
            crc = zlib.crc32(arr.tobytes(), crc)
        return zlib.crc32(np.float64(self.gain_max).tobytes(), crc)

    @cached_property
    def W12(self) -> torch.Tensor:
        """[H, 2H]: the current and the previous token's blocks of W side by side (one product for both)."""
        H = self.hidden
        return torch.from_numpy(np.concatenate([self.W[:H], self.W[H:2 * H]], 1))

    @cached_property
    def W2(self) -> torch.Tensor:
        """[2H, H]: W without its bias row (a decode step's few rows: [E[x_t], E[x_{t-1}]] · W2 + bias)."""
        return torch.from_numpy(self.W[:2 * self.hidden])

    @cached_property
    def bias(self) -> torch.Tensor:
        """[H]: W's last row."""
        return torch.from_numpy(self.W[2 * self.hidden].copy())

    @cached_property
    def bias12(self) -> torch.Tensor:
        """[2H]: the bias, then zeros (added once per distinct token, to its current half)."""
        return torch.cat([self.bias, torch.zeros(self.hidden)])

    @cached_property
    def Uw(self) -> torch.Tensor:
        """[H, H] the encoder's rotation, columns in working order: y = (x - P) · Uw (T U with shaping)."""
        a = self.Ut if self.shape is None else torch.from_numpy(self.shape) @ self.Ut
        return a[:, torch.from_numpy(self.col_order)].contiguous()

    @cached_property
    def UwT(self) -> torch.Tensor:
        """[H, H] the decoder's, rows in working order: x̂ = P + z · UwT (Uwᵀ, or Uᵀ T⁻¹ with shaping)."""
        if self.shape is None:
            return self.Uw.T.contiguous()
        return (self.Ut.T @ torch.from_numpy(self.shape_inv))[torch.from_numpy(self.col_order)].contiguous()

    @cached_property
    def Ut(self) -> torch.Tensor:
        return torch.from_numpy(self.U)

    # A decode step's products in half precision (`_mm`): the weights of the fp16 kernel, [N, K]
    # (each product's transpose), None where the predictor does not fit fp16's range.
    @cached_property
    def W16(self) -> torch.Tensor | None:
        """[H, 2H] float16: P_t - bias = [E[x_t], E[x_{t-1}]] · W16ᵀ."""
        return _half(self.W2.T)

    @cached_property
    def Uw16T(self) -> torch.Tensor | None:
        """[H, H] float16, the encoder's: y = r · Uw = r · Uw16Tᵀ (None past fp16's range, as W16)."""
        return _half(self.Uw.T)

    @cached_property
    def Uw16(self) -> torch.Tensor | None:
        """[H, H] float16, the decoder's: z · UwT = z · Uw16ᵀ."""
        return _half(self.UwT.T)

    # Encoder and decoder work with the KLT components in *working order*, grouped by class
    # (`col_order`), so each (gain level, class) group of the body is a slice; frames index
    # components (escapes) in KLT order.
    @cached_property
    def shrink_steps(self) -> np.ndarray:
        """[G, H] float32, working order: the decoded value of symbol 1 per (gain level, component), a · δ."""
        return (self.shrink[:, self.col_order] * np.float32(self.step)).astype(np.float32)

    @cached_property
    def inv_crms2(self) -> np.ndarray:
        """[H] float32 1 / rms², working order."""
        return (1.0 / self.crms[self.col_order].astype(np.float64) ** 2).astype(np.float32)

    @cached_property
    def crms_w(self) -> torch.Tensor:
        return torch.from_numpy(self.crms[self.col_order])

    @cached_property
    def col_rank(self) -> np.ndarray:
        """Inverse of col_order: KLT component -> working position."""
        return np.argsort(self.col_order)

    @cached_property
    def col_order(self) -> np.ndarray:
        """Components grouped by class (ascending index within a class): the body's column order."""
        return np.argsort(self.classes, kind="stable")

    @cached_property
    def col_bounds(self) -> np.ndarray:
        """[C + 1]: class c's columns are col_order[col_bounds[c]:col_bounds[c + 1]]."""
        return np.searchsorted(self.classes[self.col_order], np.arange(self.sym_probs.shape[1] + 1))

    @cached_property
    def class_cols(self) -> list[tuple[int, slice]]:
        """(class, its column slice in working order) of every class that has components."""
        cb = self.col_bounds.tolist()
        return [(c, slice(cb[c], cb[c + 1])) for c in range(len(cb) - 1) if cb[c + 1] > cb[c]]

    @cached_property
    def gain_model(self):
        return _Categorical(self.gain_probs / self.gain_probs.sum(), perfect=False)

    @cached_property
    def row_bits(self) -> float:
        """Mean bits of one coded row (its gain level and H symbols) on text like the fit text: the fit
        text's own rate when the fit recorded it, else the models' entropy (which their smoothing
        inflates when the fit text was short). Escapes and raw rows (rare) are left out."""
        if isinstance(self.info.get("row_bits_fit"), (int, float)) and math.isfinite(self.info["row_bits_fit"]):
            return max(0.0, float(self.info["row_bits_fit"]))
        p = self.sym_probs / self.sym_probs.sum(-1, keepdims=True)                  # [G, C, 2K + 1]
        bits = -(p * np.log2(np.where(p > 0, p, 1.0))).sum(-1)                     # [G, C]
        g = self.gain_probs / self.gain_probs.sum()
        per_class = np.bincount(self.classes, minlength=bits.shape[1])             # components per class
        return float(g @ bits @ per_class - (g * np.log2(g)).sum())

    def sym_model(self, g: int, c: int):
        models = self.__dict__.setdefault("_models", {})
        if (g, c) not in models:
            p = self.sym_probs[g, c]
            models[g, c] = _Categorical(p / p.sum(), perfect=False)
        return models[g, c]

    # ---- persistence ----
    def save(self, path: str | Path) -> None:
        """Write an .npz (arrays + a JSON meta record); the caller decides about overwriting."""
        meta = dict(version=self.version, step=self.step, gain_max=self.gain_max, emb_crc=self.emb_crc,
                    info=self.info, format="splitllm-predictive-codec")
        buf = io.BytesIO()
        shaping = {} if self.shape is None else dict(shape=self.shape, shape_inv=self.shape_inv)
        np.savez(buf, W=self.W, U=self.U, crms=self.crms, classes=self.classes, gain_edges=self.gain_edges,
                 gain_probs=self.gain_probs, sym_probs=self.sym_probs, shrink=self.shrink,
                 meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **shaping)
        Path(path).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "PredictiveCodec":
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                arrays = {k: z[k] for k in ("W", "U", "crms", "classes", "gain_edges", "gain_probs", "sym_probs",
                                            "shrink")}
                arrays.update({k: z[k] for k in ("shape", "shape_inv") if k in z.files})
        except (OSError, KeyError, ValueError, UnicodeDecodeError) as exc:
            raise SplitLLMError(f"cannot read predictive codec file {path}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != "splitllm-predictive-codec":
            raise SplitLLMError(f"{path} is not a splitllm predictive codec file")
        try:
            return cls(**arrays, step=float(meta["step"]), gain_max=float(meta["gain_max"]),
                       emb_crc=int(meta["emb_crc"]), info=dict(meta.get("info") or {}), version=int(meta["version"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SplitLLMError(f"predictive codec file {path} is invalid: {exc}") from exc


def _half(w: torch.Tensor) -> torch.Tensor | None:
    """w as a contiguous float16 copy, or None where fp16 would not hold it (|w| > _FP16_SAFE)."""
    return w.to(torch.float16).contiguous() if float(w.abs().max()) <= _FP16_SAFE else None
