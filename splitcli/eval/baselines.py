"""Full-model quantization baselines as simulated (fake) quantization: RTN W4A16, SmoothQuant-style
W4A{4,3} and Atom-style W4A{4,3}.

Every decoder linear (q/k/v/o, gate/up/down of every layer; not the embeddings or the LM head)
gets quantize-dequantized weights, and, for the W4A{4,3} baselines, a forward pre-hook that
fake-quantizes its input. Weights are group-wise asymmetric RTN (`splitcli.quant`) at 4 bits with
the model's default group size (64 on SmolLM2-135M).

How the papers were read (simulation, not the papers' kernels):
- SmoothQuant (Xiao et al.): per input channel j of each linear, s_j = max|X_j|^alpha /
  max|W_j|^(1 - alpha), alpha = 0.5, from a calibration slice; the linear computes
  (X / s) (W * s)^T, with X / s fake-quantized per token (symmetric, ``a_bits``) and W * s
  group-wise. The original folds s into the preceding RMSNorm for q/k/v and gate/up and leaves
  o_proj and down_proj unsmoothed; smoothing every linear here is generous to the baseline.
  max|W_j| is floored at 1e-5 and s at 1e-5 so that dead channels do not divide by zero.
- Atom (Zhao et al.): the ``keep`` input channels with the largest calibration mean square
  (128 of 4096 in the paper; the same 3.125% share of the hidden width here, 18 of 576) are
  reordered to the end and kept at 8 bits (per token, symmetric), both in the activation and in
  the matching weight columns (8-bit, one group per row); the other channels are fake-quantized
  per token in groups of ``group_size`` consecutive reordered channels (asymmetric min-max,
  ``a_bits``; the last group may be shorter). Weights use RTN, not GPTQ, and the KV cache is
  not quantized (scoring is prefill only), so this is Atom's quantization grid, not its accuracy.
- Calibration: the first ``calib_tokens`` tokens of the codec's calibration slice (the last
  2048 tokens of WikiText-2's test text), one sequence through the full-precision model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from splitcli.errors import SplitLLMError

_DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_EPS = 1e-5


# ---- pure fake-quantization functions --------------------------------------------------------

def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Group-wise asymmetric RTN of w [out, in] along `in`, de-quantized (the quant library's grid)."""
    from splitcli.quant import dequantize_groupwise, quantize_groupwise

    q, scale, zero = quantize_groupwise(w, bits, group_size)
    return dequantize_groupwise(q, scale, zero, bits, dtype=w.dtype)


def fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token RTN of x [..., channels]: levels -(2^(b-1)-1) .. 2^(b-1)-1 times max|x| / that."""
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax(dim=-1, keepdim=True)  # [..., 1]
    step = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return torch.round(x / step).clamp_(-qmax, qmax) * step


def fake_quant_groups(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Asymmetric min-max RTN of x [..., channels] in consecutive groups of `group_size` channels
    (the last group may be shorter), 2^bits levels spanning each group's [min, max]."""
    c = x.shape[-1]
    full = c - c % group_size
    parts = []
    if full:
        parts.append(_minmax_rtn(x[..., :full].reshape(*x.shape[:-1], -1, group_size), bits).reshape(*x.shape[:-1], full))
    if full < c:
        parts.append(_minmax_rtn(x[..., full:].unsqueeze(-2), bits).squeeze(-2))
    return torch.cat(parts, dim=-1) if parts else x.clone()


