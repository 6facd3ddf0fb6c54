"""`splitllm bench quant`: the Table 4 analog, shard bytes, edge memory and edge decode speed.

Perplexity uses fake quantization: each linear of an OPSC-quantized layer gets its weight
replaced by the RTN-dequantized weight (`QuantLinear.dequantized_weight`, fp32 math), so the
numbers measure the quantization grid itself, not the int4 kernel's bf16 activations.
Methods at ℓw (Table 4; 4-bit, other layers kept in full precision):
  front: layers [0, ℓw) quantized;   back: the last ℓw layers quantized.
ℓw = 0 is the float model for both, so it is not recomputed (ppl_fp is reused); ℓw = L is the
same model for both methods and is computed once.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..errors import SplitLLMError

DEFAULT_LWS = (0, 5, 10, 15, 20, 25, 30)
MEM_PROMPT_TOKENS, MEM_TOTAL_TOKENS = 256, 320  # prefill P, then decode up to W_bar


def quantized_weights(layers, bits: int, group_size: int) -> list[dict[str, torch.Tensor]]:
    """RTN-dequantized copies of every linear weight, per layer (name -> [out, in] fp32)."""
    from ..quant import QuantLinear

    out = []
    for layer in layers:
        out.append({name: QuantLinear.from_linear(m, bits, group_size).dequantized_weight()
                    for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)})
    return out


def set_fake_quant(layers, originals, quantized, on: list[bool]) -> None:
    """Point each layer's linears at its quantized (on[i]) or original weights; no copies made."""
    for i, layer in enumerate(layers):
        src = quantized[i] if on[i] else originals[i]
        for name, w in src.items():
            layer.get_submodule(name).weight.data = w


