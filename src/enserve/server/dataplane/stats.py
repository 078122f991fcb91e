"""Per-model inference statistics (Triton's ModelStatistics) and their Prometheus collector."""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from enserve.server.protocol import STATUS_OK

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
# Upper bounds (seconds) of the request-latency histogram: buckets add up across daemons, so
# Prometheus can give one p99 for many replicas (Triton's cumulative counters cannot).
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                     0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BUCKET_NS = [round(b * 1e9) for b in LATENCY_BUCKETS_S]


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class ModelStats:
    name: str
    version: str = "1"
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    rejected: int = 0
    durations: dict[str, Duration] = field(default_factory=lambda: {k: Duration() for k in DURATIONS})
    # successful requests by latency bucket (the last one: above every bound)
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_ns: int = 0
    # requests with a latency objective: answers by the number of members combined, answers after
    # the objective or failed, and members not run for an answer (left out or cancelled)
    front_answers: dict[int, int] = field(default_factory=dict)
    objective_misses: int = 0
    members_skipped: int = 0

    def touch(self) -> None:
        self.last_inference_ms = int(time.time() * 1000)


def record_batch(stats: ModelStats, frame, requests: int, members: int) -> None:
    """One batch a worker ran for this member (its compute split evenly among the ``members`` the
    worker ran on the same batch); ``frame`` is the worker's completion."""
    stats.execution_count += 1
    stats.inference_count += frame.rows
    stats.touch()
    d = stats.durations
    d["queue"].add(frame.queue_ns, requests)
    d["compute_input"].add(frame.input_ns * requests // members, requests)
    d["compute_infer"].add(frame.infer_ns * requests // members, requests)
    d["compute_output"].add(frame.output_ns * requests // members, requests)
    own = (frame.input_ns + frame.infer_ns + frame.output_ns) // members
    d["success" if frame.status == STATUS_OK else "fail"].add(frame.queue_ns + own * requests, requests)


def latency_bucket(ns: int) -> int:
    """Index of the histogram bucket of a latency: the first bound >= it (Prometheus' ``le``)."""
    return bisect.bisect_left(_BUCKET_NS, ns)


def record_request(stats: ModelStats, request) -> None:
    """One ensemble request, from its arrival to its answer."""
    t_end = time.perf_counter_ns()
    stats.touch()
    d = stats.durations
    if request.objective_s is not None:
        if request.error is None and request.used is not None:
            stats.front_answers[len(request.used)] = stats.front_answers.get(len(request.used), 0) + 1
            stats.members_skipped += len(request.recipe.weights) - len(request.used)
        if request.error is not None or t_end - request.t0 > request.objective_s * 1e9:
            stats.objective_misses += 1
    if request.error is None:
        stats.inference_count += request.count
        stats.execution_count += 1
        elapsed = t_end - request.t0
        d["success"].add(elapsed)
        stats.latency_counts[latency_bucket(elapsed)] += 1
        stats.latency_sum_ns += elapsed
        d["queue"].add(0)
        d["compute_input"].add(request.t_submit - request.t0)
        d["compute_infer"].add(t_end - request.t_submit)
        d["compute_output"].add(0)
    else:
        d["fail"].add(t_end - request.t0)


class MetricsCollector:
    """Prometheus collector with Triton's metric names, read from the stats at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, ModelStats]],
                 queue_depth: Callable[[], dict[str, int]] | None = None,
                 worker_tasks: Callable[[], dict[str, int]] | None = None,
                 request_bytes: Callable[[], int] | None = None) -> None:
        self.stats = stats  # read at each scrape: the models loaded then
        self.queue_depth = queue_depth
        self.worker_tasks = worker_tasks
        self.request_bytes = request_bytes

    def collect(self) -> Iterable:
        labels = ["model", "version"]
        stats = self.stats()

        def family(name: str, doc: str, value) -> Metric:
            # Triton's counters carry no "_total" suffix: write the samples under the exact name
            fam = Metric(name, doc, "counter")
            for s in stats.values():
                fam.add_sample(name, dict(zip(labels, (s.name, s.version))), value(s))
            return fam

        yield family("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
                     lambda s: s.durations["success"].count)
        yield family("nv_inference_request_failure", "Number of failed inference requests, all batch sizes",
                     lambda s: s.durations["fail"].count)
        yield family("nv_inference_count", "Number of inferences performed (a batch of n counts n)",
                     lambda s: s.inference_count)
        yield family("nv_inference_exec_count", "Number of model executions performed (a batch counts 1)",
                     lambda s: s.execution_count)
        yield family("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds",
                     lambda s: (s.durations["success"].ns + s.durations["fail"].ns) / 1000)
        yield family("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds",
                     lambda s: s.durations["queue"].ns / 1000)
        yield family("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds",
                     lambda s: s.durations["compute_input"].ns / 1000)
        yield family("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds",
                     lambda s: s.durations["compute_infer"].ns / 1000)
        yield family("nv_inference_compute_output_duration_us", "Cumulative compute output duration in microseconds",
                     lambda s: s.durations["compute_output"].ns / 1000)
        yield family("nv_inference_request_rejected", "Requests refused at once because the server was full",
                     lambda s: s.rejected)
        histogram = HistogramMetricFamily(
            "enserve_request_duration_seconds", "Successful requests by latency, arrival to answer "
            "(its buckets add up across daemons)", labels=labels)
        bounds = [*map(str, LATENCY_BUCKETS_S), "+Inf"]
        for s in stats.values():
            if any(s.latency_counts):  # models asked directly (members only run batches)
                cumulative = list(itertools.accumulate(s.latency_counts))
                histogram.add_metric([s.name, s.version], list(zip(bounds, cumulative)), s.latency_sum_ns / 1e9)
        yield histogram
        answers = CounterMetricFamily("enserve_front_answers", "Answers to requests with a latency objective, by "
                                      "the number of members they combined", labels=[*labels, "members"])
        misses = CounterMetricFamily("enserve_objective_misses", "Requests with a latency objective answered "
                                     "after it or failed", labels=labels)
        skipped = CounterMetricFamily("enserve_members_skipped", "Members not run for answers to requests with a "
                                      "latency objective (left out of their front point, or cancelled)", labels=labels)
        for s in stats.values():
            for members, count in sorted(s.front_answers.items()):
                answers.add_metric([s.name, s.version, str(members)], count)
            if s.front_answers or s.objective_misses:
                misses.add_metric([s.name, s.version], s.objective_misses)
                skipped.add_metric([s.name, s.version], s.members_skipped)
        yield answers
        yield misses
        yield skipped
        if self.queue_depth is not None:
            gauge = GaugeMetricFamily("nv_inference_pending_request_count", "Requests in flight", labels=labels)
            for name, depth in self.queue_depth().items():
                gauge.add_metric([name, "1"], depth)
            yield gauge
        if self.worker_tasks is not None:
            gauge = GaugeMetricFamily("enserve_worker_tasks", "Tasks handed to a worker group and not yet done "
                                      "or skipped (live and cancelled)", labels=["group"])
            for group, count in self.worker_tasks().items():
                gauge.add_metric([group], count)
            yield gauge
        if self.request_bytes is not None:
            yield GaugeMetricFamily("enserve_inflight_request_bytes", "Request bytes held by requests being "
                                    "received, computed or answered (bounded by --max-inflight-bytes)",
                                    value=self.request_bytes())
