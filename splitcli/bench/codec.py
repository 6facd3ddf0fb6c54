"""`splitllm bench codec`: the codec on real hidden states at the split, and what it costs in ppl.

Protocol (stated in the JSON under "protocol"):
- WikiText-2 test text (LF line ends), or the user's `--text` file read the same way, tokenized
  once without special tokens ("the file" below).
- Calibration (tau, channel classes, static symbol model) on the LAST calibration window of the
  file (`splitcli.deploy.calibrate`); perplexity on the FIRST `windows` windows of `seqlen` tokens
  (GPTQ convention, `splitcli.eval.perplexity`), so calibration is out of sample.
- ppl_fp / ppl_codec: a SplitSession per window with RawWire(fp32) / CodecWire; each window's
  prefill crosses the wire as one frame of `seqlen` tokens. Sizes, rel_l2 and entropy overhead
  are over exactly those frames.
- Baselines (fp32, fp16, int8 per-token absmax, zstd-3 of fp16) over the same hidden states.
- Timings (`splitcli.codec.measure.measure_codec`): median encode / decode ms of one-token frames,
  prefill encode MB/s of fp32 input for the first window.
- Sweep (paper Figs. 6-7, extended to format v3's switches): every recipe of SWEEP_RECIPES at
  every ℓ asked for, each calibrated on the same calibration slice the way deployment calibrates
  (`recipe_config`: the error guard's fallback included, reported in the row's "chosen"); size,
  rel_l2 and ppl over fewer, shorter windows (`sweep_windows` x `sweep_seqlen`, the first of the
  file) to stay affordable, against ppl_fp on those same windows; per recipe also encode + decode
  ms of a one-token frame and prefill encode MB/s.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict

import torch

from ..codec.calibrate import calibrate_settings
from ..codec.config import CodecConfig
from ..codec.measure import measure_codec
from ..deploy import Split, SplitSpec, build_split
from ..data import WIKITEXT2_TEST
from ..deploy.calibrate import calib_tokens_for, calibrated_config, calibration_ids, edge_hidden, text_source
from ..errors import SplitLLMError
from ..plan.codec_settings import DEFAULT_Q_BAR, DEFAULT_TAU_QUANTILE, CodecSettings
from ..runtime.codec_wire import CodecWire
from ..runtime.wire import RawWire


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

    @property
    def needs_ids(self) -> bool:
        return getattr(self.inner, "needs_ids", False)

    def encode(self, hidden: torch.Tensor, **ids) -> bytes:    # [N, H]; ids: a predictive wire's
        self._last = hidden.detach().to(torch.float32).clone()
        if self.keep_hidden:
            self.hidden.append(self._last)
        frame = self.inner.encode(hidden, **ids)
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
                repeats: int = 200, sweep_layers=None, progress: Progress | None = None,
                log: Callable[[str], None] | None = None, predictive: dict | None = None,
                text_file=None) -> dict:
    """Run the benchmark described in the module docstring (on `text_file`, else WikiText-2);
    returns the JSON-ready dict."""
    tick = (lambda stage, total: (lambda done: progress(stage, done, total))) if progress else (lambda s, t: None)
    model = lm.model
    source = text_source(text_file, data_dir)
    text, text_sha, name = source
    ids = [int(i) for i in lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
    n_calib = calib_tokens_for(model)
    if windows * seqlen + n_calib > len(ids):
        raise SplitLLMError(f"{name} has {len(ids)} tokens: {windows} windows of {seqlen} plus the "
                            f"{n_calib}-token calibration slice do not fit without overlapping")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and seqlen > context:
        raise SplitLLMError(f"--seqlen {seqlen} exceeds the model's context of {context} tokens")
    cfg, calib_info = calibrated_config(lm, split_layer, params, data_dir, log, source=source)
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
        calibration=dict(calib_info, text_sha256=text_sha), text=name,
        protocol=(f"calibration on the last window of {name}; ppl on the first windows; one frame per "
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
    if predictive is not None:    # {fit_windows, target_rel_error, step}: see bench.codec_predictive
        from .codec_predictive import bench_predictive

        result["predictive"] = bench_predictive(lm, split, split_layer, ids, windows=windows, seqlen=seqlen,
                                                ppl_fp=ppl_fp, eval_hidden=raw.hidden, repeats=repeats,
                                                tick_factory=tick, text_name=name, **predictive)
    if sweep:
        result["sweep"] = sweep_codec_ppl(lm, params, sweep_layers or (split_layer,), ids, text,
                                          min(sweep_windows, windows), min(sweep_seqlen, seqlen), tick,
                                          text_name=name)
    return result


#: The sweep's recipes: (name, overrides of the user's settings). "paper" is the paper's recipe
#: with the project's defaults (τ at the 0.999 quantile, Q̄ = 6, Δ = 0.05); "ours" the recipe this
#: project proposes for 4-bit activations (docs/results.md): Hadamard rotation + channel_alpha 0.5.
PAPER = "paper"
OURS = "ours: rot+α0.5 Q̄4"
SWEEP_RECIPES = (
    (PAPER, dict()),
    ("paper Q̄4", dict(q_bar=4)),
    ("paper Q̄5", dict(q_bar=5)),
    ("paper Q̄8", dict(q_bar=8)),
    ("paper τ.9999", dict(tau_quantile=0.9999)),
    ("rot Q̄3", dict(q_bar=3, rotation="hadamard")),
    ("rot Q̄4", dict(q_bar=4, rotation="hadamard")),
    ("rot Q̄5", dict(q_bar=5, rotation="hadamard")),
    ("rot+α0.5 Q̄3", dict(q_bar=3, rotation="hadamard", channel_alpha=0.5)),
    (OURS, dict(q_bar=4, rotation="hadamard", channel_alpha=0.5)),
    ("α0.5 Q̄5", dict(q_bar=5, channel_alpha=0.5)),
    ("α0.5 Q̄6", dict(q_bar=6, channel_alpha=0.5)),
    ("target 0.10", dict(target_rel_error=0.10)),
    ("target 0.15", dict(target_rel_error=0.15)),
)
_RESET = dict(tau=None, tau_quantile=None, q_bar=None, rotation="none", rotation_seed=0, channel_alpha=0.0,
              target_rel_error=None)


def recipe_settings(params: CodecSettings, overrides: dict) -> CodecSettings:
    """The user's settings (entropy, Δ, classes, ...) with a recipe's codec choices: the recipe's
    own keys, the defaults for the other transform keys (so recipes compare like with like)."""
    base = dict(_RESET, tau_quantile=DEFAULT_TAU_QUANTILE, q_bar=DEFAULT_Q_BAR)
    kw = {**params.to_dict(), **base, **overrides}
    kw["q_bar_min"] = min(kw["q_bar_min"], kw["q_bar"])
    return CodecSettings(**kw)


def recipe_config(calib, settings: CodecSettings) -> tuple[CodecConfig, dict | None]:
    """The config deployment would use for `settings` on these hidden states [tokens, hidden]
    (`calibrate_settings`, as `deploy.calibrate.calibrated_config` does: a target, or the guard's
    fallback to the default target when fixed settings wipe out the non-massive channels), and
    what a target calibration chose (given or fallen back to), else None."""
    cfg, report = calibrate_settings(calib, settings)
    return cfg, (report if "target_rel_error" in report else None)


def sweep_codec_ppl(lm, params: CodecSettings, layers, ids, text: str, windows: int, seqlen: int,
                    tick, repeats: int = 30, text_name: str = WIKITEXT2_TEST) -> dict:
    """Every recipe at every ℓ in `layers`: calibrated (`recipe_config`) on the calibration
    slice (the last calibration window of the text, `text_name`), then ratio vs fp16, rel_l2,
    ppl on the first `windows` x `seqlen` tokens (one frame per window, fewer tokens than the
    headline, said in the output), encode + decode ms of one-token frames (median of `repeats`)
    and prefill encode MB/s (median of 3 encodes of one `seqlen`-token frame)."""
    model = lm.model
    hidden_size = model.config.hidden_size
    n_calib = calib_tokens_for(model)
    out = []
    for layer in layers:
        advance = tick(f"sweep at ℓ={layer} ({windows} x {seqlen} tokens for ppl)", len(SWEEP_RECIPES) + 1)
        split = build_split(lm, SplitSpec(split_layer=layer))
        calib = edge_hidden(model, layer, calibration_ids(lm.tokenizer, text, n_calib))
        raw = _Probe(RawWire("fp32"), keep_hidden=True)
        ppl_fp = _ppl(split, raw, ids, seqlen, windows)
        advance(1)
        for i, (name, overrides) in enumerate(SWEEP_RECIPES):
            p = recipe_settings(params, overrides)
            cfg, chosen = recipe_config(calib, p)
            wire = CodecWire(cfg)
            probe = _Probe(wire)
            for h in raw.hidden:                                # the ppl windows' own frames
                probe.decode(probe.encode(h))
            frames = _frame_summary(wire, probe, hidden_size)
            ppl = _ppl(split, CodecWire(cfg, keep_stats=False), ids, seqlen, windows)
            timing = measure_codec(raw.hidden[0], cfg, repeats=repeats, prefill_tokens=seqlen, prefill_repeats=3)
            row = dict(layer=layer, recipe=name, settings={k: v for k, v in p.to_dict().items() if k in _RESET or
                                                          k in ("delta", "entropy")},
                       tau=cfg.tau, q_bar=cfg.q_bar, bytes_per_token=frames["bytes_per_token"],
                       ratio_vs_fp16=frames["ratio_vs_fp16"], rel_l2=frames["rel_l2"],
                       mean_width=frames["mean_width"], outliers_per_token=frames["outliers_per_token"],
                       ppl=ppl, ppl_ratio=ppl / ppl_fp,
                       encode_decode_ms_token=timing.encode_ms_token + timing.decode_ms_token,
                       prefill_encode_mb_s=timing.prefill_encode_mb_s)
            if chosen is not None:
                row["chosen"] = chosen
            out.append(row)
            advance(i + 2)
    return dict(ppl_windows=windows, ppl_seqlen=seqlen, layers=list(layers), rows=out, paper=PAPER, ours=OURS,
                calibration=f"last calibration window (2048 tokens, or the context) of {text_name}",
                evaluation=f"first {windows} windows x {seqlen} tokens of {text_name}",
                note=f"sweep ppl uses {windows} windows x {seqlen} tokens (fewer than the headline)")


def pareto(rows: list[dict]) -> list[dict]:
    """Rows not dominated in (smaller bytes/token, lower ppl) among rows of the same ℓ."""
    keep = []
    for r in rows:
        same = [o for o in rows if o["layer"] == r["layer"] and o is not r]
        if not any(o["bytes_per_token"] <= r["bytes_per_token"] and o["ppl"] <= r["ppl"] and
                   (o["bytes_per_token"] < r["bytes_per_token"] or o["ppl"] < r["ppl"]) for o in same):
            keep.append(r)
    return keep


def plot_sweep(sweep: dict, path) -> None:
    """Size vs perplexity per ℓ (Pareto view), the paper's recipe and ours marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sweep["rows"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for layer in sweep["layers"]:
        sel = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["ratio_vs_fp16"])
        line, = ax.plot([r["ratio_vs_fp16"] for r in sel], [100 * (r["ppl_ratio"] - 1) for r in sel], "o",
                        alpha=0.6, label=f"ℓ={layer}")
        front = sorted(pareto(sel), key=lambda r: r["ratio_vs_fp16"])
        ax.plot([r["ratio_vs_fp16"] for r in front], [100 * (r["ppl_ratio"] - 1) for r in front], "-",
                color=line.get_color(), lw=1)
        for name, marker in ((sweep["paper"], "*"), (sweep["ours"], "D")):
            for r in sel:
                if r["recipe"] == name:
                    ax.plot(r["ratio_vs_fp16"], 100 * (r["ppl_ratio"] - 1), marker, ms=13, mfc="none",
                            color=line.get_color())
    ax.plot([], [], "k*", mfc="none", ms=11, label="paper's recipe (τ .999, Q̄ 6)")
    ax.plot([], [], "kD", mfc="none", ms=9, label="ours (rotation + α 0.5, Q̄ 4)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("compression vs fp16 (x)")
    ax.set_ylabel(f"ppl increase % ({sweep['ppl_windows']} x {sweep['ppl_seqlen']} tokens)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