def wikitext_ids(tokenizer, data_dir=None) -> torch.Tensor:
    from ..eval.loaders import load_text
    from ..eval.spec import get_task_spec

    text = load_text(get_task_spec("wikitext2"), data_dir)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def table4_ppl(model, ids, lws, seqlen: int, windows: int, group_size: int, bits: int = 4, progress=None) -> dict:
    """{'ppl_fp', 'ppl_front': {ℓw: ppl}, 'ppl_back': {...}} with fake-quantized weights."""
    from ..eval.perplexity import perplexity
    from ..model.split import decoder_parts

    layers = decoder_parts(model).layers
    n = len(layers)
    bad = [lw for lw in lws if not 0 <= lw <= n]
    if bad:
        raise SplitLLMError(f"--lw values {bad} are outside 0..{n}")

    def ppl(k: int, what: str) -> float:
        fn = lambda x, mask: model(input_ids=x).logits  # noqa: E731  (right padding: mask unused)
        tick = None if progress is None else (  # a window takes ~10 s here: say where the run is
            lambda i, _nll: progress(k, len(jobs), f"{what}: window {i + 1}/{windows}"))
        return perplexity(fn, ids, seqlen=seqlen, n_windows=windows, on_window=tick).ppl

    originals = [{name: m.weight.data for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
                 for layer in layers]
    quantized = quantized_weights(layers, bits, group_size)
    jobs = [("fp", 0)] + [(m, lw) for lw in lws if lw for m in ("front", "back") if not (m == "back" and lw == n)]
    out = {"ppl_fp": None, "ppl_front": {}, "ppl_back": {}}
    try:
        for k, (method, lw) in enumerate(jobs):
            if method == "fp":
                on = [False] * n
            elif method == "front":
                on = [i < lw for i in range(n)]
            else:
                on = [i >= n - lw for i in range(n)]
            set_fake_quant(layers, originals, quantized, on)
            value = ppl(k, f"ppl {method} ℓw={lw}" if method != "fp" else "ppl fp32")
            if method == "fp":
                out["ppl_fp"] = value
            else:
                out[f"ppl_{method}"][lw] = value
            if progress:
                progress(k + 1, len(jobs), f"ppl {method} ℓw={lw}: {value:.3f}")
    finally:
        set_fake_quant(layers, originals, quantized, [False] * n)
    for lw in lws:
        if lw == 0:
            out["ppl_front"][0] = out["ppl_back"][0] = out["ppl_fp"]
        if lw == n:
            out["ppl_back"][n] = out["ppl_front"][n]
    out["ppl_front"] = dict(sorted(out["ppl_front"].items()))
    out["ppl_back"] = dict(sorted(out["ppl_back"].items()))
    return out


def _edge_tok_s(half, prompt: torch.Tensor, tokens: torch.Tensor) -> float:
    """Prefill (untimed), then feed `tokens` [1, n] one at a time through the edge half."""
    cache = half.new_cache()
    p = prompt.shape[1]
    half(prompt, torch.arange(p)[None], None, cache)
    t0 = time.perf_counter()
    for i in range(tokens.shape[1]):
        half(tokens[:, i : i + 1], torch.tensor([[p + i]]), None, cache)
    return tokens.shape[1] / (time.perf_counter() - t0)


def edge_decode_speed(fp_half, q_half, vocab: int, prompt_len: int = 64, n_tokens: int = 32,
                      repeats: int = 5) -> dict:
    """Median edge decode tok/s, fp32 vs quantized edge, interleaved repeats, same token ids."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
    tokens = torch.randint(0, vocab, (1, n_tokens), generator=g)
    _edge_tok_s(fp_half, prompt, tokens[:, :4])  # warm-up both paths
    _edge_tok_s(q_half, prompt, tokens[:, :4])
    fp, q = [], []
    for _ in range(repeats):
        fp.append(_edge_tok_s(fp_half, prompt, tokens))
        q.append(_edge_tok_s(q_half, prompt, tokens))
    return {"fp32": statistics.median(fp), "int4": statistics.median(q), "fp32_runs": fp, "int4_runs": q}


def bench_quant(lm, lws=DEFAULT_LWS, windows: int = 8, seqlen: int = 2048, data_dir=None, split_layer: int = 15,
                group_size: int = 64, repeats: int = 5, work_dir: Path | None = None, progress=None,
                decode_threads: int = 1) -> dict:
    """Everything `splitllm bench quant` reports. Decode is timed with `decode_threads` torch threads
    (0 = torch's default): on this shared 2-core host two OpenMP threads under a load of ~7 measured
    0.6-8.7 tok/s run to run, one thread a stable 21-25 tok/s (fp32, ℓ = 15)."""
    import os

    from ..model.loader import materialize
    from ..model.safetensors_io import payload_bytes
    from ..model.shard_loader import QuantEdgeHalf, load_edge
    from ..model.shards import EDGE_FILE, QuantSpec, predicted_edge_bytes, write_shards
    from ..model.split import EdgeHalf, decoder_parts, validate_split_layer
    from .edge_memory import measure_edge_memory, predict_edge_memory

    parts = decoder_parts(lm.model)
    validate_split_layer(split_layer, parts.num_layers)
    say = progress or (lambda *a: None)
    say(0, 0, "tokenizing WikiText-2")
    ids = wikitext_ids(lm.tokenizer, data_dir)
    result = table4_ppl(lm.model, ids, list(lws), seqlen, windows, group_size, 4, progress)

    spec = QuantSpec(split_layer, 4, None, None, "front", group_size, 8, 8)
    fp_spec = QuantSpec(split_layer, 16, None, None, "front", group_size, 16, 16)
    model_dir, _ = materialize(lm.source)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        out = Path(tmp) / "q"
        say(0, 0, f"writing 4-bit shards at ℓ={split_layer}")
        write_shards(lm, model_dir, spec, out)
        measured_bytes = payload_bytes(out / EDGE_FILE)
        predicted_bytes = predicted_edge_bytes(parts, spec)
        say(0, 0, "measuring edge memory in a child process")
        mem = measure_edge_memory(out, MEM_PROMPT_TOKENS, MEM_TOTAL_TOKENS)
        pred = predict_edge_memory(lm.model.config, measured_bytes, split_layer, spec.kv_bits,
                                   MEM_PROMPT_TOKENS, MEM_TOTAL_TOKENS)
        say(0, 0, "timing edge decode, fp32 vs int4")
        threads = torch.get_num_threads()
        torch.set_num_threads(decode_threads or threads)  # first: the int4 kernel is chosen at load by it
        try:
            edge = load_edge(out)
            q_half = QuantEdgeHalf(edge.half.parts, split_layer, kv_bits=16)  # same float cache as fp32
            speed = edge_decode_speed(EdgeHalf(parts, split_layer), q_half, lm.model.config.vocab_size, repeats=repeats)
            q_kv_half = QuantEdgeHalf(edge.half.parts, split_layer, kv_bits=spec.kv_bits)
            speed_kv = edge_decode_speed(q_half, q_kv_half, lm.model.config.vocab_size, repeats=max(1, repeats // 2))
        finally:
            torch.set_num_threads(threads)
    fp_bytes = predicted_edge_bytes(parts, fp_spec)
    mb = 1 << 20
    result.update(
        model=lm.model_id, windows=windows, seqlen=seqlen, group_size=group_size, weight_bits=4,
        split_layer=split_layer,
        edge_bytes_4bit_l15=measured_bytes, edge_bytes_4bit_l15_predicted=predicted_bytes,
        edge_bytes_fp32_l15=fp_bytes, edge_bytes_ratio=measured_bytes / fp_bytes,
        edge_mem_pred_mb=pred.total_bytes / mb, edge_mem_measured_mb=mem["measured_mb"],
        edge_mem_baseline_mb=mem["baseline_mb"], edge_mem_after_load_mb=mem["after_load_mb"],
        edge_mem_pred_parts_mb={k: v / mb for k, v in vars(pred).items()},
        edge_mem_tokens={"prompt": MEM_PROMPT_TOKENS, "w_bar": MEM_TOTAL_TOKENS, "kv_bits": spec.kv_bits},
        decode_tok_s_fp32=speed["fp32"], decode_tok_s_int4=speed["int4"],
        decode_tok_s_runs={"fp32": speed["fp32_runs"], "int4": speed["int4_runs"]},
        decode_tok_s_int4_kv8=speed_kv["int4"], threads=torch.get_num_threads(),
        decode_threads=decode_threads or torch.get_num_threads(),
        load_average=list(os.getloadavg()),
    )
    return result
