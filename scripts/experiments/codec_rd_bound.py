"""Experiment (not shipped): how much could any quantizer of the closed-loop residuals still save?

The standing prediction pipeline (codec_match.py --predictors h1: token + decoded h_{t-1}, KLT,
one uniform step for all components, exact outliers past tau, forward-gain "ngain" entropy model)
codes each residual component with a scalar quantizer and an adaptive histogram. Rate-distortion
theory bounds what any quantizer of the same values could do at the same mean squared error: for a
memoryless source known only through its distribution, no code (vector, trellis, lattice, ...) gets
below R(D). This script measures that bound on the values the scalar quantizer actually sees.

Source model: every non-outlier residual component of the evaluation windows (tokens >= 1), split
into subsources by what both ends know — the component's entropy class (16, by calibration RMS) and
the token's forward gain level (G, side info) — each subsource i.i.d. with its *empirical*
distribution on the evaluation text itself (an oracle: a real code would only know calibration
statistics, so the bound is optimistic). R(D) of the composite source at total distortion D is the
sum of the subsources' R_i(D_i) at one common slope (reverse water-filling); each R_i(D_i) comes from
Blahut-Arimoto on a fine grid (bins of step/16, reproduction points every step/8), with Blahut's dual
lower bound to show convergence.

Compared at the scalar quantizer's measured MSE (non-outlier components):
  ecsq_model_bits : the measured rate (ngain histograms fitted on calibration text, parent smoothing)
  ecsq_oracle_bits: the empirical entropy of the same symbols per subsource on the evaluation text
                    (the scalar quantizer with a perfectly matched model)
  rd_bits         : R(D) of the composite source at the same D (Blahut-Arimoto), upper / dual lower
All in bits per value over every value of the frame (sink token included, as the ratios are).
Overheads (sink as fp16, 16 header bits per token, 26 bits per outlier, gain side info) are the
same for every line, so the implied ratio of an R(D)-achieving quantizer is 16 / (rd_bits + over).
What it does not cover: dependence between components or tokens beyond the class and gain context
(the adaptive-context experiments found <= 0.015 bit there), and perplexity (MSE is the proxy).

Run (from the repository root, nothing else timing):
  .venv/bin/python scripts/experiments/codec_rd_bound.py --windows 12 --steps 2.0,2.25,2.5
"""

from __future__ import annotations

import json
import math

import torch

# run as a script, this directory is on sys.path
from codec_context import CAL, K, SEQ, adaptive_rates, cal_buckets, token_gain
from codec_match import closed_loop, fit_maps, load_windows, quantizer_setup
from codec_predictor import experiment_parser

LN2 = math.log(2.0)


def blahut_arimoto(p, x, y, beta, q=None, iters=3000, tol=1e-9):
    # p [S, nx] subsource distributions on bin centres x [nx], reproduction points y [ny], slope beta
    # (nats per unit of squared error) -> (R upper [S] bits, R dual lower [S] bits, D [S], q [S, ny])
    d = (x[:, None] - y[None]) ** 2                                   # [nx, ny]
    A = torch.exp(-beta * d)                                          # [nx, ny]
    q = torch.full((len(p), len(y)), 1.0 / len(y), dtype=p.dtype) if q is None else q
    for _ in range(iters):
        Z = q @ A.T                                                    # [S, nx]
        c = (p / Z.clamp_min(1e-300)) @ A                              # [S, ny]
        q_new = q * c
        if (q_new - q).abs().max() < tol:
            q = q_new
            break
        q = q_new
    Z = (q @ A.T).clamp_min(1e-300)
    c = (p / Z) @ A
    D = ((p / Z) * (q @ (A * d).T)).sum(1)
    logZ = (p * torch.log(Z)).sum(1)
    R = (-beta * D - logZ) / LN2                                       # I(X; Y) of the current channel
    R_low = R - torch.log(c.max(1).values) / LN2                       # Blahut's lower bound on R(D)
    return R, R_low, D, q


def rd_at(p, w, x, y, D_target, betas):
    # composite source: subsource weights w [S] (fraction of values); walk the common slope down a grid
    # and interpolate R between the two points around D_target -> (R upper, R lower) per value
    pts, q = [], None
    for beta in betas:
        R, R_low, D, q = blahut_arimoto(p, x, y, beta, q)
        pts.append(((w * D).sum().item(), (w * R).sum().item(), (w * R_low).sum().item()))
    pts.sort()
    for (d0, r0, l0), (d1, r1, l1) in zip(pts, pts[1:]):
        if d0 <= D_target <= d1:
            a = (D_target - d0) / (d1 - d0)
            return r0 + a * (r1 - r0), l0 + a * (l1 - l0), pts
    raise ValueError(f"D {D_target} outside the slope grid's range {pts[0][0]} .. {pts[-1][0]}")


