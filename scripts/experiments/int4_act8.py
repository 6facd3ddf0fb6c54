"""Experiment (not shipped): what 8-bit activations would cost the int4 edge's accuracy.

splitllm's 4-bit kernel rounds each one-token input to int16 per group of 64 (2^-16 of the group's
largest |x|). Int8 there (2^-8, as llama.cpp's Q8 activations) would let `vpmaddubsw` replace
about a third of the kernel's instructions (a scratch C harness measured 1.35-1.38x per product
on the 2-core Zen 3 host, 1 thread, medians of 31 interleaved rounds, session 12). This script
measures the accuracy side: the split at ℓ = 15 with 4-bit edge weights, no codec, WikiText-2
perplexity (first 4 windows of 2048, the results protocol) with every Int4Linear input rounded per
group of 64 to b bits (symmetric, absmax scale) before the product. Prefill runs the float product
of the dequantized weight, so this emulates on every token what the kernel would do at decode.

Run (1 torch thread, ~4 min; the data dir as elsewhere: SPLITLLM_DATA or ../shared/data):
  .venv/bin/python scripts/experiments/int4_act8.py --bits 32,16,8
Measured (session 12): float input 29.714, int16 29.714, int8 29.777 (+0.21%).
"""

from __future__ import annotations

import argparse

import torch

from splitcli.data import data_file, read_text
from splitcli.deploy import SplitSpec, build_split
from splitcli.eval.perplexity import perplexity
from splitcli.model.loader import load_model
from splitcli.quant.modules import Int4Linear


def rounded_forward(forward, bits: int):
    """Int4Linear.forward with its input x [..., K] rounded per group of 64 to `bits` (symmetric)."""
    qmax = 2 ** (bits - 1) - 1

    def f(self, x):
        g = x.float().reshape(-1, x.shape[-1] // 64, 64)  # [tokens, K/64, 64]
        scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-30) / qmax
        return forward(self, (torch.round(g / scale) * scale).reshape(x.shape).to(x.dtype))

    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="32,16,8", help="input widths to compare (32 = the float input as is)")
    ap.add_argument("--split-layer", type=int, default=15)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model()
    text = read_text(data_file("wikitext2/wiki.test.raw"))
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    split = build_split(lm, SplitSpec(split_layer=args.split_layer, q_w1=4, qa=16, wire="none"))

    @torch.inference_mode()
    def logits(input_ids, attention_mask):
        return split.session().forward(input_ids, attention_mask, logits_to_keep=0)

    forward = Int4Linear.forward
    try:
        for bits in (int(b) for b in args.bits.split(",")):
            Int4Linear.forward = forward if bits == 32 else rounded_forward(forward, bits)
            r = perplexity(logits, ids, seqlen=2048, n_windows=args.windows)
            print(f"int4 edge, l = {args.split_layer}, input {bits} bits: ppl {r.ppl:.4f}", flush=True)
    finally:
        Int4Linear.forward = forward


if __name__ == "__main__":
    main()
