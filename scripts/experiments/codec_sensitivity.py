"""Experiment (not shipped): where is the cloud's loss sensitive to the codec's error at ℓ?

Feeds codec_context.py two ways of spending the bits where the loss is sensitive, both known to
both ends (nothing but a per-token level crosses the wire):
  fisher : F = E_t[g_t g_t^T], g_t = d(window NLL)/d h_t at positions >= 1 (the empirical Fisher
           of the cloud's loss w.r.t. the split's hidden state), on fit windows. codec_context.py
           --basis fisher quantizes r F^gamma Q (Q the KLT of the weighted residual), which makes
           the second-order loss increase (r-space error)^T F (r-space error) plain MSE at gamma 1/2.
  tokmult: per-token step multipliers m_t = w_hat_t^(-beta/2) (geometric mean 1 on fit text, in
           quarter octaves in [2^-3, 2^3]), where w_hat_t predicts |g_t|^2 by ridge regression on
           what the edge has (h_t, its log norm, the embeddings of the token and the previous one).
           codec_context.py --token-mult uses them (4 bits of side info per token counted).
Gradients need the hidden-state cache of codec_context.py (/tmp/codecctx-l{ℓ}-f24-w4.pt; run it
once first). Fit windows: the last 8 of the fit text; evaluation: its first 4 windows.

Run (1 torch thread, ~8 min):
  .venv/bin/python scripts/experiments/codec_sensitivity.py --beta 0.75 --ridge 1e4
  then codec_context.py ... --basis fisher --gamma 0.5   or   ... --basis klt --token-mult /tmp/tokmult-l15-b0.75.pt
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from splitcli.model.split import CloudHalf, decoder_parts

# run as a script, this directory is on sys.path
from codec_predictor import features as emb_feats  # ids [T] -> [T, 2H + 1]: E[t], E[t-1], 1
from codec_predictor import load_experiment

FIT = 8


def grad_h(cloud, h, ids):
    # h [T, H], ids [T] -> g [T, H] = d(sum of next-token NLL over the window)/dh (row T-1 is 0: no label)
    h = h.clone().requires_grad_(True)
    x = cloud.layers(h[None], torch.arange(len(h))[None], None, cloud.new_cache())  # outside inference_mode
    logits = cloud.parts.lm_head(cloud.parts.norm(x))[0]
    return torch.autograd.grad(F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum"), h)[0]


def features(emb, h, ids):
    # what the edge has when it encodes token t: [T, 3H + 2] (float64)
    return torch.cat([emb_feats(emb, ids), h, h.norm(dim=1, keepdim=True).log()], 1).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split-layer", type=int, default=15)
    ap.add_argument("--beta", type=float, default=0.75, help="exponent of the predicted sensitivity (1 = theory)")
    ap.add_argument("--ridge", type=float, default=1e4, help="ridge of the |g|^2 predictor (standardized features)")
    args = ap.parse_args()
    lm, _, emb = load_experiment()
    c = torch.load(f"/tmp/codecctx-l{args.split_layer}-f24-w4.pt")
    cloud = CloudHalf(decoder_parts(lm.model), args.split_layer)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    fit = range(len(c["fit_h"]) - FIT, len(c["fit_h"]))
    g_fit = [grad_h(cloud, c["fit_h"][k], c["tail"][k]) for k in fit]
    g_ev = [grad_h(cloud, h, i) for h, i in zip(c["hs"], c["wins"])]
    G = torch.cat([g[1:-1] for g in g_fit]).double()                               # [N, H]
    Fm = G.T @ G / len(G)
    ev = torch.linalg.eigvalsh(Fm)
    torch.save(dict(F=Fm, windows=list(fit)), f"/tmp/fisher-l{args.split_layer}.pt")
    print(f"Fisher: eigenvalues {ev.min():.3g} .. {ev.max():.3g}; isotropic noise -> F^1/2 shaping gains "
          f"{0.5 * math.log2(ev.mean() / ev.log().mean().exp()):.3f} bit per value in theory")

    # per-token sensitivity w_t = |g_t|^2 and its prediction from edge-side features (positions 1 .. T-2)
    y_fit = torch.cat([g[1:-1].pow(2).sum(1) for g in g_fit]).double().clamp_min(1e-12).log()
    y_ev = torch.cat([g[1:-1].pow(2).sum(1) for g in g_ev]).double().clamp_min(1e-12).log()
    X = torch.cat([features(emb, c["fit_h"][k], c["tail"][k])[1:-1] for k in fit])
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    X = (X - mu) / sd
    W = torch.linalg.solve(X.T @ X + args.ridge * torch.eye(X.shape[1], dtype=torch.float64), X.T @ (y_fit - y_fit.mean()))

    def log_m(h, ids):
        return -0.5 * args.beta * (((features(emb, h, ids) - mu) / sd) @ W)       # [T], before normalization

    off = torch.cat([log_m(c["fit_h"][k], c["tail"][k])[1:] for k in fit]).mean()

    def mult(h, ids):
        q = torch.round(4 * (log_m(h, ids) - off) / math.log(2)).clamp(-12, 12)    # quarter octaves
        return torch.exp2(q / 4).float()

    pred = torch.cat([((features(emb, h, i) - mu) / sd)[1:-1] @ W for h, i in zip(c["hs"], c["wins"])]) + y_fit.mean()
    r2 = 1 - (y_ev - pred).pow(2).mean() / (y_ev - y_ev.mean()).pow(2).mean()
    w, d = y_ev.exp(), (-args.beta * pred).exp()
    d = d / d.log().mean().exp()
    print(f"per-token |g|^2 on evaluation text: spread (AM/GM) {0.5 * math.log2(w.mean() / y_ev.mean().exp()):.3f} "
          f"bit per value; predicted R^2 of log {r2:.3f}; steps from the prediction gain "
          f"{0.5 * math.log2(w.mean() / (w * d).mean()):.3f} bit per value in theory")
    out = f"/tmp/tokmult-l{args.split_layer}-b{args.beta}.pt"
    torch.save(dict(fit=[mult(h, i) for h, i in zip(c["fit_h"], c["tail"])],
                    ev=[mult(h, i) for h, i in zip(c["hs"], c["wins"])], beta=args.beta, ridge=args.ridge), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
