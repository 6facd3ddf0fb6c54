"""`bench serve --backend ray`: the split's cloud half on Ray Serve with R replicas, under the same
replay clients as the local backend (issue 16), and the local backend beside it for Ray's overhead.

Setup, all on 127.0.0.1 (ports chosen at run time), measured the way `bench.serve` measures:
- **Server child processes.** For each replica count R a child process (`ServerProcess`, spawn)
  starts a local Ray instance (num_cpus = this machine's cores, no dashboard, loopback only) and a
  `RayCloudServer` with R replicas (each loads the model itself, `--threads` torch threads). The
  local baseline is the same `ServerProcess` as `bench serve`, with the same threads. Cloud CPU is
  the CPU time of the server child and every process under it (for Ray: the gRPC front, gcs,
  raylet, Serve's controller and the replicas), read with psutil before and after each run.
- **Replay clients** (`serve_replay.run_once`): recorded frames of the split at ℓ, at an edge's
  pace, every returned token checked against the recording.
- **Overhead**: at 1 replica, Ray and local runs alternate within each repeat (same clients, same
  recordings), and the ratio of their median per-token latencies (p50) is reported.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

from ..errors import SplitLLMError
from .serve_replay import (Recording, ServerProcess, build_mode_split, open_fields, record, report_child_error,
                           run_once, serve_commands)

KEYS = ("cloud_cpu_s_per_token", "tokens_per_s", "p50_ms", "p99_ms", "ttft_ms", "bytes_per_token", "mean_batch",
        "wall_s")


def _tree_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of this process ('front': the gRPC front and the handle's
    router) and its descendants alive now: Serve's replicas and the rest of Ray (gcs, raylet,
    controller, agents)."""
    import psutil

    me = psutil.Process()
    parts = {"front": 0.0, "replicas": 0.0, "ray_system": 0.0}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            name = "front" if p.pid == me.pid else ("replicas" if p.name().startswith("ray::ServeRepli") or
                                                   " ".join(p.cmdline()[:1]).startswith("ray::ServeReplica")
                                                   else "ray_system")
        except psutil.Error:
            continue  # gone between the listing and the read
        parts[name] += t.user + t.system
    return parts


def split_factory_main(model_ref: str, split_layer: int, wire: str, data_dir):
    """Run on each replica: the model loaded there, the bench's split built from it."""
    from ..model.loader import load_model

    lm = load_model(model_ref)
    return build_mode_split(lm, "split", split_layer, wire, data_dir), lm.sha256


def ray_server_main(conn, model_ref: str, split_layer: int, wire: str, data_dir, settings: dict, threads: int,
                    replicas: int) -> None:
    """Child process: a RayCloudServer with `replicas` replicas; answers 'cpu', 'stats split' and
    'stop' on `conn` as `serve_replay`'s local server child does."""
    import functools

    server = None
    try:
        from ..serve.cloud import CloudSettings
        from ..serve.ray_backend import RayCloudServer, RayOptions

        factory = functools.partial(split_factory_main, model_ref, split_layer, wire, data_dir)
        server = RayCloudServer(factory, CloudSettings(model_sha256="-", **settings),
                                RayOptions(replicas=replicas, num_cpus=os.cpu_count() or 2,
                                           replica_threads=threads or 1))
        conn.send(("ready", {"split": server.port}, threads or 1))

        def answer(cmd, _arg):
            if cmd == "cpu":
                return sum(_tree_cpu_s().values())
            if cmd == "cpu_parts":
                return _tree_cpu_s()
            if cmd == "stats":
                c = server.servicer.counters()
                reps = server.replica_stats().values()
                return {"generated_tokens": c.generated_tokens, "prompt_tokens": c.prompt_tokens,
                        "frame_bytes_in": c.frame_bytes_in, "forwards": sum(r["forwards"] for r in reps),
                        "batched_steps": sum(r["batched_steps"] for r in reps),
                        "sessions": server.servicer.session_count, "replicas": len(reps),
                        "replica_rss_bytes": max(r["rss_bytes"] for r in reps),
                        "route": server.servicer.route_overhead()}
            raise StopIteration

        serve_commands(conn, answer)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        report_child_error(conn, exc)
    finally:
        if server is not None:
            server.stop(0)
        conn.close()


