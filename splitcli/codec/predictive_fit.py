"""Fitting a `PredictiveCodec` from hidden states at the split and their tokens (offline, once per
model and layer): the ridge predictor, the KLT, the step for a target error, classes, gain levels
and the static symbol models. Tensors in, codec out: no model here.

Text use: every window given is fit text (predictor, KLT, step, models); evaluate on other text.
Row 0 of each window (the attention sink, which the codec sends raw) is left out of every fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from splitcli.codec.predictive import K, PredictiveCodec, embedding_crc, gain_of
from splitcli.errors import SplitLLMError
from splitcli.plan.codec_settings import DEFAULT_PREDICTIVE_TARGET_REL_ERROR

#: The `BulkError` (of the rounding, on the fit text) the step is chosen for when none is given
#: (its home and its measurements: splitcli.plan.codec_settings).
DEFAULT_TARGET_REL_ERROR = DEFAULT_PREDICTIVE_TARGET_REL_ERROR
DEFAULT_CLASSES = 16
DEFAULT_GAINS = 8
DEFAULT_RIDGE = 10.0
#: The decoder gains' clamp: a gain outside it would come from a handful of points.
SHRINK_MIN, SHRINK_MAX = 0.5, 1.5
#: The shaping by the cloud's Fisher F (`fisher_shaping`): T = F^γ with F's eigenvalues raised to at
#: least SHAPE_FLOOR × their mean, so the directions the loss is most sensitive to get a finer step
#: and the rest keep one common step. Chosen on validation windows (docs/results.md, "Shaping the
#: codec by the cloud's true Fisher"): plain F^½ (no floor) costs perplexity, F^¾ and F^1 gain less.
SHAPE_GAMMA, SHAPE_FLOOR = 0.5, 0.4

Window = tuple[torch.Tensor, torch.Tensor]   # (ids [T] int64, hidden [T, H] float32)


def _features(emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[E[x_t], E[x_{t-1}], 1] for rows t >= 1 of a window: ids [T] -> [T - 1, 2H + 1]."""
    e = emb[ids]
    return torch.cat([e[1:], e[:-1], torch.ones(len(ids) - 1, 1)], 1)


