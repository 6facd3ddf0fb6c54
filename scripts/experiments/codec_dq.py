"""Experiment (not shipped): dependent quantization (VVC's trellis) in the shipped predictive codec.

The TCQ experiment (codec_tcq.py) found trellis coding lowers the MSE at equal rate but costs
perplexity: half of its reproduction points (the odd union codebook) have no zero, so small
components that the scalar quantizer leaves at zero get energy. VVC's dependent quantization
keeps zero in both quantizers: Q0 = {2kΔ}, Q1 = {(2k - sgn k)Δ} = {0, ±Δ, ±3Δ, ...}; a 4-state
machine picks the quantizer, driven by the parity of each transmitted k (next = TR[s][k & 1]);
the encoder runs a Viterbi over each token's components. The decoder needs no sequential entropy
decoding when the symbol models do not depend on the state ("state-free": k coded with the shipped
(gain level, class) models), and the states follow from the parities by a prefix scan.

Pipeline: the shipped codec (format 4, the cached default fit) gives the prediction, the KLT, the
gain levels, the raw (sink) rows; only the quantizer of the residual y changes. Symbol models and
the decoder's shrink per (gain level, component) are fitted on fit windows (the last --fit windows
of wiki.test.raw, inside the codec's own fit text); evaluation: the first --windows windows (the
bench codec protocol). Rates: cross-entropy of the evaluation symbols under the fit histograms
("parent" smoothing as shipped) plus the gain levels, ids, raw rows, escapes and headers as the
shipped frame would carry them. The scalar line (rounding, as shipped) runs through the same
estimate, so the two are compared on one footing (and against the real frames' size).

Run (from the repository root, nothing else timing):
  .venv/bin/python scripts/experiments/codec_dq.py --steps 2.24,2.4 --deltas 1.5,1.6,1.7
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from splitcli.bench.codec import _ppl
from splitcli.codec import predictive as P
from splitcli.deploy import SplitSpec, build_split
from splitcli.deploy.calibrate import edge_hidden, read_wikitext
from splitcli.deploy.predictive import fitted_predictive
from splitcli.model.loader import load_model

TR = np.array([[0, 2], [2, 0], [1, 3], [3, 1]])     # next state by (state, k & 1)
SEQ = 2048


class StoredWire:
    """A wire for `_ppl` whose reconstructions were computed beforehand: each window's, keyed by
    its first 8 token ids (the perplexity run sends each window as one prefill frame)."""

    name, needs_ids = "stored", True

    def __init__(self, recon: dict):
        self.recon, self.last = recon, None

    def encode(self, hidden, ids=None, prev_id=None):
        self.last = self.recon[tuple(ids[:8].tolist())]
        return b""

    def decode(self, frame):
        return self.last


def setup(windows: int, fit: int):
    """(lm, the cached default codec, embeddings, WikiText-2 ids, evaluation windows 0..windows-1, the
    last `fit` windows, hidden states at ℓ = 15 by id(window)) on 2 threads."""
    torch.set_num_threads(2)
    lm = load_model("smollm2-135m")
    pc, emb, _ = fitted_predictive(lm, 15)
    text, _ = read_wikitext(None)
    ids = [int(i) for i in lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert len(ids) // SEQ - fit > windows
    ev = [torch.tensor(ids[w * SEQ:(w + 1) * SEQ]) for w in range(windows)]
    ft = [torch.tensor(ids[len(ids) - (i + 1) * SEQ:len(ids) - i * SEQ]) for i in range(fit)]
    with torch.inference_mode():
        hid = {id(w): edge_hidden(lm.model, 15, w) for w in ev + ft}
    return lm, pc, emb, ids, ev, ft, hid


def recon_levels(k: np.ndarray, q1: np.ndarray) -> np.ndarray:
    """Reproduction point in units of Δ of index k under Q0 (q1 False) or Q1."""
    return np.where(q1, 2 * k - np.sign(k), 2 * k)


def viterbi(u: np.ndarray, lam: float = 0.0) -> np.ndarray:
    """u [T, H] in units of Δ -> k [T, H] int: the dependent-quantization path of least squared error
    (+ lam per nonzero index) per row, from state 0."""
    T, H = u.shape
    cost = np.full((T, 4), np.inf)
    cost[:, 0] = 0.0
    back_s = np.zeros((H, T, 4), np.int8)
    back_k = np.zeros((H, T, 4), np.int32)
    rows = np.arange(T)
    for j in range(H):
        x = u[:, j]
        # Q0: points 2m; the two around x have opposite parities
        m0 = np.floor(x / 2)
        q0 = np.stack([m0, m0 + 1], 1)                                        # [T, 2]
        # Q1: points 0, ±1, ±3, ...: index a with point sign * (2a - 1) for a >= 1
        ax, sx = np.abs(x), np.where(x < 0, -1.0, 1.0)
        a = np.floor((ax + 1) / 2)
        lo = np.where(ax < 1, 0.0, a)                                          # |k| of the point below |x|
        q1 = np.stack([sx * lo, sx * (lo + 1)], 1)                            # [T, 2]
        new = np.full((T, 4), np.inf)
        ns = np.zeros((T, 4), np.int8)
        nk = np.zeros((T, 4), np.int32)
        for s in range(4):
            cand = q0 if s < 2 else q1
            pts = recon_levels(cand, np.full(cand.shape, s >= 2))
            d = (x[:, None] - pts) ** 2 + lam * (cand != 0) + cost[:, s:s + 1]    # [T, 2]
            par = (cand.astype(np.int64) & 1)
            for c in range(2):
                nxt = TR[s][par[:, c]]                                         # [T]
                better = d[:, c] < new[rows, nxt]
                r = rows[better]
                new[r, nxt[better]] = d[better, c]
                ns[r, nxt[better]] = s
                nk[r, nxt[better]] = cand[better, c]
        cost = new
        back_s[j], back_k[j] = ns, nk
    k = np.zeros((T, H), np.int32)
    state = np.argmin(cost, 1)
    for j in range(H - 1, -1, -1):
        k[:, j] = back_k[j][rows, state]
        state = back_s[j][rows, state]
    return k


def states_of(k: np.ndarray) -> np.ndarray:
    """The quantizer each index was coded with (state >= 2: Q1), from the parities (decoder side)."""
    T, H = k.shape
    st = np.zeros((T, H), np.int64)
    s = np.zeros(T, np.int64)
    for j in range(H):
        st[:, j] = s
        s = TR[s, k[:, j] & 1]
    return st


def window_y(pc, emb, ids, h):
    pred = P.prediction(pc, emb, ids, P.NO_TOKEN)                              # [T, H]: P_t (h domain)
    return (h - pred) @ pc.Uw, pred                                            # [T, H] working order


def side(pc, y):
    """Gain levels, raw rows, escapes as the shipped encoder decides them (round at the shipped step)."""
    _s, levels, raw, esc = P.quantize(pc, y.numpy())
    return levels, raw, esc


def quantize(kind, y, delta, lam):
    u = y.numpy().astype(np.float64) / delta
    if kind == "scalar":
        k = np.round(u).astype(np.int32)
        return k, k.astype(np.float64)
    k = viterbi(u, lam)
    return k, recon_levels(k, states_of(k) >= 2).astype(np.float64)


def histo(pc, ks, lvs, G, C, ctx_q=None):
    counts = np.zeros((G, C, 2 * P.K + 1))
    cls = pc.classes[pc.col_order]
    for k, lv in zip(ks, lvs):
        sym = np.clip(k, -P.K, P.K) + P.K
        np.add.at(counts, (lv[:, None].repeat(k.shape[1], 1), cls[None].repeat(len(k), 0), sym), 1)
    parent = counts.sum(0) + 1
    parent /= parent.sum(-1, keepdims=True)
    probs = counts + (2 * P.K + 1) * parent[None]
    return probs / probs.sum(-1, keepdims=True)


def bits(pc, probs, k, lv):
    cls = pc.classes[pc.col_order]
    sym = np.clip(k, -P.K, P.K) + P.K
    return float(-np.log2(probs[lv[:, None], cls[None], sym]).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="2.24,2.4", help="scalar steps δ")
    ap.add_argument("--deltas", default="1.6,1.7", help="dependent quantization Δ (Q0's spacing is 2Δ)")
    ap.add_argument("--lam", type=float, default=0.0, help="Viterbi cost per nonzero index (units of Δ²)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--fit", type=int, default=8)
    ap.add_argument("--no-ppl", action="store_true")
    args = ap.parse_args()
    lm, pc, emb, ids, ev, ft, hid = setup(args.windows, args.fit)
    G, C, H = len(pc.gain_probs), pc.sym_probs.shape[1], pc.hidden
    split = build_split(lm, SplitSpec(split_layer=15, wire="none"))
    ppl_fp = None if args.no_ppl else _ppl(split, split.wire, ids, SEQ, args.windows)
    print(f"fp ppl {ppl_fp}")
    runs = [("scalar", float(s)) for s in args.steps.split(",") if s] + \
        [("dq", float(d)) for d in args.deltas.split(",") if d]
    for kind, delta in runs:
        fit = []
        for w in ft:
            y, _ = window_y(pc, emb, w, hid[id(w)])
            lv, raw, _ = side(pc, y)
            keep = ~raw
            k, q = quantize(kind, y[keep], delta, args.lam)
            fit.append((k, lv[keep], y[keep].numpy(), q * delta))
        probs = histo(pc, [f[0] for f in fit], [f[1] for f in fit], G, C)
        # shrink per (gain level, component): E[y q] / E[q^2] on the fit windows
        num, den = np.zeros((G, H)), np.zeros((G, H))
        for _k, lv, yv, qv in fit:
            np.add.at(num, lv, yv * qv)
            np.add.at(den, lv, qv * qv)
        shrink = np.where(den > 0, num / np.maximum(den, 1e-12), 1.0).clip(0.5, 1.5)
        gp = np.bincount(np.concatenate([f[1] for f in fit]), minlength=G) + 1.0
        gp /= gp.sum()
        total_bits, tokens, recon = 0.0, 0, {}
        for w in ev:
            h = hid[id(w)]
            y, pred = window_y(pc, emb, w, h)
            lv, raw, (et, ej) = side(pc, y)
            keep = ~raw
            k, q = quantize(kind, y[keep], delta, args.lam)
            z = np.zeros((len(w), H))
            z[keep] = q * delta * shrink[lv[keep]]
            z[et, ej] = y.numpy()[et, ej]                                    # escapes travel exactly
            x = torch.from_numpy(z).float() @ pc.UwT + pred
            x[torch.from_numpy(raw)] = h[torch.from_numpy(raw)].half().float()
            recon[tuple(w[:8].tolist())] = x
            body = bits(pc, probs, k, lv[keep]) - np.log2(gp[lv[keep]]).sum()
            total_bits += body + 8 * (40 + 2 * len(w) + raw.sum() * (2 * H + 1) + 9 * len(et))
            tokens += len(w)
        ratio = 2 * H * tokens * 8 / total_bits

        ppl = None if args.no_ppl else _ppl(split, StoredWire(recon), ids, SEQ, args.windows)
        rel = "" if ppl is None else f", ppl {ppl:.4f} ({100 * (ppl / ppl_fp - 1):+.2f}%)"
        print(f"{kind} {delta}: {ratio:.3f}x vs fp16 ({total_bits / tokens / H:.3f} bits/value){rel}", flush=True)


if __name__ == "__main__":
    main()
