"""Layer timings on the fast decode path (`splitcli.model.fast`), the path `splitllm generate` runs.

Why: the eager Hugging Face path pays per-op Python and mask / cache overhead that the fast path
does not, so a profile timed there was 17-25% pessimistic against generate's measured edge step
(README, 8-bit x 29: 15.2 vs 13.0 ms). `measure_profile` times on this path whenever the model is
one the fast path supports (`timed_path` names which path a profile timed) and falls back to the
eager `LayerRange` timer otherwise.

What is timed, per weight width, on COPIES of the layers (the fast path fuses q/k/v and gate/up
into one weight each and re-lays out float weights in place, so the user's model is never
wrapped): each layer alone as a one-layer `FastLayers` (decode: one token after
`decode_context` cached tokens, the cache rolled back to that prefix before each call; prefill: T
tokens into a fresh static cache), in rounds over all layers, and one decode step of the whole
stack as one `FastLayers`. A fast forward pays its rotary table lookup, the one-token rotary matrix
and the cache bookkeeping once for all its layers; each layer timed alone paid it once, so the
per-forward cost is what the alone timings add up to beyond the stack, spread over the n - 1
extra forwards: O = (sum of alone - stack) / (n - 1) (it also absorbs a layer's being slower
alone than inside the stack). `measure_profile` charges O to the embedding stage, as it charges
the eager path's masks + rotary, and scales the layers so they sum to the stack minus O. Prefill
timings keep their per-call cost (a static cache allocation and a table lookup: tens of µs
against ms of prefill).

Memory: while one width is timed its copies are alive, so the as-loaded width holds a second
float copy of every layer (SmolLM2-135M: +405 MiB; a 7B fp32 model would need its layers twice).

The head: the LM head on a copy re-laid out as the fast path lays it out (`relayout_linear_`:
its batch-1 product streams that layout faster), after the model's final norm.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Callable

import torch

from splitcli.model.fast import FastLayers, fast_unsupported, relayout_linear_
from splitcli.plan.profile import TIMED_PATHS

FAST, EAGER = TIMED_PATHS


def timed_path(parts) -> str:
    """FAST when every layer of `parts` runs on the fast decode path, else EAGER."""
    return FAST if fast_unsupported(parts, 0, parts.num_layers) is None else EAGER


def fast_overhead_ms(alone_ms: list[float], stack_ms: float) -> float:
    """Per-forward cost O of the fast path: each of n layers timed alone paid it once, the stack
    of all n once, so sum(alone) - stack = (n - 1) O. Never negative; 0 for one layer."""
    n = len(alone_ms)
    return max(0.0, (sum(alone_ms) - stack_ms) / (n - 1)) if n > 1 else 0.0


def layer_copies(layers, variant: Callable[[torch.nn.Module], torch.nn.Module]) -> list[torch.nn.Module]:
    """`variant(layer)` of each layer, always a copy: a variant that returns the layer itself
    (the as-loaded width) is deep-copied, since the fast path rewrites the weights it wraps."""
    out = []
    for layer in layers:
        v = variant(layer)
        out.append(copy.deepcopy(v) if v is layer else v)
    return out


class FastTimer:
    """Same rounds and results as measure._Timer, with each layer as a one-layer `FastLayers`
    and the stack as one `FastLayers` over all of them (module docstring)."""

    def __init__(self, parts, inputs: list[torch.Tensor], positions: torch.Tensor, settings):
        self.parts, self.inputs, self.positions, self.settings = parts, inputs, positions, settings
        self.prefix = settings.decode_context

    def _filled(self, fast: FastLayers, hidden: torch.Tensor):
        """A static cache holding the prefix's keys and values (rolled back to it before each step)."""
        p = self.prefix
        cache = fast.new_cache(p + 1)
        fast(hidden[:, :p], self.positions[:, :p], None, cache)
        return cache

    def _step(self, fast: FastLayers, hidden: torch.Tensor, cache) -> float:
        """ms of one decode token after the prefix (every call sees the same prefix)."""
        p = self.prefix
        cache.length = p  # position p is overwritten: the cache is the prefix again
        t0 = time.perf_counter()
        fast(hidden[:, p:p + 1], self.positions[:, p:p + 1], None, cache)
        return (time.perf_counter() - t0) * 1e3

    def time_all(self, layers: list[torch.nn.Module], tick: Callable[[str], None], what: str):
        """Per layer: ({T: median prefill ms}, median decode ms) of `layers` (copies, rewritten
        by the fast path), and the median decode step of all of them as one stack."""
        n, h, pos = len(layers), self.inputs, self.positions
        parts = dataclasses.replace(self.parts, layers=torch.nn.ModuleList(layers))
        singles = [FastLayers(parts, k, k + 1) for k in range(n)]
        stack = FastLayers(parts, 0, n)  # finds the fused weights the singles made (no second copy)
        filled = [self._filled(f, h[k]) for k, f in enumerate(singles)]
        stack_filled = self._filled(stack, h[0])
        samples = new_samples(n, self.settings.tokens)
        for r in range(self.settings.repeats + 1):  # round 0 warms up
            # decode steps of all layers back to back (as in an edge forward), then the prefills
            d_round = [self._step(f, h[k], filled[k]) for k, f in enumerate(singles)]
            p_round = []
            for k, f in enumerate(singles):
                row = {}
                for t in self.settings.tokens:
                    cache = f.new_cache(t)
                    t0 = time.perf_counter()
                    f(h[k][:, :t], pos[:, :t], None, cache)
                    row[t] = (time.perf_counter() - t0) * 1e3
                p_round.append(row)
            stack_ms = self._step(stack, h[0], stack_filled)
            if r:
                record_round(samples, stack_ms, d_round, p_round)
            tick(f"{what}, round {r}/{self.settings.repeats}")
        return round_medians(samples)


def fast_head(parts) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [B, 1, H] -> logits: the final norm and a copy of the LM head laid out as the fast path
    lays it out (the model's own head is left as it is)."""
    head = copy.deepcopy(parts.lm_head)
    relayout_linear_(head)
    norm = parts.norm
    return lambda x: head(norm(x))


def new_samples(n: int, tokens) -> tuple:
    """Empty (stack_decode, decode, prefill) tables for n layers (`record_round`)."""
    return [], [[] for _ in range(n)], [{t: [] for t in tokens} for _ in range(n)]


def record_round(samples: tuple, stack_ms: float, d_round: list[float], p_round: list[dict[int, float]]) -> None:
    """Append one timing round to samples = (stack_decode [ms], decode [layer][ms], prefill [layer]{tokens: [ms]})
    (the eager and the fast timer keep the same tables)."""
    stack_decode, decode, prefill = samples
    stack_decode.append(stack_ms)
    for k, ms in enumerate(d_round):
        decode[k].append(ms)
        for t, v in p_round[k].items():
            prefill[k][t].append(v)


def round_medians(samples: tuple) -> tuple[list[tuple[dict[int, float], float]], float]:
    """Per layer (prefill ms by tokens, decode ms) and the whole stack's decode ms: medians over rounds."""
    stack_decode, decode, prefill = samples
    per_layer = [({t: statistics.median(v) for t, v in prefill[k].items()}, statistics.median(decode[k]))
                 for k in range(len(decode))]
    return per_layer, statistics.median(stack_decode)
