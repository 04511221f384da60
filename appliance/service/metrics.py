"""The server's Prometheus metrics, in a registry of its own (several servers in one process do not collide).

Latencies are measured on the event loop, as a client sees them: time to first token from the request's arrival
(queue wait included); inter-token time between tokens as the model made them in its worker thread (a pause there,
from an overloaded machine or a slow replica, is a pause the reader sees). A gap over ``STALL_S`` is a stall.
Answer quality (repetition rate, topic similarity) comes from ``appliance.answer_quality``, the same numbers any
front end can show; safety-filter hits are counted as the session reports them to its audit log.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.answer_quality import repetition_rate, topic_similarity
from appliance.device_usage import device_usage
from appliance.live_numbers import STALL_S
from appliance.safety import AuditLog
from appliance.service.pool import EnginePool

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
RATIO_BUCKETS = (0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1)
SIMILARITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1)
ERROR_KINDS = ("bad_request", "unauthorized", "forbidden", "too_large", "too_many_connections", "queue_full",
               "not_ready", "engine", "history", "internal")


class Metrics:
    def __init__(self, pool: EnginePool) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ... (Linux)
        self.ttft = Histogram("streamchat_time_to_first_token_seconds", "request arrival to first streamed text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("streamchat_inter_token_seconds",
                                     "time between tokens as the model made them (a frame carries them all since the last)",
                                     buckets=TOKEN_BUCKETS, registry=r)
        self.stalls = Counter("streamchat_token_stalls", f"pauses between tokens over {STALL_S} s", registry=r)
        self.latency = Histogram("streamchat_request_seconds", "request arrival to the end of its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("streamchat_generated_tokens", "tokens generated", registry=r)
        self.answers = Counter("streamchat_answers", "answers ended, by stop reason", ["stop_reason"], registry=r)
        self.errors = Counter("streamchat_errors", "failed requests, by kind", ["kind"], registry=r)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)  # every kind shows from the start, at 0
        self.busy = Counter("streamchat_replica_busy_seconds", "time each replica spent running answers", ["replica"],
                            registry=r)
        self.repetition = Histogram("streamchat_answer_repetition_ratio",
                                    "share of an answer's token 4-grams that repeat an earlier one",
                                    buckets=RATIO_BUCKETS, registry=r)
        self.topic = Histogram("streamchat_answer_topic_similarity",
                               "cosine of the question's and the answer's term counts", buckets=SIMILARITY_BUCKETS,
                               registry=r)
        self.on_topic = Counter("streamchat_answers_on_topic", "answers sharing at least one term with their question",
                                registry=r)
        self.safety_hits = Counter("streamchat_safety_hits", "safety rule matches, by stage (input, output), action "
                                   "and rule list", ["stage", "action", "list"], registry=r)
        Gauge("streamchat_queue_depth", "requests waiting for a replica", registry=r).set_function(lambda: pool.waiting)
        Gauge("streamchat_busy_replicas", "replicas running an answer", registry=r).set_function(lambda: pool.busy)
        Gauge("streamchat_replicas", "replicas whose model is loaded", registry=r).set_function(
            lambda: len(pool.replicas))
        r.register(AcceleratorCollector(pool))

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def token_gap(self, seconds: float) -> None:
        """The time between two tokens of one answer."""
        self.inter_token.observe(seconds)
        if seconds > STALL_S:
            self.stalls.inc()

    def replica_busy(self, replica: int, seconds: float) -> None:
        """Replica ``replica`` ran an answer for ``seconds`` (called from its worker thread)."""
        self.busy.labels(str(replica)).inc(seconds)

    def answer_quality(self, question: str, token_ids: list[int], answer: str) -> None:
        """An answer's repetition rate and topic similarity, when it has them (see ``appliance.answer_quality``)."""
        repeated = repetition_rate(token_ids)
        if repeated is not None:
            self.repetition.observe(repeated)
        similarity = topic_similarity(question, answer)
        if similarity is not None:
            self.topic.observe(similarity)
            if similarity > 0:
                self.on_topic.inc()

    def audit(self, audit: AuditLog) -> AuditLog:
        """``audit`` with every rule hit counted in ``streamchat_safety_hits`` too, by stage, action and rule list (a
        rule's id is ``<list file>:<line>``: the list names the category an operator gave it)."""
        return audit.heard_by(lambda match, action, where: self.safety_hits.labels(
            where, action, match.rule.rpartition(":")[0]).inc())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class AcceleratorCollector(Collector):
    """Device memory and utilisation of the replicas whose engine reports them (``appliance.device_usage``);
    nothing at all for engines that cannot tell (every CPU engine)."""

    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool

    def describe(self) -> Iterable[Metric]:
        return []  # the families exist only once an engine reports: nothing to declare up front

    def collect(self) -> Iterator[Metric]:
        labels = ["replica", "device"]
        used = GaugeMetricFamily("streamchat_accelerator_memory_used_bytes", "device memory in use", labels=labels)
        total = GaugeMetricFamily("streamchat_accelerator_memory_total_bytes", "device memory", labels=labels)
        busy = GaugeMetricFamily("streamchat_accelerator_utilisation_ratio", "device busy share", labels=labels)
        for replica in list(self.pool.replicas):
            for usage in device_usage(replica.model.engine):
                key = [str(replica.index), usage.device]
                for family, value in ((used, usage.memory_used_bytes), (total, usage.memory_total_bytes),
                                      (busy, usage.utilisation)):
                    if value is not None:
                        family.add_metric(key, value)
        yield from (family for family in (used, total, busy) if family.samples)
