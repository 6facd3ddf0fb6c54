"""Measure a `Profile` of a loaded model on this machine (what `splitllm profile` writes).

Layers are timed on the path `splitllm generate` decodes on: the fast decode path
(`splitcli.deploy.measure_fast`: each layer as a one-layer `FastLayers` over a static cache, on
copies of the layers) when the model supports it, else the eager one described here; the profile
records which (`timed_path`). Eager: per decoder layer k, each timed on its own through
`LayerRange(parts, k, k + 1)` (so masks and rotary embeddings are built the way the runtime
builds them) on the real output of layer k - 1,
median of `repeats` samples after one warm-up; samples are taken in rounds over all layers so
that a burst of load on a shared machine spreads over many layers:
- prefill_ms[T]: T tokens into an empty KV cache;
- decode_ms: one token after a prefix of `decode_context` tokens already in the cache (each call
  gets a fresh copy of that cache, so every call sees the same context), scaled per bit width so
  that the layers sum to one decode step of the whole stack timed in the same rounds (a layer
  timed alone is slower than inside the stack; the per-layer numbers keep their proportions);
- both again with the layer's weights at each bit width (`decode_ms_by_bits`,
  `prefill_ms_by_bits`; 16 = the layer as loaded), because the 4-bit CPU kernel runs at its own
  speed. Quantized layers are copies swapped in and back out, so the model is left as it was.
The masks and rotary embeddings LayerRange builds are paid once per edge forward: their cost
(timed with pass-through layers; on the fast path derived from the alone and stack timings,
`measure_fast.fast_overhead_ms`) is subtracted from each layer and added to the embedding stage.
The head (final norm + LM head) is timed for one token, on the fast path on a copy of the LM head
laid out as that path lays it out.
Sizes are exact, from `splitcli.quant`'s byte accounting: weight bytes at each bit width (16 = not
quantized, held in the model's float dtype, i.e. 4 bytes per value on this fp32 runtime) and KV
bytes one token adds at each Qa (16 = the runtime's float cache, 4 bytes per value).

The codec (`default_codec_hook`): each recipe of `ProfileSettings.recipes` at q̄ 4, 6, 8, on the
hidden state leaving layers [0, ℓ) at a few split layers ℓ (`codec_split_layers`): the one-token
frame size and the distortion on held-out tokens, calibrated as deployment calibrates. Its hidden
states come from real text when the caller passes `codec_ids` (`text_codec_ids`: the tail of
WikiText-2's test text, the slice deployment calibrates on), else from the timing's random ids:
random tokens make hidden states unlike text's (SmolLM2, ℓ = 29, paper q̄ 6: 341 B per token
predicted, 263 B sent by generate on text). `Profile.codec_source` records which. The timings
always run on the random ids.

Reading of "peak activation bytes": the CPU allocator keeps no peak counter, so the transient
peak of one layer is estimated from tensor shapes at the largest profiled token count
(`activation_peak_bytes`); it is an estimate, the rest are measurements.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from splitcli.deploy.measure_fast import (FAST, FastTimer, fast_head, fast_overhead_ms, layer_copies, new_samples,
                                          record_round, round_medians, timed_path)
from splitcli.errors import SplitLLMError
from splitcli.model.split import LayerRange, decoder_parts, new_cache
from splitcli.plan.profile import CODEC_SOURCES, CodecCost, DeviceInfo, LayerCost, Profile, StageCost
from splitcli.plan.recipes import PROFILE_RECIPES, Recipe
from splitcli.quant import (
    KEEP_BITS, SUPPORTED_BITS, KVQuantConfig, fp_kv_bytes_per_token, kv_bytes_per_token,
    layer_shapes_of, layer_weight_bytes, quantize_layers_,
)

Progress = Callable[[int, int, str], None]
"""progress(done, total, what) after each timed unit of work."""

CodecHook = Callable[[dict[int, torch.Tensor], int, tuple[Recipe, ...], Callable[[str], None]], "CodecCost | None"]
"""codec_hook({split layer: hidden [N, H]}, repeats, recipes, tick) -> codec timings, sizes and
errors per recipe and layer (tick(what) once per recipe), or None."""


@dataclass(frozen=True)
class ProfileSettings:
    """What to measure: weight bit widths, KV bit widths (Qa), prefill token counts, repeats, and
    the number of cached tokens a timed decode step attends to (decode_context: attention grows
    with it, so it should sit where generation spends its steps, e.g. half of W̄)."""

    bits: tuple[int, ...] = (4, 8, 16)
    kv_bits: tuple[int, ...] = (4, 8, 16)
    tokens: tuple[int, ...] = (1, 32, 256)
    repeats: int = 5
    group_size: int = 64
    seed: int = 0
    decode_context: int = 64
    recipes: tuple[Recipe, ...] = PROFILE_RECIPES  # codec recipes to measure (splitcli.plan.recipes)

    def __post_init__(self) -> None:
        recipes = tuple(dict.fromkeys(self.recipes))
        if not recipes or not all(isinstance(r, Recipe) for r in recipes):
            raise SplitLLMError("profile recipes must be a non-empty list of codec recipes")
        object.__setattr__(self, "recipes", recipes)
        for name in ("bits", "kv_bits", "tokens"):
            value = tuple(sorted(set(getattr(self, name))))
            object.__setattr__(self, name, value)
            if not value:
                raise SplitLLMError(f"profile {name} must not be empty")
        for b in self.bits:
            if b not in SUPPORTED_BITS + (KEEP_BITS,):
                raise SplitLLMError(f"weight bits {b} not supported: choose from "
                                    f"{', '.join(map(str, SUPPORTED_BITS + (KEEP_BITS,)))}")
        for b in self.kv_bits:
            if b not in (2, 3, 4, 8, KEEP_BITS):
                raise SplitLLMError(f"KV bits {b} not supported: choose from 2, 3, 4, 8, 16")
        if self.tokens[0] < 1:
            raise SplitLLMError(f"token counts must be >= 1, got {self.tokens[0]}")
        if self.repeats < 1:
            raise SplitLLMError(f"repeats must be >= 1, got {self.repeats}")
        if self.decode_context < 1:
            raise SplitLLMError(f"decode context must be >= 1 token, got {self.decode_context}")
        if self.group_size < 1:
            raise SplitLLMError(f"group size must be >= 1, got {self.group_size}")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or platform's answer elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> DeviceInfo:
    """This machine: name carries cores and the torch version (the schema has no other slot)."""
    import psutil

    cores = os.cpu_count() or 0
    name = f"{platform.node() or 'cpu'} ({cores} cores, torch {torch.__version__}, {platform.system()})"
    return DeviceInfo(name=name, cpu=cpu_model(), threads=torch.get_num_threads(),
                      memory_bytes=int(psutil.virtual_memory().total))


def head_dims(config) -> tuple[int, int]:
    """(n_kv_heads, head_dim) of a transformers config."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_kv, head_dim


