"""The planner's default accuracy source: a WikiText-2 perplexity proxy run on the model.

See `splitcli.plan.accuracy` for what a drop is and how the proxy is read: WikiText-2 perplexity
on a short calibration slice (by default 1 window of 512 tokens from the start of the test
split), with the candidate's edge layers [0, l) fake-quantized to their OPSC weight bits
(the runtime's scheme at those bits: per-channel int8 at 8, group-wise RTN otherwise, dequantized
back to fp32) and, when Qa < 16, the edge layers' keys and values
stored in a Qa-bit cache. It does not model the codec (q_bar, tau) on the hidden state.

Cost control: each layer's quantized codes are computed once per bit width and reused; perplexity
is cached per distinct effective configuration (edge weight bits, and Qa with the layers it
covers), so the many candidates that share one (e.g. every l_w >= l) cost one evaluation.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch

from splitcli.data import WIKITEXT2_TEST, data_file, read_text
from splitcli.errors import SplitLLMError
from splitcli.model.split import CloudHalf, EdgeHalf, decoder_parts
from splitcli.plan.accuracy import edge_bits
from splitcli.plan.enumerate import Candidate
from splitcli.quant import KEEP_BITS, KVQuantConfig, QuantizedKVCache, dequantize_weight, quantize_weight

def resolve_data_dir(option: str | os.PathLike[str] | None) -> Path:
    """The data directory holding WikiText-2's test file (--data-dir, else $SPLITLLM_DATA, else
    ../shared/data: `splitcli.data`'s search), or a one-line error that also offers the way out."""
    try:
        return data_file(WIKITEXT2_TEST, option).parents[1]
    except SplitLLMError as e:
        raise SplitLLMError(f"{e}; or pass --accuracy-table to plan on measured accuracy instead") from None


def calibration_windows(tokenizer, data_dir: Path, windows: int = 1, seqlen: int = 512) -> torch.Tensor:
    """The first `windows` non-overlapping windows of `seqlen` tokens of WikiText-2 test: [n, seqlen]."""
    if windows < 1 or seqlen < 2:
        raise SplitLLMError(f"need >= 1 window of >= 2 tokens, got {windows} x {seqlen}")
    need = windows * seqlen
    text = read_text(Path(data_dir) / WIKITEXT2_TEST)
    chars = need * 8  # WikiText averages ~4 characters per token: read twice that, grow if short
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise SplitLLMError(f"WikiText-2 holds {len(ids)} tokens, fewer than {windows} x {seqlen}")
    return torch.tensor(ids[:need], dtype=torch.long).reshape(windows, seqlen)


class PerplexityProxy:
    """Relative perplexity increase of a candidate on calibration windows (module docstring)."""

    def __init__(self, model, windows: torch.Tensor, group_size: int, progress: Callable[[str], None] | None = None):
        self.parts = decoder_parts(model)
        self.windows = windows  # [n, seqlen]
        self.group_size = group_size
        self.progress = progress
        self._codes: dict[tuple[int, str, int], tuple[torch.Tensor, ...]] = {}
        self._ppl: dict[tuple, float] = {}
        self.evaluations = 0

    @property
    def n_layers(self) -> int:
        return self.parts.num_layers

    def _key(self, bits: tuple[int | None, ...], qa: int) -> tuple:
        weights = tuple(k for k in enumerate(bits) if k[1] is not None and k[1] < KEEP_BITS)
        kv_layers = len(bits) if qa < KEEP_BITS else 0
        return weights, (qa if kv_layers else KEEP_BITS), kv_layers

    def perplexity(self, bits: tuple[int | None, ...], qa: int) -> float:
        """Perplexity with edge layers [0, len(bits)) at `bits` and their KV at `qa` bits."""
        key = self._key(bits, qa)
        if key not in self._ppl:
            self._ppl[key] = self._evaluate(*key)
        return self._ppl[key]

    def baseline(self) -> float:
        return self.perplexity((), KEEP_BITS)

    def drop(self, candidate: Candidate) -> float:
        base = self.baseline()
        return (self.perplexity(edge_bits(candidate, self.n_layers), candidate.qa) - base) / base

    def _fake_weights(self, k: int, name: str, linear: torch.nn.Linear, bits: int) -> torch.Tensor:
        # the scheme the runtime runs at these bits (8: per-channel int8 for the int8 kernel)
        key = (k, name, bits)
        if key not in self._codes:
            self._codes[key] = quantize_weight(linear.weight, bits, self.group_size)
        return dequantize_weight(self._codes[key], bits, linear.weight.dtype)

    @torch.inference_mode()
    def _evaluate(self, weights: tuple[tuple[int, int], ...], qa: int, kv_layers: int) -> float:
        self.evaluations += 1
        if self.progress:
            self.progress(f"proxy perplexity #{self.evaluations}: weights {_runs(weights) or 'as loaded'}; "
                          f"KV {f'{qa}b on layers 0-{kv_layers - 1}' if kv_layers else 'float'}")
        originals: list[tuple[torch.nn.Linear, torch.Tensor]] = []
        try:
            for k, b in weights:
                for name, module in self.parts.layers[k].named_modules():
                    if isinstance(module, torch.nn.Linear):
                        originals.append((module, module.weight.data))
                        module.weight.data = self._fake_weights(k, name, module, b)
            return self._windows_ppl(qa, kv_layers)
        finally:
            for module, weight in originals:
                module.weight.data = weight

    def _windows_ppl(self, qa: int, kv_layers: int) -> float:
        parts, total, count = self.parts, 0.0, 0
        # The edge/cloud halves run the same layers as the whole model; splitting where the Qa-bit
        # cache ends keeps the cloud's layers on a float cache.
        l = min(max(kv_layers, 1), parts.num_layers - 1)
        edge, cloud = EdgeHalf(parts, l), CloudHalf(parts, l)
        for row in self.windows:
            ids = row[None]  # [1, T]
            positions = torch.arange(ids.shape[1])[None]  # [1, T]
            cache = QuantizedKVCache(KVQuantConfig(bits=qa)) if kv_layers and qa < KEEP_BITS else None
            hidden = edge(ids, positions, None, cache)  # [1, T, H]
            logits = cloud(hidden, positions, None, None)  # [1, T, V]
            nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
            total, count = total + float(nll), count + ids.shape[1] - 1
        return math.exp(total / count)


def _runs(weights: tuple[tuple[int, int], ...]) -> str:
    """((0, 4), (1, 4), (2, 8)) -> 'layers 0-1 at 4b, 2 at 8b'."""
    runs: list[list[int]] = []
    for k, b in weights:
        if runs and runs[-1][2] == b and runs[-1][1] == k - 1:
            runs[-1][1] = k
        else:
            runs.append([k, k, b])
    return ", ".join(f"{'layers ' if i == 0 else ''}{a}{f'-{z}' if z != a else ''} at {b}b"
                     for i, (a, z, b) in enumerate(runs))
