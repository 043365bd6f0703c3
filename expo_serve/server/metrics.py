"""Prometheus metrics under vLLM's names with an `expo:` prefix (DESIGN.md §6).

Engine gauges (running, waiting, KV-cache usage) are read from the engine when /metrics is
scraped. Latencies and token counts are observed per engine request as its outputs arrive at
the server (serving.RequestTracker), so they include the time a request spends queued; each
carries the A/B `arm` that served it ("" where no experiment applies).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine.llm_engine import EngineStats

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0)


class _EngineCollector:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self._stats = stats
        self._model = model_name

    def collect(self):
        stats = self._stats()
        for name, doc, value in (
            ("expo:num_requests_running", "Sequences the engine is running.", stats.num_running),
            ("expo:num_requests_waiting", "Sequences waiting for the engine (queued or preempted).", stats.num_waiting),
            ("expo:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 is full).", stats.kv_cache_usage),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self._model], value)
            yield gauge
        preemptions = CounterMetricFamily("expo:num_preemptions", "Sequences preempted for lack of KV cache.",
                                          labels=["model_name"])
        preemptions.add_metric([self._model], stats.num_preemptions)
        yield preemptions


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        # `_created` timestamps double the output and no dashboard reads them (process-wide switch).
        disable_created_metrics()
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(stats, model_name))
        arm = ["model_name", "arm"]
        self.ttft = Histogram("expo:time_to_first_token_seconds", "Time from arrival to the first output token.",
                              arm, buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("expo:inter_token_latency_seconds", "Time between output tokens of a sequence.",
                             arm, buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("expo:e2e_request_latency_seconds", "Time from arrival to the last output token.",
                             arm, buckets=E2E_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("expo:prompt_tokens", "Prompt tokens computed (once per α of a request).",
                                     arm, registry=self.registry)
        self.generation_tokens = Counter("expo:generation_tokens", "Output tokens generated.", arm,
                                         registry=self.registry)
        self.finished = Counter("expo:request_success", "Engine requests finished, by finish reason.",
                                ["model_name", "arm", "finish_reason"], registry=self.registry)
        self.rejected = Counter("expo:requests_rejected", "Requests refused before reaching the engine, by reason.",
                                ["model_name", "reason"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()
