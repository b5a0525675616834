"""Prometheus metrics in the text exposition format, with no client library.

Names follow tensorflow_model_server's (`/tensorflow/serving/...` becomes
`:tensorflow:serving:...` in Prometheus), labelled per model, version, API and status,
so dashboards built for the real server keep working for the parts we cover.
"""

from __future__ import annotations

import bisect
import threading
import time

# Latency buckets in microseconds (TF Serving reports request latency in us).
LATENCY_BUCKETS_US = (100, 250, 500, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 1e7)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DEFAULT_PATH = "/monitoring/prometheus/metrics"


def _labels(pairs) -> str:
    if not pairs:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in pairs) + "}"


class Counter:
    def __init__(self, name, help_, label_names):
        self.name, self.help, self.label_names = name, help_, tuple(label_names)
        self._values: dict[tuple, float] = {}

    def inc(self, *labels, amount=1.0):
        self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels) -> float:
        return self._values.get(labels, 0.0)

    def render(self):
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, v in sorted(self._values.items()):
            yield f"{self.name}{_labels(zip(self.label_names, labels))} {v:g}"


class Histogram:
    def __init__(self, name, help_, label_names, buckets):
        self.name, self.help, self.label_names, self.buckets = name, help_, tuple(label_names), tuple(buckets)
        self._values: dict[tuple, list] = {}  # labels -> [bucket counts..., +Inf count, sum]

    def observe(self, value, *labels):
        row = self._values.setdefault(labels, [0] * (len(self.buckets) + 1) + [0.0])
        row[bisect.bisect_left(self.buckets, value)] += 1
        row[-1] += value

    def count(self, *labels) -> int:
        return sum(self._values.get(labels, [0, 0.0])[:-1])

    def render(self):
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for labels, row in sorted(self._values.items()):
            pairs = list(zip(self.label_names, labels))
            cumulative = 0
            for bound, n in zip(list(self.buckets) + ["+Inf"], row[:-1]):
                cumulative += n
                le = bound if bound == "+Inf" else f"{bound:g}"
                yield f"{self.name}_bucket{_labels(pairs + [('le', le)])} {cumulative}"
            yield f"{self.name}_sum{_labels(pairs)} {row[-1]:g}"
            yield f"{self.name}_count{_labels(pairs)} {cumulative}"


class ServerMetrics:
    """The server's metrics; thread-safe through one lock (updates are tiny)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.request_count = Counter(
            ":tensorflow:serving:request_count", "The total number of requests.",
            ("model_name", "model_version", "api", "entrypoint", "status"))
        self.request_latency = Histogram(
            ":tensorflow:serving:request_latency", "Distribution of request latency in microseconds.",
            ("model_name", "model_version", "api", "entrypoint"), LATENCY_BUCKETS_US)
        self.batch_size = Histogram(
            ":tensorflow:serving:batching_session:processed_batch_size", "Rows per model call made by the batcher.",
            ("model_name", "model_version", "signature_name"), BATCH_BUCKETS)
        self._all = (self.request_count, self.request_latency, self.batch_size)

    def record_request(self, model, version, api, entrypoint, status, seconds):
        with self._lock:
            self.request_count.inc(model or "", version or "", api, entrypoint, status)
            self.request_latency.observe(seconds * 1e6, model or "", version or "", api, entrypoint)

    def record_batch(self, model, version, signature, rows):
        with self._lock:
            self.batch_size.observe(rows, model, str(version), signature)

    def render(self) -> str:
        with self._lock:
            return "\n".join(line for metric in self._all for line in metric.render()) + "\n"


class Timer:
    """`with Timer() as t: ...; t.seconds` — request latency without repeating time calls."""

    def __enter__(self):
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
        return False
