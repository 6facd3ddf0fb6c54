"""Experiment (not shipped): do the token ids sharpen the predictive codec's symbol models?

Both ends know each row's token, so the static models per (gain level, class) could also be split
by the token: the N most frequent tokens of the fit text each get their own models (the rest share
one), the previous token likewise, or k-means clusters of the input embeddings. Models are fitted on
the codec's fit windows (parent-smoothed towards the shipped (gain level, class) model with a prior
mass of --mass); the rate is the cross-entropy of the evaluation windows' symbols (windows 0-7, the
`bench codec` windows), in bits per value, against the shipped models' on the same symbols.

Run (from the repository root, after codec_fisher.py has cached the hidden states; ~2 min):
  .venv/bin/python scripts/experiments/codec_token_ctx.py --step 2.4
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from splitcli.codec import predictive as P
from splitcli.codec.predictive_fit import fit_predictive

# run as a script, this directory is on sys.path
from codec_fisher import setup

K = P.K


def symbols(pc, emb_rows, wins, hs):
    """(symbols + K [N, H], gain levels [N], tokens [N], previous tokens [N]) of the rows not sent raw."""
    out = []
    for w, h in zip(wins, hs):
        y = ((h - P.prediction(pc, emb_rows, w, P.NO_TOKEN)) @ pc.Uw).numpy()
        s, lv, raw, _ = P.quantize(pc, y)
        keep = ~raw
        prev = np.r_[0, w.numpy()[:-1]]
        out.append((np.clip(s[keep], -K, K).astype(np.int64) + K, lv[keep], w.numpy()[keep], prev[keep]))
    return [np.concatenate(z) for z in zip(*out)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step", type=float, default=2.4)
    ap.add_argument("--mass", type=float, default=2 * K + 1, help="prior mass of the parent model")
    args = ap.parse_args()
    _lm, _cloud, emb, emb_rows, ev, ft, c, _Ft, _Fe = setup(8, 2)
    pc = fit_predictive(emb, list(zip(ft, c["ft_h"])), step=args.step)
    cls = pc.classes[pc.col_order].astype(np.int64)
    G, C = len(pc.gain_probs), int(cls.max()) + 1
    fs, fl, ftok, fprev = symbols(pc, emb_rows, ft, c["ft_h"])
    es, el, etok, eprev = symbols(pc, emb_rows, ev, c["ev_h"])
    H = fs.shape[1]

    def xent(ctx_f, ctx_e, n_ctx):
        # (shipped, per context) bits per value of the evaluation symbols
        cnt = np.zeros((n_ctx, G, C, 2 * K + 1))
        np.add.at(cnt, (np.repeat(ctx_f, H), np.repeat(fl, H), np.tile(cls, len(fs)), fs.reshape(-1)), 1)
        base = cnt.sum(0)
        par = base.sum(0) + 1
        par /= par.sum(-1, keepdims=True)
        pb = base + (2 * K + 1) * par[None]
        pb /= pb.sum(-1, keepdims=True)                                           # the shipped models
        pm = cnt + args.mass * pb[None]
        pm /= pm.sum(-1, keepdims=True)
        b0 = -np.log2(pb[np.repeat(el, H), np.tile(cls, len(es)), es.reshape(-1)]).sum()
        b1 = -np.log2(pm[np.repeat(ctx_e, H), np.repeat(el, H), np.tile(cls, len(es)), es.reshape(-1)]).sum()
        return b0 / es.size, b1 / es.size

    def say(what, b):
        print(f"{what}: shipped {b[0]:.4f} -> {b[1]:.4f} bits/value ({100 * (b[1] / b[0] - 1):+.2f}%)", flush=True)

    order = np.argsort(-np.bincount(ftok, minlength=emb.shape[0]))
    for n in (15, 63):
        rank = np.full(emb.shape[0], n)
        rank[order[:n]] = np.arange(n)
        say(f"top-{n} tokens (cover {(rank[etok] < n).mean():.2f} of the evaluation rows)",
            xent(rank[ftok], rank[etok], n + 1))
        say(f"previous token, top-{n}", xent(rank[fprev], rank[eprev], n + 1))
    X = emb[torch.from_numpy(np.unique(ftok))]
    for k in (8, 32):
        cen = X[torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:k]].clone()
        for _ in range(25):
            a = torch.cdist(X, cen).argmin(1)
            for j in range(k):
                if (a == j).any():
                    cen[j] = X[a == j].mean(0)
        lab = torch.cdist(emb, cen).argmin(1).numpy()
        say(f"k-means ({k}) of the input embeddings", xent(lab[ftok], lab[etok], k))


if __name__ == "__main__":
    main()
