"""`splitllm bench decode`: every decode path side by side in one run, against the memory bound.

Paths (all teacher-forced with the same greedy continuation, computed once on the old unsplit
path, so every path does identical work from the same prompt):
- hf_generate   Hugging Face `generate` on the unsplit model (greedy, its own dynamic cache);
                decode tok/s = (n - 1) / (t(n tokens) - t(1 token)), so its prefill cancels out;
- old_unsplit / old_split   the eager session path (`runtime.session`) as it was before the fast
                path: run on a pristine copy of the model, since the fast path re-lays out the
                float weights of the model it is built on (`model.fast.relayout_linear_`);
- unsplit / split           the fast path (`model.fast`, `runtime.fast`), compression off;
                every fast path steps as greedy `generate` does: its LM head reads the int8
                screen and computes in float only the rows that can be the largest
                (`quant.screen`; the same tokens), where splitllm's kernels run;
- split_full_head           the fast fp32 split with the float LM head computing every logit
                (as a sampling step does), beside `split`;
- split_int4 / split_int8   the fast split with the edge's layers [0, ℓ) at 4 / 8 bits (int4 /
                int8 kernels), fp32 cloud; one-token products run on splitllm's AVX2 kernels
                where they are available (`quant.kernels`), else on torch's;
- split_int4_torch / split_int8_torch   the same edges on torch's kernels (only where splitllm's
                run), side by side;
- split_int4_a8             split_int4 with its products' one-token inputs rounded to int8
                instead of int16 (opt-in, a plan's edge_act_bits = 8; only where splitllm's
                kernels run): faster products, coarser inputs;
- split_int4_kv8            split_int4 with the edge's KV cache at 8 bits (Qa = 8);
- local_int4 / old_local_int4   the edge generating alone before a handoff (Fig. 5b, `generate
                --local-tokens`): split_int4's OPSC edge model of all layers ([0, ℓ) at 4 bits,
                the rest as loaded), on the fast path (`runtime.fast.FastLocalEdge`) and on the
                eager one (`runtime.handoff.HandoffSession`, on a pristine copy), never handed off;
- split_torch_step / split_int4_torch_step   split / split_int4 with every token on the torch
                path's per-layer ops instead of one `decode_step.c` call per half (that call
                runs a one-token step of batch 1 on a float or 8-bit cache where splitllm's
                kernels are);
- llama_cpp     llama.cpp (`llama-cpp-python`, optional) on the model's GGUF file, same threads.
Repeats run in rounds, each round every path once in a rotated order, so drifting load hits all
alike; each path reports the median of its rounds. The split's overhead and the int4 edges' ratios
are also measured step by step: two sessions stepped alternately over the same tokens, the median
of the per-step time ratios (`*_interleaved_median`).

Per decode step of our paths: edge / codec (encode + decode) / cloud ms from the session's own
clock, and "python" = the step's wall time minus those (session bookkeeping, sampling-free loop).
The bound: a large-copy probe (a 256 MiB tensor copied, read + write bytes / time, same threads,
median, taken at the start and end of the run) gives the bandwidth; bytes read per step = every
weight tensor the step runs (linear weights or their quantized codes + scales, norms, LM head),
one embedding row and the KV cache at the mean context; bound tok/s = bandwidth / bytes. A
screened head counts its codes, scales and bound coefficients plus the float rows it computed
(their mean over the run) instead of the float head.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import statistics
import time
from typing import Callable

import torch

from ..deploy import SplitSpec, build_split, opsc_edge_model
from ..deploy.measure import head_dims
from ..errors import SplitLLMError
from ..model.split import CloudHalf, EdgeHalf, decoder_parts
from ..quant import decode_step, kernels
from ..quant.kv_format import KVQuantConfig, fp_kv_bytes_per_token, kv_bytes_per_token
from ..runtime.fast import FastUnsplitSession, fast_handoff_session, fast_split_session, fast_unsupported_model
from ..runtime.generate import SamplingConfig, encode_prompts, generate
from ..runtime.handoff import HandoffSession
from ..runtime.session import Session, SplitSession, UnsplitSession

DEFAULT_PROMPT = "The history of the city begins with a small settlement on the river, where"
PROBE_BYTES = 256 * 2**20
Progress = Callable[[str, int, int], None]


def copy_bandwidth_gb_s(nbytes: int = PROBE_BYTES, repeats: int = 5) -> float:
    """Median (read + write) GB/s of copying a `nbytes` float32 tensor (touched first, so the
    reads come from memory, not the shared zero page)."""
    src = torch.ones(nbytes // 4)
    dst = torch.zeros_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def _tensor_bytes(modules) -> int:
    """Bytes of every real parameter and buffer of `modules`, each storage once."""
    from torch import nn

    from ..model.shard_loader import resident_bytes

    return resident_bytes(nn.ModuleList(list(modules)))


def bytes_per_step(edge_parts, cloud_parts, split_layer: int, context: int, kv_bits: int = 16,
                   head_bytes: float | None = None) -> int:
    """Bytes one decode step reads (module docstring): layers [0, ℓ) of the edge's parts, [ℓ, L)
    + norm + head of the cloud's (`head_bytes` instead of the LM head's own where given: a
    screened head), one embedding row, and K/V over `context` positions."""
    n_kv, head_dim = head_dims(cloud_parts.config)
    layers = _tensor_bytes(edge_parts.layers[:split_layer]) + _tensor_bytes(cloud_parts.layers[split_layer:])
    head = _tensor_bytes([cloud_parts.norm]) + (_tensor_bytes([cloud_parts.lm_head]) if head_bytes is None
                                                 else round(head_bytes))
    emb = edge_parts.embed_tokens
    row = _tensor_bytes([emb]) // max(1, getattr(emb, "num_embeddings", 1))
    kv_fp = fp_kv_bytes_per_token(1, n_kv, head_dim) * context  # per layer
    kv_edge = kv_fp if kv_bits >= 16 else kv_bytes_per_token(1, n_kv, head_dim, KVQuantConfig(bits=kv_bits)) * context
    n = cloud_parts.num_layers
    return layers + head + row + split_layer * kv_edge + (n - split_layer) * kv_fp


def _timed_decode(session: Session, prompt_ids: torch.Tensor, tokens: torch.Tensor, top: int = 1) -> dict:
    """Prefill (untimed), then feed `tokens` one at a time: tok/s and mean ms per stage. `top`:
    `Session.forward`'s (1: the steps of greedy `generate`; 0: every logit)."""
    session.reserve(prompt_ids.shape[1] + tokens.shape[1])
    session.prefill(prompt_ids, top=top)
    n0 = len(session.stats)
    walls = []
    t_start = time.perf_counter()
    for i in range(tokens.shape[1]):
        t0 = time.perf_counter()
        session.forward(tokens[:, i : i + 1], top=top)
        walls.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_start
    steps = session.stats[n0:]
    n = len(steps)
    edge = sum(s.edge_ms for s in steps) / n
    codec = sum(s.encode_ms + s.decode_ms for s in steps) / n
    # the unsplit model: all of its step counts as compute
    cloud = sum(s.cloud_ms if isinstance(session, SplitSession) else s.total_ms for s in steps) / n
    step_ms = 1e3 * sum(walls) / n
    return {"tok_s": n / total, "step_ms": step_ms, "edge_ms": edge, "codec_ms": codec, "cloud_ms": cloud,
            "python_ms": max(0.0, step_ms - edge - codec - cloud)}