def activation_peak_bytes(config, n_tokens: int, float_bytes: int = 4) -> float:
    """Shape estimate of one decoder layer's transient peak for a prefill of `n_tokens` (bytes).

    residual [T, H] kept throughout, plus the larger of
    attention: normed input [T, H] + q, k, v [T, (n_heads + 2 n_kv) d] + k, v repeated to every
      head [2, T, n_heads d] + scores [n_heads, T, T] + attention output [T, n_heads d];
    MLP: normed input [T, H] + gate, up and their product [3, T, I].
    """
    t, h = n_tokens, config.hidden_size
    n_heads = config.num_attention_heads
    n_kv, d = head_dims(config)
    inter = getattr(config, "intermediate_size", 4 * h)
    attention = t * h + t * (n_heads + 2 * n_kv) * d + 2 * t * n_heads * d + n_heads * t * t + t * n_heads * d
    mlp = t * h + 3 * t * inter
    return float((t * h + max(attention, mlp)) * float_bytes)


def kv_bytes_table(config, kv_bits: tuple[int, ...]) -> dict[int, float]:
    """Bytes one token adds to one layer's cache at each Qa (16: the runtime's fp32 cache)."""
    n_kv, d = head_dims(config)
    out: dict[int, float] = {}
    for qa in kv_bits:
        if qa >= KEEP_BITS:
            out[qa] = float(fp_kv_bytes_per_token(1, n_kv, d, 4))
        else:
            out[qa] = float(kv_bytes_per_token(1, n_kv, d, KVQuantConfig(bits=qa)))
    return out


def weight_bytes_table(layer: torch.nn.Module, bits: tuple[int, ...], group_size: int) -> dict[int, float]:
    """Exact stored bytes of `layer` at each weight bit width (16: unquantized fp32)."""
    shapes = layer_shapes_of(layer)
    return {b: float(layer_weight_bytes(shapes, min(b, KEEP_BITS), group_size, float_bytes=4)) for b in bits}


