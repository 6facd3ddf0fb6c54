"""Experiment (not shipped): how much a token-conditioned predictor would shrink the codec.

Both ends of a split know the token being decoded (the cloud produced it), so the edge could send
r = h_ℓ - P(tokens) instead of h_ℓ, with P a ridge-linear map from the token's and the previous
token's input embeddings, fitted offline. This script measures, on SmolLM2-135M at ℓ (default 15):
  - ratio vs fp16 and perplexity of fixed-step uniform quantization + a static per-class entropy
    model (cross-entropy of the symbols under histograms fitted on calibration text: an honest
    size, frame headers approximated by 16 bits per token and 26 bits per outlier), with and
    without P, over a range of steps; the sink token (position 0) is sent as fp16 in both;
  - text: P is fitted on the last `--fit-windows` windows of wiki.test.raw, the entropy model on the
    last 4 of those, perplexity on the first `--windows` windows (GPTQ windows of 2048 tokens).

Run: python scripts/experiments/codec_predictor.py --windows 2 --steps 1.0,1.5,1.75,2.0
Results and reading: docs/results.md, "Prediction from the token (experiment)".
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from splitcli.deploy import SplitSpec, build_split
from splitcli.deploy.calibrate import edge_hidden, read_wikitext
from splitcli.model.loader import load_model

SEQ = 2048
CLASSES = 8
K = 512  # symbols are clipped to [-K, K] for the histogram (never reached at these steps)


def features(emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # ids [T] -> [T, 2H + 1]: E[t], E[t-1] (zeros at t = 0), 1
    prev = torch.cat([torch.zeros(1, emb.shape[1]), emb[ids[:-1]]])
    return torch.cat([emb[ids], prev, torch.ones(len(ids), 1)], 1)


def fit_predictor(emb, fit_ids, fit_h, ridge: float = 10.0) -> torch.Tensor:
    x = torch.cat([features(emb, i)[1:] for i in fit_ids])          # [N, 2H + 1]
    y = torch.cat([h[1:] for h in fit_h])                            # [N, H]
    return torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1]), x.T @ y)  # [2H + 1, H]


def quantize(x, tau, scale, step):
    # x [T, H] -> reconstruction, symbols, outlier mask (outliers |x| > tau travel exactly)
    out = x.abs() > tau
    sym = torch.round(torch.where(out, torch.zeros_like(x), x) / (scale * step))
    return torch.where(out, x, sym * scale * step), sym.long(), out


def experiment_parser(doc: str, steps: str) -> argparse.ArgumentParser:
    """The options every codec-prediction experiment shares (this script and codec_context.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--split-layer", type=int, default=15)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--fit-windows", type=int, default=24)
    ap.add_argument("--steps", default=steps)
    ap.add_argument("--alpha", type=float, default=0.5)
    return ap


def load_experiment():
    """(model, token ids of wiki.test.raw [N], input embeddings [V, H]) on one torch thread."""
    torch.set_num_threads(1)
    lm = load_model()
    text, _ = read_wikitext()
    ids = torch.tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    return lm, ids, lm.model.get_input_embeddings().weight.detach().float()


def main() -> None:
    args = experiment_parser(__doc__, "1.0,1.5,1.75,2.0").parse_args()
    lm, ids, emb = load_experiment()
    ell, n_eval = args.split_layer, args.windows
    with torch.inference_mode():
        tail = ids[-SEQ * args.fit_windows:].reshape(args.fit_windows, SEQ)
        fit_h = [edge_hidden(lm.model, ell, w.tolist()) for w in tail]
        wins = ids[: SEQ * n_eval].reshape(n_eval, SEQ)
        hs = [edge_hidden(lm.model, ell, w.tolist()) for w in wins]
    W = fit_predictor(emb, tail, fit_h)
    split = build_split(lm, SplitSpec(split_layer=ell))

    def predict(i):
        p = features(emb, i) @ W
        p[0] = 0
        return p

    def nll(h, i):
        with torch.inference_mode():
            logits = split.cloud(h[None], torch.arange(SEQ)[None], None, split.cloud.new_cache(), 0)[0]
        return F.cross_entropy(logits[:-1].float(), i[1:], reduction="sum").item()

    n_tok = n_eval * (SEQ - 1)
    ppl_fp = math.exp(sum(nll(h, i) for h, i in zip(hs, wins)) / n_tok)
    print(json.dumps(dict(ppl_fp=ppl_fp, split_layer=ell, windows=n_eval)), flush=True)
    for use_p in (False, True):
        cal = torch.cat([(h - (predict(i) if use_p else 0))[1:] for h, i in zip(fit_h[-4:], tail[-4:])])
        tau = torch.quantile(cal.abs().flatten()[::7], 0.999).item()
        rms = torch.where(cal.abs() > tau, 0.0, cal).pow(2).mean(0).sqrt().clamp_min(1e-6)
        scale = rms ** args.alpha / (rms ** args.alpha).mean()
        cls = torch.bucketize(rms, torch.quantile(rms, torch.linspace(0, 1, CLASSES + 1)[1:-1]))
        for step in (float(s) for s in args.steps.split(",")):
            _, csym, _ = quantize(cal, tau, scale, step)
            hist = torch.ones(CLASSES, 2 * K + 1)
            for c in range(CLASSES):
                hist[c] += torch.bincount(csym[:, cls == c].flatten().clamp(-K, K) + K, minlength=2 * K + 1)
            logp = torch.log2(hist / hist.sum(1, keepdim=True))
            bits, total = 0.0, 0.0
            for h, i in zip(hs, wins):
                p = predict(i) if use_p else torch.zeros_like(h)
                rec, sym, out = quantize(h - p, tau, scale, step)
                rec[0] = (h - p)[0]
                s = sym[1:].clamp(-K, K) + K
                bits += 16 * h.shape[1] + 16 * (SEQ - 1) + 26 * out[1:].sum().item()
                bits += -logp[cls[None].expand_as(s), s].sum().item()
                total += nll(rec + p, i)
            values = n_eval * SEQ * emb.shape[1]
            print(json.dumps(dict(predictor=use_p, step=step, alpha=args.alpha, bits_per_value=bits / values,
                                  ratio_vs_fp16=16 * values / bits, ppl_ratio=math.exp(total / n_tok) / ppl_fp)),
                  flush=True)


if __name__ == "__main__":
    main()
