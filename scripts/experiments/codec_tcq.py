"""Experiment (not shipped): trellis-coded quantization of the closed-loop residuals.

codec_rd_bound.py finds the scalar quantizer of the standing pipeline (token + decoded h_{t-1}
prediction, KLT, one uniform step, ngain entropy model) 0.34 bit per value above the rate-distortion
bound of the same values at the same MSE. Part of that gap is the granular gain a scalar quantizer
cannot have (≤ 1.53 dB, 0.25 bit at high rate); trellis-coded quantization (Marcellin & Fischer 1990)
recovers most of it without changing the character of the error (still spread noise, not zeroed
components, which the deadzone experiment found perplexity dislikes).

TCQ here: reproduction points j·δ (j integer) in four subsets D_k = {j ≡ k mod 4}; a trellis of S
states (4: Ungerboeck's; 8: shift-register, next = 2s + b mod 8) allows the union codebook
A0 = D0 ∪ D2 from even states and A1 = D1 ∪ D3 from odd states, so every stage is a scalar quantizer
of spacing 2δ whose offset the path picks; Viterbi (squared error) chooses the path per token over
its non-outlier KLT components (outliers past tau travel exactly, as before; the path restarts at
state 0 every token, so a token decodes alone given the past). The coded symbol is the index in the
stage's union codebook; its rate is the honest cross-entropy under histograms per (component class,
token gain level, union codebook) fitted on the calibration windows' closed-loop symbols ("parent"
smoothing), the gain level sent as side info — the ngain model of codec_context.py plus the union bit
both ends know from the path. The scalar baseline is rated by the same function (one codebook).
The Viterbi runs in a few lines of C compiled at start (cc -O2) because it runs per token in the loop.

Run (from the repository root, nothing else timing):
  .venv/bin/python scripts/experiments/codec_tcq.py --windows 12 --steps 2.0 --tcq-steps 2.25,2.5
  (--steps: scalar steps; --tcq-steps: union spacings 2δ; --check: the trellis's granular gain on
  uniform noise, no model; --lambada 4: evaluate on LAMBADA passages instead)
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import tempfile

import torch

from splitcli.deploy.calibrate import edge_hidden
from splitcli.model.split import CloudHalf, decoder_parts

# run as a script, this directory is on sys.path
from codec_cloud_adapter import lambada_windows
from codec_context import CAL, K, SEQ, cal_buckets, token_gain
from codec_match import closed_loop, fit_maps, load_windows, quantizer_setup, window_nll
from codec_predictor import experiment_parser
from codec_predictor import features as emb_feats

C_SRC = r"""
#include <math.h>
#include <stdlib.h>
/* u[n]: values in units of delta; next/sub [S*2]; j[n] out: chosen points (value j*delta);
   bp, jj: scratch [n*S]. Squared-error Viterbi from state 0. */
