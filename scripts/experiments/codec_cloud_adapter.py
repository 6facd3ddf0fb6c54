"""Experiment (not shipped): can the cloud learn to tolerate the codec's noise at ℓ?

Every earlier codec experiment (docs/results.md) changed what crosses the wire; this one changes
the receiver. The cloud half gets LoRA adapters (rank r on q/k/v/o/gate/up/down of layers ℓ..L-1)
trained by distillation: the student is the adapted cloud on the codec's reconstruction ĥ, the
teacher the unmodified cloud on the exact h, loss KL(teacher || student) per token. No labels are
used, so the adapter learns to undo the codec's damage, not the text's domain. The codec is the
shipped one (`CodecWire`, one frame per window) with the settings given; the edge is fp.

Text (wiki.test.raw, tokenized once): perplexity on the first `--eval-windows` windows of 2048
(the `bench codec` protocol); training windows of `--seqlen` tokens from token 16 * 2048 up to the
last 2048 tokens (the codec's calibration slice), so the three never overlap. Out-of-domain check:
perplexity of LAMBADA passages (context + continuation, joined, windows of 2048).

Run (2 threads, ~18 min for 300 steps; results: docs/results.md, "A cloud trained to tolerate the codec"):
  .venv/bin/python scripts/experiments/codec_cloud_adapter.py --q-bar 5 --tau-quantile 0.9995 --steps 300 --alpha 32
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch
import torch.nn.functional as F

from splitcli.data import data_file
from splitcli.deploy.calibrate import calibrated_config, edge_hidden, read_wikitext
from splitcli.model.loader import load_model
from splitcli.model.split import CloudHalf, decoder_parts
from splitcli.plan.codec_settings import CodecSettings
from splitcli.runtime.codec_wire import CodecWire

EVAL_SEQ = 2048
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRA(torch.nn.Module):
    """y = W x + (B A x) * s, with B = 0 at start so the adapted cloud starts as the cloud."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.enabled, self.s = base, True, alpha / rank
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        y = self.base(x)
        return y + (x @ self.A.T) @ self.B.T * self.s if self.enabled else y


def add_lora(parts, start: int, rank: int, alpha: float) -> list[LoRA]:
    mods = []
    for layer in parts.layers[start:]:
        for owner in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                if hasattr(owner, name):
                    m = LoRA(getattr(owner, name), rank, alpha)
                    setattr(owner, name, m)
                    mods.append(m)
    return mods


def cloud_logits(cloud, h):
    # h [T, H] -> logits [T, V] (autograd on: the caller picks no_grad or not)
    x = cloud.layers(h[None], torch.arange(len(h))[None], None, None)
    return cloud.parts.lm_head(cloud.parts.norm(x))[0].float()


def roundtrip(cfg, h):
    wire = CodecWire(cfg, keep_stats=False)
    frame = wire.encode(h)
    return wire.decode(frame), len(frame)


def evaluate(lm, cloud, mods, cfg, windows, ell) -> dict:
    nll = dict(fp=0.0, codec=0.0, codec_adapted=0.0, fp_adapted=0.0)
    n_tok, n_bytes, n_val = 0, 0, 0
    with torch.no_grad():
        for w in windows:
            h = edge_hidden(lm.model, ell, w.tolist())
            hq, nb = roundtrip(cfg, h)
            n_bytes, n_val, n_tok = n_bytes + nb, n_val + h.numel(), n_tok + len(w) - 1
            runs = (("fp", h, False), ("codec", hq, False), ("codec_adapted", hq, True), ("fp_adapted", h, True))
            for key, x, on in runs:
                for m in mods:
                    m.enabled = on
                nll[key] += F.cross_entropy(cloud_logits(cloud, x)[:-1], w[1:], reduction="sum").item()
    for m in mods:
        m.enabled = True
    out = {f"ppl_{k}": math.exp(v / n_tok) for k, v in nll.items()}
    out.update(ratio_vs_fp16=2 * n_val / n_bytes, tokens=n_tok)
    out.update({f"{k}_vs_fp": out[f"ppl_{k}"] / out["ppl_fp"] for k in ("codec", "codec_adapted", "fp_adapted")})
    return out


