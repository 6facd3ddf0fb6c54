"""`splitllm bench codec --predictive`: the token-predictive codec (frame format 4) on the headline protocol.

Fit text: the last `fit_windows` windows of `seqlen` tokens of the benchmark's text (wiki.test.raw
unless `--text`; predictor, KLT, step,
symbol models; `splitcli.codec.predictive_fit`); evaluation: the first `windows` windows, the same
frames and perplexity protocol as the TAB-Q codec's headline (one frame per window's prefill,
ppl_fp from the same run). The two texts do not overlap (checked). Timings as `measure_codec`'s:
median encode / decode ms of one-token frames (each with its previous token), prefill encode MB/s
of fp32 input for one window.
"""

from __future__ import annotations

import torch

from ..codec import predictive
from ..codec.calibrate import bulk_channels, bulk_rel_error
from ..codec.measure import _median_ms
from ..codec.predictive_fit import DEFAULT_TARGET_REL_ERROR
from ..data import WIKITEXT2_TEST
from ..deploy.predictive import PREDICTIVE_FIT_WINDOWS, fit_from_ids
from ..runtime.codec_wire import PredictiveWire


def bench_predictive(lm, split, split_layer: int, ids: list[int], *, windows: int, seqlen: int, ppl_fp: float,
                     eval_hidden: list[torch.Tensor], fit_windows: int = PREDICTIVE_FIT_WINDOWS,
                     target_rel_error: float = DEFAULT_TARGET_REL_ERROR, step: float | None = None,
                     repeats: int = 200, tick_factory=None, text_name: str = WIKITEXT2_TEST) -> dict:
    """Fit, then measure the format-4 codec on the headline's windows; returns the JSON-ready dict."""
    from .codec import _Probe, _ppl

    tick = tick_factory or (lambda stage, total: None)
    pc, emb = fit_from_ids(lm, split_layer, ids, windows=fit_windows, seqlen=seqlen, reserved=windows * seqlen,
                           target_rel_error=target_rel_error, step=step, text_name=text_name,
                           tick=tick("predictive codec: edge hidden states of the fit text", fit_windows))
    wire = PredictiveWire(pc, emb)
    probe = _Probe(wire)
    ppl = _ppl(split, probe, ids, seqlen, windows, tick("ppl (predictive wire)", windows))
    hidden = eval_hidden[0]                                                     # [seqlen, H]
    w0 = torch.tensor(ids[:seqlen])
    n = min(len(w0), 64)
    frames = [predictive.encode(hidden[i:i + 1], w0[i:i + 1], pc, emb, int(w0[i - 1]) if i else predictive.NO_TOKEN)
              for i in range(1, n)]
    k = iter(range(1 << 62))
    enc = _median_ms(lambda: (lambda i: predictive.encode(hidden[i:i + 1], w0[i:i + 1], pc, emb, int(w0[i - 1])))(
        1 + next(k) % (n - 1)), repeats)
    dec = _median_ms(lambda: predictive.decode(frames[next(k) % len(frames)], pc, emb), repeats)
    pre = _median_ms(lambda: predictive.encode(hidden, w0, pc, emb), 7)
    hidden_size = hidden.shape[1]
    # the figure the step was chosen for (BulkError), here on the first evaluation window after decoding
    x = hidden[1:].numpy()
    bulk = bulk_rel_error(predictive.decode(predictive.encode(hidden, w0, pc, emb), pc, emb)[1:].numpy(), x,
                          bulk_channels(x))
    total = sum(probe.frame_bytes)
    token_bytes = sum(map(len, frames)) / len(frames)
    return dict(
        ratio_vs_fp16=2 * hidden_size * probe.tokens / total, bytes_per_token=total / probe.tokens,
        rel_l2_error=probe.rel_l2, bulk_rel_error_window0=bulk, ppl_fp=ppl_fp, ppl=ppl, ppl_ratio=ppl / ppl_fp,
        encode_ms_decode_step=enc, decode_ms_decode_step=dec, decode_step_frame_bytes=token_bytes,
        decode_step_ratio_vs_fp16=2 * hidden_size / token_bytes,
        prefill_encode_mb_s=hidden.numel() * 4 / 1e6 / (pre / 1e3), prefill_tokens=len(w0),
        step=pc.step, fit=pc.info, frame_version=predictive.FRAME_VERSION,
        protocol=(f"fit (predictor, KLT, step, symbol models) on the last fit windows of {text_name}, "
                  "ppl and sizes on the first windows (no overlap); one frame per window's prefill"),
    )
