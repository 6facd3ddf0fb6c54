"""`splitllm profile --predictive`: the token-predictive codec's points in a profile, so `plan` can choose it.

At each split layer ℓ the profile measures TAB-Q at, the codec a deployment would run
(`fitted_predictive`: the default fit, cached, so the deployment reuses it) is measured the way the
TAB-Q points are: the mean size of a one-token frame (each token sent alone with its ids, as a
decode step sends it) over up to SIZE_TOKENS tokens, the encode ms of one, and `bulk_rel_error`
over the last quarter of the tokens. The tokens are not the TAB-Q points' (the tail of
wiki.test.raw, inside this codec's fit text, where it codes ~7% smaller than elsewhere) but the
same number from `MEASURE_WINDOW` windows into the file: neither the fit text nor the `bench codec`
evaluation windows.

The point's q̄ is the width eq. (8a)'s Ψ counts it at (`psi_width`): the widest q̄ at which the
paper's recipe, measured at ℓ, is at least as lossy as the predictive codec. Ψ's q̄ is the paper
codec's width (the planner counts every TAB-Q recipe at its q̄ whatever its error), so the
predictive codec is counted as the paper's codec it is at least as accurate as. A profile without
the paper's recipe compares with every recipe measured (each at least as lossy).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

from splitcli.deploy.calibrate import edge_hidden, read_wikitext
from splitcli.deploy.predictive import fit_seqlen_for, fit_windows_for, fitted_predictive
from splitcli.errors import SplitLLMError
from splitcli.plan.codec_profile import CodecPoint
from splitcli.plan.codec_settings import DEFAULT_TAU_QUANTILE, MIN_Q
from splitcli.plan.recipes import PAPER_RECIPE

#: The measurement tokens start this many fit-length windows into wiki.test.raw (the validation
#: windows of docs/results.md: after the `bench codec` windows 0-7, before the fit text).
MEASURE_WINDOW = 8


def psi_width(error: float, tabq: Sequence[CodecPoint]) -> int:
    """The widest q̄ of `tabq` (TAB-Q points at one ℓ) at which the paper recipe's error (every
    recipe's, when the paper's was not measured) is >= `error`; MIN_Q when there is none."""
    paper = [p for p in tabq if p.recipe == PAPER_RECIPE]
    by_q: dict[int, list[float]] = {}
    for p in paper or tabq:
        if p.rel_error is not None:
            by_q.setdefault(p.q_bar, []).append(p.rel_error)
    widths = [q for q, errs in by_q.items() if min(errs) >= error]
    return max(widths, default=MIN_Q)


def measure_ids(lm, n_tokens: int, data_dir=None) -> list[int]:
    """`n_tokens` token ids of wiki.test.raw from MEASURE_WINDOW fit windows in (module docstring)."""
    text, _ = read_wikitext(data_dir)
    ids = [int(i) for i in lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
    seqlen = fit_seqlen_for(lm)
    start = MEASURE_WINDOW * seqlen
    if start + n_tokens > len(ids) - fit_windows_for(len(ids), seqlen) * seqlen:
        raise SplitLLMError(f"wiki.test.raw has {len(ids)} tokens: too few to measure the predictive codec on "
                            f"{n_tokens} tokens outside its fit text and the benchmark's windows")
    return ids[start:start + n_tokens]


def predictive_points(lm, layers: Sequence[int], n_tokens: int, tabq: Sequence[CodecPoint], *, repeats: int,
                      size_tokens: int, data_dir=None, progress: Callable[[str], None] | None = None
                      ) -> list[CodecPoint]:
    """One predictive CodecPoint per split layer in `layers` (module docstring); `tabq`: the
    profile's TAB-Q points, whose errors at each ℓ set the point's Ψ width."""
    from splitcli.codec import predictive
    from splitcli.codec.calibrate import bulk_channels, bulk_rel_error
    from splitcli.deploy.measure import median_ms

    ids = torch.tensor(measure_ids(lm, n_tokens, data_dir))                  # [N]
    n = ids.numel()
    held = n - n // 4 if n >= 4 else 0                                       # first held-out position
    points = []
    for layer in layers:
        pc, emb, _ = fitted_predictive(lm, layer, data_dir, progress)
        with torch.inference_mode():
            hidden = edge_hidden(lm.model, layer, ids)                       # [N, H]
        at = range(held, min(n, held + size_tokens))
        # a decode step's frame: one row, coded against the token before it
        sizes = [len(predictive.encode(hidden[i:i + 1], ids[i:i + 1], pc, emb, int(ids[i - 1]) if i else predictive.NO_TOKEN))
                 for i in at]
        last = at[-1]
        one, one_ids, prev = hidden[last:last + 1], ids[last:last + 1], int(ids[last - 1]) if last else predictive.NO_TOKEN
        enc = median_ms(lambda: predictive.encode(one, one_ids, pc, emb, prev), repeats)
        x = hidden[held:].numpy()
        y = predictive.decode(predictive.encode(hidden[held:], ids[held:], pc, emb,
                                                int(ids[held - 1]) if held else predictive.NO_TOKEN), pc, emb).numpy()
        error = bulk_rel_error(y, x, bulk_channels(x))
        here = [p for p in tabq if p.split_layer == layer and not p.recipe.predictive]
        points.append(CodecPoint(q_bar=psi_width(error, here), tau=DEFAULT_TAU_QUANTILE,
                                 bytes_per_token=statistics.fmean(sizes), tau_is_quantile=True, rel_error=error,
                                 split_layer=layer, wire="predictive", encode_ms=enc))
        if progress is not None:
            progress(f"predictive codec at ℓ = {layer}: {points[-1].bytes_per_token:.1f} B/token, error {error:.3g}, "
                     f"counted as q̄ {points[-1].q_bar} in Ψ")
    return points