def _interleaved(make_base, make_other, prompt_ids: torch.Tensor, tokens: torch.Tensor, top: int = 1) -> list[float]:
    """Per-step time ratios base / other of two sessions stepped alternately (base first on even
    steps, other first on odd ones) over the same tokens: drift in the machine's speed, which
    moves whole rounds by +-10% on a shared 2-core host, hits both halves of each pair alike."""
    a, b = make_base(), make_other()
    for s in (a, b):
        s.reserve(prompt_ids.shape[1] + tokens.shape[1])
        s.prefill(prompt_ids, top=top)
    ratios = []
    for i in range(tokens.shape[1]):
        step = tokens[:, i : i + 1]
        t = {}
        for name, s in ((("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a))):
            t0 = time.perf_counter()
            s.forward(step, top=top)
            t[name] = time.perf_counter() - t0
        ratios.append(t["a"] / t["b"])
    return ratios


def _hf_generate_tok_s(model, prompt_ids: torch.Tensor, n: int) -> dict:
    """HF generate, greedy, exactly n new tokens; decode tok/s from t(n) - t(1)."""
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(k: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=k,
                           min_new_tokens=k, **kw)
        return time.perf_counter() - t0

    one, full = run(1), run(n)
    tok_s = (n - 1) / max(full - one, 1e-9)
    return {"tok_s": tok_s, "step_ms": 1e3 / tok_s}


def llama_cpp_runner(gguf_path, threads: int, prompt: str, n: int, n_ctx: int = 1024):
    """A callable timing llama.cpp greedy decode of n tokens on the GGUF (None if not installed).
    Its context holds llama.cpp's own tokens of `prompt` (they may differ from ours) plus the n
    steps: opened at `n_ctx` and opened again larger when that is short. What llama.cpp refuses
    is a one-line SplitLLMError."""
    if importlib.util.find_spec("llama_cpp") is None or gguf_path is None:
        return None
    from llama_cpp import Llama

    def open_llama(size: int):
        return Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=size,
                     verbose=False, seed=0)

    try:
        llm = open_llama(n_ctx)
        prompt_tokens = llm.tokenize(prompt.encode())
        need = len(prompt_tokens) + n + 1
        if need > llm.n_ctx():
            llm.close()
            llm = open_llama(need)
    except (RuntimeError, ValueError) as e:
        raise SplitLLMError(f"llama.cpp cannot run {gguf_path}: {e}") from None

    def run() -> dict:
        try:
            llm.reset()
            llm.eval(prompt_tokens)
            tok = llm.sample(top_k=1, temp=0.0)
            t0 = time.perf_counter()
            for _ in range(n):
                llm.eval([tok])
                tok = llm.sample(top_k=1, temp=0.0)
            dt = time.perf_counter() - t0
        except (RuntimeError, ValueError) as e:
            raise SplitLLMError(f"llama.cpp failed decoding {len(prompt_tokens)} + {n} tokens: {e}") from None
        return {"tok_s": n / dt, "step_ms": 1e3 * dt / n}

    return run


def _prompt_ids(tokenizer, prompt: str, context: int) -> torch.Tensor:
    """The prompt repeated until it is `context` tokens long (at least the prompt once)."""
    ids, _ = encode_prompts(tokenizer, [prompt])
    reps = max(1, -(-context // ids.shape[1]))
    return ids.repeat(1, reps)[:, : max(context, 1)] if context else ids


def bench_decode(lm, split_layer: int, n_tokens: int = 64, repeats: int = 5, prompt: str = DEFAULT_PROMPT,
                 context: int = 192, gguf_path=None, llama_cpp: bool = True, hf_generate: bool = True,
                 progress: Progress | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Measure every path (module docstring) in one process; returns the JSON-ready result."""
    say = log or (lambda _m: None)
    tick = progress or (lambda *_: None)
    threads = torch.get_num_threads()
    why_not = fast_unsupported_model(lm.model)
    if why_not is not None:
        raise SplitLLMError(f"bench decode compares the fast path, which does not support this model: {why_not}")
    say(f"measuring: decode of {n_tokens} tokens after a {context}-token prompt, ℓ = {split_layer}, "
        f"{threads} torch thread(s), {repeats} rounds; medians")
    pristine = copy.deepcopy(lm.model)  # the old path's model: the fast path re-lays out lm.model
    ids = _prompt_ids(lm.tokenizer, prompt, context)
    ref = generate(UnsplitSession(pristine), ids, None, SamplingConfig(max_new_tokens=n_tokens))
    tokens = ref.tokens  # [1, n]: a fixed sequence every path is fed (eos is not special here)
    old_parts = decoder_parts(pristine)
    splits = {name: build_split(lm, SplitSpec(split_layer=split_layer, q_w1=bits, qa=qa))
              for name, bits, qa in (("split", 16, 16), ("split_int4", 4, 16), ("split_int8", 8, 16),
                                     ("split_int4_kv8", 4, 8))}
    ours = {4: kernels.use_for_int4(), 8: kernels.available() and kernels.use_for_int8(1)}
    why = kernels.why_unavailable() or f"{threads} threads"
    kernel_names = {bits: "splitllm-avx2" if ours[bits] else f"torch ({why})" for bits in (4, 8)}
    say(f"quantized edge kernels: int4 {kernel_names[4]}, int8 {kernel_names[8]}")
    if ours[4]:  # the opt-in 8-bit input of splitllm's 4-bit kernel (a plan's edge_act_bits)
        splits["split_int4_a8"] = build_split(lm, SplitSpec(split_layer=split_layer, q_w1=4, qa=16, edge_act_bits=8))
    for bits in (4, 8):  # the same quantized edge on torch's kernel, side by side
        if ours[bits]:
            with kernels.disabled():
                splits[f"split_int{bits}_torch"] = build_split(lm, SplitSpec(split_layer=split_layer, q_w1=bits, qa=16))
    sessions: dict[str, Callable[[], Session]] = {
        "old_unsplit": lambda: UnsplitSession(pristine),
        "old_split": lambda: SplitSession.from_halves(EdgeHalf(old_parts, split_layer),
                                                      CloudHalf(old_parts, split_layer)),
        "unsplit": lambda: FastUnsplitSession(lm.model),
    }
    for name, sp in splits.items():
        sessions[name] = lambda sp=sp: fast_split_session(sp)
    # the edge alone before a handoff, its OPSC model of all layers built once per path
    int4 = splits["split_int4"]
    local_models = {"local_int4": opsc_edge_model(lm.model, int4.spec),
                    "old_local_int4": opsc_edge_model(pristine, int4.spec)}
    sessions["local_int4"] = lambda: fast_handoff_session(int4, local_models["local_int4"]) or HandoffSession(
        lm.model, split_layer, edge=int4.edge, edge_model=local_models["local_int4"])
    sessions["old_local_int4"] = lambda: HandoffSession(pristine, split_layer,
                                                        edge_model=local_models["old_local_int4"])
    sessions["split_full_head"] = sessions["split"]
    # the same fast splits with every token on the torch path (decode_step.c off), side by side
    torch_steps = {"split_torch_step": "split", "split_int4_torch_step": "split_int4"}
    for name, base in torch_steps.items():
        sessions[name] = sessions[base]
    tops = {name: 0 if name == "split_full_head" else 1 for name in sessions}

    def timed(name: str, toks: torch.Tensor, session: Session | None = None) -> dict:
        with decode_step.disabled() if name in torch_steps else contextlib.nullcontext():
            return _timed_decode(session or sessions[name](), ids, toks, tops[name])

    runners: dict[str, Callable[[], dict]] = {name: (lambda name=name: timed(name, tokens)) for name in sessions}
    if hf_generate:
        runners["hf_generate"] = lambda: _hf_generate_tok_s(pristine, ids, n_tokens)
    llama = llama_cpp_runner(gguf_path, threads, lm.tokenizer.decode(ids[0]), n_tokens,
                             ids.shape[1] + n_tokens + 1) if llama_cpp else None
    if llama is not None:
        runners["llama_cpp"] = llama

    bandwidth = [copy_bandwidth_gb_s()]
    say(f"bandwidth probe (copy of {PROBE_BYTES >> 20} MiB): {bandwidth[0]:.1f} GB/s")
    for name, run in runners.items():  # warm-up: first calls allocate, page in and tabulate rotary
        tick(f"warm-up {name}", 0, repeats)
        if name not in ("hf_generate", "llama_cpp"):
            session = sessions[name]()
            if tops[name] and _head(session) is not None:
                _head(session).build_screen()  # now, not in a background thread during the timed rounds
            timed(name, tokens[:, :4], session)
    names = list(runners)
    samples: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            tick(f"round {r + 1}/{repeats}: {name}", r, repeats)
            samples[name].append(runners[name]())
        tick(f"round {r + 1}/{repeats} done", r + 1, repeats)
    # the two ratios the issue sets targets for, also from steps interleaved one by one
    pairs = {"overhead": ("unsplit", "split"), "int4": ("split", "split_int4")}
    if "split_int4_a8" in sessions:
        pairs["int4_a8"] = ("split", "split_int4_a8")
    interleaved: dict[str, list[float]] = {k: [] for k in pairs}
    for r in range(repeats):
        for key, (base, other) in pairs.items():
            tick(f"interleaved steps {r + 1}/{repeats}: {base} / {other}", r, repeats)
            interleaved[key] += _interleaved(sessions[base], sessions[other], ids, tokens)
    bandwidth.append(copy_bandwidth_gb_s())
    bw = statistics.median(bandwidth)

    mean_context = ids.shape[1] + n_tokens / 2
    full = decoder_parts(lm.model)
    heads = {name: _screened_head_bytes(sessions[name]()) for name in ("unsplit", *splits)}

    def head_bytes(name: str) -> float | None:
        return heads[name]["bytes"] if heads[name] else None

    unsplit_bytes = bytes_per_step(full, full, full.num_layers, mean_context)
    step_bytes = {"unsplit": bytes_per_step(full, full, full.num_layers, mean_context, head_bytes=head_bytes("unsplit")),
                  "old_unsplit": unsplit_bytes, "hf_generate": unsplit_bytes}
    for name, sp in splits.items():
        step_bytes[name] = bytes_per_step(sp.edge.parts, sp.cloud.parts, split_layer, mean_context, sp.spec.qa,
                                          head_bytes(name))
    for name, base in torch_steps.items():
        step_bytes[name] = step_bytes[base]
    step_bytes["split_full_head"] = step_bytes["old_split"] = bytes_per_step(
        splits["split"].edge.parts, splits["split"].cloud.parts, split_layer, mean_context)
    configs = {}
    for name in names:
        runs = samples[name]
        row = {"tok_s": statistics.median(x["tok_s"] for x in runs), "tok_s_runs": [x["tok_s"] for x in runs]}
        for key in ("step_ms", "edge_ms", "codec_ms", "cloud_ms", "python_ms"):
            if key in runs[0]:
                row[key] = statistics.median(x[key] for x in runs)
        if name in step_bytes:
            row["bytes_per_step"] = step_bytes[name]
            row["bound_tok_s"] = bw * 1e9 / step_bytes[name]
            row["fraction_of_bound"] = row["tok_s"] / row["bound_tok_s"]
        configs[name] = row
    tok = {n: configs[n]["tok_s"] for n in names}
    u, s = tok["unsplit"], tok["split"]

    def paired(base: str, other: str) -> float:
        # median over rounds of other / base within the same round: the rounds of this host swing
        # by +-10% together, so a ratio of the same round is steadier than one of two medians
        return statistics.median(b["tok_s"] / a["tok_s"] for a, b in zip(samples[base], samples[other]))

    kv_ratio = configs["split_int4_kv8"]["edge_ms"] / configs["split_int4"]["edge_ms"]
    return {
        "model": lm.model_id,
        "split_layer": split_layer,
        "tokens": int(tokens.shape[1]),
        "prompt_tokens": int(ids.shape[1]),
        "repeats": repeats,
        "threads": threads,
        "unsplit_tok_s": u,
        "split_tok_s": s,
        "overhead": 1 - s / u,
        "overhead_paired_median": 1 - paired("unsplit", "split"),
        # 1 - (unsplit step / split step), median over split and unsplit steps taken alternately
        "overhead_interleaved_median": 1 - statistics.median(interleaved["overhead"]),
        "interleaved_steps": len(interleaved["overhead"]),
        "unsplit_tok_s_runs": configs["unsplit"]["tok_s_runs"],
        "split_tok_s_runs": configs["split"]["tok_s_runs"],
        "old_unsplit_tok_s": tok["old_unsplit"],
        "old_split_tok_s": tok["old_split"],
        "split_speedup_vs_old": s / tok["old_split"],
        "split_full_head_tok_s": tok["split_full_head"],
        "screened_head_speedup": s / tok["split_full_head"],  # greedy steps: int8-screened vs float LM head
        "screened_head_speedup_paired_median": paired("split_full_head", "split"),
        "screened_head_rows": {name: heads[name]["rows"] if heads[name] else None for name in heads},
        "hf_generate_tok_s": tok.get("hf_generate"),
        "split_int4_tok_s": tok["split_int4"],
        "split_int8_tok_s": tok["split_int8"],
        "split_int4_kv8_tok_s": tok["split_int4_kv8"],
        "local_int4_tok_s": tok["local_int4"],
        "old_local_int4_tok_s": tok["old_local_int4"],
        "local_int4_speedup_vs_old": tok["local_int4"] / tok["old_local_int4"],
        "local_int4_speedup_vs_old_paired_median": paired("old_local_int4", "local_int4"),
        "int4_over_fp32_split": tok["split_int4"] / s,
        "int4_over_fp32_split_paired_median": paired("split", "split_int4"),
        "int4_over_fp32_split_interleaved_median": statistics.median(interleaved["int4"]),
        # the same int4 edge with its products' inputs rounded to int8 (opt-in: edge_act_bits = 8)
        "split_int4_a8_tok_s": tok.get("split_int4_a8"),
        "int4_a8_over_fp32_split": tok["split_int4_a8"] / s if "split_int4_a8" in tok else None,
        "int4_a8_over_fp32_split_paired_median": paired("split", "split_int4_a8") if "split_int4_a8" in tok else None,
        "int4_a8_over_fp32_split_interleaved_median": (statistics.median(interleaved["int4_a8"])
                                                       if "int4_a8" in interleaved else None),
        # decode_step.c (one C call per half per token) against the torch path's per-layer ops
        "split_torch_step_tok_s": tok["split_torch_step"],
        "split_int4_torch_step_tok_s": tok["split_int4_torch_step"],
        "c_step_speedup": s / tok["split_torch_step"],
        "c_step_speedup_paired_median": paired("split_torch_step", "split"),
        "int4_c_step_speedup": tok["split_int4"] / tok["split_int4_torch_step"],
        "int4_over_fp32_split_torch_step": tok["split_int4_torch_step"] / tok["split_torch_step"],
        "int4_kernel": kernel_names[4],
        "int8_kernel": kernel_names[8],
        "split_int4_torch_kernel_tok_s": tok.get("split_int4_torch"),
        "int4_torch_kernel_over_fp32_split": tok["split_int4_torch"] / s if "split_int4_torch" in tok else None,
        "split_int8_torch_kernel_tok_s": tok.get("split_int8_torch"),
        "int8_torch_kernel_over_fp32_split": tok["split_int8_torch"] / s if "split_int8_torch" in tok else None,
        "int8_over_fp32_split": tok["split_int8"] / s,
        "int8_over_fp32_split_paired_median": paired("split", "split_int8"),
        # the most int4_over_fp32_split can be when both runs read memory equally fast: the fp32
        # cloud (and LM head) is common to both, so at ℓ = L/2 this is ~1.5 whatever the kernels
        "int4_bound_ratio": step_bytes["split"] / step_bytes["split_int4"],
        "int8_bound_ratio": step_bytes["split"] / step_bytes["split_int8"],
        "kv8_edge_ms_ratio": kv_ratio,  # edge step with Qa = 8 over the fp KV's (int4 edge both)
        "kv8_step_ratio": tok["split_int4"] / tok["split_int4_kv8"],  # whole split step, same pair
        "llama_cpp_tok_s": tok.get("llama_cpp"),
        "llama_cpp": "timed" if llama is not None else "not installed (pip install 'splitllm[llamacpp]') or no GGUF",
        "bandwidth_gb_s": bw,
        "bandwidth_gb_s_probes": bandwidth,
        "bound_tok_s": configs["split"]["bound_tok_s"],
        "fraction_of_bound": configs["split"]["fraction_of_bound"],
        "configs": configs,
        "load_average": list(_load_average()),
    }


def _head(session: Session):
    """A fast session's LM head (`model.fast._Head`; a local stage's own, before a handoff), else None."""
    local = getattr(session, "local_edge", None)
    half = local.back if local is not None else getattr(session, "cloud", None) or getattr(session, "model", None)
    head = getattr(half, "head", None)
    return head if hasattr(head, "build_screen") else None


def _screened_head_bytes(session: Session) -> dict | None:
    """What a fast session's screened LM head read per step over the run so far: {"bytes": screen
    + float rows, "rows": mean float rows}; None when no step of it was screened."""
    head = _head(session)
    screen = getattr(head, "screen", None)
    if screen is None or not head.screened[0]:
        return None
    rows = head.screened[1] / head.screened[0]
    return {"bytes": screen.nbytes + rows * screen.cols * 4, "rows": rows}


def _load_average() -> tuple[float, float, float]:
    import os

    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)
