"""Serving endpoint health metrics in the Prometheus text format of
``GET /api/2.0/serving-endpoints/{name}/metrics``: the local workspace records and renders them,
and :func:`parse_endpoint_metrics` reads them back from it or from a real Databricks workspace.

Databricks reports each metric over the last minute, per served entity; so does
:class:`RequestWindow`, by keeping per-second totals rather than every request, which bounds its
memory at any request rate.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

WINDOW_S = 60
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REQUESTS = "request_count_total"
ERRORS_4XX = "request_4xx_count_total"
ERRORS_5XX = "request_5xx_count_total"
LATENCY = "request_latency_ms"
LABELS = ("endpoint_name", "served_entity_name")
# endpoint-wide, since the server started: inference table rows dropped because too many waited to
# be written (a local workspace extension; Databricks' export has no such sample)
ROWS_DROPPED = "inference_rows_dropped"

# A geometric ladder from 1 ms to 65.5 s, four buckets per doubling: interpolating inside a bucket
# is then off by at most 19 %, at any latency a served model can have.
LATENCY_BUCKETS_MS: tuple[float, ...] = tuple(round(2 ** (i / 4), 3) for i in range(65))


@dataclass
class RequestStats:
    """Totals of one served entity over a span of time."""

    requests: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    latency_sum_ms: float = 0.0
    # per bucket of LATENCY_BUCKETS_MS, then one for everything slower (+Inf); not cumulative
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))

    def add(self, status: int, latency_ms: float) -> None:
        self.requests += 1
        self.errors_4xx += 400 <= status < 500
        self.errors_5xx += status >= 500
        self.latency_sum_ms += latency_ms
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1

    def merge(self, other: RequestStats) -> None:
        self.requests += other.requests
        self.errors_4xx += other.errors_4xx
        self.errors_5xx += other.errors_5xx
        self.latency_sum_ms += other.latency_sum_ms
        self.latency_counts = [a + b for a, b in zip(self.latency_counts, other.latency_counts)]


class RequestWindow:
    """Requests per (endpoint, served entity) over the last ``window_s`` seconds; thread-safe."""

    def __init__(self, window_s: int = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        # second -> totals, in time order (dicts keep insertion order), so pruning stops early
        self._seconds: dict[tuple[str, str], dict[int, RequestStats]] = {}

    def record(self, endpoint: str, entity: str, status: int, latency_ms: float) -> None:
        now = int(self._clock())
        with self._lock:
            seconds = self._seconds.setdefault((endpoint, entity), {})
            seconds.setdefault(now, RequestStats()).add(status, latency_ms)
            self._prune(seconds, now)

    def totals(self, endpoint: str) -> dict[str, RequestStats]:
        """Served entity -> its totals in the window, for every entity with a request in it."""
        now = int(self._clock())
        out: dict[str, RequestStats] = {}
        with self._lock:
            for (ep, entity), seconds in self._seconds.items():
                if ep != endpoint:
                    continue
                self._prune(seconds, now)
                for stats in seconds.values():
                    out.setdefault(entity, RequestStats()).merge(stats)
        return out

    def forget(self, endpoint: str) -> None:
        with self._lock:
            for key in [k for k in self._seconds if k[0] == endpoint]:
                del self._seconds[key]

    def _prune(self, seconds: dict[int, RequestStats], now: int) -> None:
        for second in list(seconds):
            if second > now - self._window_s:
                break
            del seconds[second]


class _EndpointCollector(Collector):
    def __init__(self, endpoint: str, totals: Mapping[str, RequestStats], rows_dropped: int | None):
        self._endpoint = endpoint
        self._totals = totals
        self._rows_dropped = rows_dropped

    def collect(self) -> Iterator[Metric]:
        window = f"in the last {WINDOW_S} s"
        counts = {
            REQUESTS: GaugeMetricFamily(REQUESTS, f"requests {window}", labels=LABELS),
            ERRORS_4XX: GaugeMetricFamily(ERRORS_4XX, f"responses with a 4xx status {window}", labels=LABELS),
            ERRORS_5XX: GaugeMetricFamily(ERRORS_5XX, f"responses with a 5xx status {window}", labels=LABELS),
        }
        latency = HistogramMetricFamily(LATENCY, f"round-trip latency of the requests {window}", labels=LABELS)
        for entity, stats in sorted(self._totals.items()):
            labels = [self._endpoint, entity]
            counts[REQUESTS].add_metric(labels, stats.requests)
            counts[ERRORS_4XX].add_metric(labels, stats.errors_4xx)
            counts[ERRORS_5XX].add_metric(labels, stats.errors_5xx)
            cumulative = list(itertools.accumulate(stats.latency_counts))
            bounds = [floatToGoString(b) for b in LATENCY_BUCKETS_MS] + ["+Inf"]
            latency.add_metric(labels, list(zip(bounds, cumulative)), stats.latency_sum_ms)
        yield from counts.values()
        yield latency
        if self._rows_dropped is not None:
            dropped = CounterMetricFamily(ROWS_DROPPED, "inference table rows dropped since the server started, "
                                                        "because too many were waiting to be written",
                                          labels=["endpoint_name"])
            dropped.add_metric([self._endpoint], self._rows_dropped)
            yield dropped


def render_endpoint_metrics(endpoint: str, totals: Mapping[str, RequestStats], rows_dropped: int | None = None) -> bytes:
    """The Prometheus text exposition of one endpoint's served entities, and with ``rows_dropped``
    (an endpoint with an inference table) the ``inference_rows_dropped_total`` counter."""
    from prometheus_client import generate_latest

    # a private registry: the process-wide default one would add this process' own metrics
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EndpointCollector(endpoint, totals, rows_dropped))
    return generate_latest(registry)


def parse_rows_dropped(text: str) -> int | None:
    """The ``inference_rows_dropped_total`` of a metrics export; None when it has none."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{ROWS_DROPPED}_total":
                return int(sample.value)
    return None


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a histogram given as (upper bound, cumulative count) pairs, as
    Prometheus' ``histogram_quantile`` computes it: linear inside the bucket that holds the rank,
    the highest finite bound when the rank falls in +Inf, None for an empty histogram."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in ordered:
        if cumulative >= rank:  # always reached: the last count is the total
            break
        lower, below = upper, cumulative
    if upper == float("inf"):
        return lower
    if cumulative == below:  # q == 0 on empty leading buckets
        return upper
    return lower + (upper - lower) * (rank - below) / (cumulative - below)