def fit_token_predictor(emb: torch.Tensor, windows: Sequence[Window], ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Ridge map W [2H + 1, H] from [E[x_t], E[x_{t-1}], 1] to h_t (float64 normal equations)."""
    H = emb.shape[1]
    xtx = torch.zeros(2 * H + 1, 2 * H + 1, dtype=torch.float64)
    xty = torch.zeros(2 * H + 1, H, dtype=torch.float64)
    for ids, h in windows:
        x = _features(emb, ids).double()
        xtx += x.T @ x
        xty += x.T @ h[1:].double()
    return torch.linalg.solve(xtx + ridge * torch.eye(2 * H + 1, dtype=torch.float64), xty).float().numpy()


def _residuals(emb, windows, W: np.ndarray, U: np.ndarray | None) -> torch.Tensor:
    """h_t - P_t for rows t >= 1 of every window (times U if given): [N, H]."""
    Wt = torch.from_numpy(W)
    out = []
    for ids, h in windows:
        r = h[1:] - _features(emb, ids) @ Wt
        out.append(r @ torch.from_numpy(U) if U is not None else r)
    return torch.cat(out)


def fisher_shaping(fisher: torch.Tensor, gamma: float = SHAPE_GAMMA,
                   floor: float = SHAPE_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """(T, T⁻¹) [H, H] float32 from the Fisher F [H, H] (symmetric, positive semidefinite): F^γ with
    eigenvalues floored at floor × their mean, scaled to a geometric mean of 1 (the step keeps its
    scale). With the residual coded as r T, the codec's squared error weighs each direction by its
    sensitivity^(2γ): at γ = ½, ½ eᵀ F e, the loss's second-order increase."""
    f = torch.as_tensor(fisher, dtype=torch.float64)
    if f.ndim != 2 or f.shape[0] != f.shape[1] or not torch.isfinite(f).all():
        raise SplitLLMError("the Fisher matrix for the codec's shaping must be a finite square matrix")
    lam, V = torch.linalg.eigh((f + f.T) / 2)
    mean = float(lam.mean())
    if not mean > 0:
        raise SplitLLMError("the Fisher matrix for the codec's shaping is zero: the loss does not depend on h")
    d = lam.clamp_min(floor * mean).pow(gamma)
    d = d / d.log().mean().exp()
    return ((V * d) @ V.T).float().numpy(), ((V / d) @ V.T).float().numpy()


class BulkError:
    """The distortion a predictive codec's step is chosen for: the mean over tokens of the rounding
    error's relative L2 norm on the non-massive channels, ||e_t,S|| / ||h_t,S|| with S =
    `codec.calibrate.bulk_channels` (the same figure `target_rel_error` bounds for the TAB-Q codec).
    A few massive channels (here 4 of 576 hold half the energy at ℓ = 15; ~10^4 in Gemma-like models)
    would otherwise set the step and leave the bulk unbounded. The error in h is e_y · Uᵀ, or
    e_y · Uᵀ T⁻¹ with shaping. Unshaped, the error on S is the whole error less its part on the
    massive channels, e_y · U[M]ᵀ (M few); shaped, e_y · (Uᵀ T⁻¹)[:, S] is computed.

    y [N, H]: KLT-domain residuals; h [N, H]: the hidden states they came from; U [H, H];
    shape_inv [H, H]: T⁻¹, or None."""

    def __init__(self, y: torch.Tensor, h: torch.Tensor, U: torch.Tensor, shape_inv: torch.Tensor | None = None):
        from splitcli.codec.calibrate import bulk_channels

        self.y, self.orthogonal = y, shape_inv is None
        bulk = torch.from_numpy(bulk_channels(h.numpy()))
        massive = torch.ones(h.shape[1], dtype=torch.bool)
        massive[bulk] = False
        self.massive = int(massive.sum())
        self.B = U[massive].T.contiguous() if shape_inv is None else (U.T @ shape_inv)[:, bulk].contiguous()
        ref = h[:, bulk].double().pow(2).sum(1)                                   # [N]
        self.ok = ref > 0
        self.ref = ref[self.ok]

    def __call__(self, step: float) -> float:
        q = torch.round(self.y / step)
        e = torch.where(q.abs() > K, 0.0, self.y - q * step)                   # escapes travel exactly
        if self.orthogonal:   # [N]: off the massive channels
            err = e.double().pow(2).sum(1) - (e @ self.B).double().pow(2).sum(1)
        else:
            err = (e @ self.B).double().pow(2).sum(1)
        if not bool(self.ok.any()):
            return 0.0
        return float((err[self.ok].clamp_min(0) / self.ref).sqrt().mean())


def step_for_error(error: Callable[[float], float], target: float, hi: float) -> float:
    """The largest step whose `error(step)` is at most `target` (bisection in log over [1e-6, hi])."""
    lo, hi = 1e-6, hi + 1e-6
    if error(hi) <= target:
        return hi
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if error(mid) <= target else (lo, mid)
    return lo


def fit_shrink(y: torch.Tensor, q: torch.Tensor, levels: torch.Tensor, G: int) -> torch.Tensor:
    """Least-squares decoder gain per (gain level, component): E[y q] / E[q²] over the rows of each
    level, y [N, H] the residual, q [N, H] its quantized value (0 where escaped); clamped to
    [SHRINK_MIN, SHRINK_MAX], 1 where a level never quantizes a component to nonzero."""
    H = y.shape[1]
    yq = torch.zeros(G, H, dtype=torch.float64).index_add_(0, levels, (y * q).double())
    qq = torch.zeros(G, H, dtype=torch.float64).index_add_(0, levels, (q * q).double())
    a = torch.where(qq > 0, yq / qq.clamp_min(1e-30), 1.0)
    return a.clamp(SHRINK_MIN, SHRINK_MAX)


def fit_predictive(emb: torch.Tensor, windows: Sequence[Window], *, step: float | None = None,
                   target_rel_error: float = DEFAULT_TARGET_REL_ERROR, classes: int = DEFAULT_CLASSES,
                   gains: int = DEFAULT_GAINS, ridge: float = DEFAULT_RIDGE, shrink_decoder: bool = True,
                   fisher: torch.Tensor | None = None, info: dict | None = None,
                   progress: Callable[[str], None] | None = None) -> PredictiveCodec:
    """A PredictiveCodec fitted on `windows` (each (ids [T], hidden [T, H]) of one text window).

    step: δ, or None to pick it for `target_rel_error` (the rounding's `BulkError` on the fit text).
    fisher: the cloud's Fisher [H, H] w.r.t. h (`deploy.predictive.cloud_fisher`), to shape the
    codec by (`fisher_shaping`); None: no shaping."""
    say = progress or (lambda _m: None)
    emb = emb.detach().to(torch.float32)
    windows = [(torch.as_tensor(i, dtype=torch.int64).reshape(-1), h.detach().to(torch.float32)) for i, h in windows]
    if not windows or sum(len(i) - 1 for i, _ in windows) < 2 * emb.shape[1] + 1:
        raise SplitLLMError(f"fitting the predictive codec needs at least {2 * emb.shape[1] + 2} tokens of text")
    for ids, h in windows:
        if h.ndim != 2 or h.shape != (len(ids), emb.shape[1]) or not torch.isfinite(h).all():
            raise SplitLLMError("predictive codec fit: every window needs finite hidden states [T, H] for its T ids")
    if not 1 <= classes <= 64 or not 1 <= gains <= 64:
        raise SplitLLMError("predictive codec fit: classes and gains must lie in [1, 64]")
    if step is None and not 0 < target_rel_error < 1:
        raise SplitLLMError(f"predictive codec target error must lie in (0, 1), got {target_rel_error}")
    say("fitting the token predictor")
    W = fit_token_predictor(emb, windows, ridge)
    r = _residuals(emb, windows, W, None)                                        # [N, H]
    shape = shape_inv = None
    if fisher is not None:
        if tuple(fisher.shape) != (emb.shape[1],) * 2:
            raise SplitLLMError(f"the Fisher matrix is {tuple(fisher.shape)}, not [H, H] for H = {emb.shape[1]}")
        shape, shape_inv = fisher_shaping(fisher)
        r = r @ torch.from_numpy(shape)                                           # [N, H]: r T
    say("fitting the KLT")
    cen = (r - r.mean(0)).double()
    evals, vecs = torch.linalg.eigh(cen.T @ cen)
    U = vecs.flip(1).float().numpy()                                             # columns by variance, descending
    y = r @ torch.from_numpy(U)                                                  # [N, H]
    bulk_error = BulkError(y, torch.cat([h[1:] for _, h in windows]), torch.from_numpy(U),
                           None if shape_inv is None else torch.from_numpy(shape_inv))
    if step is None:
        say(f"choosing the step for relative error {target_rel_error} (non-massive channels)")
        step = step_for_error(bulk_error, target_rel_error, float(y.abs().max()) * 4)
    crms = y.pow(2).mean(0).sqrt().clamp_min(1e-6)                               # [H]
    inner = torch.linspace(0, 1, classes + 1)[1:-1]
    cls = torch.bucketize(crms, torch.quantile(crms, inner)) if classes > 1 else torch.zeros_like(crms, dtype=torch.long)
    cls = torch.unique(cls, return_inverse=True)[1]                              # no empty class
    n_cls = int(cls.max()) + 1
    s = torch.round(y / step)
    escaped = s.abs() > K
    gain = gain_of(y, crms, escaped)                                             # [N]
    edges = torch.quantile(gain[::max(1, len(gain) // 100_000)], torch.linspace(0, 1, gains + 1)[1:-1]) \
        if gains > 1 else torch.zeros(0)
    edges = torch.unique(edges)                                                  # tied quantiles: fewer levels
    levels = torch.bucketize(gain, edges)
    G = len(edges) + 1
    say("counting the symbol models")
    sym = (torch.where(escaped, 0, s).long() + K).clamp(0, 2 * K)               # [N, H]
    idx = (levels[:, None] * n_cls + cls[None]) * (2 * K + 1) + sym
    counts = torch.bincount(idx.reshape(-1), minlength=G * n_cls * (2 * K + 1)).double().view(G, n_cls, 2 * K + 1)
    # "parent" smoothing: the prior mass of add-one, shaped like the class's histogram over all gain
    # levels, so sparse (level, class) models do not spread mass over symbols they never see
    parent = counts.sum(0) + 1
    parent = parent / parent.sum(-1, keepdim=True)
    probs = counts + (2 * K + 1) * parent[None]
    probs = probs / probs.sum(-1, keepdim=True)
    gain_probs = torch.bincount(levels, minlength=G).double() + 1
    # the rate the fit text codes at under these models (the live policy's byte model, `row_bits`)
    coded = probs.reshape(-1)[idx.reshape(-1)].log2().sum() + (gain_probs / gain_probs.sum())[levels].log2().sum()
    shrink = fit_shrink(y, torch.where(escaped, 0.0, s * step), levels, G) if shrink_decoder else torch.ones(G, y.shape[1])
    return PredictiveCodec(W=W, U=U, step=float(step), crms=crms.numpy(), classes=cls.to(torch.uint8).numpy(),
                           gain_edges=edges.float().numpy(), gain_max=float(gain.max()),
                           gain_probs=(gain_probs / gain_probs.sum()).numpy(), sym_probs=probs.numpy(),
                           shrink=shrink.float().numpy(), shape=shape, shape_inv=shape_inv,
                           emb_crc=embedding_crc(emb), info=dict(info or {}, tokens=int(len(r)),
                                                                  rel_error_fit=bulk_error(step),
                                                                  row_bits_fit=float(-coded / len(r)),
                                                                  massive_channels=bulk_error.massive))


__all__ = ["BulkError", "DEFAULT_TARGET_REL_ERROR", "fisher_shaping", "fit_predictive", "fit_shrink",
           "fit_token_predictor", "step_for_error"]
