"""The edge's memory, predicted (paper eqs. (1)-(2)) and measured in a fresh process.

Predicted = weights + KV + transient activations, via `splitcli.cost.memory.EdgeMemory`:
- weights: the edge shard's payload (eq. (1) over the kept layers + the embedding; exact);
- KV: W_bar tokens x the cache's exact bytes per token over layers [0, ℓ) (eq. (2)'s edge term);
- activations: the largest transient set of one decoder layer during the prefill of P tokens
  (`layer_activation_bytes`). Layers run one after another, so it is a max, not a sum.

Measured = peak RSS of a child process that loads the edge shard, prefills P tokens and decodes
up to W_bar, minus its RSS after imports (the baseline, reported beside it: torch + transformers
alone are a few hundred MB; the
baseline includes importing the model's modeling module). The child resets the kernel's peak-RSS counter (/proc/self/clear_refs)
after the baseline, and sets glibc's mmap threshold to 64 KiB so freed tensors go back to the OS
instead of being kept (and counted) as heap; without that the peak measures the allocator too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..cost.memory import EdgeMemory
from ..errors import SplitLLMError


def layer_activation_bytes(config, tokens: int, kv_bits: int, cache_tokens: int) -> int:
    """Peak transient bytes of one Llama-style layer on `tokens` new tokens, float32 activations.

    Reading of "transient activations": what one layer holds on top of its input while it runs.
    The MLP dominates: act(gate) [T, I], up [T, I] and their product [T, I] are alive together
    (f32), plus the residual input and the normed input [T, H] and the int4 kernel's bf16 copy of
    its input [T, H]. The attention's part (q, k, v, rotary) is smaller for I >= 2H, but a
    quantized KV cache hands attention a dequantized float copy of the whole layer cache
    [2, kv_heads, S, head_dim], which is added when kv_bits < 16.
    """
    h, i = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    mlp = 3 * tokens * i * 4 + tokens * h * (4 + 4 + 2)  # [T, I] x3 f32, [T, H] residual + normed + bf16
    kv_view = 0 if kv_bits == 16 else 2 * config.num_key_value_heads * cache_tokens * hd * 4
    return mlp + kv_view


def kv_cache_bytes(config, split_layer: int, kv_bits: int, tokens: int) -> int:
    from ..quant import KVQuantConfig, fp_kv_bytes_per_token, kv_bytes_per_token

    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kvh = config.num_key_value_heads
    if kv_bits == 16:
        return tokens * fp_kv_bytes_per_token(split_layer, kvh, hd, 4)
    return tokens * kv_bytes_per_token(split_layer, kvh, hd, KVQuantConfig(bits=kv_bits))


def predict_edge_memory(config, weight_bytes: int, split_layer: int, kv_bits: int,
                        prompt_tokens: int, total_tokens: int) -> EdgeMemory:
    if not 1 <= prompt_tokens <= total_tokens:
        raise SplitLLMError(f"need 1 <= prompt tokens ({prompt_tokens}) <= W_bar ({total_tokens})")
    return EdgeMemory(
        weights_bytes=weight_bytes,
        kv_bytes=kv_cache_bytes(config, split_layer, kv_bits, total_tokens),
        activation_bytes=layer_activation_bytes(config, prompt_tokens, kv_bits, total_tokens),
    )


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SplitLLMError(f"/proc/self/status has no {field} (memory measurement needs Linux)")


def _warm_up(shard_dir: Path, prompt_tokens: int) -> None:
    """Run the edge's code paths (same module kinds, bits and cache) on a 1-layer toy model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.shard_loader import QuantEdgeHalf
    from ..model.shards import read_manifest
    from ..model.split import decoder_parts
    from ..quant import QuantEmbedding, quantize_layers_

    m = read_manifest(shard_dir)
    cfg = AutoConfig.from_pretrained(str(shard_dir)).to_dict()
    g = m.group_size
    cfg.update(num_hidden_layers=2, hidden_size=2 * g, intermediate_size=4 * g, vocab_size=256,
               num_attention_heads=2, num_key_value_heads=1, head_dim=g, layer_types=None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32).eval()
    parts = decoder_parts(model)
    bits = next((b for b in m.layer_bits if b is not None), 16)
    quantize_layers_(parts.layers, [0], bits, g)
    if m.embed_bits != 16:
        model.model.embed_tokens = QuantEmbedding.from_embedding(parts.embed_tokens, bits=m.embed_bits)
    half = QuantEdgeHalf(decoder_parts(model), 1, m.kv_bits)
    cache = half.new_cache()
    ids = torch.randint(0, 256, (1, prompt_tokens + 2))
    pos = torch.arange(prompt_tokens + 2)[None]
    half(ids[:, :prompt_tokens], pos[:, :prompt_tokens], None, cache)
    for t in range(prompt_tokens, prompt_tokens + 2):
        half(ids[:, t : t + 1], pos[:, t : t + 1], None, cache)


def child_main(shard_dir: str, prompt_tokens: int, total_tokens: int) -> dict:
    """Runs inside the measured process (see `measure_edge_memory`)."""
    import torch
    import transformers  # noqa: F401  - part of the baseline, as on a device

    from ..model import shard_loader
    from ..runtime.session import SplitSession  # noqa: F401

    # Importing the model family's transformers module costs ~134 MB of RSS (modeling_llama and
    # what it pulls in), and the first call of each kernel faults in its code pages and thread
    # pools: neither is model memory, so both happen before the baseline, on a toy model.
    _warm_up(Path(shard_dir), prompt_tokens)
    baseline_kb = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    edge = shard_loader.load_edge(Path(shard_dir))
    loaded_kb = _rss_kb("VmRSS")
    half = edge.half
    vocab = edge.model.config.vocab_size
    ids = torch.randint(0, vocab, (1, total_tokens), generator=torch.Generator().manual_seed(0))
    cache = half.new_cache()
    pos = torch.arange(total_tokens)[None]
    half(ids[:, :prompt_tokens], pos[:, :prompt_tokens], None, cache)  # prefill
    for t in range(prompt_tokens, total_tokens):  # decode up to W_bar tokens
        half(ids[:, t : t + 1], pos[:, t : t + 1], None, cache)
    peak_kb = _rss_kb("VmHWM")
    return {
        "baseline_mb": baseline_kb / 1024, "after_load_mb": (loaded_kb - baseline_kb) / 1024,
        "measured_mb": (peak_kb - baseline_kb) / 1024, "threads": torch.get_num_threads(),
    }


def measure_edge_memory(shard_dir: Path, prompt_tokens: int, total_tokens: int, timeout: float = 600) -> dict:
    """Peak RSS above the post-import baseline of a fresh edge process (MB), and that baseline."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    code = (
        "import json, sys; from splitcli.bench.edge_memory import child_main; "
        f"print(json.dumps(child_main({str(shard_dir)!r}, {prompt_tokens}, {total_tokens})))"
    )
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SplitLLMError(f"edge memory child process failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