def parse_endpoint_metrics(text: str) -> dict[str, dict]:
    """Served entity -> ``requests``, ``errors_4xx``, ``errors_5xx``, ``error_rate`` (server errors,
    5xx, per request: what a served model's own failures cost; 0.0 without requests),
    ``client_error_rate`` (4xx per request: bad requests, kept apart since a caller's mistakes say
    nothing of the model), ``throughput_rps`` (requests per second over the minute) and
    ``latency_p50_ms``, ``latency_p95_ms``, ``latency_p99_ms`` (None without requests).

    Samples are matched by name, not by family, so the counts read the same whether a server
    types them as gauges or counters; samples without a ``served_entity_name`` label (endpoint-wide
    CPU or memory gauges) are not per entity and are skipped.
    """
    counts: dict[str, dict[str, float]] = {}
    latency_buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            entity = sample.labels.get("served_entity_name")
            if entity is None:
                continue
            if sample.name in (REQUESTS, ERRORS_4XX, ERRORS_5XX):
                per_entity = counts.setdefault(entity, {})
                per_entity[sample.name] = per_entity.get(sample.name, 0.0) + sample.value
            elif sample.name == f"{LATENCY}_bucket":
                bound = float(sample.labels["le"])
                per_entity = latency_buckets.setdefault(entity, {})
                per_entity[bound] = per_entity.get(bound, 0.0) + sample.value

    out: dict[str, dict] = {}
    for entity in sorted(counts.keys() | latency_buckets.keys()):
        c = counts.get(entity, {})
        requests = int(c.get(REQUESTS, 0))
        errors_4xx, errors_5xx = int(c.get(ERRORS_4XX, 0)), int(c.get(ERRORS_5XX, 0))
        buckets = list(latency_buckets.get(entity, {}).items())
        out[entity] = {
            "requests": requests,
            "errors_4xx": errors_4xx,
            "errors_5xx": errors_5xx,
            "error_rate": errors_5xx / requests if requests else 0.0,
            "client_error_rate": errors_4xx / requests if requests else 0.0,
            "throughput_rps": requests / WINDOW_S,
            **{f"latency_p{q}_ms": histogram_quantile(q / 100, buckets) if requests else None for q in (50, 95, 99)},
        }
    return out