def _minmax_rtn(g: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric RTN of each group g [..., groups, group] over its own [min, max]."""
    levels = 2**bits - 1
    lo = g.amin(-1, keepdim=True)
    step = (g.amax(-1, keepdim=True) - lo) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))
    return torch.round((g - lo) / safe).clamp_(0, levels) * step + lo


def smooth_factors(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1-alpha) for act_absmax [in], w [out, in] -> [in]."""
    w_absmax = w.abs().amax(dim=0).clamp_min(_EPS)  # [in]
    s = act_absmax.clamp_min(_EPS).pow(alpha) / w_absmax.pow(1.0 - alpha)
    return s.clamp_min(_EPS)


def atom_keep_channels(act_meansq: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the `keep` input channels with the largest calibration mean square."""
    if keep <= 0:
        return torch.empty(0, dtype=torch.long)
    return torch.topk(act_meansq, min(keep, act_meansq.numel())).indices.sort().values


def atom_order(c: int, keep: torch.Tensor) -> torch.Tensor:
    """Atom's channel reordering: the normal channels in order, then the kept ones -> perm [c]."""
    is_kept = torch.zeros(c, dtype=torch.bool)
    is_kept[keep] = True
    return torch.cat([torch.nonzero(~is_kept).flatten(), keep.to(torch.long)])


def atom_fake_quant_reordered(xr: torch.Tensor, n_keep: int, bits: int, group_size: int, keep_bits: int = 8) -> torch.Tensor:
    """Fake-quant of already reordered activations xr [..., c] (kept channels last): the first
    c - n_keep channels group-wise at `bits`, the last n_keep per token at `keep_bits` (symmetric)."""
    c = xr.shape[-1]
    normal = fake_quant_groups(xr[..., : c - n_keep], bits, group_size)
    if not n_keep:
        return normal
    return torch.cat([normal, fake_quant_per_token(xr[..., c - n_keep :], keep_bits)], dim=-1)


def atom_fake_quant(x: torch.Tensor, keep: torch.Tensor, bits: int, group_size: int, keep_bits: int = 8) -> torch.Tensor:
    """Atom-style activation fake-quant of x [..., in] in the original channel order: channels
    `keep` at `keep_bits` (per token, symmetric), the rest reordered contiguously and quantized
    group-wise at `bits`."""
    perm = atom_order(x.shape[-1], keep)
    xq = atom_fake_quant_reordered(x[..., perm], keep.numel(), bits, group_size, keep_bits)
    return torch.empty_like(xq).index_copy_(-1, perm, xq)


# ---- model transforms ------------------------------------------------------------------------

def decoder_linears(model) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear inside the decoder layers, by qualified name."""
    from splitcli.model.split import decoder_parts

    layers = decoder_parts(model).layers
    out = []
    for i, layer in enumerate(layers):
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear):
                out.append((f"layers.{i}.{name}", m))
    if not out:
        raise SplitLLMError("the model's decoder layers hold no nn.Linear modules to quantize")
    return out


def calibration_stats(model, ids: list[int]) -> dict[str, dict[str, torch.Tensor]]:
    """Per decoder linear: input absmax [in] and mean square [in] over one calibration sequence."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name, m in decoder_linears(model):
        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
            stats[name] = {"absmax": x.abs().amax(0), "meansq": x.pow(2).mean(0)}
        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids], dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return stats


def _baseline_bits(pipeline: str) -> tuple[str, int | None]:
    kind, wa = pipeline.split("-")
    a = int(wa.split("a")[1])
    return kind, None if a >= 16 else a


#: The codec's calibration slice (`splitcli.deploy.calibrate`): the last 2048 tokens of WikiText-2's
#: test text, found in its last 64 characters per token.
CALIB_SLICE_TOKENS = 2048


def calibration_slice(tokenizer, data_dir, n_tokens: int) -> list[int]:
    """The first `n_tokens` of the codec's calibration slice (the same text; the evaluated
    perplexity windows are the first ones of the file, so the two never overlap)."""
    from splitcli.eval.loaders import load_text
    from splitcli.eval.protocols import encode
    from splitcli.eval.spec import get_task_spec

    text = load_text(get_task_spec("wikitext2"), data_dir)
    ids = encode(tokenizer, text[-64 * CALIB_SLICE_TOKENS:])[-CALIB_SLICE_TOKENS:]
    if len(ids) < n_tokens:
        raise SplitLLMError(f"the calibration text has {len(ids)} tokens, fewer than the {n_tokens} needed")
    return ids[:n_tokens]


def apply_baseline_(model, pipeline: str, group_size: int, stats: dict | None = None, alpha: float = 0.5,
                    keep_channels: int = 0) -> dict[str, Any]:
    """Fake-quantize `model` in place for `pipeline` (one of `pipelines.BASELINES`); returns info.

    `stats` (from `calibration_stats` on the full-precision model) is needed for SmoothQuant and Atom.
    """
    kind, a_bits = _baseline_bits(pipeline)
    if kind not in ("rtn", "smoothquant", "atom"):
        raise SplitLLMError(f"unknown baseline {pipeline!r}")
    if a_bits is not None and stats is None:
        raise SplitLLMError(f"{pipeline} needs calibration statistics")
    info: dict[str, Any] = {"weight_bits": 4, "act_bits": a_bits, "group_size": group_size}
    for name, m in decoder_linears(model):
        w = m.weight.data  # [out, in]
        if kind == "rtn":
            m.weight.data = fake_quant_weight(w, 4, group_size)
        elif kind == "smoothquant":
            s = smooth_factors(stats[name]["absmax"], w, alpha)  # [in]
            m.weight.data = fake_quant_weight(w * s, 4, group_size)
            m.register_forward_pre_hook(_smoothquant_hook(s, a_bits))
        else:
            keep = atom_keep_channels(stats[name]["meansq"], keep_channels)
            wq = fake_quant_weight(w, 4, group_size)
            if keep.numel():
                wq[:, keep] = fake_quant_weight(w[:, keep].contiguous(), 8, keep.numel())
            # Reorder the weight's columns once, so the hook only gathers the input (as Atom does).
            perm = atom_order(w.shape[1], keep)
            m.weight.data = wq[:, perm].contiguous()
            m.register_forward_pre_hook(_atom_hook(perm, keep.numel(), a_bits, group_size))
    if kind == "smoothquant":
        info["alpha"] = alpha
    if kind == "atom":
        info["keep_channels"] = keep_channels
    return info


def _smoothquant_hook(s: torch.Tensor, a_bits: int):
    def hook(mod, args):
        return (fake_quant_per_token(args[0] / s.to(args[0].dtype), a_bits),) + tuple(args[1:])
    return hook


def _atom_hook(perm: torch.Tensor, n_keep: int, a_bits: int, group_size: int):
    def hook(mod, args):
        return (atom_fake_quant_reordered(args[0][..., perm], n_keep, a_bits, group_size),) + tuple(args[1:])
    return hook


def build_baseline(lm, cfg, data_dir=None) -> tuple[Any, dict[str, Any]]:
    """A fake-quantized copy of ``lm.model`` for the resolved PipelineConfig `cfg`, and its info."""
    model = copy.deepcopy(lm.model)
    stats = None
    info: dict[str, Any] = {}
    if cfg.pipeline != "rtn-w4a16":
        ids = calibration_slice(lm.tokenizer, data_dir, cfg.calib_tokens)
        stats = calibration_stats(lm.model, ids)
        info["calib_tokens"] = len(ids)
    info.update(apply_baseline_(model, cfg.pipeline, cfg.group_size, stats, cfg.alpha, cfg.keep_channels or 0))
    return model, info
