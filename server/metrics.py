"""Prometheus metrics with vLLM's names, in a registry of the app's own (tests start several).

Gauges and counters are read from the engine's stats snapshot at scrape time (a custom
collector), so the engine keeps one source of truth. Latency histograms are observed by the
request handlers from each RequestOutput's engine-side timestamps (time.monotonic in the
engine thread), so event-loop delays do not leak into TTFT or inter-token latency.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxpaged.engine.engine import EngineStats
from jaxpaged.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)  # fmt: skip
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0)  # fmt: skip


class _EngineCollector:
    def __init__(self, get_stats: Callable[[], EngineStats], model_name: str) -> None:
        self.get_stats = get_stats
        self.model_name = model_name

    def _family(self, cls, name: str, doc: str, value: float):
        family = cls(name, doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family

    def collect(self):
        stats = self.get_stats()
        sched = stats.scheduler
        gauges = [
            ("vllm:num_requests_running", "Requests in the running batch.", sched.num_running_reqs),
            (
                "vllm:num_requests_waiting",
                "Requests waiting to be scheduled.",
                sched.num_waiting_reqs,
            ),
            (
                "vllm:kv_cache_usage_perc",
                "Fraction of KV cache blocks in use (0-1).",
                sched.kv_cache_usage,
            ),
        ]
        for name, doc, value in gauges:
            yield self._family(GaugeMetricFamily, name, doc, value)
        counters = [
            ("vllm:prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens_total),
            ("vllm:generation_tokens", "Tokens generated.", stats.generation_tokens_total),
            ("vllm:num_preemptions", "Preemptions.", sched.num_preemptions_total),
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             sched.prefix_cache_queries_total),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             sched.prefix_cache_hits_total),
        ]  # fmt: skip
        for name, doc, value in counters:
            # CounterMetricFamily exposes `<name>_total`, vLLM's exact names.
            yield self._family(CounterMetricFamily, name, doc, value)


class ServerMetrics:
    def __init__(self, get_stats: Callable[[], EngineStats], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(get_stats, model_name))

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(
                name, doc, ["model_name"], registry=self.registry, buckets=buckets
            ).labels(model_name)

        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Time between output tokens.", _ITL_BUCKETS
        )
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", _E2E_BUCKETS)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """Per handler call: turns the delta RequestOutputs of its requests into latencies."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self._last_token_time: dict[str, float] = {}

    def observe(self, out: RequestOutput) -> None:
        m = out.metrics
        if m is None:
            return
        num_new = sum(len(c.token_ids) for c in out.outputs)
        prev = self._last_token_time.get(out.request_id)
        if num_new and m.last_token_time is not None:
            if prev is None and m.first_token_time is not None:
                self.metrics.ttft.observe(m.first_token_time - m.arrival_time)
            elif prev is not None:
                # One step produced these tokens; vLLM observes one interval per step too.
                self.metrics.itl.observe(max(m.last_token_time - prev, 0.0))
            self._last_token_time[out.request_id] = m.last_token_time
        if out.finished and m.finished_time is not None:
            self.metrics.e2e.observe(m.finished_time - m.arrival_time)