def embedding_bytes_table(embed) -> dict[int, float]:
    """Bytes of the embedding as the edge shard stores it: {8: quantized, 16: as loaded}.

    8 bits: one group per row, the exact payload `splitllm quantize --embed-bits 8` writes
    (`predicted_edge_bytes` uses the same formula and a shard test pins it to the file)."""
    from splitcli.quant import quantized_matrix_bytes

    rows, cols = embed.weight.shape
    as_loaded = sum(p.numel() * p.element_size() for p in embed.parameters())
    return {8: float(quantized_matrix_bytes(rows, cols, 8, cols)), 16: float(as_loaded)}


def stack_scale(alone_ms: list[float], stack_ms: float, overhead_ms: float) -> float:
    """Factor that makes per-layer decode times (each timed alone, overhead removed) sum to one
    decode step of the whole stack, which pays the masks + rotary overhead once.

    A layer timed alone runs ~10-20% slower than inside the stack (measured for the int4 kernel on
    SmolLM2-135M), so the stack sets the total and the layers keep their measured proportions."""
    alone = sum(alone_ms)
    return max(0.0, stack_ms - overhead_ms) / alone if alone > 0 else 1.0


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` in ms over `repeats` calls after one warm-up call."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def _variant(layer: torch.nn.Module, bits: int, group_size: int) -> torch.nn.Module:
    if bits >= KEEP_BITS:
        return layer
    clone = copy.deepcopy(layer)
    quantize_layers_(torch.nn.ModuleList([clone]), [0], bits, group_size)
    return clone


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder layer to time what LayerRange does around it (masks, rotary)."""

    def forward(self, hidden, **_):
        return hidden


class _Timer:
    """Samples for each layer, taken in rounds over all layers so a burst of machine load lands
    on one sample of many layers rather than on every sample of one layer. Within a round the
    decode steps of all layers run back to back, as in a real edge forward, before the prefills:
    a short decode call timed right after a long prefill would pay for the prefill's time slice
    on a shared machine."""

    def __init__(self, parts, inputs: list[torch.Tensor], positions: torch.Tensor, settings: ProfileSettings):
        self.parts, self.inputs, self.positions, self.settings = parts, inputs, positions, settings
        self.prefix = settings.decode_context

    def _fill(self, k: int):
        """Layer k's cache after the prefix (rebuilt per layer variant)."""
        cache = new_cache(self.parts)
        LayerRange(self.parts, k, k + 1)(self.inputs[k][:, :self.prefix], self.positions[:, :self.prefix], None, cache)
        return cache

    def _round(self, ranges: list[LayerRange], filled: list) -> tuple[list[float], list[dict[int, float]]]:
        """One decode step per layer (back to back), then one prefill per token count per layer."""
        h, pos, p = self.inputs, self.positions, self.prefix
        # A fresh copy of each filled cache: every call sees the same prefix (transformers' crop
        # does not serve sliding-window layers).
        caches = [copy.deepcopy(c) for c in filled]
        decode = []
        for k, layer_range in enumerate(ranges):
            t0 = time.perf_counter()
            layer_range(h[k][:, p:p + 1], pos[:, p:p + 1], None, caches[k])
            decode.append((time.perf_counter() - t0) * 1e3)
        prefill = []
        for k, layer_range in enumerate(ranges):
            row = {}
            for t in self.settings.tokens:
                cache = new_cache(self.parts)
                t0 = time.perf_counter()
                layer_range(h[k][:, :t], pos[:, :t], None, cache)
                row[t] = (time.perf_counter() - t0) * 1e3
            prefill.append(row)
        return decode, prefill

    def time_all(self, layers: list[torch.nn.Module], tick: Callable[[str], None], what: str):
        """Per layer: ({T: median prefill ms}, median decode ms) with `layers` swapped in, and the
        median decode step of all of them run as one stack (the runtime's way)."""
        n, originals = len(layers), list(self.parts.layers)
        samples = new_samples(n, self.settings.tokens)
        p = self.prefix
        try:
            for k, layer in enumerate(layers):
                self.parts.layers[k] = layer
            filled = [self._fill(k) for k in range(n)]
            ranges = [LayerRange(self.parts, k, k + 1) for k in range(n)]
            stack, stack_filled = LayerRange(self.parts, 0, n), new_cache(self.parts)
            stack(self.inputs[0][:, :p], self.positions[:, :p], None, stack_filled)
            for r in range(self.settings.repeats + 1):  # round 0 warms up
                d_round, p_round = self._round(ranges, filled)
                cache = copy.deepcopy(stack_filled)
                t0 = time.perf_counter()
                stack(self.inputs[0][:, p:p + 1], self.positions[:, p:p + 1], None, cache)
                stack_ms = (time.perf_counter() - t0) * 1e3
                if r:
                    record_round(samples, stack_ms, d_round, p_round)
                tick(f"{what}, round {r}/{self.settings.repeats}")
        finally:
            for k, layer in enumerate(originals):
                self.parts.layers[k] = layer
        return round_medians(samples)


#: q̄ values `splitllm profile` measures the codec at (with every recipe).
PROFILE_Q_BARS = (4, 6, 8)
#: Held-out tokens whose one-token frames give a codec point's bytes per token (their mean).
SIZE_TOKENS = 32


def codec_split_layers(n_layers: int) -> tuple[int, ...]:
    """Split layers ℓ the profile measures the codec at: every max(1, L // 6)-th in 1..L-1, the
    middle one and L - 1 (for L = 30: 5, 10, 15, 20, 25, 29): a candidate ℓ above the first of
    them is at most about L // 12 layers from a measured one, one below it up to L // 6 - 1."""
    step = max(1, n_layers // 6)
    return tuple(sorted({*range(step, n_layers, step), n_layers // 2, n_layers - 1} - {0}))


def default_codec_hook(hiddens: dict[int, torch.Tensor], repeats: int, recipes: tuple[Recipe, ...] = PROFILE_RECIPES,
                       tick: Callable[[str], None] | None = None) -> CodecCost | None:
    """Per recipe, split layer ℓ (key of `hiddens`: the hidden state [N, H] leaving layers
    [0, ℓ)) and q̄ in PROFILE_Q_BARS (τ at the default quantile): the codec calibrated the way
    deployment calibrates (`calibrate_from_samples`) on the first 3/4 of the tokens, then
    measured on the last 1/4 (held out; all tokens when N < 4): the mean size of a one-token
    frame (a decode step sends one) over up to SIZE_TOKENS held-out tokens, encode / decode ms of
    the last one's, and the distortion `bulk_rel_error` over the held-out tokens. Encode / decode ms are the median over every point. (Pass
    codec_hook=None to `measure_profile` for a profile without a codec section; the planner then
    estimates wire bytes as hidden * q_bar / 8.)"""
    from dataclasses import replace

    from splitcli import codec
    from splitcli.codec.calibrate import bulk_channels, bulk_rel_error, calibrate_from_samples
    from splitcli.plan.codec_settings import DEFAULT_TAU_QUANTILE, CodecSettings
    from splitcli.plan.profile import CodecPoint

    splits = {}
    for layer, hidden in sorted(hiddens.items()):
        samples = hidden.reshape(-1, hidden.shape[-1]).float()  # [N, H]
        n = samples.shape[0]
        calib, held = (samples[: n - n // 4], samples[n - n // 4:]) if n >= 4 else (samples, samples)
        splits[layer] = calib, held, held.numpy(), bulk_channels(held.numpy())
    points, enc, dec = [], [], []
    for recipe in recipes:
        for layer, (calib, held, x, cols) in splits.items():
            one = held[-1:]  # a decode step sends one token
            for q_bar in PROFILE_Q_BARS:
                settings = CodecSettings(q_bar=q_bar, tau_quantile=DEFAULT_TAU_QUANTILE, **recipe.to_dict())
                cfg = calibrate_from_samples(calib, settings)
                frame = codec.encode(one, cfg)
                # one token's frame varies with the token (SmolLM2, paper q̄ 6, ℓ = 29: 216-438 B
                # over 64 held-out tokens): the mean over up to SIZE_TOKENS, each sent alone
                # as a decode step sends it
                sizes = [len(codec.encode(held[i:i + 1], cfg)) for i in range(min(SIZE_TOKENS, held.shape[0]))]
                enc.append(median_ms(lambda: codec.encode(one, cfg), repeats))
                dec.append(median_ms(lambda: codec.decode(frame, cfg), repeats))
                # entropy coding is lossless: reconstruct from the faster bit-packed frame
                y = codec.decode(codec.encode(held, replace(cfg, entropy=False)), cfg).numpy()
                points.append(CodecPoint(q_bar=q_bar, tau=DEFAULT_TAU_QUANTILE, bytes_per_token=statistics.fmean(sizes),
                                         tau_is_quantile=True, rel_error=bulk_rel_error(y, x, cols),
                                         split_layer=layer, **recipe.to_dict()))
        if tick:
            tick(f"codec recipe {recipe.name} ({recipe.describe()})")
    return CodecCost(statistics.median(enc), statistics.median(dec), tuple(points))


def profile_tokens(settings: ProfileSettings) -> int:
    """Tokens of the sequence a profile runs through the model (timings and the codec)."""
    return max(settings.tokens[-1], settings.decode_context) + 1


def text_codec_ids(tokenizer, n_tokens: int, data_dir=None) -> tuple[list[int] | None, str]:
    """(the last n_tokens tokens of WikiText-2's test text, as deployment calibration slices it;
    "") for the codec points, or (None, why not) when there is no tokenizer or the data is not
    found. An explicit `data_dir` that lacks the text is an error (a user who named it meant it);
    only the implicit places fall back."""
    from splitcli.deploy.calibrate import calibration_ids, read_wikitext

    if tokenizer is None:
        return None, "the model has no tokenizer"
    try:
        text, _ = read_wikitext(data_dir)
    except SplitLLMError as e:
        if data_dir is not None:
            raise
        return None, f"no evaluation text ({e})"
    return calibration_ids(tokenizer, text, n_tokens), ""


@torch.inference_mode()
def measure_profile(
    model,
    model_id: str,
    settings: ProfileSettings = ProfileSettings(),
    progress: Progress | None = None,
    codec_hook: CodecHook | None = default_codec_hook,
    codec_ids: "list[int] | torch.Tensor | None" = None,
) -> Profile:
    """Measure `model` (fp32, eval mode) on this machine; see the module docstring. `codec_ids`:
    the calibration text's token ids (`text_codec_ids`) whose hidden states the codec points are
    measured on; None: the timing's random ids."""
    parts = decoder_parts(model)
    config = parts.config
    n_layers = parts.num_layers
    context = getattr(config, "max_position_embeddings", None)
    needed = profile_tokens(settings)
    if context is not None and needed > context:
        raise SplitLLMError(f"largest token count or decode context ({needed - 1}) + 1 exceeds the model's "
                            f"context of {context}")
    for b in settings.bits:
        if b < KEEP_BITS:
            weight_bytes_table(parts.layers[0], (b,), settings.group_size)  # group size check up front
    gen = torch.Generator().manual_seed(settings.seed)
    vocab = parts.embed_tokens.num_embeddings
    ids = torch.randint(0, vocab, (1, needed), generator=gen)  # [1, T+1]
    positions = torch.arange(needed)[None]  # [1, T+1]
    n_kv, head_dim = head_dims(config)
    codec_layers = codec_split_layers(n_layers)  # none for a 1-layer model: nothing to split
    path = timed_path(parts)
    fast = path == FAST
    total = (len(settings.bits) + (0 if fast else 1)) * (settings.repeats + 1) + 2 + (
        len(settings.recipes) if codec_hook and codec_layers else 0)
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    emb_prefill = {t: median_ms(lambda: parts.embed_tokens(ids[:, :t]), settings.repeats) for t in settings.tokens}
    emb_decode = median_ms(lambda: parts.embed_tokens(ids[:, :1]), settings.repeats)
    tick("embedding")
    inputs = layer_inputs(parts, ids, n_layers)  # inputs[k]: what layer k sees, [1, T+1, H]
    as_loaded = KEEP_BITS if KEEP_BITS in settings.bits else settings.bits[-1]
    by_bits, stack_decode = {}, {}
    if fast:
        timer = FastTimer(parts, inputs, positions, settings)
        for b in settings.bits:  # copies at every width: the fast path rewrites what it wraps
            variants = layer_copies(parts.layers, lambda layer: _variant(layer, b, settings.group_size))
            by_bits[b], stack_decode[b] = timer.time_all(variants, tick, f"{b}-bit layers (fast path)")
            del variants
        # the per-forward cost (rotary, cache bookkeeping) the alone timings paid n times
        over_decode = fast_overhead_ms([by_bits[as_loaded][k][1] for k in range(n_layers)], stack_decode[as_loaded])
        over_prefill = {t: 0.0 for t in settings.tokens}
    else:
        timer = _Timer(parts, inputs, positions, settings)
        # What LayerRange costs around the layers (masks, rotary) is paid once per edge forward, not
        # once per layer: measured with pass-through layers, subtracted from each layer and charged
        # to the embedding stage, which runs once per forward too.
        overhead, _ = timer.time_all([_PassThrough() for _ in range(n_layers)], tick, "masks + rotary")
        over_prefill = {t: statistics.median(o[0][t] for o in overhead) for t in settings.tokens}
        over_decode = statistics.median(o[1] for o in overhead)
        for b in settings.bits:
            variants = [_variant(layer, b, settings.group_size) for layer in parts.layers]
            by_bits[b], stack_decode[b] = timer.time_all(variants, tick, f"{b}-bit layers")
            del variants
    embedding = StageCost(
        weight_bytes=float(sum(p.numel() * p.element_size() for p in parts.embed_tokens.parameters())),
        weight_bytes_by_bits=embedding_bytes_table(parts.embed_tokens),
        decode_ms=emb_decode + over_decode,
        prefill_ms={t: emb_prefill[t] + over_prefill[t] for t in settings.tokens},
    )
    peak = activation_peak_bytes(config, settings.tokens[-1])
    kv_table = kv_bytes_table(config, settings.kv_bits)
    scale = {b: stack_scale([max(0.0, by_bits[b][k][1] - over_decode) for k in range(n_layers)],
                            stack_decode[b], over_decode) for b in settings.bits}
    layers = []
    for k in range(n_layers):
        prefill_by_bits = {b: {t: max(0.0, ms - over_prefill[t]) for t, ms in by_bits[b][k][0].items()}
                           for b in settings.bits}
        decode_by_bits = {b: max(0.0, by_bits[b][k][1] - over_decode) * scale[b] for b in settings.bits}
        layers.append(LayerCost(
            prefill_ms=prefill_by_bits[as_loaded], decode_ms=decode_by_bits[as_loaded],
            weight_bytes=weight_bytes_table(parts.layers[k], settings.bits, settings.group_size),
            kv_bytes_per_token=kv_table, activation_peak_bytes=peak,
            decode_ms_by_bits=decode_by_bits, prefill_ms_by_bits=prefill_by_bits,
        ))
    hidden = inputs[-1]
    x_last = hidden[:, -1:]

    head_fn = fast_head(parts) if fast else (lambda x: parts.lm_head(parts.norm(x)))

    def head_step():
        return head_fn(x_last)

    head_bytes = {id(p): p.numel() * p.element_size()
                  for m in (parts.norm, parts.lm_head) for p in m.parameters()}
    head = StageCost(weight_bytes=float(sum(head_bytes.values())), decode_ms=median_ms(head_step, settings.repeats))
    tick("head")
    codec = codec_hook(_codec_hiddens(parts, inputs, codec_layers, codec_ids), settings.repeats,
                       settings.recipes, tick) if codec_hook and codec_layers else None
    return Profile(
        model_id=model_id, hidden_size=config.hidden_size, n_kv_heads=n_kv, head_dim=head_dim,
        device=device_info(), layers=tuple(layers), embedding=embedding, head=head, codec=codec,
        group_size=settings.group_size, decode_context=settings.decode_context, timed_path=path,
        codec_source=CODEC_SOURCES[0 if codec_ids is None else 1],
    )


def _codec_hiddens(parts, inputs: list[torch.Tensor], layers: tuple[int, ...], codec_ids) -> dict[int, torch.Tensor]:
    """{ℓ: hidden [N, H] leaving layers [0, ℓ)}: of the timing's random ids (already computed,
    `inputs`) or of `codec_ids`, run through layers [0, max ℓ) the same way."""
    if codec_ids is None or not layers:
        return {l: inputs[l][0] for l in layers}
    ids, vocab = torch.as_tensor(codec_ids, dtype=torch.long).reshape(1, -1), parts.embed_tokens.num_embeddings
    if ids.shape[1] < 1 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise SplitLLMError(f"codec token ids must be a non-empty sequence in [0, {vocab})")
    h = layer_inputs(parts, ids, max(layers))
    return {l: h[l][0] for l in layers}


def layer_inputs(parts, ids: torch.Tensor, n: int) -> list[torch.Tensor]:
    """ids [1, T] -> [embeddings, out of layer 0, ..., out of layer n - 1], each [1, T, H]
    (positions 0..T-1, no mask): what each of layers 0..n sees."""
    positions = torch.arange(ids.shape[1])[None]  # [1, T]
    out = [parts.embed_tokens(ids)]
    for k in range(n):
        out.append(LayerRange(parts, k, k + 1)(out[k], positions, None, None))
    return out
