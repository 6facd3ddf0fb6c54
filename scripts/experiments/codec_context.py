"""Experiment (not shipped): closed-loop prediction of h_ℓ from the token AND the past hidden states.

Extends codec_predictor.py (token-embedding predictor). Both ends of a split know the hidden
states already sent, so the edge can predict h_t from the *decoded* h_{t-1}, h_{t-2}, ... (DPCM:
the predictor is fed the cloud's reconstruction, never the true past) plus E[x_t], E[x_{t-1}],
and send only the quantized residual. Feature sets (ridge-linear, fitted offline):
  emb  : E[x_t], E[x_{t-1}], 1                     (the codec_predictor baseline)
  h1   : emb + h_{t-1}
  h2   : emb + h_{t-1}, h_{t-2}
  h2m  : emb + h_{t-1}, h_{t-2}, mean(h_1 .. h_{t-1})
Past h at position 0 (the attention sink, sent as fp16) is treated as unknown (zeros).
Part 1 (open loop): fraction of the bulk energy left after prediction with the true past (bulk =
positions >= 1, channels with RMS <= 5x the median RMS, |h| <= the 0.999 quantile).
Part 2 (closed loop): codec_predictor's honest accounting (fixed step, channel scale rms^alpha,
tau outliers exact at 26 bits, static per-class histograms fitted on calibration text, 16 header
bits per token, sink token as fp16), with the history features taken from the reconstruction.
The history weights are refitted per step with the quantizer's noise variance (step*scale)^2/12
added to the history block of X^T X (the expected X^T X of noisy inputs), so the predictor
does not over-trust noisy history. Text: fit on the last --fit-windows windows of wiki.test.raw
(histograms and tau/scale on the last 4 of those), evaluation on the first --windows windows.
Hidden states are cached in /tmp/codecctx-l{ℓ}-f{fit}-w{windows}.pt.

Run (1 torch thread, under the shared CPU lock):
  flock -s /tmp/splitllm-cpu.lock .venv/bin/python scripts/experiments/codec_context.py \
      --windows 4 --steps 1.5,1.75,2.0,2.25 --sets h1,emb,none
  (~13 min on a shared 2-core machine; add --energy-only for part 1 alone.)
  KLT basis, MSE step (alpha 0), 16 entropy classes:
  ... --windows 4 --sets h1 --basis klt --alpha 0 --classes 16 --steps 2.0,2.5
Part 3 (--adaptive): the same symbols (same quantizer, reconstruction and perplexity) rated under
adaptive entropy models, histograms per (component class, context) fitted on calibration text only:
  prevmag / prevmean : backward, the same component's |s| at t-1 (0, 1, >=2) / token t-1's mean |s|
  intra              : backward, inside token t: decoded |s| so far over its calibration mean
  gain / ngain       : forward, token t's residual log2 RMS (ngain: in units of each component's RMS)
                       in G levels, sent as side info (coded conditioned on the previous level)
  a+b                : context products
with add-one smoothing and "parent" smoothing (same prior mass, shaped like the class histogram).
  ... --windows 4 --sets h1 --basis klt --alpha 0 --classes 16 --steps 2.0,2.25,2.5 --adaptive
Part 4, spending the error where the cloud's loss is sensitive (codec_sensitivity.py writes the inputs):
  --basis fisher --gamma G : quantize r F^G Q (F the empirical Fisher of the NLL w.r.t. h_l)
  --token-mult FILE        : per-token step multipliers predicted on the edge (4 side-info bits/token)
  --deadzone THETA         : round |x|/step up only past k + 1/2 + THETA (decoder unchanged)
Part 5, the decoder's reconstruction points:
  --recon                  : decode a nonzero symbol k to sign(k) (|k| - delta) step instead of the bin's
                             centre k step, delta per (entropy class, |k| in 1, 2, >= 3) fitted on the
                             calibration windows' closed-loop residuals (the mean of |k| - |v| in each bin:
                             the bin's centroid); a table of 3 x classes numbers known to both ends, no rate
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

from splitcli.deploy.calibrate import edge_hidden
from splitcli.model.split import CloudHalf, decoder_parts

# run as a script, this directory is on sys.path
from codec_predictor import experiment_parser, load_experiment
from codec_predictor import features as emb_feats  # ids [T] -> [T, 2H + 1]: E[t], E[t-1], 1

SEQ, K, CAL = 2048, 512, 4
DEADZONE = [0.0]  # set from --deadzone (one value per run)
RECON = [None]  # --recon: per-component centroid offsets [H, 4] (index min(|k|, 3); column 0 unused)
HIST = {"none": 0, "emb": 0, "h1": 1, "h2": 2, "h2m": 3}  # number of [H] history blocks


def hist_feats(h, n):
    # h [T, H] (row 0 = sink, unknown to the predictor) -> [T, n*H]: h_{t-1}, h_{t-2}, mean(h_1..h_{t-1})
    hz = h.clone()
    hz[0] = 0
    z = torch.zeros(2, h.shape[1])
    blocks = [torch.cat([z[:1], hz[:-1]]), torch.cat([z, hz[:-2]])]
    cnt = (torch.arange(len(h)) - 1).clamp_min(1).unsqueeze(1).float()   # t - 1 past rows for position t (>= 1)
    blocks.append(torch.cat([z[:1], torch.cumsum(hz, 0)[:-1]]) / cnt)
    return torch.cat(blocks[:n], 1) if n else torch.zeros(len(h), 0)


def gram(emb, ids_list, h_list, n):
    # X^T X and X^T Y over positions >= 1, float64
    d = 2 * emb.shape[1] + 1 + n * emb.shape[1]
    xtx, xty = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, emb.shape[1], dtype=torch.float64)
    for ids, h in zip(ids_list, h_list):
        x = torch.cat([emb_feats(emb, ids), hist_feats(h, n)], 1)[1:].double()
        xtx += x.T @ x
        xty += x.T @ h[1:].double()
    return xtx, xty


def solve(xtx, xty, n_rows, noise_var=None, n=0, ridge=10.0):
    # ridge solve; noise_var [H] adds E[noise^2] * N to the diagonal of the h_{t-1}, h_{t-2} blocks
    a = xtx + ridge * torch.eye(len(xtx), dtype=torch.float64)
    if noise_var is not None and n:
        H = len(noise_var)
        start = len(xtx) - n * H
        for b in range(min(n, 2)):
            idx = torch.arange(start + b * H, start + (b + 1) * H)
            a[idx, idx] += n_rows * noise_var.double()
    return torch.linalg.solve(a, xty).float()


def quantize(x, tau, scale, step, deadzone=0.0):
    # deadzone theta: |x| / step rounds up only past k + 1/2 + theta (fewer, cheaper symbols near zero;
    # the decoder is unchanged)
    out = x.abs() > tau
    v = torch.where(out, torch.zeros_like(x), x) / (scale * step)
    sym = torch.sign(v) * torch.floor(v.abs() + 0.5 - deadzone).clamp_min(0)
    level = sym
    if RECON[0] is not None:  # the bin's centroid instead of its centre (zero stays zero)
        k = sym.abs().long().clamp(max=3)
        level = sym - torch.sign(sym) * RECON[0].gather(1, k[:, None])[:, 0]
    return torch.where(out, x, level * scale * step), sym.long(), out


def closed_loop(h, ids, emb, W, n, tau, scale, step, U, Ui=None, mult=None):
    # DPCM over one window: returns reconstruction [T, H], symbols [T-1, H], outlier mask [T-1, H],
    # residual before quantization [T-1, H]; the residual is quantized in the orthogonal basis U
    # (identity = channels, or the KLT) or through an invertible analysis matrix U with synthesis Ui
    Ui = U.T if Ui is None else Ui
    E = 2 * emb.shape[1] + 1
    pe = emb_feats(emb, ids) @ W[:E]
    Wh = [W[E + b * h.shape[1]: E + (b + 1) * h.shape[1]] for b in range(n)]
    rec = torch.zeros_like(h)
    rec[0] = h[0]                                                   # sink token: fp16 on the wire
    syms, outs, res = [], [], []
    zero, run = torch.zeros(h.shape[1]), torch.zeros(h.shape[1])
    for t in range(1, len(h)):
        past = [rec[t - 1] if t >= 2 else zero, rec[t - 2] if t >= 3 else zero, run / max(t - 1, 1)]
        p = pe[t] + sum((past[b] @ Wh[b] for b in range(n)), zero)
        r = (h[t] - p) @ U
        q, s, o = quantize(r, tau, scale, step if mult is None else step * mult[t].item(), DEADZONE[0])
        rec[t] = p + q @ Ui
        run += rec[t]
        syms.append(s)
        outs.append(o)
        res.append(r)
    return rec, torch.stack(syms), torch.stack(outs), torch.stack(res)


def token_gain(res, out, crms, norm):
    # res, out [T-1, H] -> log2 RMS per token [T-1] over the non-outlier components (outliers go exact);
    # norm: in units of each component's calibration RMS, so every component weighs the same
    r = res / crms if norm else res
    r = torch.where(out, 0.0, r)
    return 0.5 * torch.log2(r.pow(2).sum(1) / (~out).sum(1).clamp_min(1) + 1e-12)


def cal_buckets(x, n):
    # calibration values [N] -> n-1 inner quantile thresholds (n equally filled buckets)
    return torch.quantile(x.flatten().float(), torch.linspace(0, 1, n + 1)[1:-1])


VARIANTS = ("static", "prevmag", "prevmean", "prevmag+prevmean", "intra", "intra+prevmag", "gain",
            "gain+prevmag", "ngain", "ngain+prevmag", "ngain+prevmag+prevmean")


def intra_ratio(sym, order, e):
    # backward gain inside token t: components are decoded in order (largest calibration RMS first);
    # component j sees (sum of |s| decoded before it + 1) / (their calibration mean |s| + 1) [T-1, H]
    mag = (sym[:, order] - K).abs().float()
    cm = torch.cumsum(mag, 1) - mag
    ce = torch.cumsum(e[order], 0) - e[order]
    ratio = torch.empty_like(mag)
    ratio[:, order] = (cm + 1) / (ce + 1)
    return ratio


def window_feats(sym, res, out, crms, thr, order, e):
    # one window's symbols sym [T-1, H] (clamped index 0..2K) -> what the contexts are built from.
    # Backward contexts use only symbols of token t-1, which the decoder already has; token 1 (the
    # first after the sink) has no past residual and takes context 0. Gain levels [T-1] travel as
    # side info (forward-adaptive).
    H = sym.shape[1]
    mag = (sym - K).abs()
    pm = torch.cat([torch.zeros(1), mag[:-1].float().mean(1)])                    # mean |s| of token t-1
    return dict(sym=sym, prev_mag=torch.cat([torch.zeros(1, H, dtype=torch.long), mag[:-1].clamp_max(2)]),
                pmb=torch.bucketize(pm, thr["pm"]), intra=torch.bucketize(intra_ratio(sym, order, e), thr["intra"]),
                gain=torch.bucketize(token_gain(res, out, crms, False), thr["gain"]),
                ngain=torch.bucketize(token_gain(res, out, crms, True), thr["ngain"]))


def context(name, f, cls, G, B):
    # variant name, window feats -> (context index [T-1, H], contexts per component class); every
    # context refines one class: class = index // multiplier
    T1, H = f["sym"].shape
    c, mult = cls[None].expand(T1, H), 1
    for part in name.split("+"):
        if part == "prevmag":
            c, mult = c * 3 + f["prev_mag"], mult * 3
        elif part == "prevmean":
            c, mult = c * B + f["pmb"][:, None], mult * B
        elif part == "intra":
            c, mult = c * B + f["intra"], mult * B
        elif part in ("gain", "ngain"):
            c, mult = c * G + f[part][:, None], mult * G
    return c, mult


def adaptive_rates(cal, ev, cls, crms, n_cls, G, B):
    # cal, ev: lists of (sym, res, out) per window -> {variant: (symbol bits with "parent" smoothing,
    # gain side-info bits, symbol bits with add-one)} on the evaluation windows. Histograms (and gain /
    # bucket thresholds) come from the calibration windows only. Both smoothings add the same prior
    # mass (2K + 1 counts per context): add-one (as the static model), and "parent" (the prior shaped
    # like the context's static component-class histogram, which many sparse contexts need).
    NS = 2 * K + 1
    thr = {"pm": cal_buckets(torch.cat([(s - K).abs().float().mean(1) for s, _, _ in cal]), B),
           "gain": cal_buckets(torch.cat([token_gain(r, o, crms, False) for _, r, o in cal]), G),
           "ngain": cal_buckets(torch.cat([token_gain(r, o, crms, True) for _, r, o in cal]), G)}
    order = torch.argsort(crms, descending=True)
    e = torch.cat([(s - K).abs().float() for s, _, _ in cal]).mean(0)            # calibration mean |s| [H]
    thr["intra"] = cal_buckets(torch.cat([intra_ratio(s, order, e) for s, _, _ in cal])[:, ::7], B)
    cal_f = [window_feats(s, r, o, crms, thr, order, e) for s, r, o in cal]
    ev_f = [window_feats(s, r, o, crms, thr, order, e) for s, r, o in ev]

    def counts(name, n_ctx):
        cnt = torch.zeros(n_ctx * NS)
        for f in cal_f:
            cnt += torch.bincount((context(name, f, cls, G, B)[0] * NS + f["sym"]).flatten(), minlength=n_ctx * NS)
        return cnt.view(n_ctx, NS)

    def xent(name, logp):
        return sum(-logp[context(name, f, cls, G, B)[0], f["sym"]].sum().item() for f in ev_f)

    def prev(g):
        return torch.cat([torch.zeros(1, dtype=torch.long), g[:-1]])

    parent = counts("static", n_cls) + 1
    parent /= parent.sum(1, keepdim=True)
    out = {}
    for name in VARIANTS:
        mult = context(name, ev_f[0], cls, G, B)[1]
        cnt = counts(name, n_cls * mult)
        lp_add1 = torch.log2((cnt + 1) / (cnt + 1).sum(1, keepdim=True))
        lp_par = torch.log2((cnt + NS * parent.repeat_interleave(mult, 0)) / (cnt.sum(1, keepdim=True) + NS))
        side, lev = 0.0, name.split("+")[0]
        if lev in ("gain", "ngain"):
            # gain level per token, coded with a histogram conditioned on the previous token's level
            # (G x G, add-one, calibration text): the side info's honest cross-entropy
            hg = torch.ones(G * G)
            for f in cal_f:
                hg += torch.bincount(prev(f[lev]) * G + f[lev], minlength=G * G)
            lg = torch.log2(hg.view(G, G) / hg.view(G, G).sum(1, keepdim=True))
            side = sum(-lg[prev(f[lev]), f[lev]].sum().item() for f in ev_f)
        out[name] = (xent(name, lp_par), side, xent(name, lp_add1))
    return out


def hidden_cache(lm, ids, ell, n_fit, n_eval):
    path = f"/tmp/codecctx-l{ell}-f{n_fit}-w{n_eval}.pt"
    if os.path.exists(path):
        return torch.load(path)
    tail = ids[-SEQ * n_fit:].reshape(n_fit, SEQ)
    wins = ids[: SEQ * n_eval].reshape(n_eval, SEQ)
    with torch.inference_mode():
        d = dict(tail=tail, wins=wins, fit_h=[edge_hidden(lm.model, ell, w.tolist()) for w in tail],
                 hs=[edge_hidden(lm.model, ell, w.tolist()) for w in wins])
    torch.save(d, path)
    return d


def main() -> None:
    ap = experiment_parser(__doc__, "1.5,2.0,2.5,3.0")
    ap.add_argument("--sets", default="h1,emb,none", help="closed-loop feature sets (part 2)")
    ap.add_argument("--classes", type=int, default=8, help="entropy-model classes (components grouped by RMS)")
    ap.add_argument("--energy-only", action="store_true")
    ap.add_argument("--basis", choices=("chan", "klt", "fisher"), default="chan",
                    help="quantize the residual per channel, in the KLT of the calibration residual, or in the "
                         "KLT of the residual weighted by F^gamma (F: Fisher of the NLL w.r.t. h_l, --fisher)")
    ap.add_argument("--fisher", default="/tmp/fisher-l15.pt", help="--basis fisher: file with F [H, H]")
    ap.add_argument("--token-mult", default=None,
                    help="file with per-token step multipliers (lists 'fit' and 'ev' of [T]) predicted on the edge "
                         "from h_t and the tokens; costs 4 bits of side info per token")
    ap.add_argument("--deadzone", type=float, default=0.0, help="rounding deadzone theta in [0, 0.5)")
    ap.add_argument("--recon", action="store_true",
                    help="decode nonzero symbols to their bins' calibration centroids (per class and |k| 1, 2, >= 3)")
    ap.add_argument("--gamma", type=float, default=0.5, help="--basis fisher: exponent of F (0 = plain KLT)")
    ap.add_argument("--adaptive", action="store_true",
                    help="also rate the same symbols under adaptive entropy models (one line per variant)")
    ap.add_argument("--gains", type=int, default=4, help="--adaptive: per-token gain levels G (side info)")
    ap.add_argument("--mean-buckets", type=int, default=4, help="--adaptive: buckets B of mean |s| of token t-1")
    ap.add_argument("--hist-windows", type=int, default=CAL,
                    help="--adaptive: calibration windows the adaptive histograms are fitted on (last of the fit text)")
    args = ap.parse_args()
    DEADZONE[0] = args.deadzone
    lm, ids, emb = load_experiment()
    ell, n_eval = args.split_layer, args.windows
    c = hidden_cache(lm, ids, ell, args.fit_windows, max(n_eval, 4))
    tail, wins, fit_h, hs = c["tail"], c["wins"][:n_eval], c["fit_h"], c["hs"][:n_eval]
    n_rows = sum(len(h) - 1 for h in fit_h)
    # bulk mask on the evaluation text (same for every feature set)
    ev = torch.cat([h[1:] for h in hs])
    rms = ev.pow(2).mean(0).sqrt()
    bulk = (rms <= 5 * rms.median())[None] & (ev.abs() <= torch.quantile(ev.abs().flatten()[::7], 0.999))
    grams, Ws = {}, {}
    full = gram(emb, tail, fit_h, 3)                     # feature sets are nested prefixes of h2m's
    for name in HIST:
        if name == "none":
            continue
        d = 2 * emb.shape[1] + 1 + HIST[name] * emb.shape[1]
        grams[name] = (full[0][:d, :d], full[1][:d])
        Ws[name] = solve(*grams[name], n_rows)
        r = torch.cat([(h - torch.cat([emb_feats(emb, i), hist_feats(h, HIST[name])], 1) @ Ws[name])[1:]
                       for h, i in zip(hs, wins)])
        var_ratio = (r.pow(2) * bulk).sum(0) / (ev.pow(2) * bulk).sum(0)   # per channel, uncentred
        cb = rms <= 5 * rms.median()
        print(json.dumps(dict(part="open_loop", set=name, bulk_energy_left=((r.pow(2) * bulk).sum()
                                                                             / (ev.pow(2) * bulk).sum()).item(),
                              all_energy_left=(r.pow(2).sum() / ev.pow(2).sum()).item(),
                              bits_gain_per_value=-0.5 * var_ratio[cb].log2().mean().item(),
                              n_bulk_channels=int(cb.sum()))), flush=True)
    if args.energy_only:
        return
    cloud = CloudHalf(decoder_parts(lm.model), ell)

    def nll(h, i):
        logits = cloud(h[None], torch.arange(SEQ)[None], None, cloud.new_cache(), 0)[0]
        return F.cross_entropy(logits[:-1].float(), i[1:], reduction="sum").item()

    n_tok = n_eval * (SEQ - 1)
    ppl_fp = math.exp(sum(nll(h, i) for h, i in zip(hs, wins)) / n_tok)
    print(json.dumps(dict(ppl_fp=ppl_fp, split_layer=ell, windows=n_eval)), flush=True)
    H = emb.shape[1]
    for name in args.sets.split(","):
        n = HIST[name]
        W0 = torch.zeros(2 * H + 1 + n * H, H) if name == "none" else Ws[name]
        # tau and channel scale from open-loop residuals of the calibration windows (true past)
        cal = torch.cat([(h - torch.cat([emb_feats(emb, i), hist_feats(h, n)], 1) @ W0)[1:]
                         for h, i in zip(fit_h[-CAL:], tail[-CAL:])])
        cen = cal - cal.mean(0)
        U, Ui = torch.eye(H), None
        if args.basis == "klt":
            U = torch.linalg.eigh((cen.T @ cen).double())[1].float()
        elif args.basis == "fisher":
            # y = r F^gamma Q: the weighted error (r-space error)^T F (r-space error) becomes plain MSE in y
            # at gamma 1/2; F^gamma is scaled to determinant 1 so a step costs the same rate in every basis
            ev, V = torch.linalg.eigh(torch.load(args.fisher)["F"].double())
            ev = ev.clamp_min(ev.max() * 1e-6)
            ev = ev / ev.log().mean().exp()
            Fg, Fgi = (V * ev ** args.gamma) @ V.T, (V * ev ** -args.gamma) @ V.T
            cw = cen.double() @ Fg
            Q = torch.linalg.eigh(cw.T @ cw)[1]
            U, Ui = (Fg @ Q).float(), (Q.T @ Fgi).float()
        cal = cal @ U
        tau = torch.quantile(cal.abs().flatten()[::7], 0.999).item()
        crms = torch.where(cal.abs() > tau, 0.0, cal).pow(2).mean(0).sqrt().clamp_min(1e-6)
        scale = crms ** args.alpha / (crms ** args.alpha).mean()
        cls = torch.bucketize(crms, torch.quantile(crms, torch.linspace(0, 1, args.classes + 1)[1:-1]))
        tm = torch.load(args.token_mult) if args.token_mult else None
        fit_m = tm["fit"] if tm else [None] * len(fit_h)
        ev_m = tm["ev"] if tm else [None] * len(hs)
        side = 4 * (SEQ - 1) if tm else 0
        for step in (float(s) for s in args.steps.split(",")):
            # the history's quantization noise in channel space: diag(Ui^T diag(var) Ui) (= var for an orthogonal U)
            nv = (scale * step) ** 2 / 12
            nv = nv if Ui is None else (Ui.pow(2) * nv[:, None]).sum(0)
            W = W0 if n == 0 else solve(*grams[name], n_rows, nv, n)
            hist = torch.ones(args.classes, 2 * K + 1)
            cal_syms = []                                                  # (sym index, residual, outliers)
            for h, i, m in zip(fit_h[-CAL:], tail[-CAL:], fit_m[-CAL:]):  # closed-loop symbols on calibration text
                _, csym, cout, cres = closed_loop(h, i, emb, W, n, tau, scale, step, U, Ui, m)
                if args.adaptive and args.hist_windows == CAL:
                    cal_syms.append((csym.clamp(-K, K) + K, cres, cout))
                for k in range(args.classes):
                    hist[k] += torch.bincount(csym[:, cls == k].flatten().clamp(-K, K) + K, minlength=2 * K + 1)
            logp = torch.log2(hist / hist.sum(1, keepdim=True))
            RECON[0] = None
            if args.recon:  # centroids from the calibration windows' closed-loop residuals (centres used there)
                num, den = torch.zeros(args.classes, 4), torch.zeros(args.classes, 4)
                for h, i, m in zip(fit_h[-CAL:], tail[-CAL:], fit_m[-CAL:]):
                    _, csym, cout, cres = closed_loop(h, i, emb, W, n, tau, scale, step, U, Ui, m)
                    v = (cres / (scale * step)).abs()
                    k = csym.abs().clamp(max=3)
                    keep = (~cout) & (k > 0)
                    idx = (cls[None].expand_as(k) * 4 + k)[keep]
                    num += torch.bincount(idx, weights=(k.float() - v)[keep].double(), minlength=4 * args.classes).view(-1, 4).float()
                    den += torch.bincount(idx, minlength=4 * args.classes).view(-1, 4).float()
                delta = (num / den.clamp_min(1)).clamp(0.0, 0.45)
                RECON[0] = delta[cls]  # [H, 4]
                print(json.dumps(dict(part="recon", step=step, delta_k1=delta[:, 1].tolist(),
                                      delta_k2=delta[:, 2].tolist(), delta_k3=delta[:, 3].tolist())), flush=True)
            if args.adaptive and args.hist_windows != CAL:
                for h, i in zip(fit_h[-args.hist_windows:], tail[-args.hist_windows:]):
                    _, csym, cout, cres = closed_loop(h, i, emb, W, n, tau, scale, step, U, Ui)
                    cal_syms.append((csym.clamp(-K, K) + K, cres, cout))
            bits, ent, total, err, n_out, ev_syms = 0.0, 0.0, 0.0, 0.0, 0, []
            for h, i, m in zip(hs, wins, ev_m):
                rec, sym, out, res = closed_loop(h, i, emb, W, n, tau, scale, step, U, Ui, m)
                s = sym.clamp(-K, K) + K
                if args.adaptive:
                    ev_syms.append((s, res, out))
                n_out += out.sum().item()
                e = -logp[cls[None].expand_as(s), s].sum().item()
                ent += e
                bits += e + 16 * H + 16 * (SEQ - 1) + 26 * out.sum().item() + side
                err += ((rec - h)[1:].pow(2).sum() / h[1:].pow(2).sum()).sqrt().item() / n_eval
                total += nll(rec, i)
            values = n_eval * SEQ * H
            print(json.dumps(dict(part="closed_loop", set=name, basis=args.basis, gamma=args.gamma, step=step, alpha=args.alpha,
                                  bits_per_value=bits / values, symbol_bits_per_value=ent / values,
                                  ratio_vs_fp16=16 * values / bits, rel_err=err, token_mult=args.token_mult, deadzone=args.deadzone,
                                  recon=args.recon,
                                  ppl_ratio=math.exp(total / n_tok) / ppl_fp)), flush=True)
            if not args.adaptive:
                continue
            # same quantizer, same symbols and reconstruction (so the same ppl and error): only the rate moves
            over = n_eval * (16 * H + 16 * (SEQ - 1)) + 26 * n_out          # sink fp16, headers, outliers
            rates = adaptive_rates(cal_syms, ev_syms, cls, crms, args.classes, args.gains, args.mean_buckets)
            base = (rates["static"][2] + over) / values                      # add-one static = the line above
            for v, (b_par, side, b_add1) in rates.items():
                for sm, b in (("add1", b_add1), ("parent", b_par)):
                    bpv = (b + side + over) / values
                    print(json.dumps(dict(part="adaptive", set=name, step=step, variant=v, smoothing=sm,
                                          gains=args.gains, mean_buckets=args.mean_buckets,
                                          hist_windows=args.hist_windows, bits_per_value=bpv,
                                          side_bits_per_value=side / values, delta_vs_static=bpv - base,
                                          ratio_vs_fp16=16 / bpv, rel_err=err,
                                          ppl_ratio=math.exp(total / n_tok) / ppl_fp)), flush=True)


if __name__ == "__main__":
    main()
