"""Every Prometheus object of the server, in one registry per server instance.

Prefix ``seqserve_``, base units, ``_total`` on counters, bounded labels (model, method,
code, reason): never a request id. Recorded at boundaries (request, queue wait, encoder,
decoder step, batch fill, rescoring), never inside the pure beam-search core.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
ROW_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "seqserve_requests", "RPCs handled, by final status code", ["model", "method", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "seqserve_request_duration_seconds",
            "RPC wall time",
            ["model", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "seqserve_queue_wait_seconds",
            "time a source waited before joining the decode batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.encoder_seconds = Histogram(
            "seqserve_encoder_duration_seconds", "encoder call wall time", ["model"], buckets=STEP_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "seqserve_decoder_step_duration_seconds",
            "decoder step wall time (graph + beam bookkeeping)",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.rescoring_seconds = Histogram(
            "seqserve_rescoring_duration_seconds",
            "re-ranking one request's n-best lists with the bundle's graphone n-gram",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "seqserve_batch_rows", "hypothesis rows per decoder step", ["model"], buckets=ROW_BUCKETS, registry=r
        )
        self.queue_length = Gauge("seqserve_queue_length", "sources waiting to join the batch", ["model"], registry=r)
        self.active_sources = Gauge(
            "seqserve_active_sources", "sources in the running decode batch", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            "seqserve_generated_tokens", "output tokens returned (best hypothesis)", ["model"], registry=r
        )
        self.unknown_source_tokens = Counter(
            "seqserve_unknown_source_tokens",
            "source tokens outside the model's vocabulary (read as <unk>)",
            ["model"],
            registry=r,
        )
        self.rejected = Counter(
            "seqserve_rejected", "sources refused or dropped, by reason", ["model", "reason"], registry=r
        )
        self.model_ready = Gauge(
            "seqserve_model_ready", "1 if the model version serves, else 0", ["model", "version"], registry=r
        )
