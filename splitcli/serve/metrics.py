"""Prometheus metrics of the edge's OpenAI-compatible API, named as llama.cpp and vLLM name theirs
(`splitllm:` prefix, `_total` counters, `_seconds` histograms), so existing dashboards and
scrape configs carry over. Each app owns its registry: the process-wide default registry would
refuse a second app's metrics (duplicate names), and tests build many apps."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Buckets from 1 ms (a local decode step on a small model) to a minute (a long prefill over a slow link).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """The counters one app updates; `render()` is the /metrics body."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model_name",)
        r = self.registry

        def counter(name, doc, extra=()):
            return Counter(name, doc, labels + tuple(extra), registry=r)

        self.requests_running = Gauge("splitllm:requests_running", "Requests generating now.", labels, registry=r)
        self.prompt_tokens = counter("splitllm:prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = counter("splitllm:generation_tokens_total", "Tokens generated.")
        self.request_success = counter("splitllm:request_success_total", "Requests that finished, by reason.",
                                       ("finished_reason",))
        self.request_errors = counter("splitllm:request_errors_total",
                                      "Requests refused or failed, by HTTP status.", ("status",))
        self.ttft = Histogram("splitllm:time_to_first_token_seconds", "Request start to first token.", labels,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("splitllm:inter_token_latency_seconds", "Time between consecutive tokens.", labels,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("splitllm:e2e_request_latency_seconds", "Request start to its last token.", labels,
                             buckets=_E2E_BUCKETS, registry=r)
        self.model_name = model_name

    def error(self, status: int) -> None:
        self.request_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Times one generation: first token, the gaps between tokens, the whole request; keeps the
    running gauge right however the request ends (call `end` exactly once, in a finally)."""

    def __init__(self, metrics: ServeMetrics, prompt_tokens: int):
        self.m, self.name = metrics, metrics.model_name
        self.start = self.last = time.perf_counter()
        self.tokens = 0
        self.m.requests_running.labels(self.name).inc()
        self.m.prompt_tokens.labels(self.name).inc(prompt_tokens)

    def token(self) -> None:
        now = time.perf_counter()
        if self.tokens == 0:
            self.m.ttft.labels(self.name).observe(now - self.start)
        else:
            self.m.itl.labels(self.name).observe(now - self.last)
        self.last = now
        self.tokens += 1
        self.m.generation_tokens.labels(self.name).inc()

    def end(self, finish_reason: str | None, error_status: int | None = None) -> None:
        self.m.requests_running.labels(self.name).dec()
        if finish_reason is not None:
            self.m.request_success.labels(self.name, finish_reason).inc()
            self.m.e2e.labels(self.name).observe(time.perf_counter() - self.start)
        elif error_status is not None:
            self.m.error(error_status)
