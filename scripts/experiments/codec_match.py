"""Experiment (not shipped): a closed-loop predictor that also looks back at earlier occurrences.

codec_context.py's best line predicts h_ℓ,t from the token embeddings and the decoded h_{t-1}
(ridge-linear, DPCM) and codes the residual in its KLT basis. Text repeats itself: names, numbers
and phrases come back within a window, and the hidden state at an earlier occurrence is known to
both ends (decoded). This script adds, per position t:
  match  : the decoded ĥ at the last earlier position with the same bigram (x_{t-1}, x_t) if there is
           one, else at the last earlier position with the same token x_t, else nothing; the ridge
           map is fitted separately for the three cases (bigram / token / no match), each with the
           features [E[x_t], E[x_{t-1}], 1, ĥ_{t-1}, ĥ_match, 1{match}]
  table  : a per-token-id table of the mean residual left by that map on the fit text, shrunk by
           its count (lam), added to the prediction (the token is known to both ends)
and compares it with the plain token + h_{t-1} predictor on the same windows, quantizer (KLT,
one step for all components, tau at the 0.999 quantile, exact outliers), honest static entropy
model (per-class histograms of closed-loop symbols on calibration text) and the forward-gain
adaptive model ("ngain", parent smoothing) of codec_context.py --adaptive. Rates count the sink
token as fp16, 16 header bits per token and 26 bits per outlier, as codec_context.py does.
Text: fit on the last 24 windows of 2048 tokens of wiki.test.raw (histograms, tau and the KLT on
the last 4 of those), evaluation on the first --windows windows (disjoint).

Run (from the repository root, nothing else timing):
  .venv/bin/python scripts/experiments/codec_match.py --windows 12 --steps 2.0,2.25,2.5
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from splitcli.model.split import CloudHalf, decoder_parts

# run as a script, this directory is on sys.path
from codec_context import CAL, K, SEQ, adaptive_rates, hidden_cache, hist_feats, quantize
from codec_predictor import experiment_parser, load_experiment
from codec_predictor import features as emb_feats  # ids [T] -> [T, 2H + 1]: E[t], E[t-1], 1

CASES = 3  # 0: no earlier occurrence, 1: same token earlier, 2: same bigram earlier


def matches(ids):
    # ids [T] -> (case [T], match position [T], 0 where there is none); positions >= 1 only (0 is the sink)
    T, il = len(ids), ids.tolist()
    case, m = torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long)
    last, lastb = {}, {}
    for t in range(1, T):
        b = lastb.get((il[t - 1], il[t]), 0) if t >= 2 else 0
        u = last.get(il[t], 0)
        case[t], m[t] = (2, b) if b else ((1, u) if u else (0, 0))
        last[il[t]] = t
        if t >= 2:
            lastb[(il[t - 1], il[t])] = t
    return case, m


def design(emb, ids, h, use_match):
    # open-loop design matrix with the true past: [T, 3H + 1] or, with matches, [T, 4H + 2]; case [T]
    x = [emb_feats(emb, ids), hist_feats(h, 1)]                    # h_{t-1}; the sink (row 0) is unknown
    case, m = matches(ids)
    if use_match:
        x += [torch.where((m > 0)[:, None], h[m], 0.0), (m > 0).float()[:, None]]
    return torch.cat(x, 1), case if use_match else torch.zeros_like(case)


def apply(x, case, W):
    # x [T, d], case [T], W [CASES, d, H] -> [T, H]: each row through its case's map
    out = torch.zeros(len(x), W.shape[2])
    for k in range(len(W)):
        sel = case == k
        if sel.any():
            out[sel] = x[sel] @ W[k]
    return out


def fit_maps(emb, tail, fit_h, use_match, noise_var, ridge=10.0):
    # per-case ridge maps W [CASES, d, H]; noise_var (scalar) joins the diagonal of the history blocks
    # (the expected X^T X of the decoded, noisy history)
    H = emb.shape[1]
    xs = [design(emb, i, h, use_match) for i, h in zip(tail, fit_h)]
    d = xs[0][0].shape[1]
    hist = torch.zeros(d, dtype=torch.float64)
    hist[2 * H + 1: 3 * H + 1] = 1
    if use_match:
        hist[3 * H + 1: 4 * H + 1] = 1
    W = torch.zeros(CASES, d, H)
    for k in range(CASES if use_match else 1):
        xtx, xty = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, H, dtype=torch.float64)
        n_rows = 0
        for (x, case), h in zip(xs, fit_h):
            sel = case[1:] == k
            xk = x[1:][sel].double()
            xtx += xk.T @ xk
            xty += xk.T @ h[1:][sel].double()
            n_rows += int(sel.sum())
        # noise only where the history is present: for the match block, on its rows with a match (all but case 0)
        nv = hist.clone()
        if use_match and k == 0:
            nv[3 * H + 1:] = 0
        a = xtx + torch.diag(ridge + n_rows * noise_var * nv)
        W[k] = torch.linalg.solve(a, xty).float()
    return W


def token_table(emb, tail, fit_h, W, use_match, lam):
    # [V, H]: per token id, the mean open-loop residual on the fit text shrunk by count (sum / (n + lam))
    V, H = emb.shape
    s, n = torch.zeros(V, H), torch.zeros(V)
    for i, h in zip(tail, fit_h):
        x, case = design(emb, i, h, use_match)
        r = (h - apply(x, case, W))[1:]
        s.index_add_(0, i[1:], r)
        n += torch.bincount(i[1:], minlength=V).float()
    return s / (n[:, None] + lam)


def closed_loop(h, ids, emb, W, table, use_match, tau, step, U):
    # DPCM over one window with the decoded history -> rec [T, H], symbols / outliers / residual [T-1, H]
    H = h.shape[1]
    E = 2 * H + 1
    case, m = matches(ids)
    case = case if use_match else torch.zeros_like(case)
    ef = emb_feats(emb, ids)
    pe = apply(ef, case, W[:, :E]) + table[ids]
    if use_match:
        pe = pe + (m > 0).float()[:, None] * W[case, -1]
    rec = torch.zeros_like(h)
    rec[0] = h[0]                                                   # sink token: fp16 on the wire
    syms, outs, res = [], [], []
    for t in range(1, len(h)):
        Wt = W[case[t]]
        p = pe[t] + (rec[t - 1] @ Wt[E:E + H] if t >= 2 else 0.0)
        if use_match and m[t] > 0:
            p = p + rec[m[t]] @ Wt[E + H:E + 2 * H]
        r = (h[t] - p) @ U
        q, s, o = quantize(r, tau, torch.ones(H), step)
        rec[t] = p + q @ U.T
        syms.append(s)
        outs.append(o)
        res.append(r)
    return rec, torch.stack(syms), torch.stack(outs), torch.stack(res)


def window_nll(cloud):
    # the cloud half's summed next-token NLL over one window: nll(h [T, H], ids [T]) -> float
    def nll(h, i):
        with torch.inference_mode():
            logits = cloud(h[None], torch.arange(SEQ)[None], None, cloud.new_cache(), 0)[0]
        return F.cross_entropy(logits[:-1].float(), i[1:], reduction="sum").item()
    return nll


def quantizer_setup(emb, tail, fit_h, W, table, use_match, classes):
    # from the open-loop residuals of the calibration windows (the last CAL fit windows): the KLT basis
    # U [H, H], tau (0.999 quantile; exact outliers past it), component RMS crms [H], entropy classes cls [H]
    cal = []
    for i, h in zip(tail[-CAL:], fit_h[-CAL:]):
        x, case = design(emb, i, h, use_match)
        cal.append((h - apply(x, case, W) - table[i])[1:])
    cal = torch.cat(cal)
    cen = cal - cal.mean(0)
    U = torch.linalg.eigh((cen.T @ cen).double())[1].float()
    cal = cal @ U
    tau = torch.quantile(cal.abs().flatten()[::7], 0.999).item()
    crms = torch.where(cal.abs() > tau, 0.0, cal).pow(2).mean(0).sqrt().clamp_min(1e-6)
    cls = torch.bucketize(crms, torch.quantile(crms, torch.linspace(0, 1, classes + 1)[1:-1]))
    return U, tau, crms, cls


def load_windows(args):
    # (model, input embeddings [V, H], fit ids, fit h, evaluation ids, evaluation h): the last
    # args.fit_windows and the first args.windows windows of wiki.test.raw, on args.threads threads
    lm, ids, emb = load_experiment()
    torch.set_num_threads(args.threads)
    c = hidden_cache(lm, ids, args.split_layer, args.fit_windows, max(args.windows, 4))
    return lm, emb, c["tail"], c["fit_h"], c["wins"][:args.windows], c["hs"][:args.windows]


def main() -> None:
    ap = experiment_parser(__doc__, "2.0,2.25,2.5")
    ap.add_argument("--predictors", default="h1,match", help="h1 (token + h_{t-1}) and/or match (+ earlier occurrences + table)")
    ap.add_argument("--lam", type=float, default=4.0, help="count shrinkage of the token table (0 disables the table)")
    ap.add_argument("--classes", type=int, default=16)
    ap.add_argument("--gains", type=int, default=8)
    ap.add_argument("--mean-buckets", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    lm, emb, tail, fit_h, wins, hs = load_windows(args)
    ell, n_eval = args.split_layer, args.windows
    H = emb.shape[1]
    nll = window_nll(CloudHalf(decoder_parts(lm.model), ell))
    n_tok = n_eval * (SEQ - 1)
    fp = [nll(h, i) for h, i in zip(hs, wins)]
    ppl_fp = math.exp(sum(fp) / n_tok)
    print(json.dumps(dict(ppl_fp=ppl_fp, split_layer=ell, windows=n_eval)), flush=True)
    for pred in args.predictors.split(","):
        use_match = pred == "match"
        for step in (float(s) for s in args.steps.split(",")):
            W = fit_maps(emb, tail, fit_h, use_match, step ** 2 / 12)
            table = token_table(emb, tail, fit_h, W, use_match, args.lam) if use_match and args.lam > 0 \
                else torch.zeros(emb.shape[0], H)
            U, tau, crms, cls = quantizer_setup(emb, tail, fit_h, W, table, use_match, args.classes)
            hist, cal_syms = torch.ones(args.classes, 2 * K + 1), []
            # the same histograms split by the match case (known to both ends), prior shaped like the class's
            chist = torch.zeros(CASES, args.classes, 2 * K + 1)
            for i, h in zip(tail[-CAL:], fit_h[-CAL:]):
                _, s, o, r = closed_loop(h, i, emb, W, table, use_match, tau, step, U)
                s = s.clamp(-K, K) + K
                cal_syms.append((s, r, o))
                case = matches(i)[0][1:]
                for k in range(args.classes):
                    hist[k] += torch.bincount(s[:, cls == k].flatten(), minlength=2 * K + 1)
                    for j in range(CASES):
                        chist[j, k] += torch.bincount(s[case == j][:, cls == k].flatten(), minlength=2 * K + 1)
            logp = torch.log2(hist / hist.sum(1, keepdim=True))
            prior = hist / hist.sum(1, keepdim=True)
            clogp = torch.log2((chist + (2 * K + 1) * prior) / (chist.sum(2, keepdim=True) + 2 * K + 1))
            ent, cent, energy, err, n_out, total, ev_syms, per_win = 0.0, 0.0, 0.0, 0.0, 0, 0.0, [], []
            for w, (h, i) in enumerate(zip(hs, wins)):
                rec, s, o, r = closed_loop(h, i, emb, W, table, use_match, tau, step, U)
                s = s.clamp(-K, K) + K
                ev_syms.append((s, r, o))
                ent += -logp[cls[None].expand_as(s), s].sum().item()
                case = matches(i)[0][1:, None].expand_as(s)
                cent += -clogp[case, cls[None].expand_as(s), s].sum().item()
                energy += torch.where(o, 0.0, r).pow(2).sum().item()
                n_out += int(o.sum())
                err += ((rec - h)[1:].pow(2).sum() / h[1:].pow(2).sum()).sqrt().item() / n_eval
                d = nll(rec, i)
                total += d
                per_win.append(math.exp((d - fp[w]) / (SEQ - 1)) - 1)
            values = n_eval * SEQ * H
            over = n_eval * (16 * H + 16 * (SEQ - 1)) + 26 * n_out          # sink fp16, headers, outliers
            rates = adaptive_rates(cal_syms, ev_syms, cls, crms, args.classes, args.gains, args.mean_buckets)
            b_ng, side, _ = rates["ngain"]
            pw = torch.tensor(per_win)
            print(json.dumps(dict(predictor=pred, lam=args.lam if use_match else None, step=step,
                                  static_bits_per_value=(ent + over) / values, static_ratio=16 * values / (ent + over),
                                  ngain_bits_per_value=(b_ng + side + over) / values,
                                  ngain_ratio=16 * values / (b_ng + side + over),
                                  case_static_bits_per_value=(cent + over) / values,
                                  residual_energy_per_value=energy / values, rel_err=err,
                                  ppl_ratio=math.exp(total / n_tok) / ppl_fp,
                                  ppl_ratio_window_sd=(pw.std() / math.sqrt(n_eval)).item(),
                                  cases=[float((matches(i)[0][1:] == k).float().mean()) for k in range(CASES)]
                                  if use_match else None)), flush=True)


if __name__ == "__main__":
    main()
