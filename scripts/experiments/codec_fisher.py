"""Experiment (not shipped): the shipped predictive codec in a basis shaped by the cloud's *true* Fisher.

Session 8 (codec_sensitivity.py) shaped the codec by the *empirical* Fisher, E[g gᵀ] with g the
gradient of the window's NLL at the true next tokens, and found it no better than the plain KLT.
The second-order cost of a small error e in h_ℓ is ½ eᵀ F e with F the Gauss-Newton matrix of the
loss, which equals the Fisher of the model's own distribution: F = E[g gᵀ] with the labels *sampled
from the model* (each position's label drawn from its softmax; the cross terms between positions
vanish in expectation). Both ends know F (fitted offline), so the edge can code h' = h T with
T = F^γ (normalized to a geometric mean of 1), and the cloud decodes ĥ = ĥ' T⁻¹: at γ = ½ the
codec's plain squared error in h' is the loss's second-order term.

Pipeline: the shipped format-4 codec (`fit_predictive`, real frames: `predictive.encode/decode`)
fitted on (ids, h T) of the codec's fit windows (the last 24 × 2048 tokens of wiki.test.raw), at
explicit steps; evaluation on 8 windows of 2048 tokens from window --first (0: the `bench codec`
windows; 8: the validation windows the defaults are chosen on), one frame per window. Fisher:
sampled labels on the last `--fisher-windows` fit windows. Perplexity as the bench computes it
(next-token NLL over each window), from the cloud half on the decoded hidden state. --floor keeps
the directions the loss is least sensitive to at one common step (eigenvalues below floor x the
mean are raised to it); docs/results.md, "Shaping the codec by the cloud's true Fisher".

Run (from the repository root, nothing else timing; ~5 min setup, ~30 s per point):
  .venv/bin/python scripts/experiments/codec_fisher.py --first 8 --gammas 0,0.5 --floor 0.4 --steps 2.4,2.5
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from splitcli.codec import predictive as P
from splitcli.codec.predictive_fit import fit_predictive
from splitcli.deploy.calibrate import edge_hidden, read_wikitext
from splitcli.deploy.predictive import PREDICTIVE_FIT_WINDOWS, codec_embeddings, default_table, dense_table, fit_slices
from splitcli.model.loader import load_model
from splitcli.model.split import CloudHalf, decoder_parts

SEQ, EVAL, LAYER = 2048, 8, 15
CACHE = f"/tmp/fisher-exp-l{LAYER}.pt"


def setup(fisher_windows: int, samples: int, first: int = 0):
    torch.set_num_threads(2)
    lm = load_model("smollm2-135m")
    for p in lm.model.parameters():
        p.requires_grad_(False)
    emb_rows = codec_embeddings(lm, default_table(lm))
    text, _ = read_wikitext(None)
    ids = [int(i) for i in lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
    ev = range_windows(ids, first)
    ft = [torch.tensor(ids[a:b]) for a, b in fit_slices(len(ids), SEQ, PREDICTIVE_FIT_WINDOWS, EVAL * SEQ)]
    cloud = CloudHalf(decoder_parts(lm.model), LAYER)
    c = torch.load(CACHE) if os.path.exists(CACHE) else {}
    for name, wins in ((f"ev_h{first}", ev), ("ft_h", ft)):    # hidden states at ℓ by window set, cached
        if name not in c:
            with torch.inference_mode():
                hs = [edge_hidden(lm.model, LAYER, w) for w in wins]
            c[name] = [h.clone() for h in hs]
            torch.save(c, CACHE)
    key = f"fisher{fisher_windows}x{samples}"
    if key not in c:
        t0 = time.time()
        c[key], c[key + "_emp"] = fisher(cloud, c["ft_h"][-fisher_windows:], ft[-fisher_windows:], samples)
        torch.save(c, CACHE)
        print(f"Fisher on {fisher_windows} windows x {samples} samples: {time.time() - t0:.0f} s", flush=True)
    c["ev_h"] = c[f"ev_h{first}"]   # not saved: the evaluation windows of this run
    return lm, cloud, dense_table(emb_rows), emb_rows, ev, ft, c, c[key], c[key + "_emp"]


def range_windows(ids, first: int) -> list[torch.Tensor]:
    """Windows first .. first + EVAL - 1 of SEQ tokens."""
    return [torch.tensor(ids[w * SEQ:(w + 1) * SEQ]) for w in range(first, first + EVAL)]


def logits_of(cloud, h):
    # h [T, H] -> logits [T, V] (float32), with grad when h has it
    x = cloud.layers(h[None], torch.arange(len(h))[None], None, cloud.new_cache())
    return cloud.parts.lm_head(cloud.parts.norm(x))[0].float()


def fisher(cloud, hs, wins, samples):
    """(true Fisher, empirical Fisher) [H, H] float64 over rows 1.. of the windows: E[g gᵀ], g = d(sum
    of the window's NLL)/dh at labels sampled from the model (true) or at the text's next tokens."""
    H = hs[0].shape[1]
    Ft, Fe, n = torch.zeros(H, H, dtype=torch.float64), torch.zeros(H, H, dtype=torch.float64), 0
    gen = torch.Generator().manual_seed(0)
    for h, ids in zip(hs, wins):
        hh = h.clone().requires_grad_(True)
        logits = logits_of(cloud, hh)[:-1]                                     # [T-1, V]
        with torch.no_grad():
            probs = logits.softmax(-1)
        for s in range(samples):
            y = torch.multinomial(probs, 1, generator=gen)[:, 0]
            g = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), hh, retain_graph=True)[0][1:]
            Ft += (g.double().T @ g.double()) / samples
        g = torch.autograd.grad(F.cross_entropy(logits, ids[1:], reduction="sum"), hh)[0][1:]
        Fe += g.double().T @ g.double()
        n += len(g)
    return Ft / n, Fe / n


def shaping(Fm: torch.Tensor, gamma: float, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, T⁻¹) [H, H] float32: F^γ with eigenvalues floored at floor · mean, geometric mean 1."""
    lam, V = torch.linalg.eigh(Fm)
    lam = lam.clamp_min(floor * lam.mean())
    d = lam.pow(gamma)
    d = d / d.log().mean().exp()
    return ((V * d) @ V.T).float(), ((V / d) @ V.T).float()


def nll(cloud, h, ids):
    with torch.inference_mode():
        return float(F.cross_entropy(logits_of(cloud, h)[:-1], ids[1:], reduction="sum")), len(ids) - 1


def evaluate(pc, cloud, emb_rows, ev, c, T, Ti, Ft, ppl_fp, label) -> None:
    """Real frames of the evaluation windows (one per window): size, perplexity, errors."""
    t0 = time.time()
    nbytes, tokens, s_nll, s_n, sq, ref, loss2 = 0, 0, 0.0, 0, 0.0, 0.0, 0.0
    for w, h in zip(ev, c["ev_h"]):
        frame = P.encode(h @ T, w, pc, emb_rows, P.NO_TOKEN)
        hat = P.decode(frame, pc, emb_rows) @ Ti
        nbytes += len(frame)
        tokens += len(w)
        a, b = nll(cloud, hat, w)
        s_nll, s_n = s_nll + a, s_n + b
        e = (hat - h)[1:].double()
        sq += float(e.pow(2).sum())
        ref += float(h[1:].double().pow(2).sum())
        loss2 += float(((e @ Ft) * e).sum()) / 2
    ppl = math.exp(s_nll / s_n)
    print(f"{label}: {2 * 576 * tokens / nbytes:.3f}x vs fp16, ppl {ppl:.4f} "
          f"({100 * (ppl / ppl_fp - 1):+.2f}%), rel l2 {math.sqrt(sq / ref):.4f}, "
          f"½eᵀFe per token {loss2 / (tokens - len(ev)):.5f} ({time.time() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gammas", default="0,0.5")
    ap.add_argument("--steps", default="2.24,2.4")
    ap.add_argument("--floor", default="1e-3", help="eigenvalue floors, times the mean eigenvalue")
    ap.add_argument("--fisher-windows", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--empirical", action="store_true", help="shape by the empirical Fisher instead")
    ap.add_argument("--first", type=int, default=0, help="first evaluation window (8: validation windows 8-15)")
    ap.add_argument("--shrink-scales", default="1", help="decoder shrink S' = 1 - a (1 - S) for each a")
    args = ap.parse_args()
    lm, cloud, emb, emb_rows, ev, ft, c, Ft, Fe = setup(args.fisher_windows, args.samples, args.first)
    for name, Fm in (("true", Ft), ("empirical", Fe)):
        ev_ = torch.linalg.eigvalsh(Fm)
        print(f"{name} Fisher: eigenvalues {ev_.min():.3g} .. {ev_.max():.3g}, trace {ev_.sum():.4g}; F^1/2 shaping "
              f"gains {0.5 * math.log2(ev_.mean() / ev_.clamp_min(1e-30).log().mean().exp()):.3f} bit/value in theory")
    cos = float((Ft * Fe).sum() / (Ft.norm() * Fe.norm()))
    print(f"cosine(true, empirical) {cos:.3f}", flush=True)
    tot = [nll(cloud, h, w) for h, w in zip(c["ev_h"], ev)]
    ppl_fp = math.exp(sum(a for a, _ in tot) / sum(b for _, b in tot))
    print(f"fp ppl {ppl_fp:.4f} on windows {args.first}-{args.first + EVAL - 1} (bench codec, 0-7: 19.265)", flush=True)
    Fm = Fe if args.empirical else Ft
    for gamma, floor in [(float(g), float(f)) for g in args.gammas.split(",") for f in args.floor.split(",")]:
        T, Ti = shaping(Fm, gamma, floor)
        wins = [(w, h @ T) for w, h in zip(ft, c["ft_h"])]
        for step in [float(s) for s in args.steps.split(",")]:
            pc0 = fit_predictive(emb, wins, step=step)
            for a in [float(x) for x in args.shrink_scales.split(",")]:
                pc = dataclasses.replace(pc0, shrink=(1 - a * (1 - pc0.shrink)).clip(0.05, 4))
                evaluate(pc, cloud, emb_rows, ev, c, T, Ti, Ft, ppl_fp,
                         f"gamma {gamma} floor {floor} step {step} shrink x{a}")


if __name__ == "__main__":
    main()