void tcq(const float *u, int n, int S, const int *next, const int *sub, int *j, int *bp, int *jj) {
    double cost[64], nc[64];
    for (int s = 0; s < S; s++) cost[s] = s ? INFINITY : 0.0;
    for (int i = 0; i < n; i++) {
        for (int s = 0; s < S; s++) nc[s] = INFINITY;
        for (int s = 0; s < S; s++) {
            if (!isfinite(cost[s])) continue;
            for (int b = 0; b < 2; b++) {
                int k = sub[2 * s + b], ns = next[2 * s + b];
                int q = k + 4 * (int)lrint((u[i] - k) / 4.0);
                double d = (u[i] - q) * (double)(u[i] - q), c = cost[s] + d;
                if (c < nc[ns]) { nc[ns] = c; bp[i * S + ns] = s; jj[i * S + ns] = q; }
            }
        }
        for (int s = 0; s < S; s++) cost[s] = nc[s];
    }
    int best = 0;
    for (int s = 1; s < S; s++) if (cost[s] < cost[best]) best = s;
    for (int i = n - 1; i >= 0; i--) { j[i] = jj[i * S + best]; best = bp[i * S + best]; }
}
"""

# (next state, subset) per (state, branch): Ungerboeck's 4-state and an 8-state shift-register trellis;
# even states use A0 = D0 ∪ D2, odd states A1 = D1 ∪ D3
TRELLIS = {
    4: ([0, 1, 2, 3, 0, 1, 2, 3], [0, 2, 1, 3, 2, 0, 3, 1]),
    8: ([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7],
        [0, 2, 1, 3, 2, 0, 3, 1, 2, 0, 3, 1, 0, 2, 1, 3]),
}


def load_tcq():
    d = tempfile.mkdtemp(prefix="tcq-")
    src, lib = os.path.join(d, "tcq.c"), os.path.join(d, "tcq.so")
    with open(src, "w") as f:
        f.write(C_SRC)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", src, "-o", lib, "-lm"], check=True)
    return ctypes.CDLL(lib).tcq


class Trellis:
    def __init__(self, states):
        nxt, sub = TRELLIS[states]
        self.S, self.fn = states, load_tcq()
        self.next = (ctypes.c_int * len(nxt))(*nxt)
        self.sub = (ctypes.c_int * len(sub))(*sub)
        self.nxt_t, self.sub_t = torch.tensor(nxt).view(states, 2), torch.tensor(sub).view(states, 2)

    def __call__(self, u):
        # u [n] float (units of delta) -> j [n] int64 points, union codebook per stage [n] (0 / 1)
        u = u.contiguous().float()
        n = len(u)
        j = torch.zeros(n, dtype=torch.int32)
        bp, jj = torch.zeros(n * self.S, dtype=torch.int32), torch.zeros(n * self.S, dtype=torch.int32)
        self.fn(ctypes.c_void_p(u.data_ptr()), n, self.S, self.next, self.sub, ctypes.c_void_p(j.data_ptr()),
                ctypes.c_void_p(bp.data_ptr()), ctypes.c_void_p(jj.data_ptr()))
        j = j.long()
        return j, j.remainder(2)                 # the union codebook is j's parity (A0 even, A1 odd)

    def check_path(self, j):
        # the decoder's view: walk the trellis from state 0 and confirm every point is allowed
        s = 0
        for q in j.tolist():
            k = q % 4
            b = [bb for bb in range(2) if int(self.sub_t[s, bb]) == k]
            if not b:
                return False
            s = int(self.nxt_t[s, b[0]])
        return True


def symbols(j):
    # union-codebook index: even j -> j / 2; odd j -> sign(j) (|j| + 1) / 2 (no zero; both symmetric)
    return torch.where(j % 2 == 0, j // 2, torch.sign(j) * ((j.abs() + 1) // 2))


def closed_loop_tcq(h, ids, emb, W, tau, U, delta, trellis, narrow, shrink, level=None):
    # DPCM as codec_match.closed_loop (h1 predictor) with TCQ on each token's non-outlier components;
    # components in narrow [H] (bool) take the scalar quantizer of step 2δ (union spacing) instead;
    # the decoder multiplies component c's point by shrink[c] (ones: the points themselves), or with
    # level (the token's gain level, side info: (r, out) -> int), by shrink[level, c]
    H = h.shape[1]
    E = 2 * H + 1
    pe = emb_feats(emb, ids) @ W[0, :E]
    Wh = W[0, E:E + H]
    rec = torch.zeros_like(h)
    rec[0] = h[0]
    syms, books, outs, res = [], [], [], []
    for t in range(1, len(h)):
        p = pe[t] + (rec[t - 1] @ Wh if t >= 2 else 0.0)
        r = (h[t] - p) @ U
        out = r.abs() > tau
        sel = ~out & ~narrow
        sv = shrink if level is None else shrink[level(r, out)]
        j, a = trellis(r[sel] / delta)
        q = r.clone()
        q[sel] = j.float() * delta * sv[sel]
        s, b = torch.zeros(H, dtype=torch.long), torch.zeros(H, dtype=torch.long)
        s[sel], b[sel] = symbols(j), a
        sc = ~out & narrow
        s[sc] = torch.round(r[sc] / (2 * delta)).long()
        q[sc] = s[sc].float() * 2 * delta * sv[sc]
        rec[t] = p + q @ U.T
        syms.append(s)
        books.append(b)
        outs.append(out)
        res.append(r)
    return rec, torch.stack(syms), torch.stack(books), torch.stack(outs), torch.stack(res)


def closed_loop_scalar(h, ids, emb, W, tau, U, step):
    rec, s, o, r = closed_loop(h, ids, emb, W, torch.zeros(emb.shape[0], h.shape[1]), False, tau, step, U)
    return rec, s, torch.zeros_like(s), o, r


def rate(cal, ev, cls, crms, n_cls, G):
    # cal, ev: lists of (sym, book, out, res) -> (symbol bits, gain side-info bits) on ev: histograms per
    # (class, gain level, union codebook) from cal, prior shaped like the (class, codebook) histogram
    NS = 2 * K + 1
    thr = cal_buckets(torch.cat([token_gain(r, o, crms, True) for _, _, o, r in cal]), G)

    def ctx(s, b, o, r):
        g = torch.bucketize(token_gain(r, o, crms, True), thr)
        return (cls[None] * G + g[:, None]) * 2 + b, g, s.clamp(-K, K) + K

    cnt = torch.zeros(n_cls * G * 2, NS)
    for c, _, s in (ctx(*x) for x in cal):
        cnt.view(-1).index_add_(0, (c * NS + s).flatten(), torch.ones(s.numel()))
    parent = cnt.view(n_cls, G, 2, NS).sum(1) + 1                       # [cls, 2, NS]
    parent = (parent / parent.sum(-1, keepdim=True)).repeat_interleave(G, 0).view(n_cls, G, 2, NS)
    parent = parent.view(-1, NS)
    lp = torch.log2((cnt + NS * parent) / (cnt.sum(1, keepdim=True) + NS))
    hg = torch.ones(G, G)
    for _, g, _ in (ctx(*x) for x in cal):
        hg.view(-1).index_add_(0, g[:-1] * G + g[1:], torch.ones(len(g) - 1))
    lg = torch.log2(hg / hg.sum(1, keepdim=True))
    bits, side = 0.0, 0.0
    for x in ev:
        c, g, s = ctx(*x)
        bits += -lp[c, s].sum().item()
        side += -lg[torch.cat([torch.zeros(1, dtype=torch.long), g[:-1]]), g].sum().item()
    return bits, side


def check(states):
    # granular gain on uniform data (high rate): MSE of TCQ at union spacing 2 vs a scalar of step 2
    tr = Trellis(states)
    u = torch.rand(200000) * 200 - 100
    j, _ = tr(u)
    mse_tcq, mse_sq = (u - j).pow(2).mean().item(), 4 / 12
    ok = tr.check_path(j[:5000])
    print(json.dumps(dict(states=states, gain_db=10 * math.log10(mse_sq / mse_tcq), path_valid=ok)))


def main() -> None:
    ap = experiment_parser(__doc__, "2.0")
    ap.add_argument("--tcq-steps", default="2.25,2.5", help="union-codebook spacings 2δ")
    ap.add_argument("--states", type=int, default=8, choices=(4, 8))
    ap.add_argument("--classes", type=int, default=16)
    ap.add_argument("--gains", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--lambada", type=int, default=0,
                    help="evaluate on the first N x 2048 tokens of the LAMBADA passages joined instead (fit and "
                         "calibration stay on WikiText-2)")
    ap.add_argument("--shrink", action="store_true", help="decode TCQ points scaled by a per-component least-squares gain")
    ap.add_argument("--shrink-gain", action="store_true",
                    help="as --shrink, one gain per (token gain level, component): larger residuals shrink less")
    ap.add_argument("--narrow", type=float, default=0.0,
                    help="components whose calibration RMS < NARROW x the union spacing use the scalar quantizer")
    args = ap.parse_args()
    if args.check:
        for s in (4, 8):
            check(s)
        return
    lm, emb, tail, fit_h, wins, hs = load_windows(args)
    n_eval, G = args.windows, args.gains
    if args.lambada:
        n_eval = args.lambada
        wins = lambada_windows(lm.tokenizer, None, n_eval)
        with torch.inference_mode():
            hs = [edge_hidden(lm.model, args.split_layer, w.tolist()) for w in wins]
    H = emb.shape[1]
    nll = window_nll(CloudHalf(decoder_parts(lm.model), args.split_layer))
    trellis = Trellis(args.states)
    n_tok = n_eval * (SEQ - 1)
    fp = [nll(h, i) for h, i in zip(hs, wins)]
    ppl_fp = math.exp(sum(fp) / n_tok)
    print(json.dumps(dict(ppl_fp=ppl_fp, windows=n_eval, states=args.states,
                          text="lambada" if args.lambada else "wikitext2")), flush=True)
    runs = [("scalar", float(s)) for s in args.steps.split(",") if s] + \
           [("tcq", float(s)) for s in args.tcq_steps.split(",") if s]
    for kind, spacing in runs:
        # the union codebook's spacing plays the scalar step's part (predictor noise, same step scale)
        W = fit_maps(emb, tail, fit_h, False, spacing ** 2 / 12)
        U, tau, crms, cls = quantizer_setup(emb, tail, fit_h, W, torch.zeros(emb.shape[0], H), False, args.classes)
        shrink, lev = torch.ones(H), None
        if kind == "scalar":
            run = lambda h, i: closed_loop_scalar(h, i, emb, W, tau, U, spacing)  # noqa: E731
        else:
            narrow = crms < args.narrow * spacing

            def tcq(h, i, shrink, lev):
                return closed_loop_tcq(h, i, emb, W, tau, U, spacing / 2, trellis, narrow, shrink, lev)

            if args.shrink or args.shrink_gain:
                # per component (and with --shrink-gain per token gain level), the least-squares gain of
                # the decoded points on the calibration windows' closed-loop residuals, E[r q] / E[q^2]
                # (a table of H or G x H numbers known to both ends)
                passes = [tcq(h, i, shrink, None) for i, h in zip(tail[-CAL:], fit_h[-CAL:])]
                thr = cal_buckets(torch.cat([token_gain(r, o, crms, True) for _, _, _, o, r in passes]), G)
                L = G if args.shrink_gain else 1
                rq, qq = torch.zeros(L, H), torch.zeros(L, H)
                for (rec, _, _, o, r), h in zip(passes, fit_h[-CAL:]):
                    q = torch.where(o, 0.0, (rec - h)[1:] @ U + r)       # the decoded points (rec - h = (q - r) U^T)
                    g = torch.bucketize(token_gain(r, o, crms, True), thr) if L > 1 else torch.zeros(len(r), dtype=torch.long)
                    rq.index_add_(0, g, torch.where(o, 0.0, r) * q)
                    qq.index_add_(0, g, q.pow(2))
                shrink = (rq / qq.clamp_min(1e-9)).clamp(0.5, 1.5)
                if L == 1:
                    shrink = shrink[0]
                else:
                    lev = lambda r, o: int(torch.bucketize(token_gain(r[None], o[None], crms, True), thr)[0])  # noqa: E731
            run = lambda h, i: tcq(h, i, shrink, lev)  # noqa: E731
        cal_s = [run(h, i)[1:] for i, h in zip(tail[-CAL:], fit_h[-CAL:])]
        ev_s, total, err, mse, n_in, per_win = [], 0.0, 0.0, 0.0, 0, []
        for w, (h, i) in enumerate(zip(hs, wins)):
            rec, s, b, o, r = run(h, i)
            ev_s.append((s, b, o, r))
            resid = (rec - h)[1:] @ U                                   # error in the KLT basis
            mse += resid[~o].pow(2).sum().item()
            n_in += int((~o).sum())
            err += ((rec - h)[1:].pow(2).sum() / h[1:].pow(2).sum()).sqrt().item() / n_eval
            d = nll(rec, i)
            total += d
            per_win.append(math.exp((d - fp[w]) / (SEQ - 1)) - 1)
        bits, side = rate(cal_s, ev_s, cls, crms, args.classes, G)
        values = n_eval * SEQ * H
        n_out = n_eval * (SEQ - 1) * H - n_in
        over = n_eval * (16 * H + 16 * (SEQ - 1)) + 26 * n_out + side
        pw = torch.tensor(per_win)
        print(json.dumps(dict(kind=kind, spacing=spacing, states=args.states if kind == "tcq" else None,
                              narrow=int((crms < args.narrow * spacing).sum()) if kind == "tcq" else None,
                              shrink_mean=shrink.mean().item(),
                              bits_per_value=(bits + over) / values, ratio=16 * values / (bits + over),
                              mse_non_outlier=mse / n_in, rel_err=err, ppl_ratio=math.exp(total / n_tok) / ppl_fp,
                              ppl_ratio_window_sd=(pw.std() / math.sqrt(n_eval)).item())), flush=True)


if __name__ == "__main__":
    main()