def _median_record(rs: list[dict], **fields) -> dict:
    rec = {**fields, "repeats": len(rs), "tokens": rs[0]["tokens"],
           "replay_tokens_match": all(x["replay_tokens_match"] for x in rs)}
    rec.update({k: statistics.median(x[k] for x in rs) for k in KEYS})
    for k in ("cpu_ms_per_token_front", "cpu_ms_per_token_replicas", "cpu_ms_per_token_ray_system",
              "replica_rss_bytes", "route_ms_per_message"):
        if k in rs[0]:
            rec[k] = statistics.median(x[k] for x in rs)
    rec["per_repeat"] = {k: [x[k] for x in rs] for k in ("cloud_cpu_s_per_token", "tokens_per_s", "p50_ms", "p99_ms")}
    return rec


def bench_serve_ray(lm, model_ref: str, split_layer: int, clients: list[int], replicas: list[int], n_tokens: int = 32,
                    repeats: int = 3, wire: str = "fp16", data_dir=None, threads: int = 1,
                    progress: Callable[[str, int, int], None] | None = None,
                    log: Callable[[str], None] | None = None) -> dict:
    """Split at ℓ on Ray with each replica count in `replicas`, and on the local backend, under
    each number of `clients`; medians over `repeats`."""
    from ..runtime.generate import SamplingConfig, encode_prompts, generate
    from .serve import PROMPTS, _machine

    progress = progress or (lambda *_: None)
    log = log or (lambda _: None)
    clients, replicas = sorted(set(clients)), sorted(set(replicas))
    if not clients or clients[0] < 1 or not replicas or replicas[0] < 1:
        raise SplitLLMError("clients and replicas must be integers >= 1")
    threads = threads or 1
    load_before = os.getloadavg()
    split = build_mode_split(lm, "split", split_layer, wire, data_dir)
    prompt_ids = [encode_prompts(lm.tokenizer, [p])[0] for p in PROMPTS[:min(len(PROMPTS), clients[-1])]]
    recordings: list[Recording] = []
    for i, ids in enumerate(prompt_ids):
        progress("recording edge frames", i, len(prompt_ids))
        recordings.append(record(split, ids, n_tokens))
    ref0 = generate(split.session(), prompt_ids[0], None, SamplingConfig(max_new_tokens=n_tokens)).tokens[0].tolist()
    pace = statistics.median(r.edge_step_s for r in recordings)
    ell = split.spec.split_layer
    fields = open_fields(split)   # a codec wire's settings and calibration travel in each Open
    raw: dict[tuple[str, int, int], list[dict]] = {}

    def measure(server, backend: str, r: int, c: int, rep: int) -> None:
        what = f"{backend}{f' x{r}' if backend == 'ray' else ''}, {c} client{'s' if c > 1 else ''} (repeat {rep + 1})"
        if backend == "ray":
            before, route0 = server.ask("cpu_parts"), server.ask("stats", "split")["route"]
        one = run_once(server, "split", lm.sha256, ell, wire, recordings, c, pace, fields=fields)
        if backend == "ray":  # where Ray's CPU goes per generated token; the router's time per message
            after, stats = server.ask("cpu_parts"), server.ask("stats", "split")
            one.update({f"cpu_ms_per_token_{k}": 1e3 * (after[k] - before[k]) / one["tokens"] for k in before})
            one["replica_rss_bytes"] = stats["replica_rss_bytes"]
            (s1, n1), (s0, n0) = stats["route"], route0
            one["route_ms_per_message"] = 1e3 * (s1 - s0) / max(1, n1 - n0)
        raw.setdefault((backend, r, c), []).append(one)
        log(f"{what}: {one['tokens_per_s']:.1f} tok/s, cloud CPU {1e3 * one['cloud_cpu_s_per_token']:.2f} ms/token, "
            f"p50 {one['p50_ms']:.1f} ms, p99 {one['p99_ms']:.1f} ms, mean batch {one['mean_batch']:.2f}")

    kw = {"max_sessions": clients[-1], "threads": threads}
    progress("starting the local server process", 0, 1)
    # The local child answers 'cpu' with its process time: for one process, what the Ray child's
    # process-tree sum measures.
    with ServerProcess(model_ref, ell, wire, data_dir, **kw) as local:
        for r in replicas:
            progress(f"starting Ray with {r} replica{'s' if r > 1 else ''}", 0, 1)
            started = time.perf_counter()
            with ServerProcess(model_ref, ell, wire, data_dir, main=ray_server_main, main_args=(r,), **kw) as ray:
                log(f"Ray with {r} replicas ready in {time.perf_counter() - started:.1f} s")
                run_once(ray, "split", lm.sha256, ell, wire, recordings, 1, 0.0, fields=fields)  # warm-up
                if r == replicas[0]:
                    run_once(local, "split", lm.sha256, ell, wire, recordings, 1, 0.0, fields=fields)
                total, done = repeats * len(clients), 0
                for rep in range(repeats):
                    for c in clients:
                        progress(f"ray x{r}", done, total)
                        order = ("ray", "local") if (rep + c) % 2 == 0 else ("local", "ray")
                        for backend in order:  # the local baseline beside the first replica count
                            if backend == "ray":
                                measure(ray, "ray", r, c, rep)
                            elif r == replicas[0]:
                                measure(local, "local", 1, c, rep)
                        done += 1
    runs = [_median_record(rs, mode=("local" if b == "local" else f"ray x{r}"), backend=b, replicas=r, clients=c,
                           split_layer=ell, wire=wire, edge_pace_ms=1e3 * pace)
            for (b, r, c), rs in sorted(raw.items(), key=lambda kv: (kv[0][0] != "local", kv[0][1], kv[0][2]))]
    by = {(x["backend"], x["replicas"], x["clients"]): x for x in runs}
    overhead = [{"clients": c, "replicas": replicas[0],
                 "p50_ratio_ray_over_local": by["ray", replicas[0], c]["p50_ms"] / by["local", 1, c]["p50_ms"],
                 "cpu_ratio_ray_over_local": (by["ray", replicas[0], c]["cloud_cpu_s_per_token"]
                                              / by["local", 1, c]["cloud_cpu_s_per_token"])}
                for c in clients]
    scaling = [{"clients": c, "replicas": r,
                "tokens_per_s_over_1_replica": by["ray", r, c]["tokens_per_s"] / by["ray", replicas[0], c]["tokens_per_s"]}
               for c in clients for r in replicas if r != replicas[0]]
    return {
        "backend": "ray", "model": lm.model_id, "model_sha256": lm.sha256, "split_layer": ell, "wire": wire,
        "tokens_per_client": n_tokens, "clients": clients, "replicas": replicas, "repeats": repeats,
        "threads_per_server": threads,
        "protocol": "replay clients as in bench serve (recorded frames of the split at ℓ, sent over gRPC at an "
                    "edge's pace, tokens checked); Ray: a local instance in a child process, R replicas behind "
                    "the gRPC front; local: the serve-cloud core in a child process",
        "cpu_measure": "CPU time (user+system) of the server child and all its descendant processes, psutil, "
                       "before and after each run",
        "machine": {**_machine(), "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())},
        "recorded_equals_generate": ref0 == recordings[0].tokens,
        "runs": runs, "overhead_at_1_replica": overhead, "scaling": scaling,
    }

