"""`splitllm bench codec`: the codec on real hidden states at the split, and what it costs in ppl.

Protocol (stated in the JSON under "protocol"):
- WikiText-2 test text (LF line ends), tokenized once without special tokens.
- Calibration (tau, channel classes, static symbol model) on the LAST calibration window of the
  file (`splitcli.deploy.calibrate`); perplexity on the FIRST `windows` windows of `seqlen` tokens
  (GPTQ convention, `splitcli.eval.perplexity`), so calibration is out of sample.
- ppl_fp / ppl_codec: a SplitSession per window with RawWire(fp32) / CodecWire; each window's
  prefill crosses the wire as one frame of `seqlen` tokens. Sizes, rel_l2 and entropy overhead
  are over exactly those frames.
- Baselines (fp32, fp16, int8 per-token absmax, zstd-3 of fp16) over the same hidden states.
- Timings (`splitcli.codec.measure.measure_codec`): median encode / decode ms of one-token frames,
  prefill encode MB/s of fp32 input for the first window.
- Sweep (paper Figs. 6-7): tau quantile x q_bar, each point calibrated on the same slice; sizes
  over all evaluation frames, ppl over fewer, shorter windows (`sweep_windows` x `sweep_seqlen`)
  to stay affordable, against ppl_fp on those same windows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, replace

import torch

from ..codec.calibrate import calibrate_from_samples
from ..codec.measure import measure_codec
from ..deploy import Split, SplitSpec, build_split
from ..deploy.calibrate import calib_tokens_for, calibrated_config, calibration_ids, edge_hidden, read_wikitext
from ..errors import SplitLLMError
from ..plan.codec_settings import CodecSettings
from ..runtime.codec_wire import CodecWire
from ..runtime.wire import RawWire

SWEEP_TAU_QUANTILES = (0.995, 0.999, 0.9995, 0.9999)
SWEEP_Q_BARS = (4, 5, 6, 8)

Progress = Callable[[str, int, int], None]   # (stage, done, total)


class _Probe:
    """Wraps a wire: keeps what went in (optionally), frame sizes, and the squared error of what
    came out, so rel_l2 is measured on exactly the frames the cloud half consumed."""

    def __init__(self, inner, keep_hidden: bool = False):
        self.inner, self.name, self.keep_hidden = inner, inner.name, keep_hidden
        self.hidden: list[torch.Tensor] = []
        self.frame_bytes: list[int] = []
        self.tokens = 0
        self.sq_err = 0.0
        self.sq_ref = 0.0
        self._last: torch.Tensor | None = None

    def encode(self, hidden: torch.Tensor) -> bytes:           # [N, H]
        self._last = hidden.detach().to(torch.float32).clone()
        if self.keep_hidden:
            self.hidden.append(self._last)
        frame = self.inner.encode(hidden)
        self.frame_bytes.append(len(frame))
        self.tokens += hidden.shape[0]
        return frame

    def decode(self, frame: bytes) -> torch.Tensor:
        y = self.inner.decode(frame)
        self.sq_err += float(((y.double() - self._last.double()) ** 2).sum())
        self.sq_ref += float((self._last.double() ** 2).sum())
        return y

    @property
    def rel_l2(self) -> float:
        return math.sqrt(self.sq_err / self.sq_ref) if self.sq_ref > 0 else 0.0


def split_logits_fn(split: Split, wire):
    """A LogitsFn (splitcli.eval) running each row through its own session of `split` over `wire`:
    the whole row is one prefill, i.e. one frame. Rows are full windows (no padding)."""

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = []
        for b in range(input_ids.shape[0]):
            session = split.session(wire)
            rows.append(session.forward(input_ids[b:b + 1], None, logits_to_keep=0))  # [1, T, V]
        return torch.cat(rows)

    return fn


def _ppl(split: Split, wire, ids, seqlen, windows, tick=None) -> float:
    from ..eval.perplexity import perplexity

    on_window = (lambda i, _nll: tick(i + 1)) if tick is not None else None
    return perplexity(split_logits_fn(split, wire), ids, seqlen=seqlen, n_windows=windows,
                      batch_size=1, on_window=on_window).ppl


def _frame_summary(wire: CodecWire, probe: _Probe, hidden: int) -> dict:
    stats = wire.stats
    coded = sum(8 * s.body_bytes for s in stats)
    entropy = sum(s.entropy_bits for s in stats)
    models = sum(8 * s.model_bytes for s in stats)
    total = sum(probe.frame_bytes)
    return dict(bytes_per_token=total / probe.tokens, ratio_vs_fp16=2 * hidden * probe.tokens / total,
                rel_l2=probe.rel_l2, entropy_overhead=coded / entropy - 1 if entropy > 0 else 0.0,
                entropy_overhead_with_models=(coded + models) / entropy - 1 if entropy > 0 else 0.0,
                mean_width=sum(s.mean_width * s.tokens for s in stats) / probe.tokens,
                outliers_per_token=sum(s.n_outliers for s in stats) / probe.tokens,
                paths=sorted({s.path for s in stats}))


def bench_codec(lm, split_layer: int, params: CodecSettings, *, data_dir=None, windows: int = 8,
                seqlen: int = 2048, sweep: bool = True, sweep_windows: int = 2, sweep_seqlen: int = 512,
                repeats: int = 200, progress: Progress | None = None,
                log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark described in the module docstring; returns the JSON-ready dict."""
    tick = (lambda stage, total: (lambda done: progress(stage, done, total))) if progress else (lambda s, t: None)
    model = lm.model
    text, text_sha = read_wikitext(data_dir)
    ids = [int(i) for i in lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
    n_calib = calib_tokens_for(model)
    if windows * seqlen + n_calib > len(ids):
        raise SplitLLMError(f"WikiText-2 has {len(ids)} tokens: {windows} windows of {seqlen} plus the "
                            f"{n_calib}-token calibration slice do not fit without overlapping")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and seqlen > context:
        raise SplitLLMError(f"--seqlen {seqlen} exceeds the model's context of {context} tokens")
    cfg, calib_info = calibrated_config(lm, split_layer, params, data_dir, log)
    hidden_size = model.config.hidden_size
    split = build_split(lm, SplitSpec(split_layer=split_layer))   # the codec alone: unquantized edge

    raw = _Probe(RawWire("fp32"), keep_hidden=True)
    ppl_fp = _ppl(split, raw, ids, seqlen, windows, tick("ppl (raw fp32 wire)", windows))
    codec_wire = CodecWire(cfg)
    probe = _Probe(codec_wire)
    ppl_codec = _ppl(split, probe, ids, seqlen, windows, tick("ppl (codec wire)", windows))
    frames = _frame_summary(codec_wire, probe, hidden_size)

    tick("timings", 1)(0)
    hidden = torch.cat(raw.hidden)                                              # [windows * seqlen, H]
    report = measure_codec(hidden, cfg, repeats=repeats, prefill_tokens=seqlen, prefill_repeats=7)
    tick("timings", 1)(1)
    methods = [asdict(m) for m in report.methods if m.method != "codec"]
    methods.append(dict(method="codec", bytes_per_token=frames["bytes_per_token"],
                        ratio_vs_fp16=frames["ratio_vs_fp16"], rel_l2=frames["rel_l2"]))
    result = dict(
        model=lm.model_id, model_sha256=lm.sha256, split_layer=split_layer, hidden=hidden_size,
        windows=windows, seqlen=seqlen, params=params.to_dict(), codec_config=cfg.to_dict(),
        calibration=dict(calib_info, text_sha256=text_sha),
        protocol=("calibration on the last window of wiki.test.raw; ppl on the first windows; one frame per "
                  "window's prefill; timings are medians on a shared machine"),
        ratio_vs_fp16=frames["ratio_vs_fp16"], rel_l2_error=frames["rel_l2"], ppl_fp=ppl_fp, ppl_codec=ppl_codec,
        ppl_ratio=ppl_codec / ppl_fp, bytes_per_token=frames["bytes_per_token"],
        entropy_overhead=frames["entropy_overhead"],
        entropy_overhead_with_models=frames["entropy_overhead_with_models"], mean_width=frames["mean_width"],
        outliers_per_token=frames["outliers_per_token"], frame_paths=frames["paths"],
        encode_ms_decode_step=report.encode_ms_token, decode_ms_decode_step=report.decode_ms_token,
        decode_step_frame_bytes=report.token_bytes, decode_step_ratio_vs_fp16=report.token_ratio_vs_fp16,
        decode_step_path=report.token_path, prefill_encode_mb_s=report.prefill_encode_mb_s,
        prefill_tokens=report.prefill_tokens, methods=methods,
        load_average=list(os.getloadavg()), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
    )
    if sweep:
        calib = edge_hidden(model, split_layer, calibration_ids(lm.tokenizer, text, n_calib))
        result["sweep"] = sweep_codec_ppl(split, params, calib, raw.hidden, ids,
                                          min(sweep_windows, windows), min(sweep_seqlen, seqlen), tick)
    return result


def sweep_codec_ppl(split: Split, params: CodecSettings, calib: torch.Tensor, eval_hidden: list[torch.Tensor],
                    ids, windows: int, seqlen: int, tick) -> dict:
    """tau quantile x q_bar grid: size and rel_l2 over the evaluation frames, ppl on
    `windows` x `seqlen` tokens (fewer than the headline, said in the output)."""
    grid = [(tq, qb) for tq in SWEEP_TAU_QUANTILES for qb in SWEEP_Q_BARS]
    advance = tick(f"sweep ({windows} x {seqlen} tokens for ppl)", len(grid) + 1)
    ppl_fp = _ppl(split, RawWire("fp32"), ids, seqlen, windows)
    advance(1)
    hidden_size = split.edge.parts.config.hidden_size
    rows = []
    for i, (tq, qb) in enumerate(grid):
        p = replace(params, tau=None, tau_quantile=tq, q_bar=qb, q_bar_min=min(params.q_bar_min, qb),
                    target_rel_error=None)
        cfg = calibrate_from_samples(calib, p)
        wire = CodecWire(cfg)
        probe = _Probe(wire)
        for h in eval_hidden:                                # same frames as the headline run
            probe.decode(probe.encode(h))
        frames = _frame_summary(wire, probe, hidden_size)
        ppl = _ppl(split, CodecWire(cfg, keep_stats=False), ids, seqlen, windows)
        rows.append(dict(tau_quantile=tq, tau=cfg.tau, q_bar=qb, delta=p.delta,
                         bytes_per_token=frames["bytes_per_token"], ratio_vs_fp16=frames["ratio_vs_fp16"],
                         rel_l2=frames["rel_l2"], mean_width=frames["mean_width"],
                         outliers_per_token=frames["outliers_per_token"],
                         entropy_overhead=frames["entropy_overhead"], ppl=ppl, ppl_ratio=ppl / ppl_fp))
        advance(i + 2)
    return dict(ppl_windows=windows, ppl_seqlen=seqlen, ppl_fp=ppl_fp, rows=rows,
                note=f"sweep ppl uses {windows} windows x {seqlen} tokens (fewer than the headline)")


def plot_sweep(sweep: dict, path) -> None:
    """Figs. 6-7 style: ratio vs tau quantile per q_bar, and ppl increase vs ratio (Pareto view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sweep["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for qb in sorted({r["q_bar"] for r in rows}):
        sel = [r for r in rows if r["q_bar"] == qb]
        a.plot([1 - r["tau_quantile"] for r in sel], [r["ratio_vs_fp16"] for r in sel], "o-", label=f"Q̄={qb}")
        b.plot([r["ratio_vs_fp16"] for r in sel], [100 * (r["ppl_ratio"] - 1) for r in sel], "o-", label=f"Q̄={qb}")
    a.set_xscale("log")
    a.set_xlabel("outlier fraction 1 - τ quantile")
    a.set_ylabel("compression vs fp16 (x)")
    b.set_xlabel("compression vs fp16 (x)")
    b.set_ylabel(f"ppl increase % ({sweep['ppl_windows']} x {sweep['ppl_seqlen']} tokens)")
    b.axhline(2.0, color="grey", lw=0.8, ls="--")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
