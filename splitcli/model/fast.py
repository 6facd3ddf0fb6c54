"""A lean decode path for Llama-family decoders: the model's own weights, a preallocated KV cache,
one Python function per layer and no Hugging Face module dispatch, mask builder or cache object.

Why: at batch 1 a decode step of a small model is bound by reading the weights once, but the eager
Hugging Face path spends about as long again in Python (module calls, mask construction, cache
concatenation). This path runs the same arithmetic as `LlamaDecoderLayer` —
RMSNorm as `weight * (x * rsqrt(mean(x^2) + eps))` (bit-identical), rotary as
`q * cos + rotate_half(q) * sin` with the model's own cos/sin (bit-identical; q and k rotate in one
call), SDPA with `enable_gqa` and the layer's `scaling`, SiLU MLP — with q/k/v and gate/up each as
ONE product and o/down added into the residual (`splitcli.model.fused`: every op costs µs of
dispatch at batch 1). What differs from the eager path is the float weights' layout
(`relayout_linear_`), which the eager modules share once a fast session was built. Tested in
tests/test_decode_fast.py: on SmolLM2 the fp32 split is within 1e-3 of the eager model (measured
9.7e-5; same greedy text), quantized edges (int4, int8 + 4-bit KV) within 5e-4 over 12 steps
(measured <= 5e-5), and a float edge with 4-bit KV bit-identical on the same layout; against a
model never re-laid out, 4-bit KV codes can flip on the ~1e-6 layout difference and that case
drifts (0.6 logits at prefill, 14-29 per decode step in review repro s6.py).

`FastEdgeHalf` / `FastCloudHalf` have the call signatures of `split.EdgeHalf` / `CloudHalf`
(`(ids | hidden, position_ids, attention_mask, cache[, logits_to_keep])` and `new_cache()`; the
fast ones take an optional `capacity`), so
`runtime.session.SplitSession.from_halves` and a cloud server drive them unchanged. Their cache is
a `StaticKV` (or a quantized one, `splitcli.quant.static_kv`): allocated once for `capacity`
positions, written in place, and grown by doubling (one copy) if a sequence outgrows it.

Supported: float32 models of the types in FAST_MODEL_TYPES with full attention only, no logit softcapping, and
linear layers that are nn.Linear or one of splitcli.quant's modules. `fast_unsupported` says why
anything else is not, and callers fall back to the eager halves.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import SplitLLMError
from ..quant import decode_step, kernels
from ..quant.decode_step import DecodeStep, LayerOperands, Product
from ..quant.screen import Int8Screen
from ..quant.static_kv import DEFAULT_CAPACITY, QuantStaticKV, StaticCache
from .fused import FusedLinear, fused_call, is_float_linear, residual_call
from .split import DecoderParts, validate_split_layer

FAST_MODEL_TYPES = ("llama", "mistral", "qwen2")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def fast_unsupported(parts: DecoderParts, start: int, end: int) -> str | None:
    """Why layers [start, end) of `parts` cannot run on the fast path (None: they can)."""
    cfg = parts.config
    kind = getattr(cfg, "model_type", None)
    if kind not in FAST_MODEL_TYPES:
        return f"model type {kind!r} is not one of {', '.join(FAST_MODEL_TYPES)}"
    if any(t != "full_attention" for t in parts.layer_types[start:end]):
        return "sliding-window attention layers"
    if parts.final_logit_softcapping is not None:
        return "final logit softcapping"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    rope = getattr(parts.rotary_emb, "rope_type", "default")
    if any(kind in str(rope) for kind in ("dynamic", "longrope")):
        # their frequencies depend on the longest position seen; the table is built past it
        # once, which would change the shared rotary module and every later position's values
        return f"{rope} rotary scaling"
    if parts.norm.weight.dtype != torch.float32:
        # its rotary tables, static caches and fused products are float32 (a bf16 model crashed in F.linear)
        return f"{parts.norm.weight.dtype} weights (the fast path runs float32 models)"
    for i in range(start, end):
        layer = parts.layers[i]
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or any(not hasattr(attn, n) for n in _PROJ) or \
                any(not hasattr(mlp, n) for n in _MLP):
            return f"layer {i} is not a Llama-style decoder layer"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return f"layer {i} normalizes queries/keys"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or type(norm).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm",
                                                                                     "Qwen2RMSNorm"):
                return f"layer {i} has a {type(norm).__name__} norm"
    return None


def relayout_linear_(m: nn.Module) -> None:
    """Store a float nn.Linear's weight [N, K] as the transpose of a contiguous [K, N] tensor, in
    place: same values, same shape, no extra memory, and every caller (this path and the eager
    module alike) computes with it. MKL's batch-1 product streams that layout faster: measured on
    this 2-core host over SmolLM2-135M's 538 MB of linears, 25 ms vs 35 ms per pass (21 vs 15
    GB/s). A weight tied to the embedding moves with it (the lookup then gathers a strided row).
    Anything else is left alone. The layout is `FusedLinear`'s for one module (one rule for both:
    a weight already laid out so is found, not copied)."""
    if is_float_linear(m):
        FusedLinear.build([m])


def _linear_fn(m: nn.Module):
    """The cheapest callable computing m(x): F.linear for a float nn.Linear, the module's own
    forward otherwise (skips nn.Module.__call__'s hook machinery on every step)."""
    if type(m) is nn.Linear:
        w, b = m.weight, m.bias
        return lambda x: F.linear(x, w, b)
    return m.forward


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm's arithmetic in its order, (x * rsqrt(mean(x^2) + eps)) * w, bit for bit (tested);
    # spelled out because F.rms_norm decomposes into the same ops on CPU and costs ~6 µs more per call
    r = x.pow(2).mean(-1, keepdim=True)  # [..., 1]
    return (x * r.add_(eps).rsqrt_()).mul_(weight)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # x * cos + rotate_half(x) * sin, bit for bit: rotate_half(x) = cat(-x2, x1) and
    # (-a) * s == a * (-s) exactly, so the sign moves into the table and the rotation is one roll
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _act_fn(act: nn.Module):
    # SiLU through F.silu directly (same function, no module call per step); anything else as given
    return F.silu if type(act) is nn.SiLU or type(act).__name__ == "SiLUActivation" else act

class _Layer:
    """One decoder layer's weights as plain callables and tensors."""

    __slots__ = ("qkv", "o", "gate_up", "down", "n_inter", "act", "w_in", "w_post", "eps_in", "eps_post",
                 "n_heads", "n_kv", "head_dim", "scaling")

    def __init__(self, layer: nn.Module, config):
        attn, mlp = layer.self_attn, layer.mlp
        # h -> [q | k | v] and h -> [gate | up] as one product each (model.fused: the modules' weights
        # become views of the fused ones); o and down add straight into the residual
        self.qkv = fused_call([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = residual_call(attn.o_proj)
        self.gate_up = fused_call([mlp.gate_proj, mlp.up_proj])
        self.down = residual_call(mlp.down_proj)
        self.n_inter = mlp.gate_proj.out_features
        self.act = _act_fn(mlp.act_fn)
        # the norms' weights as tensors, captured like the fused products' (a Parameter whose .data is
        # swapped later would otherwise reach the torch path but not the C step's captured pointer)
        self.w_in, self.eps_in = layer.input_layernorm.weight.detach(), layer.input_layernorm.variance_epsilon
        self.w_post = layer.post_attention_layernorm.weight.detach()
        self.eps_post = layer.post_attention_layernorm.variance_epsilon
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(attn, "head_dim", None) or config.hidden_size // self.n_heads
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))


#: torch threads up to which a one-token step runs in `decode_step.c`, which uses one thread (its
#: float GEMV does not split work where MKL's may on many cores). Measured on this 2-core AVX2 host
#: (SmolLM2-135M, l = 15, greedy steps, medians of 3-5 rounds of 48): at 1 thread the fp32 split
#: step took 35.6 ms against 44.6 on the torch path, the int4 edge's 23.4 against 37.1; at 2
#: threads 36.9 against 48.4 and 26.8 against 36.3.
STEP_MAX_THREADS = 2


def _product(call) -> Product | str:
    """The C step's description of a `fused_call` / `residual_call` product, or why it has none."""
    f = call if isinstance(call, FusedLinear) else getattr(call, "__self__", None)
    if not isinstance(f, FusedLinear):
        return "a product outside model.fused"
    if f.bias is not None:
        return "biases"
    try:
        if f.kind == "float":
            return Product("float", f.in_features, f.out_features, f.weight.t())
        if f.kind == "int4" and f.layout == "splitllm":
            return Product("int4", f.in_features, f.out_features, f.packed, f.scales_and_zeros, f.group_size,
                           f.act_bits)
        if f.kind == "int8" and f.gemv and kernels.INT8_MAX_THREADS >= STEP_MAX_THREADS:
            return Product("int8", f.in_features, f.out_features, f.codes, f.scales)
    except ValueError as e:
        return str(e)
    return f"{f.kind} weights on torch's kernel"


def _decode_step(layers: list[_Layer], hidden: int) -> tuple[DecodeStep | None, str]:
    """The C step over `layers`, or (None, why not)."""
    ops = []
    for i, ly in enumerate(layers):
        prods = [_product(c) for c in (ly.qkv, ly.o, ly.gate_up, ly.down)]
        why = next((p for p in prods if isinstance(p, str)), None)
        if why is None and ly.act is not F.silu:
            why = "an activation other than SiLU"
        if why is None and prods[2].N != 2 * ly.n_inter:
            why = "gate and up widths differ"
        if why is not None:
            return None, f"layer {i}: {why}"
        ops.append(LayerOperands(*prods, ly.w_in, ly.w_post, float(ly.eps_in), float(ly.eps_post),
                                 ly.scaling, ly.n_heads, ly.n_kv, ly.head_dim))
    return DecodeStep.build(ops, hidden)


class StaticKV(StaticCache):
    """Float K/V of `n_layers` layers: k, v [n_layers, B, kv_heads, capacity, head_dim], allocated once
    at the first forward (when the batch is known) and written in place; `length` positions are
    filled. Growing past the capacity doubles it (one copy), so a sequence is never cut short."""

    BATCH_DIM, POS_DIM = 1, 3

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, capacity: int = DEFAULT_CAPACITY,
                 dtype: torch.dtype = torch.float32):
        super().__init__(capacity)
        self.n_layers, self.n_kv, self.head_dim, self.dtype = n_layers, n_kv, head_dim, dtype
        self.k = self.v = None
        self._k = self._v = ()  # per-layer views [B, kv_heads, capacity, D], made once per allocation

    def _tensors(self) -> tuple:
        return self.k, self.v

    def _store(self, tensors: tuple) -> None:
        self.k, self.v = tensors
        self._k, self._v = self.k.unbind(0), self.v.unbind(0)

    def _alloc(self, batch: int, capacity: int):
        shape = (self.n_layers, batch, self.n_kv, capacity, self.head_dim)
        return torch.zeros(*shape, dtype=self.dtype), torch.zeros(*shape, dtype=self.dtype)

    def write(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, kv_heads, T, D] at positions [start, start + T) of layer i; returns the
        layer's K, V over [0, start + T) (views, no copy)."""
        t, kl, vl = k.shape[2], self._k[i], self._v[i]
        kl.narrow(2, start, t).copy_(k)  # views made at allocation: 2 ops a tensor instead of ~5 indexing ones
        vl.narrow(2, start, t).copy_(v)
        return kl.narrow(2, 0, start + t), vl.narrow(2, 0, start + t)