def main() -> None:
    ap = experiment_parser(__doc__, "2.0,2.25,2.5")
    ap.add_argument("--classes", type=int, default=16)
    ap.add_argument("--gains", type=int, default=8)
    ap.add_argument("--mean-buckets", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    _, emb, tail, fit_h, wins, hs = load_windows(args)
    n_eval = args.windows
    H, G = emb.shape[1], args.gains
    table = torch.zeros(emb.shape[0], H)
    for step in (float(s) for s in args.steps.split(",")):
        # the standing pipeline, exactly as codec_match.py --predictors h1 builds it
        W = fit_maps(emb, tail, fit_h, False, step ** 2 / 12)
        U, tau, crms, cls = quantizer_setup(emb, tail, fit_h, W, table, False, args.classes)
        run = lambda h, i: closed_loop(h, i, emb, W, table, False, tau, step, U)  # noqa: E731
        cal_syms = [(s.clamp(-K, K) + K, r, o) for _, s, o, r in (run(h, i) for i, h in zip(tail[-CAL:], fit_h[-CAL:]))]
        ev = [(s.clamp(-K, K) + K, r, o) for _, s, o, r in (run(h, i) for h, i in zip(hs, wins))]
        b_ng, side, _ = adaptive_rates(cal_syms, ev, cls, crms, args.classes, G, args.mean_buckets)["ngain"]
        thr = cal_buckets(torch.cat([token_gain(r, o, crms, True) for _, r, o in cal_syms]), G)
        # subsource index per value (class x gain level), non-outlier values only
        sub = torch.cat([cls[None] * G + torch.bucketize(token_gain(r, o, crms, True), thr)[:, None] for _, r, o in ev])
        r_all = torch.cat([r for _, r, _ in ev])
        s_all = torch.cat([s for s, _, _ in ev])
        keep = ~torch.cat([o for _, _, o in ev])
        err = r_all - (s_all - K).float() * step
        D = err[keep].pow(2).mean().item()                              # the scalar quantizer's MSE
        sub, r_in, s_in = sub[keep], r_all[keep].double(), s_all[keep]
        S, n_in = args.classes * G, int(keep.sum())
        # the scalar quantizer with a model matched to the evaluation text: entropy per subsource
        oracle = 0.0
        for k in range(S):
            cnt = torch.bincount(s_in[sub == k], minlength=2 * K + 1).double()
            pk = cnt[cnt > 0] / cnt.sum() if cnt.sum() > 0 else cnt[:0]
            oracle += -(cnt[cnt > 0] * torch.log2(pk)).sum().item()
        # the empirical source on a fine grid
        wbin = step / 16
        nb = int(math.ceil(tau / wbin))
        xb = torch.arange(-nb, nb + 1, dtype=torch.float64) * wbin      # [nx]
        yb = torch.arange(-2 * int(math.ceil(tau / step * 4)), 2 * int(math.ceil(tau / step * 4)) + 1,
                          dtype=torch.float64) * step / 8              # [ny]
        yb = yb[yb.abs() <= tau + step]
        idx = torch.round(r_in / wbin).long().clamp(-nb, nb) + nb
        cnt = torch.zeros(S, len(xb), dtype=torch.float64)
        cnt.index_put_((sub, idx), torch.ones(n_in, dtype=torch.float64), accumulate=True)
        w = cnt.sum(1)
        used = w > 0
        p = cnt[used] / w[used, None]
        w = w[used] / n_in
        betas = torch.logspace(math.log10(0.2 / D), math.log10(5 / D), 30).tolist()
        R_up, R_low, _ = rd_at(p, w, xb, yb, D, betas)
        values = n_eval * SEQ * H
        n_out = n_eval * (SEQ - 1) * H - n_in
        over = n_eval * (16 * H + 16 * (SEQ - 1)) + 26 * n_out + side
        rd_bits = R_up * n_in
        print(json.dumps(dict(
            step=step, windows=n_eval, mse_non_outlier=D, tau=tau, subsources=int(used.sum()),
            ecsq_model_bits=b_ng / values, ecsq_oracle_bits=oracle / values,
            rd_bits=rd_bits / values, rd_bits_lower=R_low * n_in / values, overhead_bits=over / values,
            ratio_ecsq=16 * values / (b_ng + over), ratio_ecsq_oracle=16 * values / (oracle + over),
            ratio_rd=16 * values / (rd_bits + over),
            gap_model_to_rd_bits=(b_ng - rd_bits) / values)), flush=True)


if __name__ == "__main__":
    main()
