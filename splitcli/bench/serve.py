"""`bench serve`: the cloud server under N concurrent edge sessions, cloud-only vs split (Fig. 5).

Setup, all on 127.0.0.1 with ports chosen at run time:

- **One server process.** A child process (multiprocessing, spawn) loads the model and serves two
  `CloudServer`s: `cloud-only`, whose cloud half runs every decoder layer [0, L) behind the
  embedding (the edge only looks token embeddings up: a documented ℓ = 0 path that lives here,
  since a split needs 1 <= ℓ <= L-1), and `split`, the cloud half [ℓ, L) of the split at ℓ. Only
  one of them is driven at a time. Cloud CPU is the child's own process CPU time
  (`time.process_time()` in the child, read over a pipe before and after each run), so nothing
  the clients do is counted, and the clients do not hold the server's GIL.
- **Replay clients.** On a 2-core machine real edge processes would steal the server's CPU, so
  each client's frames are recorded once, offline, in this process: the edge half runs on a
  prompt and its greedy continuation, each step's frame is encoded with the session's wire, and
  the in-process cloud half gives the token the server must answer. During a run, N threads each
  open a real gRPC session (the same protocol as `splitcli.serve.client`), send the recorded
  frames at an edge's pace (after each token they wait the edge's measured per-step time before
  sending the next frame) and check every token the server returns against the recording.
- **One real edge** (`generate_remote`) checks end to end that the served split gives the
  recording's tokens, and `generate_remote_handoff` gives the Fig. 5b curve: tokens the cloud
  computed vs W̄ (the tokens the edge generates alone before handing the session over).

Per run: cloud CPU-seconds per generated token, aggregate tokens/s (all clients' tokens over the
wall time from the common start to the last token), p50 / p99 per-token latency (client side,
from sending a decode step's frame to its token; the prefill step is reported as TTFT), and frame
bytes sent per generated token. Medians over repeats; the two modes alternate within each repeat.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable

from ..errors import SplitLLMError
from .serve_replay import MODES, Recording, ServerProcess, build_mode_split, open_fields, record, run_once

__all__ = ["MODES", "PROMPTS", "ServerProcess", "acceptance", "bench_serve", "plot_serve"]

PROMPTS = [
    "The history of the city begins with a small settlement on the river, where",
    "In the early morning the fishermen of the village",
    "The theory of evolution by natural selection explains",
    "A good recipe for bread needs only four ingredients:",
    "The first computers filled entire rooms and",
    "When the storm finally passed, the valley",
    "Mathematics is sometimes called the language of",
    "The museum's new exhibition presents",
]
PROTOCOL = ("replay clients: each client's codec frames were recorded once offline (edge half on a prompt "
            "and its greedy continuation, frames encoded with the session's wire) and are sent over real "
            "gRPC sessions (splitcli/serve/proto/split.proto) to an in-process-started CloudServer in a child "
            "process on 127.0.0.1, one thread and one channel per client, at an edge's pace (the edge's "
            "measured per-step time between receiving a token and sending the next frame); every returned "
            "token is checked against the recording. cloud-only: the cloud runs all L decoder layers (ℓ = 0: "
            "the edge only embeds, frames are token embeddings on the same wire).")
CPU_MEASURE = ("cloud CPU = process CPU time (user+system, all threads) of the child process that runs only "
               "the servers, read with time.process_time() in the child before and after each run; the replay "
               "clients run in the parent and are not counted")


# -- the whole benchmark ---------------------------------------------------------------------

def _handoff_curve(lm, split, server: ServerProcess, prompt_ids, n_tokens: int, reference: list[int],
                   windows: list[int]) -> list[dict]:
    """Fig. 5b: for each W̄ the edge generates W̄ tokens alone (full model here), then hands over."""
    from ..deploy.split import opsc_edge_model
    from ..runtime.generate import SamplingConfig
    from ..serve.client import RemoteCloud
    from ..serve.handoff import generate_remote_handoff

    cloud = RemoteCloud(target=f"127.0.0.1:{server.ports['split']}", api_key=server.api_key,
                        model_sha256=lm.sha256, timeout_s=300.0)
    edge_model = opsc_edge_model(lm.model, split.spec)
    cfg = SamplingConfig(max_new_tokens=n_tokens)
    out = []
    for i_kv in (0, 1):
        for w in windows:
            s0, c0 = server.ask("stats", "split"), server.ask("cpu")
            tokens = list(generate_remote_handoff(split, edge_model, prompt_ids, cfg, cloud, local_tokens=w, i_kv=i_kv))
            s1, c1 = server.ask("stats", "split"), server.ask("cpu")
            out.append({
                "w_bar": w, "i_kv": i_kv, "tokens": len(tokens),
                "edge_tokens": min(w, len(tokens)),
                "cloud_tokens": s1["generated_tokens"] - s0["generated_tokens"],  # forwards the cloud answered
                "cloud_generated_tokens": len(tokens) - min(w, len(tokens)),  # tokens the edge got from the cloud
                "cloud_prefill_positions": s1["prompt_tokens"] - s0["prompt_tokens"],
                "cloud_cpu_s": c1 - c0,
                "frame_bytes": s1["frame_bytes_in"] - s0["frame_bytes_in"],
                "matches_split_greedy": tokens == reference,
            })
    return out


def _machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "parent_threads": torch.get_num_threads()}


def bench_serve(lm, model_ref: str, split_layer: int, clients: list[int], n_tokens: int = 32, repeats: int = 3,
                wire: str = "fp16", data_dir=None, threads: int = 0, handoff_windows: list[int] | None = None,
                progress: Callable[[str, int, int], None] | None = None,
                log: Callable[[str], None] | None = None) -> dict:
    """The whole benchmark (see the module doc). `lm` is the loaded model (for recording, the
    real edge and the handoff curve); `model_ref` what the server process loads (the same model)."""
    from ..runtime.generate import SamplingConfig, encode_prompts, generate
    from ..serve.client import RemoteCloud, generate_remote

    progress = progress or (lambda *_: None)
    log = log or (lambda _: None)
    if not clients or any(c < 1 for c in clients):
        raise SplitLLMError("clients must be integers >= 1")
    clients = sorted(set(clients))
    load_before = os.getloadavg()
    splits = {m: build_mode_split(lm, m, split_layer, wire, data_dir) for m in MODES}
    n_prompts = min(len(PROMPTS), max(clients))
    prompt_ids = [encode_prompts(lm.tokenizer, [p])[0] for p in PROMPTS[:n_prompts]]
    recordings: dict[str, list[Recording]] = {m: [] for m in MODES}
    total = len(MODES) * n_prompts
    for m in MODES:
        for ids in prompt_ids:
            progress("recording edge frames", sum(map(len, recordings.values())), total)
            recordings[m].append(record(splits[m], ids, n_tokens))
    progress("recording edge frames", total, total)
    # The replay is honest only if the recording is what the split computes in process.
    cfg = SamplingConfig(max_new_tokens=n_tokens)
    ref0 = generate(splits["split"].session(), prompt_ids[0], None, cfg).tokens[0].tolist()
    recorded_equals_generate = ref0 == recordings["split"][0].tokens
    pace = {m: statistics.median(r.edge_step_s for r in recordings[m]) for m in MODES}
    wires = {m: ("fp16" if wire in ("tabq", "predictive") else wire) if m == "cloud-only" else wire for m in MODES}
    # what each mode's Open carries for its frames (the server process calibrates or fits the same
    # codec, from the same cache: the Open's copy is checked against it)
    fields = {m: open_fields(splits[m]) for m in MODES}
    layers = {"cloud-only": 0, "split": splits["split"].spec.split_layer}

    progress("starting the cloud server process", 0, 1)
    runs_raw: dict[tuple[str, int], list[dict]] = {}
    with ServerProcess(model_ref, split_layer, wire, data_dir, max_sessions=max(clients), threads=threads) as server:
        progress("starting the cloud server process", 1, 1)
        # A warm-up session per mode (first-call costs of the server and gRPC are not measured).
        for m in MODES:
            run_once(server, m, lm.sha256, layers[m], wires[m], recordings[m], 1, 0.0, fields=fields[m])
        total = repeats * len(clients) * len(MODES)
        done = 0
        for r in range(repeats):
            for c in clients:
                order = MODES if (r + c) % 2 == 0 else MODES[::-1]  # alternate: drifting load hits both
                for m in order:
                    what = f"{m}, {c} client{'s' if c > 1 else ''} (repeat {r + 1}/{repeats})"
                    progress(what, done, total)
                    one = run_once(server, m, lm.sha256, layers[m], wires[m], recordings[m], c, pace[m],
                                   fields=fields[m])
                    runs_raw.setdefault((m, c), []).append(one)
                    done += 1
                    # one line per run as it lands: a redirected run (no live bar) still shows progress
                    log(f"{what}: {one['tokens_per_s']:.1f} tok/s, cloud CPU {1e3 * one['cloud_cpu_s_per_token']:.2f} "
                        f"ms/token, p50 {one['p50_ms']:.1f} ms, p99 {one['p99_ms']:.1f} ms, "
                        f"{one['bytes_per_token']:.0f} B/token, mean batch {one['mean_batch']:.2f}")
        progress("runs", total, total)
        # One real edge end to end, and the handoff curve (Fig. 5a/b).
        progress("real edge + handoff curve", 0, 1)
        remote = RemoteCloud(target=f"127.0.0.1:{server.ports['split']}", api_key=server.api_key,
                             model_sha256=lm.sha256, timeout_s=300.0)
        real = list(generate_remote(splits["split"], prompt_ids[0], cfg, remote))
        windows = handoff_windows if handoff_windows is not None else sorted(
            {0, n_tokens // 4, n_tokens // 2, (3 * n_tokens) // 4, n_tokens})
        handoff = _handoff_curve(lm, splits["split"], server, prompt_ids[0], n_tokens, recordings["split"][0].tokens,
                                 windows)
        progress("real edge + handoff curve", 1, 1)
        server_threads = server.threads

    keys = ("cloud_cpu_s_per_token", "tokens_per_s", "p50_ms", "p99_ms", "ttft_ms", "bytes_per_token",
            "decode_bytes_per_token", "mean_batch", "wall_s")
    runs = []
    for (m, c), rs in sorted(runs_raw.items(), key=lambda kv: (MODES.index(kv[0][0]), kv[0][1])):
        rec = {"mode": m, "clients": c, "split_layer": layers[m], "wire": wires[m], "repeats": len(rs),
               "tokens": rs[0]["tokens"], "edge_pace_ms": 1e3 * pace[m],
               "replay_tokens_match": all(x["replay_tokens_match"] for x in rs)}
        rec.update({k: statistics.median(x[k] for x in rs) for k in keys})
        rec["per_repeat"] = {k: [x[k] for x in rs] for k in ("cloud_cpu_s_per_token", "tokens_per_s", "p50_ms", "p99_ms")}
        runs.append(rec)
    result = {
        "model": lm.model_id, "model_sha256": lm.sha256, "split_layer": layers["split"],
        "num_layers": splits["split"].cloud.parts.num_layers, "wire": wire, "tokens_per_client": n_tokens,
        "clients": clients, "repeats": repeats, "protocol": PROTOCOL, "cpu_measure": CPU_MEASURE,
        "cloud_only_note": "cloud-only is ℓ = 0: the cloud runs every decoder layer and the LM head; the edge sends "
                           "token embeddings (raw fp16 unless --wire none), so its bytes_per_token is that of "
                           "embeddings, not of token ids",
        "latency_note": "p50/p99 over every decode step of every client (send of the frame -> its token); "
                        "the prefill step is ttft_ms (median over clients)",
        "machine": {**_machine(), "server_threads": server_threads, "load_average_before": list(load_before),
                    "load_average_after": list(os.getloadavg())},
        "recorded_equals_generate": recorded_equals_generate,
        "real_edge_check": {"tokens_equal_replay": real == recordings["split"][0].tokens, "tokens": len(real)},
        "reference": {"prompt": PROMPTS[0], **{f"{m}_tokens": recordings[m][0].tokens for m in MODES}},
        "runs": runs,
        "handoff": handoff,
        "acceptance": acceptance(runs),
    }
    log(f"load average {load_before[0]:.2f} -> {result['machine']['load_average_after'][0]:.2f}")
    return result


def acceptance(runs: list[dict], at: int = 8) -> dict:
    """Issue 13's two numbers: split/cloud-only cloud CPU per token with `at` clients (else the
    most measured), and tokens/s with `at` clients over one client, per mode."""
    by = {(r["mode"], r["clients"]): r for r in runs}
    counts = sorted({r["clients"] for r in runs})
    n = at if at in counts else counts[-1]
    out: dict = {"clients": n}
    if ("split", n) in by and ("cloud-only", n) in by:
        out["cpu_per_token_split_over_cloud_only"] = (by["split", n]["cloud_cpu_s_per_token"]
                                                      / by["cloud-only", n]["cloud_cpu_s_per_token"])
        out["cpu_target"] = 0.70
    for m in MODES:
        if (m, 1) in by and (m, n) in by:
            out[f"{m}_speedup_vs_1_client"] = by[m, n]["tokens_per_s"] / by[m, 1]["tokens_per_s"]
    out["speedup_target"] = 3.0
    return out


def plot_serve(result: dict, path) -> None:
    """tokens/s and cloud CPU-s per token vs clients, both modes; and the handoff curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m, style in zip(MODES, ("o-", "s-")):
        rs = sorted((r for r in result["runs"] if r["mode"] == m), key=lambda r: r["clients"])
        xs = [r["clients"] for r in rs]
        label = f"{m} (ℓ={rs[0]['split_layer']})" if rs else m
        axes[0].plot(xs, [r["tokens_per_s"] for r in rs], style, label=label)
        axes[1].plot(xs, [1e3 * r["cloud_cpu_s_per_token"] for r in rs], style, label=label)
    axes[0].set(xlabel="concurrent clients", ylabel="aggregate tokens/s", title="throughput")
    axes[1].set(xlabel="concurrent clients", ylabel="cloud CPU ms / token", title="cloud cost")
    for i_kv, style in ((0, "o-"), (1, "s--")):
        hs = [h for h in (result.get("handoff") or []) if h["i_kv"] == i_kv]
        axes[2].plot([h["w_bar"] for h in hs], [h["cloud_tokens"] for h in hs], style, label=f"I_kv = {i_kv}")
    axes[2].set(xlabel="W̄ (tokens generated on the edge before the handoff)", ylabel="tokens computed by the cloud",
                title="handoff (Fig. 5b)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
        if ax is not axes[2]:
            ax.set_xscale("log", base=2)
    fig.suptitle(f"bench serve: {result['model']}, {result['tokens_per_client']} tokens per client, "
                 f"wire {result['wire']}, medians of {result['repeats']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
