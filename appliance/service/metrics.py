"""The server's Prometheus metrics, in a registry of its own (several servers in one process do not collide).

Latencies are measured on the event loop, as a client sees them: time to first token from the request's arrival
(queue wait included), inter-token time between consecutive streamed deltas (a delta is one token, or a few when
the tokenizer holds text back until a character is complete).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from appliance.service.pool import EnginePool

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
ERROR_KINDS = ("bad_request", "unauthorized", "forbidden", "too_large", "queue_full", "not_ready", "engine", "history",
               "internal")


class Metrics:
    def __init__(self, pool: EnginePool) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ... (Linux)
        self.ttft = Histogram("streamchat_time_to_first_token_seconds", "request arrival to first streamed text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("streamchat_inter_token_seconds", "time between streamed deltas",
                                     buckets=TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("streamchat_request_seconds", "request arrival to the end of its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("streamchat_generated_tokens", "tokens generated", registry=r)
        self.answers = Counter("streamchat_answers", "answers ended, by stop reason", ["stop_reason"], registry=r)
        self.errors = Counter("streamchat_errors", "failed requests, by kind", ["kind"], registry=r)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)  # every kind shows from the start, at 0
        Gauge("streamchat_queue_depth", "requests waiting for a replica", registry=r).set_function(lambda: pool.waiting)
        Gauge("streamchat_busy_replicas", "replicas running an answer", registry=r).set_function(lambda: pool.busy)
        Gauge("streamchat_replicas", "replicas whose model is loaded", registry=r).set_function(
            lambda: len(pool.replicas))

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