def lambada_windows(tok, data_dir, n):
    path = data_file("lambada/lambada_openai_test.jsonl", data_dir)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    text = "\n\n".join(r["context"] + " " + r["continuation"] for r in rows)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    return list(ids[: n * EVAL_SEQ].reshape(n, EVAL_SEQ))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split-layer", type=int, default=15)
    ap.add_argument("--q-bar", type=int, default=5)
    ap.add_argument("--tau-quantile", type=float, default=0.999)
    ap.add_argument("--rotation", default="none")
    ap.add_argument("--channel-alpha", type=float, default=0.0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16.0, help="LoRA scale alpha / rank")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--lambada-windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None, help="evaluation data (default: $SPLITLLM_DATA or ../shared/data)")
    ap.add_argument("--save", default=None, help="write the adapter's tensors here (torch.save)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    ell = args.split_layer
    lm = load_model()
    text, _ = read_wikitext(args.data_dir)
    ids = torch.tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    settings = CodecSettings(q_bar=args.q_bar, tau_quantile=args.tau_quantile, rotation=args.rotation,
                             channel_alpha=args.channel_alpha)
    cfg, _ = calibrated_config(lm, ell, settings, args.data_dir)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    parts = decoder_parts(lm.model)
    cloud = CloudHalf(parts, ell)
    mods = add_lora(parts, ell, args.rank, args.alpha)
    params = [p for m in mods for p in (m.A, m.B)]

    eval_w = list(ids[: args.eval_windows * EVAL_SEQ].reshape(args.eval_windows, EVAL_SEQ))
    lam_w = lambada_windows(lm.tokenizer, args.data_dir, args.lambada_windows)
    lo, hi = 16 * EVAL_SEQ, len(ids) - EVAL_SEQ
    train = list(ids[lo: lo + (hi - lo) // args.seqlen * args.seqlen].reshape(-1, args.seqlen))
    random.shuffle(train)
    head = dict(settings=settings.to_dict(), rank=args.rank, alpha=args.alpha, steps=args.steps,
                seqlen=args.seqlen, lr=args.lr,
                train_windows=len(train), adapter_params=sum(p.numel() for p in params))
    print(json.dumps(head), flush=True)

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    def lr_at(s):  # 20 steps of warm-up, then cosine to 0
        return min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0, kl_avg = time.time(), None
    for step in range(args.steps):
        w = train[step % len(train)]
        with torch.no_grad():
            h = edge_hidden(lm.model, ell, w.tolist())
            hq, _ = roundtrip(cfg, h)
            for m in mods:
                m.enabled = False
            teacher = F.log_softmax(cloud_logits(cloud, h), -1)
            for m in mods:
                m.enabled = True
        student = F.log_softmax(cloud_logits(cloud, hq), -1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        opt.zero_grad()
        kl.backward()
        opt.step()
        sched.step()
        kl_avg = kl.item() if kl_avg is None else 0.95 * kl_avg + 0.05 * kl.item()
        if step % 25 == 0 or step == args.steps - 1:
            print(json.dumps(dict(step=step, kl=round(kl.item(), 5), kl_avg=round(kl_avg, 5),
                                  s=round(time.time() - t0, 1))), flush=True)
    result = dict(head, wiki=evaluate(lm, cloud, mods, cfg, eval_w, ell),
                  lambada=evaluate(lm, cloud, mods, cfg, lam_w, ell), train_s=round(time.time() - t0, 1))
    print(json.dumps(result), flush=True)
    if args.save:
        torch.save({f"{i}.{k}": getattr(m, k).detach() for i, m in enumerate(mods) for k in ("A", "B")}, args.save)


if __name__ == "__main__":
    main()