class RopeTable:
    """cos/sin [positions, head_dim] from the model's own rotary module (computed per position, so
    identical to what it returns for any position_ids), extended by doubling when needed. One half
    serves many threads (a server's sessions): the pair is swapped as one tuple, so a reader never
    sees a grown cos with the old sin."""

    def __init__(self, rotary: nn.Module, head_dim: int, n: int = 1024):
        self.rotary, self.head_dim = rotary, head_dim
        self.table = self._build(n)

    def _build(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.zeros(1, 1, self.head_dim)
        cos, sin = self.rotary(x, torch.arange(n)[None])  # [1, n, D]
        half = self.head_dim // 2
        # sign of rotate_half folded into sin
        return cos[0].contiguous(), torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)

    def row(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [D] of position p (contiguous rows of the table)."""
        cos, sin = self.table
        if p >= cos.shape[0]:
            cos, sin = self.table = self._build(max(p + 1, 2 * cos.shape[0]))
        return cos[p], sin[p]

    def __call__(self, position_ids: torch.Tensor):
        """position_ids [B, T] -> cos, signed sin [B, 1, T, D] (broadcast over heads)."""
        top = int(position_ids.max()) + 1
        cos, sin = self.table
        if top > cos.shape[0]:
            cos, sin = self.table = self._build(max(top, 2 * cos.shape[0]))
        return cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)


def _attention_mask(attention_mask, start: int, t: int, batch: int):
    """Boolean SDPA mask [B, 1, T, start + T] (True = attend), or None when the causal structure
    alone decides it (one new token; or a first chunk with no padding, then `is_causal`).

    Padding rows (mask 0) still attend to themselves so no softmax row is empty (no NaN); their
    outputs are never used by real tokens, which cannot see them."""
    total = start + t
    if attention_mask is None and (t == 1 or start == 0):
        return None
    q_idx = torch.arange(start, total)[:, None]  # [T, 1]
    k_idx = torch.arange(total)[None, :]  # [1, S]
    causal = k_idx <= q_idx  # [T, S]
    if attention_mask is None:
        return causal[None, None].expand(batch, 1, t, total)
    valid = attention_mask[:, None, None, :total].bool()  # [B, 1, 1, S]
    return causal & (valid | (k_idx == q_idx))


class FastLayers:
    """Runs decoder layers [start, end) over a `StaticKV` (index 0 = layer `start`)."""

    def __init__(self, parts: DecoderParts, start: int, end: int):
        why = fast_unsupported(parts, start, end)
        if why is not None:
            raise SplitLLMError(f"the fast decode path does not support this model: {why}")
        self.parts, self.start, self.end = parts, start, end
        self.layers = [_Layer(parts.layers[i], parts.config) for i in range(start, end)]
        first = self.layers[0]
        self.n_kv, self.head_dim = first.n_kv, first.head_dim
        self.rope = RopeTable(parts.rotary_emb, self.head_dim)
        self.step, self.step_why = _decode_step(self.layers, parts.config.hidden_size)

    def new_cache(self, capacity: int = DEFAULT_CAPACITY) -> StaticKV:
        return StaticKV(len(self.layers), self.n_kv, self.head_dim, capacity)

    def __call__(self, hidden, position_ids, attention_mask, cache):
        # hidden [B, T, H]; position_ids [B, T]; attention_mask [B, past + T] (1 = real) or None
        b, t, _ = hidden.shape
        start = cache.length
        cache.reserve(start + t, b)
        if t == 1 and b == 1 and attention_mask is None:
            out = self._stepped(hidden, position_ids, cache, start)
            if out is not None:
                return out
        cos, sin = self.rope(position_ids)
        mask = _attention_mask(attention_mask, start, t, b)
        causal = mask is None and t > 1
        for i, ly in enumerate(self.layers):
            hidden = self._layer(ly, i, hidden, cos, sin, mask, causal, cache, start)
        cache.length = start + t
        return hidden

    def _stepped(self, hidden, position_ids, cache, start: int) -> torch.Tensor | None:
        """hidden [1, 1, H] of one token through `decode_step.c` where it applies (a float cache or
        an 8-bit one with fp16 scales, torch on at most STEP_MAX_THREADS threads). None: run the
        torch path, which rewrites whatever the C step wrote, from `hidden` (untouched)."""
        if self.step is None or torch.get_num_threads() > STEP_MAX_THREADS or not decode_step.enabled():
            return None
        if type(cache) is StaticKV and cache.k.dtype == torch.float32:
            where = dict(k=cache.k, v=cache.v)
        elif type(cache) is QuantStaticKV and cache.bits == 8 and cache.scale_dtype == torch.float16 and \
                cache.group % 8 == 0:
            where = dict(codes=cache.codes, scales=cache.scales, zeros=cache.zeros, group=cache.group)
        else:
            return None
        p = int(position_ids[0, 0])
        if p < 0:
            return None
        x = hidden.reshape(-1).to(torch.float32, copy=True)  # [H], the step's in-place state
        cos, sin = self.rope.row(p)
        if not self.step(x, cos, sin, start, **where):
            return None
        cache.length = start + 1
        return x.view(1, 1, -1)

    @staticmethod
    def _layer(ly: _Layer, i: int, x, cos, sin, mask, causal: bool, cache, start: int):
        # x [B, T, H]; cos, signed sin [B, 1, T, D]
        b, t, _ = x.shape
        nh, nqk, d = ly.n_heads, ly.n_heads + ly.n_kv, ly.head_dim
        qkv = ly.qkv(_rms_norm(x, ly.w_in, ly.eps_in))  # [B, T, (nh + 2 nkv) D]
        # rotary elementwise, q and k in one call: a [D, D] product per token was cheaper (~35 us per
        # layer) but rounds differently, and through the quantized kernels' bf16 casts and 4-bit KV
        # codes that drifted quantized edges away from the eager path (a plan's greedy text changed)
        if t == 1:  # one token: [B, T, heads, D] is [B, heads, T, D] in memory
            heads = qkv.view(b, nqk + ly.n_kv, 1, d)
            qk, v = _rope(heads[:, :nqk], cos, sin), heads[:, nqk:]  # [B, nh + nkv, 1, D], [B, nkv, 1, D]
        else:
            heads = qkv.view(b, t, nqk + ly.n_kv, d).transpose(1, 2)  # [B, heads, T, D]
            qk, v = _rope(heads[:, :nqk], cos, sin), heads[:, nqk:]
        keys, values = cache.write(i, start, qk[:, nh:], v)  # [B, nkv, start + T, D]
        a = F.scaled_dot_product_attention(qk[:, :nh], keys, values, attn_mask=mask, scale=ly.scaling,
                                           is_causal=causal, enable_gqa=ly.n_kv != nh)  # [B, nh, T, D]
        a = a.reshape(b, 1, nh * d) if t == 1 else a.transpose(1, 2).reshape(b, t, nh * d)
        x = ly.o(x, a)  # x + o(a)
        gate, up = ly.gate_up(_rms_norm(x, ly.w_post, ly.eps_post)).split(ly.n_inter, -1)  # [B, T, I] each
        return ly.down(x, ly.act(gate).mul_(up))  # x + down(act(gate) * up)


class FastEdgeHalf:
    """Embeddings + layers [0, ℓ) on the fast path; same call as `split.EdgeHalf`."""

    def __init__(self, parts: DecoderParts, split_layer: int, kv_bits: int = 16):
        self.parts = parts
        self.split_layer = validate_split_layer(split_layer, parts.num_layers)
        self.layers = FastLayers(parts, 0, split_layer)
        self.kv_bits = kv_bits

    def new_cache(self, capacity: int = DEFAULT_CAPACITY):
        if self.kv_bits >= 16:
            return self.layers.new_cache(capacity)
        return QuantStaticKV(len(self.layers.layers), self.layers.n_kv, self.layers.head_dim, self.kv_bits, capacity)

    @torch.inference_mode()
    def __call__(self, input_ids, position_ids, attention_mask, cache):
        # input_ids [B, T] -> hidden [B, T, H]
        return self.layers(self.parts.embed_tokens(input_ids), position_ids, attention_mask, cache)


class _Head:
    """Final norm + LM head over the last `logits_to_keep` positions (0 = all).

    A one-row step whose caller reads only its `top` largest logits (greedy decoding: 1) can read
    the head's int8 screen instead of its float weight (`quant.screen`: a quarter of the bytes, a
    quarter of the head's memory more) and compute in float only the rows that can be among the
    top; the rest come back -inf. Measured on SmolLM2-135M inside a greedy decode loop at ℓ = 15
    (the layers' weights evict the head from cache between steps; 1 thread, this 2-core host,
    medians over 192 steps): 4.2 ms per head call against 7.2 ms for the float head (session 13:
    the screen's decisions moved into one C pass, 0.83 -> 0.39 ms of each call past its product,
    the same logits; 195 calls side by side). Building the
    screen takes ~0.4-0.7 s there, which ~150 steps repay, so it is built in a background thread
    once the head has served SCREEN_AFTER_STEPS such steps: a shorter generation never pays for it
    and no step waits for it, though the steps beside the build share the CPU (measured once: 11
    steps of 64-89 ms against ~55 before and ~50 after); a process that ends during the build
    waits for it at exit. `build_screen()` builds it now. Where it
    cannot run (no splitllm kernels, a head that is not a float32 bias-free linear, an input the
    kernel leaves to float) the float head computes every logit."""

    SCREEN_AFTER_STEPS = 64

    def __init__(self, parts: DecoderParts):
        self.norm_w, self.eps = parts.norm.weight, parts.norm.variance_epsilon
        relayout_linear_(parts.lm_head)
        self.head = _linear_fn(parts.lm_head)
        m = parts.lm_head
        self.weight = m.weight if is_float_linear(m) and m.bias is None and kernels.supports8(m.in_features) else None
        self.rows = m.weight.shape[0] if self.weight is not None else 0
        self.screen: Int8Screen | None = None
        self._lock = threading.Lock()
        self._asked = 0  # one-row top-k steps served so far
        self._building = False
        self._built_for = (-1, 0)  # the weight's (version, data_ptr) the screen was built from
        self.screened = [0, 0]  # steps the screen decided, float rows they computed (bench decode's bytes)

    def build_screen(self) -> Int8Screen | None:
        """Build the screen now (None where the head cannot have one)."""
        with self._lock:
            if self.screen is None and self.weight is not None:
                built_for = self._weight_state()  # before reading: a change during the build shows later
                try:
                    self.screen = Int8Screen(self.weight.detach())
                    self._built_for = built_for
                except (SplitLLMError, RuntimeError, MemoryError):  # NaN / inf weights, no memory: float head
                    self.weight = None
        return self.screen

    def _weight_state(self) -> tuple[int, int]:
        return self.weight._version, self.weight.data_ptr()

    def _ready_screen(self) -> Int8Screen | None:
        screen = self.screen
        if screen is not None and self.weight is not None and self._weight_state() != self._built_for:
            # the head was written in place (load_state_dict) or re-pointed since: the screen would
            # screen the old weights; drop it and count towards a new one
            self.screen = screen = None
            self._asked, self._building = 0, False
        if screen is None and self.weight is not None and not self._building:
            self._asked += 1
            if self._asked >= self.SCREEN_AFTER_STEPS:
                self._building = True
                # not a daemon: Python joins it before it finalizes. A daemon thread still inside
                # torch when a short `generate` (64-~90 tokens) exited aborted the process
                # ("terminate called without an active exception", exit code 134) after the text
                # was printed; waiting costs such an exit up to the build's ~0.5 s
                threading.Thread(target=self.build_screen, name="splitllm-head-screen").start()
        return screen

    def __call__(self, hidden, logits_to_keep: int, rows_weight=None, top: int = 0):
        # hidden [B, T, H] -> logits [B, T', V]; rows_weight: `row_major_head`'s copy, used when
        # more than one row is left (a batched server step); top: see the class docstring
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        x = _rms_norm(hidden, self.norm_w, self.eps)
        b, t, h = x.shape
        # past an eighth of the rows a screen would compute most of them in float anyway
        screen = self._ready_screen() if 0 < 8 * top <= self.rows and b * t == 1 and kernels.available() else None
        if screen is not None:  # this one: another thread may drop a stale self.screen meanwhile
            got = screen.top(x.reshape(h), top, self.weight)
            if got is not None:
                self.screened[0] += 1
                self.screened[1] += got[1]
                return got[0].view(1, 1, -1)
        if rows_weight is None or b * t == 1:
            return self.head(x)
        out = (rows_weight @ x.reshape(b * t, h).T).T  # [B*T, V] from [V, H] @ [H, B*T]
        return out.reshape(b, t, -1)


def row_major_head(parts: DecoderParts) -> torch.Tensor | None:
    """A contiguous [V, H] copy of a float, bias-free LM head for steps of several rows, else None.
    The batch-1 layout this path gives the head ([H, V] storage, `relayout_linear_`) is the fast one
    for one row and the slow one for several: LM head 49152 x 576, 1 thread, this 2-core host,
    median of 9: 1 row 7.2 ms ([H, V]) vs 13.0 ([V, H] as W @ x^T); 4 rows 38.9 vs 14.2; 8 rows
    54.2 vs 22.7. A batching server keeps both; the copy costs V x H x itemsize bytes."""
    m = parts.lm_head
    if not is_float_linear(m) or m.bias is not None:
        return None
    return m.weight.detach().contiguous()


class _LayersToHead:
    """Layers [start, L) + final norm + LM head: the cloud half (start = ℓ) and the whole model (0)."""

    def __init__(self, parts: DecoderParts, start: int):
        self.parts = parts
        self.layers = FastLayers(parts, start, parts.num_layers)
        self.head = _Head(parts)

    def new_cache(self, capacity: int = DEFAULT_CAPACITY):
        return self.layers.new_cache(capacity)


class FastCloudHalf(_LayersToHead):
    """Layers [ℓ, L) + final norm + LM head on the fast path; same call as `split.CloudHalf`."""

    def __init__(self, parts: DecoderParts, split_layer: int):
        self.split_layer = validate_split_layer(split_layer, parts.num_layers)
        super().__init__(parts, split_layer)

    @torch.inference_mode()
    def __call__(self, hidden, position_ids, attention_mask, cache, logits_to_keep: int = 0, head_rows=None,
                 top: int = 0):
        # hidden [B, T, H] -> logits [B, T', V] with T' = logits_to_keep or T; head_rows: see
        # row_major_head; top: see _Head
        return self.head(self.layers(hidden, position_ids, attention_mask, cache), logits_to_keep, head_rows, top)


class FastModel(_LayersToHead):
    """The whole model on the fast path (the unsplit reference of the fast split): one stack of
    all L layers, so the split and the unsplit run the same code per layer."""

    def __init__(self, parts: DecoderParts):
        super().__init__(parts, 0)

    @torch.inference_mode()
    def __call__(self, input_ids, position_ids, attention_mask, cache, logits_to_keep: int = 0, top: int = 0):
        hidden = self.layers(self.parts.embed_tokens(input_ids), position_ids, attention_mask, cache)
        return self.head(hidden, logits_to_keep, top=top)
